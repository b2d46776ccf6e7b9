"""SIGKILL a real `spon run` at successive stage boundaries, rerunning the same command each time
(a chain: each rerun resumes and is itself killed at the next point), then let it finish.

A stage counts as finished once Prefect's cache record for it exists (its output dir alone is not
enough: a kill between the rename and the record write rightly recomputes it). Kill points are
observed on the filesystem only: a stage's record appearing; the last one (evaluate) is right
before tracking and publishing. Checked: every stage finished before a kill keeps its files
(same inode and mtime) through all later attempts; the last attempt succeeds with exactly one
registry version and one stored manifest.

Two more kill points inside tracking/publish: right after the MLflow run is complete (its id
recorded in OUT/tracked_run.json) and right after the model's manifest lands in the store (before
or while it is registered). The reruns reuse the recorded run, so publish finds the stored copy
under that run's prefix instead of storing a second one. Then the work dir is deleted while the cache records
(kept outside it here, as a user's PREFECT_LOCAL_STORAGE_PATH would) survive: the same command
recomputes every stage instead of trusting records that point at deleted files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import TINY, cli_env

pytestmark = pytest.mark.slow  # services / subprocesses: not in the fast tier

STAGES = ["calibrate", "thresholds", "distill", "fuse", "evaluate"]
STAGE_KILLS = ["calibrate", "thresholds", "fuse", "evaluate"]  # mid-distillation: test_resume_sigkill.py
PUBLISH_KILLS = ["tracked", "stored"]
KILL_POINTS = STAGE_KILLS + PUBLISH_KILLS


def command(root: Path, sample_txt: Path) -> list[str]:
    return [sys.executable, "-m", "spon.cli", "-q", "run", "--config", str(root / "tiny.json"), "--eval-text", str(sample_txt),
            "--out", str(root / "out"), "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}", "--store", str(root / "store")]


def records(root: Path) -> dict[str, str]:
    """stage -> dir of every complete cache record (a record caught mid-write is skipped)."""
    found = {}
    for f in (root / "records").glob("*"):
        try:
            ref = json.loads(json.loads(f.read_text())["result"])["data"]
            found[ref["stage"]] = ref["dir"]
        except (ValueError, KeyError, TypeError, OSError):
            continue
    return found


def reached(root: Path, point: str) -> bool:
    if point == "tracked":
        return (root / "out" / "tracked_run.json").is_file()
    if point == "stored":
        return any((root / "store").rglob("manifest.json"))
    return point in records(root)


def tracked_run_id(root: Path) -> str | None:
    try:
        return json.loads((root / "out" / "tracked_run.json").read_text())["run_id"]
    except (OSError, ValueError, KeyError):
        return None


def snapshot(dirs: dict[str, str]) -> dict[str, list[tuple[str, int, int]]]:
    return {st: [(str(f), f.stat().st_ino, f.stat().st_mtime_ns) for f in sorted(Path(d).rglob("*")) if f.is_file()]
            for st, d in dirs.items()}


@pytest.fixture(scope="module")
def chain(tmp_path_factory, sample_txt):
    root = tmp_path_factory.mktemp("kills")
    (root / "tiny.json").write_text(json.dumps(TINY))
    env = cli_env(PREFECT_LOCAL_STORAGE_PATH=str(root / "records"))
    kills = {}
    for point in KILL_POINTS:
        already = reached(root, point)
        with open(root / f"log-{point}.txt", "w") as log:
            proc = subprocess.Popen(command(root, sample_txt), env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None and not reached(root, point):
                time.sleep(0.01)
            alive = proc.poll() is None
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        finished = records(root)
        kills[point] = {"already": already, "alive": alive, "reached": reached(root, point), "finished": finished,
                        "files": snapshot(finished), "stored": any((root / "store").rglob("manifest.json")),
                        "run_id": tracked_run_id(root)}
    final = subprocess.run(command(root, sample_txt), env=env, cwd=root, capture_output=True, text=True, timeout=600)
    after = {p: snapshot({st: d for st, d in k["finished"].items()}) for p, k in kills.items()}
    summary = json.loads((root / "out" / "summary.json").read_text()) if final.returncode == 0 else {}

    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{root / 'mlflow.db'}", f"sqlite:///{root / 'mlflow.db'}")
    versions = [str(v.version) for v in c.search_model_versions(f"name='{summary.get('registered_model')}'")]
    manifests = list((root / "store").rglob("manifest.json"))

    shutil.rmtree(root / "out" / "work")  # the cache records in root/records stay behind
    rerun = subprocess.run(command(root, sample_txt), env=env, cwd=root, capture_output=True, text=True, timeout=600)
    return {"kills": kills, "after": after, "final": final, "summary": summary, "versions": versions,
            "manifests": manifests, "rerun": rerun, "root": root}


@pytest.mark.parametrize("point", STAGE_KILLS)
def test_killed_at_stage_boundary_resumes_without_recomputing(chain, point):
    k = chain["kills"][point]
    assert not k["already"], f"{point} was finished before this attempt started"
    assert k["alive"] and k["reached"], f"the run ended before reaching {point}"
    assert not k["stored"], f"killed at {point} only after publishing began"
    assert set(STAGES[:STAGES.index(point) + 1]) <= set(k["finished"]), (point, sorted(k["finished"]))
    # every later attempt served these stages from the cache: same files, never rewritten
    assert chain["after"][point] == k["files"], point


@pytest.mark.parametrize("point", PUBLISH_KILLS)
def test_killed_while_publishing_reuses_the_tracked_run(chain, point):
    k = chain["kills"][point]
    # Publishing a tiny model takes milliseconds, so the previous kill may already have landed
    # past this point (then that attempt was the one killed here); either way this attempt was
    # alive at the point and every attempt must agree on one run.
    assert k["alive"] and k["reached"], (point, k["alive"], k["reached"])
    assert set(STAGES) <= set(k["finished"])
    # the run tracked before the first publish kill is the one every later attempt used
    assert k["run_id"] == chain["kills"]["tracked"]["run_id"] == chain["summary"]["mlflow_run_id"]
    assert chain["after"][point] == k["files"]


def test_chain_finishes_with_one_version_and_one_stored_copy(chain):
    final = chain["final"]
    assert final.returncode == 0, (final.stdout + final.stderr)[-3000:]
    assert chain["versions"] == ["1"]
    assert len(chain["manifests"]) == 1
    assert chain["manifests"][0].parent.name == chain["summary"]["mlflow_run_id"]  # stored under the tracked run


def test_deleted_work_dir_is_recomputed_not_read_from_stale_records(chain):
    r = chain["rerun"]
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "which is gone: recomputing" in r.stdout + r.stderr
    work = chain["root"] / "out" / "work"
    assert all((work / st).is_dir() for st in STAGES)
    summary = json.loads((chain["root"] / "out" / "summary.json").read_text())
    assert summary["perplexity"] == chain["summary"]["perplexity"]  # same inputs, same seed: same result
