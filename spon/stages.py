"""The one chain of the method: calibrate -> thresholds -> distill -> fuse -> evaluate.

Each stage is a function from files to files: it loads what it needs, does one step of the
method, and writes its result into `out` (a directory). `spon run --in-process`, the stage
commands (`spon calibrate | distill | fuse`) and the Prefect tasks all call these functions and
nothing else, so they cannot drift apart. Every stage takes only the config sections it uses:
those sections are exactly what its cache key covers.

    calibrate(model, CalibrationConfig)            -> calibration.safetensors (train, heldout)
    thresholds(model, calibration, SparsityConfig) -> thresholds.json
    distill(model, calibration, thresholds, DistillConfig, protocol)   -> alpha.safetensors, distill.json
    fuse(model, calibration, thresholds, distill, protocol)            -> the fused checkpoint
    evaluate(fused checkpoint, EvalConfig)         -> eval.json
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from spon import distributed
from spon.calibration import build_calibration
from spon.config import CalibrationConfig, DistillConfig, EvalConfig, RunConfig, SparsityConfig
from spon.distill import distill as distill_alpha
from spon.errors import SponError
from spon.fuse import load_sparse_model, read_alpha, save_fused
from spon.model import default_model_path, load_model
from spon.perplexity import perplexities
from spon.remote_code import write_model_card
from spon.sparse import SparsifyConfig, counting_zeros, mode, sparsify_

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.safetensors"
THRESHOLDS_FILE = "thresholds.json"
ALPHA_FILE = "alpha.safetensors"
DISTILL_FILE = "distill.json"
EVAL_FILE = "eval.json"
SMOKE_PROMPT = "Once upon a time"


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
    return path


def calibration_blocks(calib_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    path = Path(calib_dir) / CALIBRATION_FILE
    if not path.is_file():
        raise SponError(f"{calib_dir} has no {CALIBRATION_FILE}: run `spon calibrate --out {calib_dir}` first")
    t = load_file(str(path))
    return t["train"], t["heldout"]


def sparse_model(model_path: str, thresholds_dir: str | Path, protocol: str, device: str, dtype: str,
                 alpha: dict[str, torch.Tensor] | None = None):
    """The model a stage works on: loaded, then `sparsify_` with the calibrated thresholds."""
    t = read_json(Path(thresholds_dir) / THRESHOLDS_FILE)
    model, tok = load_model(model_path, device, dtype)
    sparsify_(model, SparsifyConfig(targets=t["targets"], thresholds=t["thresholds"], protocol=protocol, alpha=alpha,
                                    criterion=t["config"].get("criterion", "magnitude")))
    return model, tok


def calibrate(model_path: str, cfg: CalibrationConfig, device: str, dtype: str, out: Path) -> None:
    model, tok = load_model(model_path, device, dtype)
    if cfg.source == "samples" and cfg.sample_precision == "fp64":
        model.double()  # this model only samples; its float64 logits are the same on every CPU
    train, heldout = build_calibration(model, tok, cfg)
    save_file({"train": train.contiguous(), "heldout": heldout.contiguous()}, str(out / CALIBRATION_FILE),
              metadata={"config": cfg.model_dump_json()})


def thresholds(model_path: str, calib_dir: str | Path, cfg: SparsityConfig, device: str, dtype: str, out: Path) -> None:
    """TEAL thresholds on the training blocks only (the held-out blocks judge alpha later)."""
    from spon.thresholds import compute_thresholds

    train, _ = calibration_blocks(calib_dir)
    model, _ = load_model(model_path, device, dtype)
    sparsify_(model, SparsifyConfig(targets=cfg.targets, mode="dense"))
    taus, per_proj = compute_thresholds(model, train, cfg)
    write_json(out / THRESHOLDS_FILE, {"thresholds": taus, "sparsities": per_proj, "targets": cfg.targets,
                                       "config": cfg.model_dump(mode="json")})


def distill(model_path: str, calib_dir: str | Path, thresholds_dir: str | Path, cfg: DistillConfig, protocol: str,
            device: str, dtype: str, out: Path, checkpoint_dir: Path | None = None, checkpoint_key: str | None = None,
            progress: bool = False, on_step: Callable[[int, float], None] | None = None) -> None:
    train, heldout = calibration_blocks(calib_dir)
    # under torchrun each rank on its own GPU; the key keeps the device asked for, so a run resumes
    # with any number of ranks
    model, _ = sparse_model(model_path, thresholds_dir, protocol, distributed.local_device(device), dtype)
    if checkpoint_key is None:  # what these checkpoints continue: never another calibration's
        checkpoint_key = content_key(model_path, Path(calib_dir) / CALIBRATION_FILE,
                                     Path(thresholds_dir) / THRESHOLDS_FILE, cfg, protocol, device, dtype)
    # Held-out text (not the model's own samples): its next tokens also guard perplexity.
    calib_source = json.loads(_metadata(Path(calib_dir) / CALIBRATION_FILE).get("config", "{}")).get("source")
    r = distill_alpha(model, train, heldout, cfg, checkpoint_dir=checkpoint_dir, checkpoint_key=checkpoint_key,
                      progress=progress, on_step=on_step, nll_guard=calib_source != "samples")
    if not distributed.is_main():  # every rank holds the same result; rank 0 alone writes it
        return
    save_file({k: v.contiguous() for k, v in r.alphas.items()}, str(out / ALPHA_FILE))
    write_json(out / DISTILL_FILE, {**r.record(), "config": cfg.model_dump(mode="json")})


def fuse(model_path: str, calib_dir: str | Path, thresholds_dir: str | Path, distill_dir: str | Path, protocol: str,
         device: str, dtype: str, out: Path, source: str | None = None) -> None:
    """b' = b + W alpha into a vanilla transformers checkpoint at `out`, with the sidecar a loader
    needs (thresholds, protocol) and what made it (calibration, sparsity and distillation configs,
    held-out KL and alpha selection, realized sparsity on the held-out blocks, a greedy sample
    that a pulled copy must reproduce)."""
    _, heldout = calibration_blocks(calib_dir)
    alpha = read_alpha(Path(distill_dir) / ALPHA_FILE)
    model, tok = sparse_model(model_path, thresholds_dir, protocol, device, dtype, alpha=alpha)
    t = read_json(Path(thresholds_dir) / THRESHOLDS_FILE)
    d = read_json(Path(distill_dir) / DISTILL_FILE)
    calib_cfg = json.loads(_metadata(Path(calib_dir) / CALIBRATION_FILE).get("config", "{}"))
    realized = realized_sparsity_on_blocks(model, heldout) if len(heldout) else None
    meta = {
        "sparsity": t["config"]["sparsity"],
        "allocation": t["config"]["allocation"],
        "criterion": t["config"].get("criterion", "magnitude"),
        "per_projection_sparsity": t["sparsities"],
        "realized_sparsity_heldout": realized,
        "protocol": protocol,
        "alpha_selection": {"selected_step": d["selected_step"], "selection": d["selection"]},
        "provenance": {
            "source_model": source or model_path,
            "calibration": calib_cfg,
            "sparsity": t["config"],
            "distill": d["config"],
            "heldout_kl": {"teal": d["heldout_kl_before"], "spon": d["heldout_kl_after"]},
        },
    }
    save_fused(model, tok, out, meta)
    with mode(model, "spon"):
        meta["smoke"] = {"prompt": SMOKE_PROMPT, "text": greedy(model, tok, SMOKE_PROMPT)}
    sidecar = read_json(out / "spon.json")
    write_json(out / "spon.json", {**sidecar, "smoke": meta["smoke"]})


def evaluate(fused_dir: str | Path, cfg: EvalConfig, device: str, dtype: str, out: Path) -> None:
    """Perplexity of the fused model in dense, TEAL and SPON modes on every eval file."""
    model, tok, _ = load_sparse_model(fused_dir, device, dtype)
    ppl = perplexities(model, tok, cfg.files, ("dense", "teal", "spon"), cfg.window, cfg.stride,
                      cfg.max_tokens) if cfg.files else {}
    write_json(out / EVAL_FILE, ppl)


@torch.no_grad()
def realized_sparsity_on_blocks(model, blocks: torch.Tensor, batch_size: int = 16) -> float:
    device = next(model.parameters()).device
    with mode(model, "teal"), counting_zeros(model) as z:
        for i in range(0, len(blocks), batch_size):
            model(blocks[i : i + batch_size].to(device), use_cache=False)
    return z["weighted"]


@torch.no_grad()
def greedy(model, tokenizer, prompt: str = SMOKE_PROMPT, new_tokens: int = 24) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def summarize(cfg: RunConfig, source: str, calib_dir, thresholds_dir, distill_dir, fused_dir, eval_dir,
              walls: dict[str, float]) -> dict:
    """summary.json: what a run produced, read back from the stage outputs. Every writer of
    summary.json calls this, so it also brings the fused checkpoint's model card up to date with
    the perplexities measured after fusion (the fuse stage wrote it without them)."""
    ppl = read_json(Path(eval_dir) / EVAL_FILE)
    d = read_json(Path(distill_dir) / DISTILL_FILE)
    sidecar = read_json(Path(fused_dir) / "spon.json")
    # the headline numbers are the first eval file's as given (eval.json's keys are sorted)
    first = ppl.get(str(cfg.eval.files[0])) if cfg.eval.files else None
    first = first if first is not None else next(iter(ppl.values()), None)
    summary = {
        "model": source,
        "preset": cfg.preset,
        "sparsity": cfg.sparsity.sparsity,
        "allocation": cfg.sparsity.allocation,
        "criterion": cfg.sparsity.criterion,
        "protocol": cfg.protocol,
        "realized_sparsity": first["teal"]["realized_sparsity"] if first else sidecar["realized_sparsity_heldout"],
        "realized_sparsity_heldout_calibration": sidecar["realized_sparsity_heldout"],
        "perplexity": {m: first[m]["perplexity"] for m in ("dense", "teal", "spon")} if first else {},
        "perplexity_by_file": {f: {m: r["perplexity"] for m, r in by_mode.items()} for f, by_mode in ppl.items()},
        "realized_sparsity_by_file": {f: by_mode["teal"]["realized_sparsity"] for f, by_mode in ppl.items()},
        "heldout_kl": {"teal": d["heldout_kl_before"], "spon_init": d["heldout_kl_init"], "spon": d["heldout_kl_after"],
                       "spon_last_step": d["heldout_kl_last"]},
        "heldout_kl_by_step": d["heldout_kl_by_step"],
        "heldout_nll": {"teal": d.get("heldout_nll_before"), "by_step": d.get("heldout_nll_by_step", {})},
        "alpha_selection": {"selected_step": d["selected_step"], "selection": d["selection"]},
        "kl_history": d["kl_history"],
        "world_size": d.get("world_size", 1),  # processes that distilled alpha (spon.distributed)
        "quality_warnings": quality_warnings(ppl),
        "smoke_generation": sidecar.get("smoke"),
        "fused_model_dir": str(fused_dir),
        "wall_time_s": walls,
        "host": host(),
        "config": cfg.model_dump(mode="json"),
    }
    if first:
        dn, t, s = (summary["perplexity"][m] for m in ("dense", "teal", "spon"))
        summary["gap_closed"] = (t - s) / (t - dn) if t != dn else 0.0
    write_model_card(fused_dir, summary)
    return summary


def host() -> dict:
    """What the numbers depend on beyond the config: float reductions differ between CPU kinds
    and thread counts (the same kind and count reproduce a run bit for bit)."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def quality_warnings(ppl: dict) -> list[str]:
    """Every evaluation file on which SPON is worse than TEAL: said, never shipped silently."""
    return [f"SPON perplexity {r['spon']['perplexity']:.4f} is above TEAL's {r['teal']['perplexity']:.4f} on {f}"
            for f, r in ppl.items() if r["spon"]["perplexity"] > r["teal"]["perplexity"]]


STAGES = ("calibrate", "thresholds", "distill", "fuse", "evaluate")


def run(cfg: RunConfig, progress: bool = True, on_stage: Callable[[str, float], None] | None = None) -> dict:
    """The whole chain in this process, each stage's output in a subdirectory of cfg.out;
    writes cfg.out/summary.json. The Prefect pipeline runs the same stage functions."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model = cfg.model or default_model_path()
    dirs = {s: out / s for s in ("calibration", "thresholds", "distill", "fused", "eval")}
    for d in dirs.values():
        d.mkdir(exist_ok=True)
    walls: dict[str, float] = {}

    def stage(name, fn, *args, **kw):
        t0 = time.perf_counter()
        fn(*args, **kw)
        walls[name] = round(time.perf_counter() - t0, 3)
        if on_stage is not None and distributed.is_main():
            on_stage(name, walls[name])

    rt = (cfg.device, cfg.dtype)
    # Under torchrun only distill runs on every rank; rank 0 alone runs (and writes) the others.
    if distributed.is_main():
        stage("calibrate", calibrate, model, cfg.calibration, *rt, dirs["calibration"])
        stage("thresholds", thresholds, model, dirs["calibration"], cfg.sparsity, *rt, dirs["thresholds"])
    distributed.barrier()  # the other ranks read what rank 0 just wrote
    stage("distill", distill, model, dirs["calibration"], dirs["thresholds"], cfg.distill, cfg.protocol, *rt,
          dirs["distill"], checkpoint_dir=out / "alpha_checkpoints", progress=progress)
    if not distributed.is_main():
        return {}
    stage("fuse", fuse, model, dirs["calibration"], dirs["thresholds"], dirs["distill"], cfg.protocol, *rt,
          dirs["fused"], source=model)
    stage("evaluate", evaluate, dirs["fused"], cfg.eval, *rt, dirs["eval"])
    summary = summarize(cfg, model, dirs["calibration"], dirs["thresholds"], dirs["distill"], dirs["fused"],
                        dirs["eval"], walls)
    write_json(out / "summary.json", summary)
    return summary


def content_key(*parts) -> str:
    """A hash of the content behind each part: files and directories by their bytes, configs by
    their fields, anything else (a hub id, a string) as it is."""
    import hashlib

    from pydantic import BaseModel

    from spon.digest import digest_path

    def plain(x):
        if isinstance(x, BaseModel):
            return x.model_dump(mode="json")
        if isinstance(x, Path) or (isinstance(x, str) and Path(x).exists()):
            return "sha256:" + digest_path(x)
        return x

    return hashlib.sha256(json.dumps([plain(p) for p in parts], sort_keys=True, default=str).encode()).hexdigest()[:16]


QUANT_FILE = "quantize.json"


def quantize(fused_dir: str | Path, schemes: list[str], cfg: EvalConfig, device: str, out: Path) -> None:
    """Weight-only quantization of the fused model per scheme: each saved (nf4 is quantized on
    load, never saved) and scored in spon mode on the first eval file -> quantize.json."""
    from spon.quantize import quantize_model, quantized_weight_bytes, save_quantized

    result = {}
    for scheme in schemes:
        model, tok, _ = load_sparse_model(fused_dir, device)
        before = quantized_weight_bytes(model)
        info = quantize_model(model, scheme)
        info["weight_bytes"] = {"before": before, "after": quantized_weight_bytes(model)}
        if scheme != "nf4":
            save_quantized(model, tok, out / scheme, fused_dir, info)
        ppl = perplexities(model, tok, cfg.files[:1], ("spon",), cfg.window, cfg.stride, cfg.max_tokens) if cfg.files else {}
        result[scheme] = {"info": info, "perplexity": {m: r["perplexity"] for by_mode in ppl.values() for m, r in by_mode.items()}}
    write_json(out / QUANT_FILE, result)
