"""Direct in-domain signal, outside lm-eval: token perplexity and KL to the dense fp32 model.

lm-eval's rolling perplexity reports word/byte perplexity; token perplexity (what `spon run`
reports) and KL(dense || variant) per token are what respond to sparsification on a model this
small, so they are measured here on the same documents with spon.perplexity's conventions
(each document scored on its own, BOS first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spon.calibration import read_documents
from spon.perplexity import perplexity
from spon.sparse import counting_zeros, mode


@torch.no_grad()
def _logprobs(model, ids: list[torch.Tensor], window: int) -> list[torch.Tensor]:
    return [F.log_softmax(model(x[:window].unsqueeze(0), use_cache=False).logits[0, :-1].float(), -1) for x in ids]


def _documents(tokenizer, path) -> list[torch.Tensor]:
    out = []
    for doc in read_documents(path):
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        out.append(torch.tensor(([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids))
    return out


class Fidelity:
    """Holds the dense reference log-probs once; scores each variant against them."""

    def __init__(self, reference_model, tokenizer, path, window: int = 512):
        self.tokenizer, self.path, self.window = tokenizer, path, window
        self.docs = _documents(tokenizer, path)
        with mode(reference_model, "dense"):
            self.reference = _logprobs(reference_model, self.docs, window)

    def measure(self, model, run_mode: str) -> dict:
        with mode(model, run_mode):
            ppl = perplexity(model, self.tokenizer, read_documents(self.path), window=self.window, stride=self.window // 2)
            with counting_zeros(model) as z:
                lp = _logprobs(model, self.docs, self.window)
        kl_sum = sum(F.kl_div(q, p, log_target=True, reduction="sum").item() for p, q in zip(self.reference, lp))
        n = sum(p.shape[0] for p in self.reference)
        return {
            "token_perplexity": ppl["perplexity"],
            "tokens": ppl["tokens"],
            "kl_to_dense": kl_sum / n,
            "realized_sparsity": z["weighted"] if run_mode != "dense" else 0.0,
        }
