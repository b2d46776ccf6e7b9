"""Multiple-choice loglikelihoods with each shared context run through the model once.

lm-eval's HFLM scores every (context, choice) pair as its own sequence, so a 4-choice
question runs its context 4 times (it only shares the context when every choice is a single
token). Here the requests with identical context tokens form a group; the contexts of a batch
of groups are left-padded and run once with a KV cache, and each choice then runs only its
own tokens on a copy of its context's cache:

    log p(cont | ctx) = log p(c_1 | ctx) + sum_k log p(c_k | ctx, c_<k)
                        `-- last context logit   `-- second pass over cont[:-1]

The numbers equal HFLM's up to float rounding (tests/evaluation/test_shared_context.py);
the context tokens saved are (choices - 1) per question: about half of BoolQ, COPA and PIQA,
three quarters of MMLU, HellaSwag and ARC. Requests that HFLM would truncate (context +
continuation longer than the window) and contexts with a single request (LAMBADA, WinoGrande's
one context per option) run as HFLM runs them, one sequence each with the same truncation, but
with the LM head on the continuation's positions only (`score_singles`).

Neither path computes logits it does not use: SmolLM2-135M's LM head (49,152 x 576) is a fifth of
its multiply-adds per token, and HFLM's [batch, width, vocab] fp32 log-softmax over every context
position is 64 x 100 x 49,152 x 4 bytes = 1.26 GB written per batch of 100-token contexts.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache

Request = tuple[tuple[str, str] | None, list[int], list[int]]  # (strings, context ids, continuation ids)


@contextmanager
def contiguous_head_input(model):
    """The LM head's input made contiguous while scoring a batch. With logits_to_keep, transformers
    gives the head hidden_states[:, -k:, :], a strided view when there are several rows; torch's
    matmul then cannot fold it into one [rows * k, hidden] GEMM and runs a bmm over the weight
    expanded per row. Measured on Gemma-3-270M (16 rows x 64 tokens, logits_to_keep=1, one
    thread): the forward took 2.65 s in fp32 and 32.4 s in bf16 (the expanded 262,144 x 640 weight
    copied per row), 2.11 s and 0.88 s with this hook. The numbers are the same GEMM's."""
    head = model.get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        hook.remove()


def effective_context(ctx: list[int], cont: list[int], max_length: int) -> tuple[int, ...]:
    """The context HFLM actually conditions on: it keeps the last max_length + 1 tokens of
    context + continuation, so a long context is cut from the left by the continuation's length."""
    keep = max_length + 1 - len(cont)
    return tuple(ctx[-keep:]) if len(ctx) > keep else tuple(ctx)


def group_by_context(requests: Sequence[Request], max_length: int) -> tuple[list[list[int]], list[int]]:
    """(groups of request indices sharing an effective context, indices left to the plain path).
    Choices of equal length share a truncated context too (BoolQ's long passages)."""
    by_ctx: dict[tuple[int, ...], list[int]] = {}
    for i, (_, ctx, cont) in enumerate(requests):
        by_ctx.setdefault(effective_context(ctx, cont, max_length), []).append(i)
    groups, rest = [], []
    for ctx, idx in by_ctx.items():
        longest = max(len(requests[i][2]) for i in idx)
        # Positions used: the context, then cont[:-1]; past max_length + 1 HFLM would truncate.
        if len(idx) > 1 and len(ctx) + longest <= max_length + 1:
            groups.append(idx)
        else:
            rest.extend(idx)
    return groups, rest


def batches(groups: list[list[int]], requests: Sequence[Request], max_length: int, max_groups: int,
            token_budget: int, min_fill: float = 0.75):
    """Groups sorted longest first, cut so that each pass stays within token_budget padded
    tokens (contexts x widest context; choices x longest continuation) and max_groups groups,
    and a new batch starts when a context would be padded by more than 1/min_fill: attention
    cost grows with the square of the padded width, so one long outlier must not set the
    width of 63 short contexts."""
    def ctx_len(g):
        return len(effective_context(requests[g[0]][1], requests[g[0]][2], max_length))

    def cont_len(g):
        return max(len(requests[i][2]) for i in g)

    groups = sorted(groups, key=lambda g: (-(ctx_len(g) + cont_len(g)), -ctx_len(g)))
    batch: list[list[int]] = []
    narrowest = width = tail = rows = 0
    for g in groups:
        c = ctx_len(g)
        n, w, t, r = min(narrowest, c) if batch else c, max(width, c), max(tail, cont_len(g)), rows + len(g)
        if batch and (len(batch) >= max_groups or (len(batch) + 1) * w > token_budget or r * t > token_budget
                      or n < min_fill * w):
            yield batch
            batch, n, w, t, r = [], c, c, cont_len(g), len(g)
        batch.append(g)
        narrowest, width, tail, rows = n, w, t, r
    if batch:
        yield batch


@torch.no_grad()
def score_batch(model, requests: Sequence[Request], batch: list[list[int]], pad_id: int,
                max_length: int) -> dict[int, tuple[float, bool]]:
    """{request index: (sum log p(continuation), continuation is the greedy output)} for one batch."""
    device = model.device
    ctxs = [effective_context(requests[g[0]][1], requests[g[0]][2], max_length) for g in batch]
    width = max(len(c) for c in ctxs)
    ids = torch.full((len(ctxs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ctxs), width), dtype=torch.long)
    for r, c in enumerate(ctxs):
        ids[r, width - len(c):] = torch.tensor(list(c))
        mask[r, width - len(c):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    # Only the last context position's logits are used: the LM head (a fifth of SmolLM2-135M's
    # multiply-adds per token) and a [groups, width, vocab] logits tensor are skipped elsewhere.
    with contiguous_head_input(model):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    first = F.log_softmax(out.logits[:, -1].float(), dim=-1)  # [groups, vocab]: p(c_1 | ctx)

    # Second pass: each choice's own tokens on a copy of its context's cache. Rows are taken
    # in order of continuation length so a short choice is not padded to the longest one.
    rows = sorted(((gi, i) for gi, g in enumerate(batch) for i in g), key=lambda row: len(requests[row[1]][2]))
    kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
    lengths = mask.sum(1)
    rest_logp: dict[int, torch.Tensor] = {}
    chunk_rows = max(1, len(batch))  # as many sequences per pass as the first
    for c0 in range(0, len(rows), chunk_rows):
        chunk = [r for r in rows[c0:c0 + chunk_rows] if len(requests[r[1]][2]) > 1]
        if not chunk:
            continue
        tail = max(len(requests[i][2]) for _, i in chunk) - 1
        owner = torch.tensor([gi for gi, _ in chunk], device=device)
        ids2 = torch.full((len(chunk), tail), pad_id, dtype=torch.long)
        mask2 = torch.zeros((len(chunk), tail), dtype=torch.long)
        for r, (_, i) in enumerate(chunk):
            c = requests[i][2]
            ids2[r, : len(c) - 1] = torch.tensor(c[:-1])
            mask2[r, : len(c) - 1] = 1
        cache = DynamicCache(ddp_cache_data=[(k[owner], v[owner]) for k, v in kv])
        pos2 = lengths[owner][:, None] + torch.arange(tail, device=device)[None, :]
        out2 = model(input_ids=ids2.to(device), attention_mask=torch.cat([mask[owner], mask2.to(device)], dim=1),
                     position_ids=pos2, past_key_values=cache, use_cache=True)
        targets = [requests[i][2][1:] for _, i in chunk]
        rest_logp.update(zip((i for _, i in chunk), _token_logprobs(
            [out2.logits[r, : len(t)] for r, t in enumerate(targets)], targets)))

    scores = {}
    for gi, i in rows:
        c = requests[i][2]
        lp = first[gi, c[0]]
        greedy = bool(first[gi].argmax() == c[0])
        if len(c) > 1:
            step_lp, step_greedy = rest_logp[i]
            lp = lp + step_lp
            greedy = greedy and step_greedy
        scores[i] = (float(lp), greedy)
    return scores


def _token_logprobs(logits: list[torch.Tensor], targets: list[list[int]]) -> list[tuple[torch.Tensor, bool]]:
    """(sum of log p(target_k), every target token is the argmax) per row, from each row's
    [len(target), vocab] logits. log p = logit - logsumexp, so no second [rows, positions,
    vocab] tensor (log_softmax's output) is written and read back."""
    out = []
    for row, t in zip(logits, targets):
        row = row.float()
        target = torch.tensor(t, device=row.device)
        lp = (row.gather(1, target[:, None])[:, 0] - torch.logsumexp(row, dim=-1)).sum()
        out.append((lp, bool((row.argmax(-1) == target).all())))
    return out


def single_batches(indices: list[int], requests: Sequence[Request], max_length: int, max_rows: int,
                   token_budget: int, min_fill: float = 0.75, scored_budget: int | None = None):
    """Requests scored one sequence each, longest first, cut as `batches` cuts groups: at most
    max_rows rows and token_budget padded tokens, and never a row padded by more than 1/min_fill;
    also at most scored_budget rows x longest continuation (the logits kept: rolling perplexity
    windows are continuations of up to max_length tokens, and 64 of them x 8,192 positions x a
    49,152-token vocabulary would be 100 GB)."""
    def width(i):
        return min(len(requests[i][1]) + len(requests[i][2]) - 1, max_length)

    batch: list[int] = []
    scored = 0
    for i in sorted(indices, key=lambda i: (-width(i), i)):
        w = width(i)
        scored_if_added = (len(batch) + 1) * max(scored, len(requests[i][2]))
        if batch and (len(batch) >= max_rows or (len(batch) + 1) * width(batch[0]) > token_budget
                      or w < min_fill * width(batch[0]) or (scored_budget and scored_if_added > scored_budget)):
            yield batch
            batch, scored = [], 0
        batch.append(i)
        scored = max(scored, len(requests[i][2]))
    if batch:
        yield batch


@torch.no_grad()
def score_singles(model, requests: Sequence[Request], batch: list[int], pad_id: int,
                  max_length: int) -> dict[int, tuple[float, bool]]:
    """HFLM's one forward per request over (context + continuation)[-(max_length + 1):][:-1]
    (so the same left truncation), left-padded so that every continuation ends the row: the LM
    head then runs only on the last (longest continuation) positions, not on every context
    token, and no [rows, width, vocab] log-softmax is written. LAMBADA's one-word targets and
    WinoGrande's one context per option take this path."""
    device = model.device
    seqs = [(list(requests[i][1]) + list(requests[i][2]))[-(max_length + 1):][:-1] for i in batch]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, seq in enumerate(seqs):
        ids[r, width - len(seq):] = torch.tensor(seq)
        mask[r, width - len(seq):] = 1
    ids, mask = ids.to(device), mask.to(device)
    keep = max(len(requests[i][2]) for i in batch)
    with contiguous_head_input(model):
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                    use_cache=False, logits_to_keep=keep)
    conts = [requests[i][2] for i in batch]
    # out.logits: [rows, keep, vocab], the last `keep` positions of every row; a continuation's
    # logits are its row's last len(continuation) of them.
    scored = _token_logprobs([out.logits[r, keep - len(c):] for r, c in enumerate(conts)], conts)
    return {i: (float(lp), greedy) for i, (lp, greedy) in zip(batch, scored)}
