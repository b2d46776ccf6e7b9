"""Registration is idempotent per run: a publish repeated after a kill registers nothing twice."""

from __future__ import annotations

import pytest
from spon.format import SIDECAR

pytestmark = pytest.mark.slow  # a real mlflow tracking store, ~8 s a test: not in the fast tier


def test_register_returns_the_runs_existing_version(tmp_path):
    from spon.runtime import tracking
    from spon.runtime.settings import PipelineSettings

    s = PipelineSettings(work_dir=str(tmp_path / "work"), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = []
    for name in ("first", "second"):
        run = tracking.start_run(s, {"sparsity": 0.5}, name, None, {})
        tracking.end_run(s, run)
        runs.append((run, tracking.artifact_uri(s, run, tracking.FUSED_ARTIFACT)))
    (r1, src1), (r2, src2) = runs
    assert tracking.register(s, "m", r1, src1, {}) == "1"
    assert tracking.register(s, "m", r1, src1, {}) == "1"  # the same run again: its version
    assert tracking.register(s, "m", r2, src2, {}) == "2"  # another run: a new version
    assert tracking.run_finished(s, r1) and not tracking.run_finished(s, "no-such-run")


def test_quality_gate_refuses_a_spon_worse_than_its_teal(tmp_path):
    """publish stores and registers (candidate) a SPON worse than its own TEAL on the eval text,
    but never moves `champion` to it, even when no champion exists and its SPON perplexity would
    be the best ever seen; a good result after it becomes champion."""
    from mlflow import MlflowClient

    from spon.runtime import tracking
    from spon.runtime.settings import PipelineSettings
    from spon.tasks.publish import publish, quality_refusal

    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / SIDECAR).write_text("{}")
    s = PipelineSettings(work_dir=str(tmp_path / "work"), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                         store=str(tmp_path / "store"))
    base = {"model": "m", "sparsity": 0.5, "protocol": "all", "heldout_kl": {"teal": 0.6, "spon": 0.5}}
    worse = {**base, "perplexity": {"dense": 3.5, "teal": 7.0, "spon": 7.2},
             "quality_warnings": ["SPON perplexity 7.2000 is above TEAL's 7.0000 on t.txt"]}
    good = {**base, "perplexity": {"dense": 3.5, "teal": 7.0, "spon": 6.5}, "quality_warnings": []}
    assert quality_refusal(good) is None and "above TEAL" in quality_refusal(worse)
    assert "held-out KL" in quality_refusal({**good, "heldout_kl": {"teal": 0.5, "spon": 0.6}})

    c = MlflowClient(s.tracking_uri, s.tracking_uri)
    results = []
    for summary in (worse, good):
        run = tracking.start_run(s, {}, "r", None, {})
        tracking.log_artifacts(s, run, {"fused_model": str(fused)})
        tracking.end_run(s, run)
        results.append(publish.fn(str(fused), run, summary, s))
    (w, g) = results
    assert w["champion"] is False and "above TEAL" in w["gate"]["refused"]
    assert str(c.get_model_version_by_alias(w["registered_model"], "candidate").version) == g["version"] == "2"
    assert g["champion"] is True and g["gate"]["refused"] is None
    assert str(c.get_model_version_by_alias(g["registered_model"], "champion").version) == "2"
