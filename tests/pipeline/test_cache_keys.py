"""One key per stage, covering the code: editing a method file recomputes exactly the stages
downstream of it."""

from __future__ import annotations

from pathlib import Path

from pipeline_helpers import tiny_config

import pytest

pytestmark = pytest.mark.slow  # services / subprocesses: not in the fast tier


def closure(stage: str) -> set[str]:
    """Module names whose source is part of a stage's code digest."""
    from spon.runtime import cache

    seen, todo = set(), list(cache.STAGE_CODE[stage])
    while todo:
        name = todo.pop()
        path = cache._module_file(name)
        if name in seen or name == "spon" or path is None:
            continue
        seen.add(name)
        todo.extend(cache._imports(name, path.read_text(), path.name == "__init__.py"))
        if name.rpartition(".")[0] not in ("", "spon"):
            todo.append(name.rpartition(".")[0])
    return seen


def test_stage_code_is_the_import_closure_of_its_method_module():
    assert {"spon.distill", "spon.sparse", "spon.model", "spon.kernels.reference", "spon.kernels"} <= closure("distill")
    assert "spon.thresholds" not in closure("distill") and "spon.calibration" not in closure("distill")
    assert "spon.distill" not in closure("calibrate") and "spon.distill" not in closure("thresholds")
    assert "spon.thresholds" in closure("thresholds") and "spon.fuse" in closure("fuse")


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
