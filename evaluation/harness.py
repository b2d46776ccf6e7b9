"""Score an in-memory sparse model with lm-eval: one HFLM over the model object itself.

The model is switched to each variant's mode before scoring and every SparseLinear counts the
activations it zeroes, so the results carry the sparsity realized on the task's own text.
"""

from __future__ import annotations

import logging
import time

from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from spon.evaluation import shared_context
from spon.evaluation.paired import item_scores
from spon.sparse import SparseLinear, counting_zeros, mode

log = logging.getLogger(__name__)


class SponLM(HFLM):
    """HFLM that runs each multiple-choice context once for all its choices, every other request
    with the LM head on its continuation only (see evaluation/shared_context.py), and memoises
    tokenization: every variant scores the same strings, and the slow sentencepiece tokenizer
    would otherwise dominate a tiny model's evaluation time."""

    def __init__(self, *args, share_context: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self._tok_cache: dict = {}
        self.truncated_continuations = 0
        self.share_context = share_context

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        if not self.share_context or self.backend != "causal" or self._position_dependent_sparsity():
            return self._hflm_bounded(requests, disable_tqdm, override_bs)
        groups, rest = shared_context.group_by_context(requests, self.max_length)
        scores: dict[int, tuple[float, bool]] = {}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        # As many sequences per pass as HFLM would run (batch_size x max_length padded tokens).
        batch_size = self.batch_size if isinstance(self.batch_size, int) else 64
        budget = batch_size * self.max_length
        with tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                  desc="Running loglikelihood requests (shared contexts)") as bar:
            for batch in shared_context.batches(groups, requests, self.max_length, batch_size, budget):
                scores.update(shared_context.score_batch(self.model, requests, batch, pad, self.max_length))
                bar.update(sum(map(len, batch)))
            # ~1 GB of fp32 logits at most per pass of single requests
            scored_budget = max(1, 2**28 // getattr(self.model.config, "vocab_size", 2**15))
            for single in shared_context.single_batches(rest, requests, self.max_length, batch_size, budget,
                                                        scored_budget=scored_budget):
                scores.update(shared_context.score_singles(self.model, requests, single, pad, self.max_length))
                bar.update(len(single))
        for i, (strings, _, _) in enumerate(requests):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, scores[i])
        return [scores[i] for i in range(len(requests))]

    def _hflm_bounded(self, requests, disable_tqdm: bool = False, override_bs=None):
        """HFLM's own path with no more rows a batch than keep its [rows, width, vocab] fp32 logits
        near 1 GB (it also writes their log-softmax): 64 BoolQ passages of 500 tokens x SmolLM2's
        49,152-token vocabulary were 2 x 6.3 GB, and two such workers were killed for memory."""
        saved = self.batch_size_per_gpu
        if isinstance(saved, int) and requests:
            longest = max(min(len(ctx) + len(cont), self.max_length + 1) for _, ctx, cont in requests)
            vocab = getattr(self.model.config, "vocab_size", 2**15)
            self.batch_size_per_gpu = max(1, min(saved, 2**28 // (vocab * longest)))
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        finally:
            self.batch_size_per_gpu = saved

    def _position_dependent_sparsity(self) -> bool:
        """TEAL's last_half protocol keeps the first half of each forward's sequence dense, so a
        context and its continuation run as two forwards would sparsify other positions than
        HFLM's one forward over both: such models keep HFLM's path."""
        return any(m.protocol == "last_half" and m.mode != "dense"
                   for m in self.model.modules() if isinstance(m, SparseLinear))

    def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
        key = (string, add_special_tokens, left_truncate_len, tuple(sorted(kwargs.items())))
        hit = self._tok_cache.get(key)
        if hit is None:
            hit = self._tok_cache[key] = super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
        return list(hit)  # callers may mutate

    def _encode_pair(self, context, continuation):
        """lm-eval asserts a continuation fits the context window; a few PIQA solutions (4 of
        3676) are longer than stories260K's 512 tokens. Score their first max_length tokens
        instead of aborting the whole suite, and count how often that happened."""
        ctx, cont = super()._encode_pair(context, continuation)
        if len(cont) > self.max_length:
            self.truncated_continuations += 1
            cont = cont[: self.max_length]
        return ctx, cont


def make_lm(model, tokenizer, batch_size: int = 64, max_length: int | None = None, share_context: bool = True) -> SponLM:
    return SponLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                  share_context=share_context)


def evaluate_tasks(lm: SponLM, model, run_mode: str, tasks: dict, limit=None, bootstrap_iters: int = 1000,
                   task_manager=None) -> dict[str, dict]:
    """{task: {"metrics", "n", "items", "realized_sparsity", "wall_s"}} for one mode. "items" holds
    each item's correctness by doc id (evaluation/paired.py), so variants can be compared item by
    item."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    task_manager = task_manager or TaskManager(include_defaults=False)  # see suite.run_suite
    out = {}
    for name, task in tasks.items():
        t0, cpu0 = time.perf_counter(), time.process_time()
        lm.truncated_continuations = 0
        with mode(model, run_mode), counting_zeros(model) as zeros:
            res = simple_evaluate(
                model=lm, tasks=[task], limit=limit, bootstrap_iters=bootstrap_iters, log_samples=True,
                task_manager=task_manager, verbosity="WARNING",
            )
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        task_results = {k: v for k, v in res["results"].items()}
        n = {k: v.get("effective", v.get("original")) for k, v in res.get("n-samples", {}).items()}
        for tname, metrics in task_results.items():
            out[tname] = {
                "metrics": {k: v for k, v in metrics.items() if k != "alias" and isinstance(v, (int, float))},
                "n": n.get(tname),
                "items": item_scores(res.get("samples", {}).get(tname, [])),
                "realized_sparsity": zeros["weighted"] if run_mode != "dense" else 0.0,
                "wall_s": round(wall, 2),
                # CPU time of this process: on a shared machine, wall time also counts other jobs
                "cpu_s": round(cpu, 2),
                "truncated_continuations": lm.truncated_continuations,
            }
        log.info("%-8s %-16s sparsity %.3f  %.1fs  %s", run_mode, name, out[name]["realized_sparsity"] if name in out else -1,
                 wall, {k: round(v, 4) for k, v in out.get(name, {}).get("metrics", {}).items() if "stderr" not in k})
    return out
