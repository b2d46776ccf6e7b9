"""Distilling alpha: minimise KL(p_dense || p_sparse) over next-token distributions.

The teacher is the same model with sparsity switched off; only the alpha vectors train.
Training is deterministic given the seed: the batch order of step k depends only on (seed, k),
so resuming from a checkpoint replays exactly the uninterrupted trajectory.

Under torchrun (spon.distributed) every rank trains the same alpha on its slice of each step's
global batch; the checkpoints hold only global state, so a run resumes with any number of ranks.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from spon import distributed
from spon.config import DistillConfig
from spon.errors import SponError
from spon.sparse import (alphas, load_alphas, mode, provenance, set_mode, set_thresholds, sparse_linears,
                         sparsified_positions, thresholds_of)

if TYPE_CHECKING:
    from spon.calibration import Calibration


@dataclass
class DistillResult:
    alphas: dict[str, torch.Tensor]  # the selected alpha
    kl_history: list[float] = field(default_factory=list)  # training KL per optimizer step
    heldout_kl_before: float = float("nan")  # TEAL vs dense (alpha = 0)
    heldout_kl_init: float = float("nan")  # after initialisation, before training
    heldout_kl_after: float = float("nan")  # SPON (the selected alpha) vs dense
    heldout_kl_last: float = float("nan")  # the alpha of the last step
    heldout_kl_by_step: dict[int, float] = field(default_factory=dict)  # at every checkpoint
    heldout_nll_before: float = float("nan")  # TEAL's cross-entropy on the held-out blocks' own next tokens
    heldout_nll_by_step: dict[int, float] = field(default_factory=dict)  # the same, at every checkpoint
    # several held-out domains: {domain: {"teal": [kl, nll], "by_step": {step: [kl, nll]}}} (step 0: the init)
    heldout_by_domain: dict[str, dict] = field(default_factory=dict)
    # checkpoints on which the domains disagreed (the guard held on some, not on these): {step: [domains]}
    refused_by_domain: dict[int, list[str]] = field(default_factory=dict)
    # the NLL guard at every checkpoint: {step: {domain ("" for one): upper bound of the mean per-block
    # NLL difference to TEAL}}; a checkpoint is eligible when every bound is <= 0
    heldout_nll_bound_by_step: dict[int, dict[str, float]] = field(default_factory=dict)
    selected_step: int | None = None  # None: alpha = 0 (no step beat TEAL); 0: the initialisation
    selection: str = ""
    resumed_from: int = 0
    world_size: int = 1  # processes that trained it (spon.distributed)
    # SPON's own tau with the selected alpha in place (config.retake_thresholds), TEAL keeping its
    # own; None: SPON runs TEAL's tau
    thresholds: dict[str, float] | None = None

    def record(self) -> dict:
        """Everything but the tensors, as JSON (distill.json, the summary, the sidecar)."""
        return {"kl_history": self.kl_history, "heldout_kl_before": self.heldout_kl_before,
                "heldout_kl_init": self.heldout_kl_init, "heldout_kl_after": self.heldout_kl_after,
                "heldout_kl_last": self.heldout_kl_last,
                "heldout_kl_by_step": {str(k): v for k, v in self.heldout_kl_by_step.items()},
                "heldout_nll_before": self.heldout_nll_before,
                "heldout_nll_by_step": {str(k): v for k, v in self.heldout_nll_by_step.items()},
                "heldout_by_domain": self.heldout_by_domain,
                "refused_by_domain": {str(k): v for k, v in self.refused_by_domain.items()},
                "heldout_nll_bound_by_step": {str(k): v for k, v in self.heldout_nll_bound_by_step.items()},
                "selected_step": self.selected_step, "selection": self.selection, "resumed_from": self.resumed_from,
                "world_size": self.world_size, "thresholds": self.thresholds}


@torch.no_grad()
def teacher_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """log p_dense(next token) for a batch of blocks: the same model with sparsity off, always in
    the model's own precision (never under the student's autocast)."""
    with mode(model, "dense"), torch.autocast(ids.device.type, enabled=False):
        return F.log_softmax(model(ids, use_cache=False).logits.float(), dim=-1)


def _kl_and_student(model, ids: torch.Tensor, teacher: torch.Tensor | None):
    if teacher is None:
        teacher = teacher_logprobs(model, ids)
    student = F.log_softmax(model(ids, use_cache=False).logits.float(), dim=-1)
    v = teacher.shape[-1]
    kl = F.kl_div(student.view(-1, v), teacher.to(student.device).view(-1, v), log_target=True,
                  reduction="batchmean")
    return kl, student


# The most bytes of one [tokens, vocab] fp32 tensor the chunked KL holds at once (it holds a few
# such tensors per chunk): 128 MB is 128 tokens of Gemma-3's 262,144-entry vocabulary. Every chunk
# streams the whole LM head (671 MB fp32) through each of its three matmuls, so fewer, larger
# chunks are faster (Gemma-3-270M, 512 tokens, 1 thread: 16-20 s at 32 tokens a chunk, 12.5 s at
# 128, 9-10 s at 512). The teacher goes chunked when one block's fp32 logits are at least this
# (Gemma-3: 128 tokens and up); smaller ones (stories260K, SmolLM2-135M at 128-512 tokens) keep the
# plain KL and its log-prob cache, whose Adam trajectory their tests pin to 1e-4.
LOGITS_CHUNK_BYTES = 128 << 20


def lm_head_parts(model) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
    """What turns the decoder's last hidden state into logits: the LM head's weight and bias and
    the final-logit soft-cap (Gemma-2: logits = c * tanh(z / c); None elsewhere)."""
    head = model.get_output_embeddings()
    return head.weight, head.bias, getattr(model.config, "final_logit_softcapping", None)


def final_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    """The LM head's input for `ids`: the decoder's last hidden state, after its final norm."""
    return model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state


def _head_logits(h: torch.Tensor, weight, bias, softcap) -> torch.Tensor:
    z = F.linear(h, weight, bias)
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return z


class _ChunkedKL(torch.autograd.Function):
    """sum over tokens of KL(p_teacher || p_student), and the student's NLL at `targets` per token (-1: none, 0),
    with both distributions made from hidden states by the LM head `chunk` tokens at a time.

    Forward computes, per chunk, the teacher's log-probs (in the model's precision, no autocast),
    the student's (under the caller's autocast, like the model's own LM head) and, when the student
    needs a gradient, dKL/dh_student = ((p_s * sum p_t - p_t) * dz/du) W: only that [tokens, hidden]
    tensor is kept for backward, never a [tokens, vocab] one."""

    @staticmethod
    def forward(ctx, h_student, h_teacher, targets, weight, bias, softcap, chunk, need_grad):
        device = h_student.device.type
        kl = torch.zeros((), dtype=torch.float64, device=h_student.device)
        nll = torch.zeros(h_student.shape[0], dtype=torch.float64, device=h_student.device)  # per token
        grad = torch.empty(h_student.shape, dtype=torch.float32, device=h_student.device) if need_grad else None
        # The student's LM head in the caller's autocast dtype, the weight cast once per call, not per
        # chunk (autocast would cast the 168M-entry head again for every matmul: 0.41 s each here).
        w_s, b_s = weight, bias
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            w_s, b_s = weight.to(dtype), None if bias is None else bias.to(dtype)
        with torch.autocast(device, enabled=False):
            return _ChunkedKL._chunks(ctx, h_student, h_teacher, targets, weight, bias, w_s, b_s, softcap, chunk,
                                      grad, kl, nll)

    @staticmethod
    def _chunks(ctx, h_student, h_teacher, targets, weight, bias, w_s, b_s, softcap, chunk, grad, kl, nll):
        for i in range(0, h_student.shape[0], chunk):
            sl = slice(i, i + chunk)
            t = F.log_softmax(_head_logits(h_teacher[sl], weight, bias, softcap).float(), dim=-1)
            z = _head_logits(h_student[sl].to(w_s.dtype), w_s, b_s, softcap).float()
            s = F.log_softmax(z, dim=-1)
            pt = t.exp()
            kl += (pt * (t - s)).sum(dtype=torch.float64)
            tg = targets[sl]
            has = tg >= 0
            if bool(has.any()):
                nll[sl][has] = -s[has].gather(-1, tg[has, None]).squeeze(-1).double()
            if grad is not None:
                g = s.exp_().mul_(pt.sum(-1, keepdim=True)).sub_(pt)  # dKL/dz, reusing s's memory
                if softcap is not None:
                    g.mul_(1 - (z / softcap).square())  # z = c tanh(u / c): dz/du = 1 - (z / c)^2
                grad[sl] = (g.to(w_s.dtype) @ w_s).float()  # in the student's dtype, as autograd's would be
        ctx.h_dtype = h_student.dtype
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(nll)
        return kl.float(), nll

    @staticmethod
    def backward(ctx, grad_kl, grad_nll):
        (grad,) = ctx.saved_tensors
        if grad is None:
            raise RuntimeError("_ChunkedKL: backward through a forward run without need_grad")
        return (grad * grad_kl).to(ctx.h_dtype), None, None, None, None, None, None, None


def chunked_kl_and_nll(model, ids: torch.Tensor, h_teacher: torch.Tensor, chunk: int | None = None,
                       per_block: bool = False):
    """KL(dense || current mode) (mean over tokens, as kl_div's batchmean) and the current mode's mean
    next-token NLL on `ids` (per block [B] with `per_block`), from the dense model's final hidden
    states `h_teacher` [B, T, H] and the LM head applied `chunk` tokens at a time (default:
    LOGITS_CHUNK_BYTES of fp32 logits)."""
    weight, bias, softcap = lm_head_parts(model)
    if chunk is None:
        chunk = max(1, LOGITS_CHUNK_BYTES // (weight.shape[0] * 4))
    h = final_hidden(model, ids)
    b, t = ids.shape
    targets = torch.full((b, t), -1, dtype=torch.long, device=ids.device)
    targets[:, :-1] = ids[:, 1:]
    need_grad = torch.is_grad_enabled() and h.requires_grad
    kl, nll = _ChunkedKL.apply(h.reshape(b * t, -1), h_teacher.to(h.device).reshape(b * t, -1), targets.reshape(-1),
                               weight, bias, softcap, chunk, need_grad)
    if per_block:
        return kl / (b * t), (nll.view(b, t).sum(1) / (t - 1)).float() if t > 1 else torch.full((b,), float("nan"))
    return kl / (b * t), nll.sum().float() / (b * (t - 1)) if t > 1 else torch.tensor(float("nan"))


def _filled(fn, blocks: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """fn over `blocks` in batches, written into one tensor allocated once: a torch.cat of the
    batches would hold the cache twice at its peak (SmolLM2, 168 blocks of 256 tokens: 8.5 GB of
    log-probs, 17.8 GB peak RSS in distill)."""
    out = None
    for i in range(0, len(blocks), batch_size):
        part = fn(blocks[i : i + batch_size].to(device))
        if out is None:
            out = torch.empty((len(blocks), *part.shape[1:]), dtype=part.dtype)
        out[i : i + len(part)] = part
    return out


class Teacher:
    """The dense model's next-token distributions for a fixed set of blocks.

    The teacher never changes while alpha trains, and its forward pass is a quarter of a step
    (SmolLM2-135M, 2 x 256 tokens, fp32: 1.06 s of 3.95 s). When all its log-probabilities fit in
    `budget_gb` they are computed once, in batches of `batch_size` blocks, and served from memory
    (the KL as before, bit for bit). A large vocabulary (one block's fp32 logits at least
    `logits_chunk_bytes`; Gemma-3's 262,144 x 64 x 256 tokens would be 17 GB) never holds logits
    whole: the teacher is its final hidden states instead,
    [tokens, hidden] (Gemma-3-270M: 640 floats a token, 410x less), cached when they fit the budget
    and recomputed by a dense forward pass otherwise; the KL is then computed by the LM head in
    chunks of tokens (chunked_kl_and_nll), so no [tokens, vocab] fp32 tensor is held whole.
    """

    def __init__(self, model, blocks: torch.Tensor, budget_gb: float = 0.0, batch_size: int = 16,
                 logits_chunk_bytes: int = LOGITS_CHUNK_BYTES):
        self.model, self.blocks, self.batch_size = model, blocks, batch_size
        self.sharded = False  # True: `blocks` are this rank's shard of a set (spon.distributed)
        vocab, hidden = model.get_output_embeddings().weight.shape
        self.cached: torch.Tensor | None = None
        self.hidden: torch.Tensor | None = None  # the dense final hidden states, when cached
        self.chunk = max(1, logits_chunk_bytes // (vocab * 4))  # tokens per LM-head chunk
        device = next(model.parameters()).device
        # True: KL by the LM head in chunks, from the teacher's final hidden states (a large vocabulary:
        # even a log-prob cache that fits the budget costs several times its size in temporaries when
        # a batch of blocks is scored at once: Gemma-3-270M, 4 held-out blocks of 256: 9.3 GB peak)
        self.chunked = blocks.dim() == 2 and blocks.shape[1] * vocab * 4 >= logits_chunk_bytes
        if not self.chunked:
            if len(blocks) and blocks.numel() * vocab * 4 <= budget_gb * 1e9:
                self.cached = _filled(lambda ids: teacher_logprobs(model, ids), blocks, batch_size, device)
            return
        if len(blocks) and blocks.numel() * hidden * 4 <= budget_gb * 1e9:
            self.hidden = _filled(self._dense_hidden, blocks, batch_size, device)

    @torch.no_grad()
    def _dense_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        with mode(self.model, "dense"), torch.autocast(ids.device.type, enabled=False):
            return final_hidden(self.model, ids)

    def __len__(self) -> int:
        return len(self.blocks)

    def kl(self, idx: torch.Tensor) -> torch.Tensor:
        """KL(dense || current mode) on the blocks at `idx`."""
        if self.chunked:
            return self.kl_and_nll(idx)[0]
        return _kl_and_student(self.model, *self._inputs(idx))[0]

    def kl_and_nll(self, idx: torch.Tensor, per_block: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """KL(dense || current mode) and the current mode's mean cross-entropy on the blocks' own
        next tokens (each block's, [len(idx)], with `per_block`), from one forward pass."""
        if self.chunked:
            ids = self.blocks[idx].to(next(self.model.parameters()).device)
            teacher = self._dense_hidden(ids) if self.hidden is None else self.hidden[idx]
            return chunked_kl_and_nll(self.model, ids, teacher, self.chunk, per_block)
        ids, teacher = self._inputs(idx)
        kl, student = _kl_and_student(self.model, ids, teacher)
        nll = -student[:, :-1].gather(-1, ids[:, 1:, None])
        return kl, nll.squeeze(-1).mean(1) if per_block else nll.mean()

    def _inputs(self, idx: torch.Tensor):
        ids = self.blocks[idx].to(next(self.model.parameters()).device)
        return ids, None if self.cached is None else self.cached[idx]


@torch.no_grad()
def heldout_scores(model, blocks: torch.Tensor | Teacher, batch_size: int = 16) -> tuple[float, float]:
    """Mean KL(dense || current mode) and mean next-token cross-entropy (NLL) over held-out blocks
    (a tensor, or a Teacher over them; a Teacher over this rank's shard (`sharded`): the means over
    every rank's shard, the same numbers on each)."""
    return heldout_scores_by_domain(model, blocks, [], batch_size)[""]


@torch.no_grad()
def heldout_scores_by_domain(model, blocks: torch.Tensor | Teacher, domains: list[str], batch_size: int = 16,
                             names: list[str] | None = None) -> dict[str, tuple[float, float]]:
    """heldout_scores for all held-out blocks (key "") and for each domain's (`domains`: the domain
    of each of this rank's blocks, [] for one domain; `names`: every domain of every rank's, the
    same list on each)."""
    return heldout_pass(model, blocks, domains, batch_size, names)[0]


@torch.no_grad()
def heldout_pass(model, blocks: torch.Tensor | Teacher, domains: list[str], batch_size: int = 16,
                 names: list[str] | None = None) -> tuple[dict[str, tuple[float, float]], torch.Tensor]:
    """heldout_scores_by_domain, and each of this rank's blocks' own NLL [blocks] (what the NLL
    guard pairs with TEAL's), from one pass over the blocks: a batch never spans two domains, so
    each block is scored once."""
    teacher = blocks if isinstance(blocks, Teacher) else Teacher(model, blocks)
    names = sorted(set(domains)) if names is None else names
    sums = {d: [0.0, 0.0, 0] for d in ["", *names]}
    block_nll = []
    start = 0
    while start < len(teacher):
        end = min(start + batch_size, len(teacher))
        if domains:  # the blocks of one domain are contiguous (spon.calibration.domain_blocks)
            end = next((j for j in range(start + 1, end) if domains[j] != domains[start]), end)
        idx = torch.arange(start, end)
        kl, nll = teacher.kl_and_nll(idx, per_block=True)
        block_nll.append(nll.double().cpu())
        for d in ["", domains[start]] if domains else [""]:
            sums[d][0] += kl.item() * len(idx)
            sums[d][1] += block_nll[-1].sum().item()
            sums[d][2] += len(idx)
        start = end
    if teacher.sharded and distributed.world_size() > 1:  # every rank passes the full list of names
        flat = distributed.all_reduce_sum([v for d in sums for v in sums[d]])
        sums = {d: flat[3 * i : 3 * i + 3] for i, d in enumerate(sums)}
    means = {d: (k / n, l / n) if n else (float("nan"), float("nan")) for d, (k, l, n) in sums.items()}
    return means, torch.cat(block_nll) if block_nll else torch.zeros(0, dtype=torch.float64)


def paired_upper_bound(diffs: torch.Tensor, confidence: float, sharded: bool = False) -> tuple[float, float, int]:
    """(mean, one-sided upper confidence bound of the mean, n) of paired differences (this rank's
    share of them when `sharded`: the sums are all-reduced, the same numbers on every rank), by
    Student's t over the n differences. Fewer than two differences have no spread to measure: the
    bound is the mean (so is it at confidence 0.5)."""
    d = diffs.double()
    s = [float(len(d)), d.sum().item(), d.square().sum().item()]
    if sharded and distributed.world_size() > 1:
        s = distributed.all_reduce_sum(s)
    n, s1, s2 = s
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = s1 / n
    if n < 2 or confidence <= 0.5:
        return mean, mean, int(n)
    from scipy.stats import t as student_t

    sd = math.sqrt(max(s2 - n * mean * mean, 0.0) / (n - 1))
    return mean, mean + float(student_t.ppf(confidence, n - 1)) * sd / math.sqrt(n), int(n)


def guard_bounds(diffs: torch.Tensor, domains: list[str], names: list[str], confidence: float,
                 sharded: bool = False) -> dict[str, tuple[float, float]]:
    """The NLL guard's (mean, upper bound) of paired per-block differences for each domain in `names`
    ("" for all blocks when there are none); `domains`: the domain of each of this rank's blocks."""
    out = {}
    for d in names or [""]:
        mine = diffs if d == "" else diffs[[i for i, x in enumerate(domains) if x == d]]
        out[d] = paired_upper_bound(mine, confidence, sharded)[:2]
    return out


def heldout_kl(model, blocks: torch.Tensor | Teacher, batch_size: int = 16) -> float:
    """Mean KL(dense || current mode) over held-out blocks (a tensor, or a Teacher over them)."""
    return heldout_scores(model, blocks, batch_size)[0]


@torch.no_grad()
def closed_form_alpha(model, blocks: torch.Tensor, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """alpha = E[x - S(x)]: the constant that best replaces what sparsification removed (least
    squares), measured with every layer sparse so upstream drift is included."""
    sums = {m.name: torch.zeros(m.linear.in_features, dtype=torch.float64) for m in sparse_linears(model)}
    counts = {m.name: 0 for m in sparse_linears(model)}

    def hook(m, args):
        x = sparsified_positions(m, args[0]).detach().float()  # where alpha is added: the sparse positions
        dropped = x * ~m.keep(x)
        sums[m.name] += dropped.reshape(-1, x.shape[-1]).sum(0).double().cpu()
        counts[m.name] += dropped.reshape(-1, x.shape[-1]).shape[0]

    handles = [m.register_forward_pre_hook(hook) for m in sparse_linears(model)]
    device = next(model.parameters()).device
    try:
        with mode(model, "teal"):
            for i in range(0, len(blocks), batch_size):
                model(blocks[i : i + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: (s / max(counts[n], 1)).float() for n, s in sums.items()}


def batch_indices(n_blocks: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Blocks for optimizer step `step`: a seeded permutation per epoch, a function of step only."""
    per_epoch = max(n_blocks // batch_size, 1)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[k * batch_size : (k + 1) * batch_size]


def distill(
    model,
    train_blocks: torch.Tensor,
    heldout_blocks: torch.Tensor,
    cfg: DistillConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    checkpoint_key: str | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    nll_guard: bool = True,
    heldout_domains: list[str] | None = None,
) -> DistillResult:
    """Train alpha for every SparseLinear in `model` (thresholds must already be set), then keep
    the alpha that is best on the held-out blocks: the checkpoint with the lowest held-out KL
    among those whose held-out next-token NLL is below TEAL's by more than its noise (the
    `cfg.guard_confidence` upper bound of the mean per-block difference is below zero), or
    alpha = 0 (TEAL itself) when none qualifies. A run never ships an alpha that is worse than
    TEAL on data it did not train on, by either measure: a lower KL to the dense model alone does not promise a lower
    perplexity (SmolLM2-135M at 25 %: held-out KL 0.075 -> 0.055 while wikitext-2 test perplexity
    rose 29.50 -> 29.68), the NLL guard is what perplexity on unseen text follows.
    `nll_guard=False` selects on KL alone: right when the held-out blocks are the model's own
    samples, whose NLL is their entropy plus the KL in expectation (the guard would add only the
    noise of one sampled token per position).
    `heldout_domains` (the domain of each held-out block, when there are several): the NLL guard
    holds on every domain's blocks, so a checkpoint that helps one domain at another's expense is
    never taken (SmolLM2-135M at 50 %, alpha trained on wikitext alone: TEAL -> SPON 9.96 -> 10.70
    on C code while wikitext improved); the refused steps and domains are recorded.

    checkpoint_key names what produced the checkpoints (model, calibration, thresholds, config):
    checkpoints with another key are refused, never resumed.
    """
    mods = [m for m in sparse_linears(model) if cfg.targets is None or m.kind in cfg.targets]
    if not mods:
        raise SponError("no sparse linears to train alpha for: sparsify the model (and its "
                        f"{cfg.targets or 'any'} projections) and set thresholds first")
    if len(train_blocks) == 0:
        raise SponError("calibration data is empty: no training blocks for distillation")
    device = next(model.parameters()).device
    params = [m.alpha for m in mods]
    for p in params:
        p.requires_grad_(True)
    result = DistillResult(alphas={})
    teal_taus = thresholds_of(model, "teal")  # TEAL's tau: its baseline throughout, SPON's start
    zeros = {m.name: torch.zeros_like(m.alpha) for m in sparse_linears(model)}  # TEAL: alpha = 0 everywhere
    train = Teacher(model, train_blocks, cfg.teacher_cache_gb)
    # Held-out selection across ranks: each scores its shard and the sums are all-reduced, so every
    # rank gets the same bits to select on (and the evaluation costs 1/N). Scoring all blocks on
    # every rank would promise that only if every rank's forward were bitwise equal; one rank
    # taking another checkpoint would then train on from another alpha without anyone noticing.
    heldout = Teacher(model, distributed.shard(heldout_blocks), cfg.teacher_cache_gb)
    heldout.sharded = True
    result.world_size = distributed.world_size()
    domains = list(heldout_domains or [])
    if domains and len(domains) != len(heldout_blocks):
        raise SponError(f"{len(domains)} held-out domain labels for {len(heldout_blocks)} held-out blocks")
    names = sorted(set(domains))
    my_domains = distributed.shard(domains) if domains else []

    def score(step: int | None) -> tuple[float, float, torch.Tensor]:
        """(KL, NLL) on all held-out blocks and this rank's blocks' own NLLs; each domain's means recorded."""
        by, block_nll = heldout_pass(model, heldout, my_domains, names=names)
        for d in names:
            rec = result.heldout_by_domain.setdefault(d, {"teal": None, "by_step": {}})
            if step is None:
                rec["teal"] = list(by[d])
            else:
                rec["by_step"][str(step)] = list(by[d])
        return *by[""], block_nll

    with mode(model, "teal"):
        result.heldout_kl_before, result.heldout_nll_before, teal_block_nll = score(None)

    def guard(step: int, block_nll: torch.Tensor) -> dict[str, float]:
        """The NLL guard's bound for each domain ("" for one): the upper confidence bound of the mean
        over held-out blocks of (this checkpoint's NLL - TEAL's) on the same block. Paired per block,
        because a comparison of means takes noise for a gain: SmolLM2-135M at 25 %, 8 wikitext blocks,
        a mean 0.00008 nats below TEAL's let through an alpha that was worse than TEAL on all three
        evaluation texts."""
        if not nll_guard:
            return {}
        bounds = {d: bound for d, (_, bound) in guard_bounds(block_nll - teal_block_nll, my_domains, names,
                                                                cfg.guard_confidence, sharded=True).items()}
        result.heldout_nll_bound_by_step[step] = bounds
        return bounds

    def better(best, kl: float, bounds: dict[str, float], step: int):
        """The lowest held-out KL among checkpoints whose NLL guard holds on every domain (ties keep the
        earlier, simpler one). A checkpoint that helps some domains but not others (the domains
        disagree) is noted with the others."""
        over = [d for d, bound in bounds.items() if not bound <= 0]
        if over and len(over) < len(names):
            result.refused_by_domain[step] = over
        if over or not math.isfinite(kl) or (math.isfinite(best[0]) and not kl < best[0]):
            return best
        return (kl, step, alphas(model), thresholds_of(model))

    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.schedule, cfg.warmup, cfg.steps))
    start = 0
    ckpt = _latest_checkpoint(checkpoint_dir)
    if ckpt is not None:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if state.get("key") != checkpoint_key:
            raise SponError(
                f"{checkpoint_dir} holds alpha checkpoints of another distillation (key {state.get('key')}, "
                f"this one {checkpoint_key}): use another --out, or delete that directory to start over"
            )
        load_alphas(model, state["alphas"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        result.kl_history = list(state["kl_history"])
        result.heldout_kl_by_step = {int(k): v for k, v in state["heldout_kl_by_step"].items()}
        result.heldout_nll_by_step = {int(k): v for k, v in state.get("heldout_nll_by_step", {}).items()}
        for d, rec in state.get("heldout_by_domain", {}).items():  # the TEAL numbers: measured above
            result.heldout_by_domain.setdefault(d, {"teal": None, "by_step": {}})["by_step"] = rec["by_step"]
        result.refused_by_domain = {int(k): v for k, v in state.get("refused_by_domain", {}).items()}
        result.heldout_nll_bound_by_step = {int(k): v for k, v in state.get("heldout_nll_bound_by_step", {}).items()}
        best = (state["best"]["kl"], state["best"]["step"], state["best"]["alphas"],
                state["best"].get("thresholds") or teal_taus)
        set_thresholds(model, state.get("thresholds") or teal_taus, teal=teal_taus)
        start = result.resumed_from = int(state["step"])
    else:
        load_alphas(model, zeros)
        if cfg.init == "closed_form":
            init = closed_form_alpha(model, train_blocks)
            load_alphas(model, {m.name: init[m.name] for m in mods})
        best = (result.heldout_kl_before, None, zeros, teal_taus)  # alpha = 0 is TEAL: what every step must beat
    if result.world_size > 1:  # every rank continues the same run from the same alpha
        distributed.agree(start, "the checkpoint step to resume from")
        distributed.broadcast_(params)

    teal_realized: dict[str, float] = {}

    def retake() -> None:
        """SPON's tau for the alpha in place (cfg.retake_thresholds): before the first step and at
        every checkpoint, so each checkpoint is scored, and the steps after it train, at the
        sparsity TEAL realizes. Rank 0's taus on every rank (one mask everywhere)."""
        if not cfg.retake_thresholds:
            return
        from spon.thresholds import realized_by_projection, retake_thresholds_

        if not teal_realized:  # once: what SPON's tau must realize on the training blocks
            teal_realized.update(realized_by_projection(model, train_blocks, "teal"))
        taus = retake_thresholds_(model, train_blocks, teal_realized)
        if result.world_size > 1:
            flat = [torch.tensor([taus[n] for n in taus], dtype=torch.float64)]
            distributed.broadcast_(flat)
            set_thresholds(model, dict(zip(taus, flat[0].tolist())), teal=teal_taus)

    with mode(model, "spon"):
        if start == 0:
            retake()
            result.heldout_kl_init, _, block_nll = score(0)
            best = better(best, result.heldout_kl_init, guard(0, block_nll), 0)
        bar = _progress(range(start, cfg.steps), cfg.steps, start, progress and distributed.is_main())
        micro = max(cfg.batch_size // cfg.grad_accum, 1)
        for step in bar:
            idx = batch_indices(len(train_blocks), cfg.batch_size, cfg.seed, step)
            opt.zero_grad(set_to_none=True)
            loss_sum = 0.0
            mine = distributed.shard(idx)  # this rank's slice of the global batch (all of it alone)
            for j in range(0, len(mine), micro):
                part = mine[j : j + micro]
                with _student_precision(cfg.compute_dtype, device):
                    # weighted by its share of the global batch: the sum over ranks is its mean
                    loss = train.kl(part) * (len(part) / len(idx))
                loss.backward()
                loss_sum += loss.item()
            if result.world_size > 1:
                loss_sum = distributed.all_reduce_grads(params, loss_sum)
            if not math.isfinite(loss_sum):
                raise SponError(f"distillation diverged: KL is {loss_sum} at step {step} (lower --lr)")
            opt.step()
            sched.step()
            result.kl_history.append(loss_sum)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(kl=f"{loss_sum:.4f}")
            if on_step is not None:
                on_step(step, loss_sum)
            done = step + 1
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                retake()
                kl, nll, block_nll = score(done)
                result.heldout_kl_by_step[done], result.heldout_nll_by_step[done] = kl, nll
                best = better(best, kl, guard(done, block_nll), done)
                if checkpoint_dir is not None and distributed.is_main():
                    _save_checkpoint(checkpoint_dir, done, model, opt, sched, result, best, checkpoint_key)
        result.heldout_kl_last = result.heldout_kl_by_step.get(cfg.steps, result.heldout_kl_init)

    for p in params:
        p.requires_grad_(False)
    result.heldout_kl_after, result.selected_step, chosen, chosen_taus = best
    guarded = (f", held-out NLL below TEAL's by more than its noise ({cfg.guard_confidence:.0%} bound over blocks)"
               + (" on every domain" if names else "")) if nll_guard else ""
    if len(heldout_blocks) == 0:  # nothing to select on: the last alpha, and the summary says so
        result.selected_step, chosen, chosen_taus = cfg.steps, alphas(model), thresholds_of(model)
        result.selection = "last step (no held-out blocks to select on)"
    elif result.selected_step is None:
        result.selection = "zeros: no checkpoint beat TEAL on the held-out blocks (KL" + guarded + ")"
    else:
        result.selection = f"step {result.selected_step}: lowest held-out KL" + guarded
    if result.refused_by_domain:  # the held-out domains disagreed: say which, and where
        worst = sorted({d for ds in result.refused_by_domain.values() for d in ds})
        result.selection += (f"; held-out domains disagree: step(s) {', '.join(map(str, sorted(result.refused_by_domain)))} "
                             f"refused for a held-out NLL not surely below TEAL's on {', '.join(worst)}")
    load_alphas(model, chosen)
    set_thresholds(model, chosen_taus, teal=teal_taus)  # alpha = 0 (TEAL) takes TEAL's tau back
    result.alphas = alphas(model)
    result.thresholds = thresholds_of(model) if cfg.retake_thresholds else None
    return result


def _student_precision(compute_dtype: str, device: torch.device):
    """The student's forward and backward in bf16 autocast (matmuls in bf16, alpha and the loss in
    fp32): 1.5x per step on a CPU with AVX512-BF16 (SmolLM2-135M, 2 x 256 tokens: 2.6 s vs 3.9 s).
    The teacher and every held-out measurement (what selects alpha) stay in the model's precision."""
    if compute_dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_lambda(schedule: str, warmup: int, steps: int) -> Callable[[int], float]:
    """Linear warm-up, then constant or cosine decay to zero: late steps refine instead of bouncing
    (alpha moves the sparsity masks downstream, so a large constant lr keeps the loss noisy)."""
    if schedule not in ("constant", "cosine"):
        raise SponError(f"unknown lr schedule {schedule!r}; choose 'constant' or 'cosine'")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(steps - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _progress(it, total, initial, enabled):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total, initial=initial, desc="distill alpha", leave=False)


def _save_checkpoint(directory, step, model, opt, sched, result: DistillResult, best, key):
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".alpha_step{step:07d}.pt.tmp"
    torch.save({"step": step, "key": key, "alphas": alphas(model), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "kl_history": result.kl_history,
                "heldout_kl_by_step": {str(k): v for k, v in result.heldout_kl_by_step.items()},
                "heldout_nll_by_step": {str(k): v for k, v in result.heldout_nll_by_step.items()},
                "heldout_by_domain": result.heldout_by_domain,
                "refused_by_domain": {str(k): v for k, v in result.refused_by_domain.items()},
                "heldout_nll_bound_by_step": {str(k): v for k, v in result.heldout_nll_bound_by_step.items()},
                "thresholds": thresholds_of(model),
                "best": {"kl": best[0], "step": best[1], "alphas": best[2], "thresholds": best[3]}}, tmp)
    tmp.replace(directory / f"alpha_step{step:07d}.pt")  # atomic: a kill never leaves half a checkpoint


def _latest_checkpoint(directory) -> Path | None:
    """The newest checkpoint that loads. One that does not (truncated, overwritten: a disk that
    filled up, a copy cut short) is set aside as <name>.corrupt, said in one line, and the run
    resumes from the one before it (or from the start)."""
    if directory is None or not Path(directory).is_dir():
        return None
    for ckpt in sorted(Path(directory).glob("alpha_step*.pt"), reverse=True):
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or not {"step", "key", "alphas", "optimizer", "best"} <= set(state):
                raise ValueError("not an alpha checkpoint")
            return ckpt
        except Exception as e:  # any unreadable file: never trusted, never deleted
            if not distributed.is_main():  # rank 0 sets it aside; the others just skip it
                continue
            aside = ckpt.with_name(ckpt.name + ".corrupt")
            ckpt.replace(aside)
            from spon.console import say

            say(f"spon: alpha checkpoint {ckpt} cannot be read ({(str(e).strip().splitlines() or [type(e).__name__])[0]}); "
                f"set aside as {aside.name}, resuming from the one before it")
    return None


def distill_(model, calibration: Calibration, config: DistillConfig | None = None, *,
             checkpoint_dir: str | Path | None = None, checkpoint_key: str | None = None, progress: bool = False,
             on_step: Callable[[int, float], None] | None = None) -> DistillResult:
    """Spontaneous neurons in place: train alpha to minimise KL(dense || sparse) on the training
    blocks with the model frozen, keep the checkpoint best on the held-out blocks (never worse than
    TEAL: alpha = 0 otherwise) and leave the model in SPON mode with that alpha. On text
    calibration a checkpoint must also not raise the held-out next-token NLL above TEAL's; on the
    model's own samples the NLL is their entropy plus the KL, so selection stays on KL."""
    config = config or DistillConfig()
    if not sparse_linears(model):
        raise SponError("the model is not sparse: call spon.sparsify_(model, SparsityConfig(...), calibration) first")
    model.requires_grad_(False)  # only alpha trains
    result = distill(model, calibration.train, calibration.heldout, config, checkpoint_dir=checkpoint_dir,
                     checkpoint_key=checkpoint_key, progress=progress, on_step=on_step,
                     nll_guard=calibration.source != "samples", heldout_domains=calibration.heldout_domains)
    set_mode(model, "spon")
    record_distillation(model, config, result)
    return result


def record_distillation(model, config: DistillConfig, result: DistillResult) -> None:
    """The distillation config and alpha selection, for the sidecar save_pretrained writes."""
    provenance(model).update({
        "distill": config.model_dump(mode="json"),
        "heldout_kl": {"teal": result.heldout_kl_before, "spon": result.heldout_kl_after},
        "alpha_selection": {"selected_step": result.selected_step, "selection": result.selection}})
