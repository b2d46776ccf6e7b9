"""Sliding-window perplexity over documents, for any mode of the sparse model.

Each document is scored on its own, BOS first, with windows of `window` tokens advanced by
`stride`: every token is predicted once, with up to window - stride tokens of extra context.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from spon.calibration import read_documents
from spon.errors import SponError
from spon.sparse import counting_zeros, mode, sparse_linears


@torch.no_grad()
def document_nll(model, ids: torch.Tensor, window: int, stride: int) -> tuple[float, int]:
    """Sum of negative log-likelihoods and count of predicted tokens for one token sequence."""
    if stride < 1 or stride > window:
        raise SponError(f"need 1 <= stride <= window, got stride={stride}, window={window}")
    device = next(model.parameters()).device
    n = ids.numel()
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, max(n - 1, 1), stride):
        end = min(begin + window, n)
        chunk = ids[begin:end].unsqueeze(0).to(device)
        logits = model(chunk, use_cache=False).logits[0, :-1].float()
        targets = chunk[0, 1:]
        # Only score targets not scored by the previous window.
        first = max(prev_end - begin - 1, 0)
        losses = F.cross_entropy(logits[first:], targets[first:], reduction="none")
        nll += losses.sum().item()
        count += losses.numel()
        prev_end = end
        if end == n:
            break
    return nll, count


def first_characters(documents: list[str], max_chars: int) -> list[str]:
    """The documents, in order, cut where their first `max_chars` characters end."""
    out, left = [], max_chars
    for doc in documents:
        if left <= 0:
            break
        out.append(doc[:left])
        left -= len(out[-1])
    return out


def perplexity(model, tokenizer, documents: list[str], window: int = 512, stride: int = 256,
               max_tokens: int | None = None, max_chars: int | None = None) -> dict:
    """Perplexity of `model` in its current mode; also the realized sparsity while scoring.
    max_tokens: stop after that many predicted tokens (the same prefix of the text for every mode).
    max_chars: score the first that many characters (the same text for every tokenizer, so two
    models' perplexities are comparable; the result then also counts the characters)."""
    if max_tokens is not None and max_chars is not None:
        raise SponError("give max_tokens or max_chars, not both: they cut the text in two different places")
    if max_chars is not None:
        if max_chars < 1:
            raise SponError(f"max_chars must be >= 1, got {max_chars}")
        documents = first_characters(documents, max_chars)
    if not documents:
        raise SponError("no documents to score")
    total, count = 0.0, 0
    with counting_zeros(model) as zeros:
        for doc in documents:
            ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
            if tokenizer.bos_token_id is not None:
                ids = [tokenizer.bos_token_id] + ids
            if max_tokens is not None:
                if count >= max_tokens:
                    break
                ids = ids[: max_tokens - count + 1]  # n tokens predict n - 1
                if len(ids) < 2:
                    break
            nll, c = document_nll(model, torch.tensor(ids), window, stride)
            total += nll
            count += c
    out = {"perplexity": math.exp(total / count), "tokens": count}
    if max_chars is not None:
        out["characters"] = sum(map(len, documents))
    if sparse_linears(model):
        out["realized_sparsity"] = zeros["weighted"]
    return out


def perplexities(
    model, tokenizer, files: list[str], modes=("dense", "teal", "spon"), window: int = 512, stride: int = 256,
    max_tokens: int | None = None, max_chars: int | None = None,
) -> dict[str, dict[str, dict]]:
    """{file: {mode: {"perplexity", "tokens", "realized_sparsity"}}} in one call."""
    result: dict[str, dict[str, dict]] = {}
    for f in files:
        docs = read_documents(f)
        result[str(f)] = {}
        for m in modes:
            with mode(model, m):
                result[str(f)][m] = perplexity(model, tokenizer, docs, window, stride, max_tokens, max_chars)
    return result
