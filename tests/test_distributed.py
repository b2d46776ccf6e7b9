"""Distillation on several processes (spon.distributed): gloo, 2 ranks on CPU, the real stories260K.

The same global batches and seed on 2 ranks follow the single-process trajectory (alpha within
1e-5 after every checkpointed step), only rank 0 writes, a run checkpointed by 2 ranks resumes on
1, and under torchrun the CLI runs the chain with the distillation on both ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from spon import distributed, stages
from spon.config import CalibrationConfig, DistillConfig, SparsityConfig

REPO = Path(__file__).resolve().parent.parent

# 4 steps of 8 blocks (each rank 4), checkpoints (held-out selection) at steps 2 and 4
CFG = DistillConfig(steps=4, batch_size=8, lr=1e-2, warmup=1, seed=1, checkpoint_every=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def calib(tmp_path_factory, stories_path) -> Path:
    """24 sampled blocks of 32 tokens (6 held out) and 50 % thresholds."""
    d = tmp_path_factory.mktemp("calib")
    model = stages.base_model(str(stories_path))
    stages.calibrate(model, CalibrationConfig(num_blocks=24, block_len=32), d)
    stages.thresholds(model, d, SparsityConfig(sparsity=0.5), d)
    return d


def _distill(model: str, calib: Path, out: Path, cfg: DistillConfig) -> None:
    stages.distill(stages.base_model(model), calib, calib, cfg, out, checkpoint_dir=out / "alpha_checkpoints")


def _rank(rank: int, world: int, port: int, model: str, calib: str, outs: list[str], cfg_json: str) -> None:
    """One rank as torchrun starts it: the launcher's environment, then spon.distributed.init."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # two ranks on two cores
    assert distributed.init("cpu") == world
    try:
        # each rank its own out dir, so what rank 1 would write could not hide among rank 0's files
        _distill(model, Path(calib), Path(outs[rank]), DistillConfig.model_validate_json(cfg_json))
    finally:
        distributed.close()


def checkpoint(out: Path, step: int) -> dict:
    return torch.load(out / "alpha_checkpoints" / f"alpha_step{step:07d}.pt", map_location="cpu", weights_only=True)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
def test_two_ranks_follow_the_single_process_trajectory_only_rank0_writes_and_resume_on_one(
        stories_path, calib, tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    _distill(str(stories_path), calib, single, CFG)

    outs = [tmp_path / "rank0", tmp_path / "rank1"]
    for o in outs:
        o.mkdir()
    mp.spawn(_rank, args=(2, free_port(), str(stories_path), str(calib), [str(o) for o in outs],
                          CFG.model_dump_json()), nprocs=2, join=True)

    assert list(outs[1].iterdir()) == []  # rank 1 wrote nothing: no output, no checkpoint
    assert sorted(p.name for p in (outs[0] / "alpha_checkpoints").iterdir()) == \
        ["alpha_step0000002.pt", "alpha_step0000004.pt"]
    for step in (2, 4):
        two, one = checkpoint(outs[0], step), checkpoint(single, step)
        assert max_diff(two["alphas"], one["alphas"]) < 1e-5, step
        assert two["step"] == step and two["key"] == one["key"]  # the same run, whatever the world size
    # Each rank's half of the batch is one of single-process --grad-accum 2's micro-batches, and the
    # fp64 all-reduce of two fp32 halves rounds as fp32 accumulation does: the same numbers.
    accum = tmp_path / "accum2"
    accum.mkdir()
    _distill(str(stories_path), calib, accum, CFG.model_copy(update={"grad_accum": 2}))
    assert max_diff(checkpoint(outs[0], 4)["alphas"], checkpoint(accum, 4)["alphas"]) < 1e-7
    d2, d1 = (json.loads((o / stages.DISTILL_FILE).read_text()) for o in (outs[0], single))
    assert (d2["world_size"], d1["world_size"]) == (2, 1)
    # the all-reduced loss and the sharded held-out scores are the single-process numbers
    assert d2["kl_history"] == pytest.approx(d1["kl_history"], abs=1e-5)
    # Each rank scores its shard in other batch shapes, so fp32 rounds differently, and an activation
    # within rounding of SPON's re-taken tau can be kept on one side and dropped on the other
    # (measured 2.8e-5 apart at step 2; alpha and the training KL still agree within 1e-5).
    assert d2["heldout_kl_by_step"] == pytest.approx(d1["heldout_kl_by_step"], abs=1e-4)
    assert d2["heldout_kl_before"] == pytest.approx(d1["heldout_kl_before"], abs=1e-6)
    assert d2["selected_step"] == d1["selected_step"]

    # Resume on 1 process what 2 ranks checkpointed at step 2: the same trajectory to step 4.
    resumed = tmp_path / "resumed"
    shutil.copytree(outs[0] / "alpha_checkpoints", resumed / "alpha_checkpoints")
    (resumed / "alpha_checkpoints" / "alpha_step0000004.pt").unlink()
    _distill(str(stories_path), calib, resumed, CFG)
    d = json.loads((resumed / stages.DISTILL_FILE).read_text())
    assert d["resumed_from"] == 2 and d["world_size"] == 1
    assert max_diff(checkpoint(resumed, 4)["alphas"], checkpoint(single, 4)["alphas"]) < 1e-5
    assert d["kl_history"] == pytest.approx(d1["kl_history"], abs=1e-5)
    assert d["selected_step"] == d1["selected_step"]


@pytest.mark.slow
def test_torchrun_runs_the_chain_with_the_distillation_on_two_ranks(tmp_path, sample_txt):
    """The command the spon-torchrun deployment runs (deployments/torchrun.py), on 2 CPU ranks:
    rank 0 calibrates, both distill, rank 0 fuses, evaluates and writes the summary, which records
    the world size."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("spon_torchrun_deployment", REPO / "deployments" / "torchrun.py")
    deployment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(deployment)
    out, config = tmp_path / "run", tmp_path / "run.json"
    config.write_text(json.dumps({"calibration": {"num_blocks": 16, "block_len": 32},
                                  "distill": {"steps": 2, "batch_size": 4, "checkpoint_every": 2},
                                  "eval": {"files": [str(sample_txt)], "max_tokens": 128}}))
    r = subprocess.run(deployment.torchrun_command(2, config, out), env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert len(summary["kl_history"]) == 2
    assert sorted(p.name for p in (out / "alpha_checkpoints").iterdir()) == ["alpha_step0000002.pt"]


@pytest.mark.parametrize("argv, hint", [
    (["run", "--out", "x"], "spon run --in-process"),
    (["fuse", "--calib", "c", "--alpha", "a", "--out", "x"], "only `spon distill`"),
])
def test_other_commands_refuse_to_run_under_torchrun(argv, hint, monkeypatch, capsys, tmp_path):
    """The Prefect flow runs its stages as tasks of one process, and the other commands would run
    once per rank writing the same files: one line, exit 2, before anything starts."""
    from spon.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and hint in err and "WORLD_SIZE=2" in err
    assert list(tmp_path.iterdir()) == []


def test_mlflow_params_record_the_world_size():
    from spon.runtime.tracking import flatten, run_params

    summary = {"config": {"distill": {"steps": 4}}, "world_size": 2}
    assert flatten(run_params(summary)) == {"distill.steps": "4", "world_size": "2"}
    assert run_params({"config": {}})["world_size"] == 1  # a summary written before world_size existed
