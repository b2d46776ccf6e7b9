"""evaluate: perplexity of a fused model in dense, TEAL and SPON modes -> eval.json.

lm-eval tasks and quantized variants arrive with evaluation/; they become sibling tasks taking
the same ModelRef (see flows/pipeline.py).
"""

from __future__ import annotations

import time

from prefect import task

from spon.config import EvalConfig
from spon.fuse import load_sparse_model
from spon.perplexity import perplexities

from tasks.policies import STAGE
from tasks.types import ModelRef, StageRef, TextFile
from tasks.workdir import atomic_dir, stage_dir, stage_key, write_json

EVAL_FILE = "eval.json"
MODES = ("dense", "teal", "spon")


@task(name="evaluate", **STAGE)
def evaluate(model: ModelRef, cfg: EvalConfig, files: list[TextFile], device: str, dtype: str, work_dir: str) -> StageRef:
    t0 = time.perf_counter()
    final = stage_dir(work_dir, "evaluate", stage_key(model.digest, cfg.window, cfg.stride, files, device, dtype))
    m, tok, _ = load_sparse_model(model.path, device, dtype)
    ppl = perplexities(m, tok, [f.path for f in files], MODES, cfg.window, cfg.stride) if files else {}
    with atomic_dir(final) as tmp:
        write_json(tmp / EVAL_FILE, ppl)
    return StageRef(stage="evaluate", dir=str(final), wall_s=round(time.perf_counter() - t0, 3))
