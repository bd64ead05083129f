"""Cross-process negatives: two gloo processes must reproduce the single-process big-batch run.

What must hold: under DDP, which *averages* parameter gradients over the W processes, the
training step equals the single-process step on the concatenated batch. Writing x_r for the
embeddings of process r, the parameter gradient DDP applies is (1/W) Σ_r J_rᵀ g_r, where g_r is
the gradient that reached x_r; the single-process gradient is Σ_r J_rᵀ ∂L/∂x_r. For this to hold
for any network (any J_r), g_r must be W · ∂L/∂x_r, not ∂L/∂x_r: that is what the embedding
checks assert. The check through an actual ``DistributedDataParallel`` model then confirms the
parameter gradients (the linear towers and the learnable temperature) equal the single-process
ones. Loss values: in "global" mode every process reports L; in "local" mode the processes'
losses average to L.

The single-process reference sees the same structure as the gathered one: per-pair structure is
concatenated; ``positive_mask`` and ``guide_scores`` are block-diagonal (cross-process pairs are
not positives and are never guide-masked).
"""

import shutil
import tempfile
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from losses import BatchInfo, DuplicateMasker, GuideModelMasker, HybridNCE, InfoNCE, MarginMasker

WORLD = 2
TIMEOUT = timedelta(seconds=90)
N, D, D_IN = 8, 6, 5
CLIP_IDS = [0, 1, 2, 3, 0, 5, 2, 7]
TEXTS = ["rain", "dog barks", "wind", "engine", "birds", "crowd", "music", "dog barks"]
TAGS = [{1, 2}, {3}, {1, 2}, set(), {1, 2}, {3}, {4}, {3}]
KINDS = ["tags", "tags", "long", "tags", "tags", "short", "tags", "tags"]


def make_loss(name, gather):
    if name == "infonce":
        return InfoNCE(
            temperature=0.1,
            learnable_temperature=True,
            positives="multi",
            masker=[MarginMasker(0.05), GuideModelMasker(0.0)],
            gather=gather,
        )
    if name == "infonce_duplicates_d2q":
        return InfoNCE(masker=DuplicateMasker(), directions="d2q", gather=gather)
    if name == "hybrid":
        return HybridNCE(
            temperature=0.1,
            learnable_temperature=True,
            alpha=0.7,
            beta=0.3,
            lam=0.5,
            masker=MarginMasker(0.05),
            gather=gather,
        )
    if name == "hybrid_decoupled_q2d":
        return HybridNCE(
            alpha=0.0, beta=0.5, detach_weights=True, positives_only_for_tags=False, directions="q2d", gather=gather
        )
    raise ValueError(name)


CASES = [
    (name, gather, sizes, dtype)
    for name in ("infonce", "infonce_duplicates_d2q", "hybrid", "hybrid_decoupled_q2d")
    for gather in ("local", "global")
    for sizes in ((4, 4), (3, 5))
    for dtype in (torch.float64,)
] + [("hybrid", gather, (4, 4), torch.float32) for gather in ("local", "global")]
DDP_CASES = [(name, gather) for name in ("infonce", "hybrid") for gather in ("local", "global")]
# Extra negatives (more documents than queries), a different number on each process (one has none).
EXTRA_TEXTS = ["rain", "sirens", "engine", "choir"]  # "rain" and "engine" repeat pair documents (across processes too)
EXTRA_CASES = [
    (name, gather, extras)
    for name in ("infonce_duplicates", "hybrid")
    for gather in ("local", "global")
    for extras in ((1, 3), (0, 2))
]


def make_extra_loss(name, gather):
    if name == "infonce_duplicates":
        return InfoNCE(temperature=0.1, learnable_temperature=True, masker=DuplicateMasker(), gather=gather)
    return HybridNCE(temperature=0.1, alpha=0.7, beta=0.3, lam=0.5, positives_only_for_tags=False, gather=gather)


def extra_batch(extras):
    """Pairs split (3, 5) over the processes; each process adds its own extra documents."""
    q, d, structure = full_batch(torch.float64)
    g = torch.Generator().manual_seed(2)
    e = F.normalize(torch.randn(sum(extras), D, generator=g, dtype=torch.float64), dim=-1)
    keep = {k: structure[k] for k in ("clip_index", "texts", "tag_clusters", "caption_kinds")}
    return q, d, e, keep


def extra_local(extras, rank):
    q, d, e, structure = extra_batch(extras)
    start, stop = bounds((3, 5), rank)
    e_start = sum(extras[:rank])
    e_stop = e_start + extras[rank]
    info = {k: v[start:stop] for k, v in structure.items()}
    info["extra_texts"] = EXTRA_TEXTS[e_start:e_stop]
    return q[start:stop], torch.cat([d[start:stop], e[e_start:e_stop]]), info


def full_batch(dtype):
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1)
    d = F.normalize(q + 0.6 * torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1)
    structure = dict(
        clip_index=torch.tensor(CLIP_IDS),
        texts=TEXTS,
        tag_clusters=[frozenset(t) for t in TAGS],
        caption_kinds=KINDS,
        positive_mask=torch.rand(N, N, generator=g) < 0.3,
        guide_scores=(q @ d.T) + 0.1 * torch.randn(N, N, generator=g, dtype=torch.float64),
    )
    return q.to(dtype), d.to(dtype), structure


def local_structure(structure, start, stop):
    out = {key: value[start:stop] for key, value in structure.items()}
    out["positive_mask"] = structure["positive_mask"][start:stop, start:stop]
    out["guide_scores"] = structure["guide_scores"][start:stop, start:stop]
    return out


def reference_structure(structure, sizes):
    blocks = torch.zeros(N, N, dtype=torch.bool)
    start = 0
    for size in sizes:
        blocks[start : start + size, start : start + size] = True
        start += size
    out = dict(structure)
    out["positive_mask"] = structure["positive_mask"] & blocks
    out["guide_scores"] = structure["guide_scores"].masked_fill(~blocks, float("-inf"))
    return out


def bounds(sizes, rank):
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


class Towers(nn.Module):
    """Two linear towers and the loss, so DDP averages the temperature's gradient too."""

    def __init__(self, loss):
        super().__init__()
        torch.manual_seed(0)
        self.query = nn.Linear(D_IN, D, dtype=torch.float64)
        self.document = nn.Linear(D_IN, D, dtype=torch.float64)
        self.loss = loss

    def forward(self, xq, xd, **structure):
        q, d = F.normalize(self.query(xq), dim=-1), F.normalize(self.document(xd), dim=-1)
        return self.loss(q, d, BatchInfo(**structure)).loss


def tower_inputs():
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(N, D_IN, generator=g, dtype=torch.float64) for _ in range(2))


def temperature_grad(loss):
    param = loss.temperature.log_scale
    return param.grad.clone() if isinstance(param, nn.Parameter) else None


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=TIMEOUT)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=TIMEOUT)
    try:
        results = {}
        for case in CASES:
            name, gather, sizes, dtype = case
            start, stop = bounds(sizes, rank)
            q, d, structure = full_batch(dtype)
            q, d = q[start:stop].clone().requires_grad_(), d[start:stop].clone().requires_grad_()
            loss = make_loss(name, gather)
            out = loss(q, d, BatchInfo(**local_structure(structure, start, stop)))
            out.loss.backward()
            results[case] = (out.loss.detach(), q.grad, d.grad, temperature_grad(loss))
        for case in EXTRA_CASES:
            name, gather, extras = case
            q, d, info = extra_local(extras, rank)
            q, d = q.clone().requires_grad_(), d.clone().requires_grad_()
            loss = make_extra_loss(name, gather)
            out = loss(q, d, BatchInfo(**info))
            out.loss.backward()
            results[("extra", *case)] = (out.loss.detach(), q.grad, d.grad)
        for name, gather in DDP_CASES:
            start, stop = bounds((4, 4), rank)
            _, _, structure = full_batch(torch.float64)
            xq, xd = tower_inputs()
            model = nn.parallel.DistributedDataParallel(Towers(make_loss(name, gather)))
            model(xq[start:stop], xd[start:stop], **local_structure(structure, start, stop)).backward()
            results[("ddp", name, gather)] = {k: p.grad.clone() for k, p in model.module.named_parameters()}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def per_rank():
    # The parent owns the rendezvous store on a free port, so concurrent runs cannot collide, and
    # a stuck worker fails the test after a deadline instead of hanging the suite.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
    out_dir = tempfile.mkdtemp(prefix="test_distributed_loss-")
    try:
        workers = mp.start_processes(
            _worker, args=(store.port, out_dir), nprocs=WORLD, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + 2 * TIMEOUT.total_seconds()
        while not workers.join(timeout=1):
            if time.monotonic() > deadline:
                for process in workers.processes:
                    process.kill()
                pytest.fail("the gloo workers did not finish in time")
        yield [torch.load(f"{out_dir}/rank{rank}.pt") for rank in range(WORLD)]
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2][0]}+{c[2][1]}-{str(c[3])[6:]}")
def test_gathered_loss_matches_single_process(per_rank, case):
    name, gather, sizes, dtype = case
    tol = dict(rtol=0, atol=1e-6 if dtype == torch.float64 else 1e-5)
    q, d, structure = full_batch(dtype)
    q.requires_grad_(), d.requires_grad_()
    loss = make_loss(name, "none")
    out = loss(q, d, BatchInfo(**reference_structure(structure, sizes)))
    learnable = isinstance(loss.temperature.log_scale, nn.Parameter)
    wrt = (q, d, loss.temperature.log_scale) if learnable else (q, d)
    grad_q, grad_d, *grad_t = torch.autograd.grad(out.loss, wrt)

    losses = torch.stack([results[case][0] for results in per_rank])
    if gather == "global":
        for value in losses:
            torch.testing.assert_close(value, out.loss.detach(), **tol)
    else:
        torch.testing.assert_close(losses.mean(), out.loss.detach(), **tol)
    for rank, results in enumerate(per_rank):
        start, stop = bounds(sizes, rank)
        _, got_q, got_d, _ = results[case]
        torch.testing.assert_close(got_q, WORLD * grad_q[start:stop], **tol)
        torch.testing.assert_close(got_d, WORLD * grad_d[start:stop], **tol)
    if learnable:
        averaged = torch.stack([results[case][3] for results in per_rank]).mean(0)
        torch.testing.assert_close(averaged, grad_t[0], **tol)


@pytest.mark.parametrize("name, gather", DDP_CASES)
def test_ddp_parameter_gradients_match_single_process(per_rank, name, gather):
    _, _, structure = full_batch(torch.float64)
    model = Towers(make_loss(name, "none"))
    model(*tower_inputs(), **reference_structure(structure, (4, 4))).backward()
    for results in per_rank:
        for key, param in model.named_parameters():
            torch.testing.assert_close(results[("ddp", name, gather)][key], param.grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", EXTRA_CASES, ids=lambda c: f"{c[0]}-{c[1]}-extras{c[2][0]}+{c[2][1]}")
def test_gathered_extra_documents_match_single_process(per_rank, case):
    """Every process's extra negatives join the candidates of every query, as in one process that
    holds all pairs and then all extras."""
    name, gather, extras = case
    q, d, e, structure = extra_batch(extras)
    documents = torch.cat([d, e]).requires_grad_()
    q.requires_grad_()
    info = BatchInfo(**structure, extra_texts=EXTRA_TEXTS[: sum(extras)])
    out = make_extra_loss(name, "none")(q, documents, info)
    grad_q, grad_docs = torch.autograd.grad(out.loss, (q, documents))
    tol = dict(rtol=0, atol=1e-6)
    losses = torch.stack([results[("extra", *case)][0] for results in per_rank])
    torch.testing.assert_close(losses.mean() if gather == "local" else losses[0], out.loss.detach(), **tol)
    for rank, results in enumerate(per_rank):
        start, stop = bounds((3, 5), rank)
        e_start = sum(extras[:rank])
        _, got_q, got_d = results[("extra", *case)]
        torch.testing.assert_close(got_q, WORLD * grad_q[start:stop], **tol)
        expected_d = torch.cat([grad_docs[start:stop], grad_docs[N + e_start : N + e_start + extras[rank]]])
        torch.testing.assert_close(got_d, WORLD * expected_d, **tol)
