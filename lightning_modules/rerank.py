"""The re-ranker: a second audio LLM that reads a query and a candidate together (AuroLA-rerank)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import move_data_to_device

from datamodules.rerank import DIRECTIONS, RerankCollator, RerankPrompts
from lightning_modules.backbones.base import Backbone
from lightning_modules.finetune import FineTuneModule
from lightning_modules.metrics import score_matrix_metrics
from losses.pointwise import PointwiseYesNo
from losses.rerank import RerankLoss, RerankScores


def fuse(scores: torch.Tensor, candidates: torch.Tensor, probabilities: torch.Tensor, alpha: float) -> torch.Tensor:
    """Fused scores ``s + α·p`` on every query's top-k candidates, ``s`` elsewhere.

    ``scores`` is the ``(Q, C)`` embedding similarity, ``candidates`` the ``(Q, k)`` columns of each
    query's top k, ``probabilities`` the re-ranker's ``(Q, k)`` p for them. No relevance label is read:
    every top-k candidate is fused the same way (AuroLA's A2T fusion added α·p only to the query's own
    captions).
    """
    return scores.scatter_add(1, candidates, alpha * probabilities.to(scores.dtype))


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, for left or right padding."""
    width = attention_mask.shape[1]
    return width - 1 - attention_mask.flip(1).to(torch.int64).argmax(1)


def token_id(tokenizer: Any, word: str) -> int:
    """The first token of ``word`` (the answer token the re-ranker's score reads)."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if not ids:
        raise ValueError(f"the tokenizer gives no token for the answer {word!r}")
    return ids[0]


class RerankModule(FineTuneModule):
    """Cross-modal re-ranker: ``p = softmax(logit_Yes, logit_No)[Yes]`` at the answer position of one
    prompt holding a query and a candidate; retrieval then ranks the embedding model's top ``k`` by
    ``s + α·p`` (AuroLA's retrieve-then-rerank, arXiv 2602.18010, §3.3 and its rerank code).

    **Training** reads groups of prompts from the data module (``hard_negatives`` / ``num_negatives``
    of :class:`~datamodules.RetrievalDataModule`): per clip, a direction (A2T: the clip's audio as
    query, its caption and the captions of mined neighbours as candidates; T2A: a caption as query,
    the clip's audio and its mined neighbours' audio as candidates), and the ``loss`` plugin scores
    the group (:class:`~losses.PointwiseYesNo` as AuroLA, or :class:`~losses.ListwiseSoftmax`).

    **Validation and test** take every clip of the set, score the set with the embedding model
    (``embedding_ckpt`` or ``embedding_export``, frozen, outside this module's weights), take each
    query's top ``k`` in both directions, score those pairs with the re-ranker, and fuse. α is chosen
    per direction on the validation set (best fused R@1 over ``alpha_grid``, then mAP@10, then the
    smallest α) and kept in checkpoints; test applies it. Logged: the embedding-only metrics
    (``<stage>/t2a/R@1`` ...), the fused ones (``<stage>/rerank/t2a/R@1`` ...), ``<stage>/rerank/alpha_t2a``,
    ``alpha_a2t`` and ``k``. The fusion never reads relevance labels (see :func:`fuse`).

    The A2T candidates of one query share the prompt up to the candidate (instruction and query
    audio): with ``cache_prefix`` that prefix runs once per query and its key/value cache serves all
    k candidates, instead of re-encoding the audio k times as AuroLA does. T2A prompts put the
    candidate's audio after the shared text, so there is nothing expensive to share and they run
    whole.

    Non-finite guard, RNG state, FSDP2, LoRA/QLoRA and bf16 are the embedding recipes' (callbacks,
    strategy, backbone), unchanged.

    Args:
        backbone: the audio LLM, built with its LM head (``QwenOmniThinker(lm_head=true,
            emb_token=null)``; MiDashengLM always has it).
        loss: re-ranking loss on the answer logits.
        prompts: AuroLA's prompt and answer words.
        k: candidates re-ranked per query (AuroLA: 50).
        alpha_grid: fusion weights tried on the validation set.
        alpha_t2a: fixed α for T2A instead of choosing it on the validation set.
        alpha_a2t: fixed α for A2T.
        embedding_ckpt: the stage-1 embedding model's Lightning checkpoint (its run's config.yaml
            next to ``checkpoints/``, or ``embedding_config``).
        embedding_config: the embedding run's config, when not next to its checkpoint.
        embedding_export: an exported embedding model directory, instead of a checkpoint.
        cache_prefix: share each A2T query's prefix (key/value cache) over its k candidates.
        eval_batch_size: prompts scored per forward pass in evaluation.
        init_from: trainable weights of an earlier run to start from.
        **kwargs: optimiser settings of :class:`FineTuneModule`.
    """

    def __init__(
        self,
        backbone: Backbone,
        loss: RerankLoss | None = None,
        prompts: RerankPrompts | None = None,
        k: int = 50,
        alpha_grid: list[float] | None = None,
        alpha_t2a: float | None = None,
        alpha_a2t: float | None = None,
        embedding_ckpt: str | None = None,
        embedding_config: str | None = None,
        embedding_export: str | None = None,
        cache_prefix: bool = True,
        eval_batch_size: int = 16,
        init_from: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["backbone", "loss"])
        if backbone.output_head is None:
            raise ValueError(f"{type(backbone).__name__} has no LM head: build it with lm_head: true")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if embedding_ckpt is not None and embedding_export is not None:
            raise ValueError("give embedding_ckpt or embedding_export, not both")
        self.backbone = backbone
        self.loss = loss if loss is not None else PointwiseYesNo()
        self.prompts = prompts or RerankPrompts()
        self.answer_ids = (token_id(backbone.tokenizer, self.prompts.yes), token_id(backbone.tokenizer, self.prompts.no))
        if self.answer_ids[0] == self.answer_ids[1]:
            raise ValueError(f"the answers {self.prompts.yes!r} and {self.prompts.no!r} start with the same token")
        self.collate = RerankCollator(backbone.collator(generation_prompt=True), self.prompts)
        self.k = k
        self.alpha_grid = list(alpha_grid) if alpha_grid is not None else [round(0.1 * i, 1) for i in range(31)]
        #: α per direction: fixed by the config or chosen on the validation set (kept in checkpoints).
        self.alpha: dict[str, float | None] = {"t2a": alpha_t2a, "a2t": alpha_a2t}
        self._fixed_alpha = {name for name, value in self.alpha.items() if value is not None}
        #: fused R@1 per α of the last validation, per direction (the report plots it).
        self.alpha_curves: dict[str, list[tuple[float, float]]] = {}
        self.test_results: dict[str, float] = {}
        self._clips: list[dict[str, Any]] = []
        self.init_trainable_from(init_from)

    # --- scoring -------------------------------------------------------------------------------

    def answer_scores(self, hidden: torch.Tensor, group_size: int) -> RerankScores:
        """Yes/No logits and the vocabulary's log-normaliser from answer-position states ``(N, H)``."""
        logits = self.backbone.output_head(hidden).float()
        return RerankScores(logits[:, list(self.answer_ids)], logits.logsumexp(-1), group_size)

    def score(self, inputs: dict[str, torch.Tensor], group_size: int = 1) -> RerankScores:
        """Score collated generation prompts (each a whole (query, candidate) pair)."""
        out = self.backbone(inputs)
        rows = torch.arange(out.hidden_states.shape[0], device=out.hidden_states.device)
        hidden = out.hidden_states[rows, last_positions(out.attention_mask)]
        return self.answer_scores(hidden, group_size)

    def score_with_prefix(self, inputs: dict[str, torch.Tensor]) -> RerankScores:
        """Score prompts that share one query prefix, running the prefix once (see the class docstring)."""
        hidden = self.backbone.forward_shared_prefix(inputs)
        return self.answer_scores(hidden, 1)

    # --- training ------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if batch.get("empty"):
            return None
        out = self.loss(self.score(batch["inputs"], batch["group_size"]))
        size = len(batch["clip_ids"])
        self.log("train/loss", out.loss.detach(), prog_bar=True, batch_size=size)
        self.log_dict({f"train/{k}": v for k, v in out.logs.items()}, batch_size=size)
        return out.loss

    # --- evaluation ----------------------------------------------------------------------------

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect(batch, dataloader_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect(batch, dataloader_idx)

    def _collect(self, batch: dict[str, Any], dataloader_idx: int) -> None:
        if dataloader_idx > 0:
            raise ValueError("RerankModule evaluates one set: give the data module a single val/test set")
        if not batch.get("empty"):
            self._clips.extend(batch["clips"])

    def on_validation_epoch_end(self) -> None:
        values = self._evaluate("val", choose_alpha=True)
        self.log_dict(values, sync_dist=False)

    def on_test_epoch_end(self) -> None:
        values = self._evaluate("test", choose_alpha=False)
        self.log_dict(values, sync_dist=False)
        self.test_results = {key: float(value) for key, value in values.items()}

    def _gathered_clips(self) -> list[dict[str, Any]]:
        clips, self._clips = self._clips, []
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            shards: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(shards, clips)
            clips = [clip for shard in shards for clip in shard]
        # Distributed samplers pad with repeats; keep each clip once, in set order.
        unique = {clip["clip_index"]: clip for clip in clips}
        return [unique[index] for index in sorted(unique)]

    def _evaluate(self, stage: str, choose_alpha: bool) -> dict[str, torch.Tensor]:
        clips = self._gathered_clips()
        if not clips:
            return {}
        waves = [clip["audio"] for clip in clips]
        captions = [text for clip in clips for text in clip["captions"]]
        caption_clip = torch.tensor([i for i, clip in enumerate(clips) for _ in clip["captions"]])
        audio_emb, text_emb = self._embed_set(waves, captions)
        relevant_t2a = caption_clip[:, None] == torch.arange(len(clips))[None, :]
        similarity = {"t2a": text_emb @ audio_emb.T, "a2t": audio_emb @ text_emb.T}
        relevant = {"t2a": relevant_t2a, "a2t": relevant_t2a.T.contiguous()}
        values: dict[str, torch.Tensor] = {}
        for direction in DIRECTIONS:
            scores = similarity[direction]
            if self.k > scores.shape[1]:
                raise ValueError(
                    f"k = {self.k} exceeds the {scores.shape[1]} candidates of {stage} {direction}; lower model.k"
                )
            candidates = scores.topk(self.k, dim=1).indices
            p = self._rerank(direction, candidates, waves, captions, caption_clip)
            values.update(score_matrix_metrics(scores, relevant[direction], f"{stage}/{direction}"))
            if choose_alpha and direction not in self._fixed_alpha:
                self.alpha[direction] = self._choose_alpha(direction, scores, candidates, p, relevant[direction])
            alpha = self.alpha[direction]
            if alpha is None:
                raise ValueError(f"no α for {direction}: validate first (fit does) or set model.alpha_{direction}")
            fused = fuse(scores, candidates, p, alpha)
            values.update(score_matrix_metrics(fused, relevant[direction], f"{stage}/rerank/{direction}"))
            values[f"{stage}/rerank/alpha_{direction}"] = torch.tensor(float(alpha))
        values[f"{stage}/rerank/k"] = torch.tensor(float(self.k))
        return values

    def _choose_alpha(
        self, direction: str, scores: torch.Tensor, candidates: torch.Tensor, p: torch.Tensor, relevant: torch.Tensor
    ) -> float:
        results = []
        for alpha in self.alpha_grid:
            metrics = score_matrix_metrics(fuse(scores, candidates, p, alpha), relevant, "m")
            results.append((float(metrics["m/R@1"]), float(metrics["m/mAP@10"]), -alpha, alpha))
        self.alpha_curves[direction] = [(alpha, r1) for r1, _, _, alpha in results]
        return max(results)[3]

    def _embed_set(self, waves: list[np.ndarray], captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The embedding model's L2-normalised audio and caption embeddings of the set (CPU, float32)."""
        model = self._embedding_model()
        # Every rank embeds the whole set, so every rank fuses identically (eval sets are small next to
        # the re-ranker's k pairs per query).
        audio = model.encode(audio=waves, max_seconds=None, batch_size=self.hparams.eval_batch_size)
        text = model.encode(text=captions, batch_size=self.hparams.eval_batch_size)
        return audio, text

    def _embedding_model(self):
        from lightning_modules.tools.encoder import EmbeddingModel

        # Kept outside the module's parameters: it is frozen and must not enter checkpoints.
        model = self.__dict__.get("_embedder")
        if model is None:
            if self.hparams.embedding_export is not None:
                model = EmbeddingModel.from_pretrained(self.hparams.embedding_export)
            elif self.hparams.embedding_ckpt is not None:
                model = EmbeddingModel.from_checkpoint(self.hparams.embedding_ckpt, self.hparams.embedding_config)
            else:
                raise ValueError("evaluation needs the embedding model: set model.embedding_ckpt or embedding_export")
            model.requires_grad_(False)
            self.__dict__["_embedder"] = model
        return model.to(self.device)

    def _rerank(
        self,
        direction: str,
        candidates: torch.Tensor,
        waves: list[np.ndarray],
        captions: list[str],
        caption_clip: torch.Tensor,
    ) -> torch.Tensor:
        """The re-ranker's p for every (query, top-k candidate) pair of one direction, ``(Q, k)``.

        The queries are split over the processes; every process gets every p back.
        """
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        queries = list(range(rank, candidates.shape[0], world))
        mine = {}
        with torch.no_grad():
            for query in queries:
                if direction == "a2t":
                    pairs = [self.prompts.pair("a2t", waves[query], captions[c]) for c in candidates[query].tolist()]
                else:
                    pairs = [self.prompts.pair("t2a", waves[c], captions[query]) for c in candidates[query].tolist()]
                mine[query] = self._score_pairs(pairs, shared_prefix=direction == "a2t")
        if world > 1:
            shards: list[Any] = [None] * world
            dist.all_gather_object(shards, mine)
            mine = {query: p for shard in shards for query, p in shard.items()}
        return torch.stack([mine[query] for query in range(candidates.shape[0])])

    def _score_pairs(self, pairs: list, shared_prefix: bool) -> torch.Tensor:
        size = self.hparams.eval_batch_size
        parts = []
        for begin in range(0, len(pairs), size):
            inputs = move_data_to_device(self.collate.backbone_collator(pairs[begin : begin + size]), self.device)
            use_cache = shared_prefix and self.hparams.cache_prefix
            scores = self.score_with_prefix(inputs) if use_cache else self.score(inputs)
            parts.append(torch.sigmoid(scores.match_logit()).cpu())
        return torch.cat(parts)

    # --- checkpoints ---------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["rerank_alpha"] = dict(self.alpha)
        checkpoint["rerank_alpha_curves"] = {d: [list(point) for point in c] for d, c in self.alpha_curves.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        for direction, value in checkpoint.get("rerank_alpha", {}).items():
            if direction not in self._fixed_alpha:
                self.alpha[direction] = value
        self.alpha_curves = {d: [tuple(point) for point in c] for d, c in checkpoint.get("rerank_alpha_curves", {}).items()}


__all__ = ["RerankModule", "fuse", "last_positions"]
