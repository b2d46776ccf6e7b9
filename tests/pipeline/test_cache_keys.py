"""One key per stage, covering the code: editing a method file recomputes exactly the stages
downstream of it."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from pipeline_helpers import tiny_config

import pytest



@contextmanager
def edited(module: str):
    """One comment line appended to a module's source for the duration (restored after)."""
    import importlib.util

    from spon.runtime.cache import code_digest

    path = Path(importlib.util.find_spec(module).origin)
    original = path.read_bytes()
    try:
        path.write_bytes(original + b"\n# one changed line\n")
        code_digest.cache_clear()
        yield
    finally:
        path.write_bytes(original)
        code_digest.cache_clear()


@pytest.mark.parametrize("module, changed", [
    ("spon.distill", {"distill"}),
    ("spon.thresholds", {"thresholds", "distill"}),  # distill re-takes SPON's thresholds with alpha in place
    # thresholds and distill name its Calibration type; perplexity reads documents with it
    ("spon.calibration", {"calibrate", "thresholds", "distill", "evaluate", "quantize"}),
    ("spon.sparse", {"calibrate", "thresholds", "distill", "fuse", "evaluate", "quantize"}),
    ("spon.kernels.reference", {"calibrate", "thresholds", "distill", "fuse", "evaluate", "quantize"}),
])
def test_a_stages_code_digest_changes_exactly_when_code_it_runs_changes(module, changed):
    from spon.runtime.cache import STAGE_CODE, code_digest

    stages = [s for s in STAGE_CODE if s != "lm_eval"]
    before = {s: code_digest(STAGE_CODE[s]) for s in stages}
    with edited(module):
        after = {s: code_digest(STAGE_CODE[s]) for s in stages}
    assert {s for s in stages if before[s] != after[s]} == changed


@pytest.mark.slow  # services: not in the fast tier
def test_editing_distill_recomputes_distill_and_everything_after_it(prefect_harness, tmp_path, sample_txt):
    import spon.distill
    from spon.flows.pipeline import spon_pipeline
    from spon.runtime.cache import code_digest
    from spon.runtime.settings import PipelineSettings

    settings = PipelineSettings(work_dir=str(tmp_path / "work"), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                                store=str(tmp_path / "store"))
    cfg = tiny_config(tmp_path / "run", sample_txt)
    first = spon_pipeline(cfg, settings)
    stamp = {st: Path(d).stat().st_mtime_ns for st, d in first["stage_dirs"].items()}
    source = Path(spon.distill.__file__)
    original = source.read_bytes()
    try:
        source.write_bytes(original + b"\n# one changed line\n")
        code_digest.cache_clear()
        second = spon_pipeline(cfg, settings)
    finally:
        source.write_bytes(original)
        code_digest.cache_clear()
    k1, k2 = first["stage_keys"], second["stage_keys"]
    assert {st for st in k1 if k1[st] != k2[st]} == {"distill", "fuse", "evaluate"}
    for st in ("calibrate", "thresholds"):  # served from the cache: the very same directory, not rewritten
        assert second["stage_dirs"][st] == first["stage_dirs"][st]
        assert Path(second["stage_dirs"][st]).stat().st_mtime_ns == stamp[st]
    assert second["perplexity"] == first["perplexity"]  # a comment changes the key, not the numbers
    third = spon_pipeline(cfg, settings)  # the original code again: the first run's keys, all cached
    assert third["stage_keys"] == k1
