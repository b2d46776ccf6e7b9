"""A spon run on every GPU of one node as one Prefect flow run (deployment `spon-torchrun`).

The pipeline flow (`spon run`) runs its stages as Prefect tasks of one process, so it cannot be a
torchrun job. This flow launches the method's own chain under torchrun instead,
`torchrun --standalone --nproc-per-node N -m spon.cli run --in-process` (rank 0 calibrates, every
rank distills alpha on its own GPU, rank 0 fuses and evaluates), then `spon publish`es the result:
the MLflow run (with `world_size` among its params), the stored model and the registry version,
as the pipeline would. A rerun with the same `out` resumes the distillation from its checkpoints.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger


def torchrun_command(nproc_per_node: int, config_file: str | Path, out: str | Path) -> list[str]:
    """The chain on `nproc_per_node` ranks of this node (--standalone: rendezvous on a free local port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc_per_node),
            "-m", "spon.cli", "-q", "run", "--in-process", "--config", str(config_file), "--out", str(out)]


@flow(name="spon_torchrun")
def spon_torchrun(config: dict, nproc_per_node: int = 8, publish: bool = True) -> dict:
    """`config`: a RunConfig as a mapping (as for spon_pipeline); its `device` should be cuda."""
    log = get_run_logger()
    out = Path(config.get("out") or "out/run")
    out.parent.mkdir(parents=True, exist_ok=True)
    config_file = out.parent / f"{out.name}.torchrun-config.json"  # beside out: an input may not lie inside it
    config_file.write_text(json.dumps({**config, "out": str(out)}))
    for cmd in [torchrun_command(nproc_per_node, config_file, out)] + (
            [[sys.executable, "-m", "spon.cli", "publish", str(out)]] if publish else []):
        log.info("running %s", " ".join(cmd))
        rc = subprocess.run(cmd).returncode  # its output goes to the worker's log as it runs
        if rc != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` exited {rc}: see its output above")
    return json.loads((out / "summary.json").read_text())
