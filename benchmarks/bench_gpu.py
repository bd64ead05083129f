"""Throughput, MFU and peak memory of one LoRA training step of the 7B backbones on a CUDA GPU.

Usage:
    python benchmarks/bench_gpu.py [--models qwen-omni-7b midashenglm-7b] [--pairs 16] [--audio-seconds 10]
    python benchmarks/bench_gpu.py --tiny      # tiny shapes, also on CPU: checks the script only

Each model is built with random weights at the shapes of the published 7B checkpoints, on the meta
device, then materialised on the GPU with ``to_empty`` and initialised there (no download, no host
copy). A step embeds ``--pairs`` audio queries (audio + a short prompt) and as many text documents
(``--text-tokens`` tokens), takes the last token's state as the embedding, applies a symmetric
InfoNCE loss and runs AdamW on the LoRA adapters (``q_proj``, ``k_proj``, ``v_proj``, rank 16) in
bfloat16. The audio encoder is frozen. Rows: with and without QLoRA (NF4 language model, double
quantisation, bfloat16 compute) and activation checkpointing of the language model.

FLOPs of a step (what MFU divides by time × peak). A LoRA step does not cost 6 × N per token:
with the base weights frozen there are no weight gradients for them. For the N matmul weights of
the decoder layers and T decoder tokens:

- forward through the decoder: 2·N·T;
- backward through the activations, needed down to the first layer because every layer has
  adapters: 2·N·T;
- weight gradients: only for the adapters, 2·N_lora·T (and their forward and activation backward,
  another 4·N_lora·T);
- attention scores and values, per layer and sequence of length S: 4·d·S² forward and twice that
  backward, halved for causal masking: 6·d·S² per layer (the PaLM count, halved);
- the frozen audio path runs forward only: 2·N_audio·T_audio, with N_audio its ≥2-D weights and
  T_audio its encoder tokens. Front-end convolutions and the projector are counted at the encoder
  token rate and encoder attention is left out; the audio path is under a tenth of the step at
  the default shapes, so this moves MFU little.

So decoder matmuls cost ≈ 4·N·T rather than 6·N·T. Activation checkpointing recomputes the
forward (another 2·N·T) which is not counted: this is model FLOPs utilisation, not hardware FLOPs
utilisation. QLoRA runs the same matmuls after dequantising NF4 weights to bfloat16, so its FLOPs
are the same and its MFU shows the dequantisation overhead. Tokens are real tokens (no padding:
all queries, and all documents, have the same length). Peak memory is
``torch.cuda.max_memory_allocated`` over the timed steps (weights, optimizer state, activations).

MFU target: ≥ 40 % of the dense bfloat16 peak, 989 TFLOP/s on H100 SXM and H200 (``--peak-tflops``
for other GPUs).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# Runs from a checkout without installing the package (``--help`` on any machine).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_modules.adapters import LoraSettings, add_lora, quantize_linear_4bit  # noqa: E402
from lightning_modules.backbones.dasheng import num_encoder_patches  # noqa: E402
from lightning_modules.backbones.midashenglm import MiDashengLM, MiDashengLMConfig, decoder_hidden_states  # noqa: E402
from lightning_modules.backbones.midashenglm import audio_token_count as dasheng_audio_tokens  # noqa: E402
from lightning_modules.backbones.qwen_omni import audio_token_count as qwen_audio_tokens  # noqa: E402

H100_BF16_DENSE_TFLOPS = 989.0
PROMPT_TOKENS = 24


@dataclass
class Built:
    """A model ready to train and how to run it.

    Attributes:
        model: the whole model.
        language_model: the text decoder (its layers' linears are the N of the FLOP count).
        audio: the frozen audio path (encoder and projector).
        queries: audio-query inputs of the step.
        documents: text-document inputs of the step.
        forward: ``forward(model, inputs)`` → last hidden states ``(B, S, H)``.
        audio_tokens: encoder tokens of the step's audio.
    """

    model: nn.Module
    language_model: nn.Module
    audio: nn.Module
    queries: dict[str, torch.Tensor]
    documents: dict[str, torch.Tensor]
    forward: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    audio_tokens: int


def text_ids(batch: int, length: int, vocab: int, special: set[int], generator: torch.Generator) -> torch.Tensor:
    """Random token ids that are not special tokens."""
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    for token in special:
        ids[ids == token] = next(i for i in range(vocab) if i not in special)
    return ids


def qwen_thinker_config(tiny: bool):
    """Qwen2.5-Omni-7B thinker shapes (or tiny ones); the vision tower is dropped after building."""
    from transformers import Qwen2_5OmniThinkerConfig

    if tiny:
        from lightning_modules.backbones.offline_tokenizer import build_offline_tokenizer
        from lightning_modules.backbones.qwen_omni import QWEN_SPECIAL_TOKENS, tiny_thinker_config

        tokenizer = build_offline_tokenizer(QWEN_SPECIAL_TOKENS, pad_token="<|endoftext|>", eos_token="<|im_end|>")
        return tiny_thinker_config(tokenizer, num_mel_bins=128, width=64)
    return Qwen2_5OmniThinkerConfig(
        audio_config=dict(d_model=1280, encoder_attention_heads=20, encoder_ffn_dim=5120, encoder_layers=32,
                          num_mel_bins=128, max_source_positions=1500, n_window=100, output_dim=3584),
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
                         max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        audio_token_index=151646, image_token_index=151655, video_token_index=151656, audio_start_token_id=151647,
        audio_end_token_id=151648, vision_start_token_id=151652, vision_end_token_id=151653,
        position_id_per_seconds=25, seconds_per_chunk=2,
    )


def materialise(model: nn.Module, device: torch.device) -> nn.Module:
    """Allocate a meta-device ``model`` in bfloat16 on ``device``, uninitialised, except that the
    BatchNorm running statistics are reset (mean 0, variance 1): no initialiser below touches these
    buffers, and whatever the fresh memory held (NaN included) would reach the eval-mode audio
    encoder's output."""
    model = model.to(torch.bfloat16).to_empty(device=device)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
    return model


def build_qwen(args: argparse.Namespace, device: torch.device) -> Built:
    from transformers import Qwen2_5OmniThinkerModel

    config = qwen_thinker_config(args.tiny)
    config._attn_implementation = args.attn
    with torch.device("meta"):
        model = Qwen2_5OmniThinkerModel(config)
    del model.visual
    model = materialise(model, device)
    # HF's initialiser also recomputes the buffers (rotary frequencies, sinusoidal positions).
    model.apply(model._init_weights)
    g = torch.Generator().manual_seed(0)
    frames = int(args.audio_seconds * 100)  # Whisper features: 10 ms hop
    n_audio = int(qwen_audio_tokens(frames))
    special = {config.audio_token_index, config.audio_start_token_id, config.audio_end_token_id,
               config.image_token_index, config.video_token_index}
    vocab = config.text_config.vocab_size
    prompt = text_ids(args.pairs, PROMPT_TOKENS, vocab, special, g)
    audio = [config.audio_start_token_id] + [config.audio_token_index] * n_audio + [config.audio_end_token_id]
    audio = torch.tensor(audio).expand(args.pairs, -1)
    query_ids = torch.cat([prompt[:, : PROMPT_TOKENS // 2], audio, prompt[:, PROMPT_TOKENS // 2:]], 1)
    features = torch.randn(args.pairs, config.audio_config.num_mel_bins, frames, generator=g)
    queries = {
        "input_ids": query_ids,
        "attention_mask": torch.ones_like(query_ids),
        "input_features": features.to(torch.bfloat16),
        "feature_attention_mask": torch.ones(args.pairs, frames, dtype=torch.long),
    }
    doc_ids = text_ids(args.pairs, args.text_tokens, vocab, special, g)
    documents = {"input_ids": doc_ids, "attention_mask": torch.ones_like(doc_ids)}

    def forward(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**inputs, use_cache=False).last_hidden_state

    return Built(model, model.language_model, model.audio_tower, to(queries, device), to(documents, device),
                 forward, args.pairs * ((frames - 1) // 2 + 1))


def build_midashenglm(args: argparse.Namespace, device: torch.device) -> Built:
    config = MiDashengLMConfig.tiny() if args.tiny else MiDashengLMConfig.midashenglm_7b()
    with torch.device("meta"):
        model = MiDashengLM(config, args.attn)
    model = materialise(model, device)
    text_model = model.decoder.model
    text_model.apply(text_model._init_weights)
    for module in (model.audio_encoder, model.audio_projector, model.decoder.lm_head):
        for param in module.parameters():
            nn.init.normal_(param, std=0.02) if param.ndim >= 2 else nn.init.ones_(param)
    g = torch.Generator().manual_seed(0)
    samples = int(args.audio_seconds * 16000)
    n_audio = dasheng_audio_tokens(samples, config)
    special = {config.audio_token_id}
    vocab = config.text_config.vocab_size
    prompt = text_ids(args.pairs, PROMPT_TOKENS, vocab, special, g)
    query_ids = torch.cat([prompt[:, : PROMPT_TOKENS // 2], torch.full((args.pairs, n_audio), config.audio_token_id),
                           prompt[:, PROMPT_TOKENS // 2:]], 1)
    queries = {
        "input_ids": query_ids,
        "attention_mask": torch.ones_like(query_ids),
        "audio": 0.1 * torch.randn(args.pairs, samples, generator=g),
        "audio_lengths": torch.full((args.pairs,), samples),
    }
    doc_ids = text_ids(args.pairs, args.text_tokens, vocab, special, g)
    documents = {"input_ids": doc_ids, "attention_mask": torch.ones_like(doc_ids)}

    def forward(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return decoder_hidden_states(model, config, audio_grad=False, **inputs)

    audio_path = nn.ModuleList([model.audio_encoder, model.audio_projector])
    return Built(model, text_model, audio_path, to(queries, device), to(documents, device), forward,
                 args.pairs * num_encoder_patches(samples, config.audio_encoder_config))


MODELS = {"qwen-omni-7b": build_qwen, "midashenglm-7b": build_midashenglm}


def to(inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in inputs.items()}


def prepare(built: Built, qlora: bool, checkpointing: bool) -> list[nn.Parameter]:
    """Freeze the model, quantise, add adapters and enable checkpointing as the backbones do;
    return the trainable parameters."""
    built.model.requires_grad_(False)
    settings = LoraSettings(r=16, alpha=32, dropout=0.05, quantize_4bit=qlora)
    if qlora:
        quantize_linear_4bit(built.language_model, settings)
    add_lora(built.language_model, settings)
    if checkpointing:
        built.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    built.model.train()
    built.audio.eval()
    return [p for p in built.model.parameters() if p.requires_grad]


def matmul_weights(module: nn.Module) -> int:
    """Multiply-accumulate weights of the linear layers inside ``module``, adapters excluded."""
    return sum(m.in_features * m.out_features for name, m in module.named_modules()
               if isinstance(m, nn.Linear) and "lora_" not in name)


def step_flops(built: Built, params: list[nn.Parameter]) -> float:
    """Model FLOPs of one step (see the module docstring)."""
    n_dec = matmul_weights(built.language_model.layers)
    n_lora = sum(p.numel() for p in params if p.ndim >= 2)
    n_audio = sum(p.numel() for p in built.audio.parameters() if p.ndim >= 2)
    layers = len(built.language_model.layers)
    hidden = built.language_model.config.hidden_size
    flops = 0.0
    for inputs in (built.queries, built.documents):
        batch, length = inputs["input_ids"].shape
        tokens = batch * length
        flops += 4 * n_dec * tokens + 6 * n_lora * tokens + 6 * layers * hidden * length**2 * batch
    return flops + 2 * n_audio * built.audio_tokens


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(name: str, qlora: bool, checkpointing: bool, args: argparse.Namespace, device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    built = MODELS[name](args, device)
    params = prepare(built, qlora, checkpointing)
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")

    def step() -> None:
        query = F.normalize(built.forward(built.model, built.queries)[:, -1].float(), dim=-1)
        document = F.normalize(built.forward(built.model, built.documents)[:, -1].float(), dim=-1)
        logits = query @ document.T / 0.05
        targets = torch.arange(logits.shape[0], device=device)
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    tokens = sum(inputs["input_ids"].numel() for inputs in (built.queries, built.documents))
    flops = step_flops(built, params)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    del built, params, optimizer
    return {
        "model": name,
        "QLoRA": "yes" if qlora else "no",
        "act. ckpt": "yes" if checkpointing else "no",
        "tokens/step": tokens,
        "step ms": 1000 * seconds,
        "tokens/s": tokens / seconds,
        "TFLOP/s": flops / seconds / 1e12,
        "MFU %": 100 * flops / seconds / (args.peak_tflops * 1e12),
        "peak GiB": peak,
    }


COLUMNS = ["model", "QLoRA", "act. ckpt", "tokens/step", "step ms", "tokens/s", "TFLOP/s", "MFU %", "peak GiB"]


def table_header() -> str:
    return "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)


def table_row(row: dict) -> str:
    return "| " + " | ".join(f"{row[k]:.1f}" if isinstance(row[k], float) else str(row[k]) for k in COLUMNS) + " |"


def error_row(name: str, qlora: bool, checkpointing: bool, error: BaseException) -> str:
    """The row of a configuration that failed: the error's type and first line instead of figures."""
    message = (str(error).strip().splitlines() or [""])[0][:200]
    cells = [name, "yes" if qlora else "no", "yes" if checkpointing else "no", f"failed: {type(error).__name__}: {message}"]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="See the module docstring for the FLOP count.")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--pairs", type=int, default=16, help="audio queries (and text documents) per step")
    parser.add_argument("--audio-seconds", type=float, default=10.0, help="length of every clip")
    parser.add_argument("--text-tokens", type=int, default=48, help="tokens of every text document")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "flash_attention_2", "eager"])
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                        help="dense bf16 peak of the GPU (H100 SXM and H200: 989)")
    parser.add_argument("--qlora", choices=["both", "yes", "no"], default="both", help="rows with NF4 QLoRA")
    parser.add_argument("--checkpointing", choices=["both", "yes", "no"], default="both",
                        help="rows with activation checkpointing of the language model")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny shapes of the same architectures, also on CPU: checks the script only")
    args = parser.parse_args(argv)
    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif args.tiny:
        device = torch.device("cpu")
    else:
        print("bench_gpu.py measures 7B models on a CUDA GPU, and no CUDA device is available here: nothing "
              "was measured. Run it on an H100/H200, or pass --tiny to check the script on this CPU.")
        return 0
    choices = {"both": (False, True), "yes": (True,), "no": (False,)}
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (tiny shapes)"
    print(f"{device_name}; {args.pairs} pairs of {args.audio_seconds:g} s clips and {args.text_tokens}-token "
          f"documents; bf16, LoRA r=16 on q/k/v; MFU against {args.peak_tflops:g} TFLOP/s")
    print(table_header(), flush=True)
    # Each row prints as soon as it is measured, and a failing row (out of memory, a missing attention
    # kernel, a bug) is reported in its place: a run cut short or failing half-way keeps what it measured.
    failed = 0
    for name in args.models:
        for qlora in choices[args.qlora]:
            for checkpointing in choices[args.checkpointing]:
                try:
                    line = table_row(bench(name, qlora, checkpointing, args, device))
                except Exception as error:  # noqa: BLE001 - reported in the table, the other rows go on
                    failed += 1
                    line = error_row(name, qlora, checkpointing, error)
                    traceback.print_exc(file=sys.stderr)
                finally:
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                print(line, flush=True)
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
