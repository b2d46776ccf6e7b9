"""Registration is idempotent per run: a publish repeated after a kill registers nothing twice."""

from __future__ import annotations


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
