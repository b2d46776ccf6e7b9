"""Data-parallel distillation across processes (torchrun): the one place the process group lives.

Every rank holds the whole frozen model and trains the same alpha; each takes a contiguous slice
of every step's global batch, and the alpha gradients are summed across ranks in one flat
all-reduce per step, so every rank applies the same update and alpha stays identical everywhere.
With one process (no torchrun, or WORLD_SIZE=1) nothing here starts a process group and every
function is the identity: the single-process path is exactly what it was.

    torchrun --nproc-per-node N -m spon.cli distill --calib DIR --out DIR   # also: run --in-process

The launcher's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) is all
`init` reads. Backends: NCCL when the run's device is CUDA (rank r on cuda:LOCAL_RANK), gloo on CPU.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist

from spon.errors import SponError


def launched() -> int:
    """The world size torchrun (or any launcher setting WORLD_SIZE) started this process in; 1 when
    it was started on its own."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the only rank that writes checkpoints, outputs and summaries, and prints."""
    return rank() == 0


def local_device(device: str) -> str:
    """The device this rank computes on: cuda:LOCAL_RANK for a CUDA run under a launcher (one GPU per
    rank, whatever cuda[:N] was asked), the device as given otherwise."""
    if world_size() > 1 and torch.device(device).type == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def init(device: str) -> int:
    """Join the launcher's process group once (no-op when started alone or already joined); returns
    the world size."""
    n = launched()
    if n <= 1 or dist.is_initialized():
        return world_size()
    if not dist.is_available():
        raise SponError(f"WORLD_SIZE={n} but this torch {torch.__version__} has no torch.distributed")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise SponError(f"rank with LOCAL_RANK={local} has no GPU of its own ({torch.cuda.device_count()} "
                            f"visible): start at most that many processes per node (--nproc-per-node)")
        torch.cuda.set_device(local)
    # `spon run --in-process`: the other ranks wait at a barrier while rank 0 calibrates (hours for
    # a 70B model), far past the default timeout (10 min NCCL, 30 min gloo). A rank that dies ends
    # them all through torchrun; the timeout only bounds a real deadlock.
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=12))
    return world_size()


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo is given CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard(x: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous slice of `x` (rank r of N: rows [r*n//N, (r+1)*n//N)); `x` itself
    with one process. Slices differ in size by at most one row; a rank may get none."""
    n_ranks = world_size()
    if n_ranks == 1:
        return x
    r, n = rank(), len(x)
    return x[r * n // n_ranks : (r + 1) * n // n_ranks]


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """The sums over ranks of a few numbers (float64), the same on every rank."""
    t = torch.tensor(list(values), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_grads(params: Sequence[torch.Tensor], loss: float) -> float:
    """Sum every parameter's gradient (a rank that saw no blocks contributes zeros) and this rank's
    share of the loss over ranks: one all-reduce of one flat float64 buffer per step. Returns the
    summed loss; the gradients are replaced by their sums."""
    dev = _collective_device()
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dev, torch.float64)
                      for p in params] + [torch.tensor([loss], dtype=torch.float64, device=dev)])
    dist.all_reduce(flat)
    i = 0
    for p in params:
        p.grad = flat[i : i + p.numel()].view_as(p).to(p.device, p.dtype)
        i += p.numel()
    return float(flat[-1])


def broadcast_(params: Sequence[torch.Tensor]) -> None:
    """Overwrite every rank's tensors with rank 0's (one flat broadcast): the training starts from
    one alpha even if an initialisation differed in the last bit between ranks."""
    dev = _collective_device()
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1).to(dev, torch.float64) for p in params])
        dist.broadcast(flat, src=0)
        i = 0
        for p in params:
            p.copy_(flat[i : i + p.numel()].view_as(p))
            i += p.numel()


def agree(value: int, what: str) -> None:
    """Raise on every rank (not only the odd one out, which would leave the others waiting in the
    next collective) unless all ranks hold the same `value`."""
    t = torch.tensor([value, -value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    hi, neg_lo = t.tolist()
    if hi != -neg_lo:
        raise SponError(f"ranks disagree on {what} ({-neg_lo} .. {hi}): every rank must see the same files "
                        f"(put --out on a filesystem all nodes share)")


def barrier() -> None:
    """Wait for every rank (no-op with one process): after rank 0 wrote what the others read."""
    if world_size() > 1:
        dist.barrier(device_ids=[torch.cuda.current_device()] if dist.get_backend() == "nccl" else None)
