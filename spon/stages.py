"""The one chain of the method: calibrate -> thresholds -> distill -> fuse -> evaluate.

Each stage is an adapter from files to files over one of the method's verbs (spon.oneshot): it takes the base
model, reads what the stages before it wrote, runs one verb and writes its result into `out` (a
directory). `spon run --in-process`, the stage commands (`spon calibrate | distill | fuse`) and
the Prefect tasks all call these functions and nothing else, so they cannot drift apart. Every
stage takes only the config sections it uses: those sections are exactly what its cache key covers.

    calibrate(model, CalibrationConfig)                  -> calibration.safetensors (train, heldout)
    thresholds(model, calibration, SparsityConfig)       -> thresholds.json
    distill(model, calibration, thresholds, DistillConfig) -> alpha.safetensors, distill.json
    fuse(model, calibration, thresholds, distill)        -> the fused checkpoint
    evaluate(fused checkpoint, EvalConfig)               -> eval.json

The base model is a `ModelHandle`: loaded on first use and kept, so the stages of one process
(one `spon run --in-process`, one `spon calibrate`, one Prefect flow run inside `shared_models()`)
load it once. Each stage sets on it what its input files say (thresholds, alpha), so it does not
matter whether an earlier stage ran in this process or was cached.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import load_file, save_file

from spon import distributed
from spon.calibration import Calibration, calibrate as calibrate_blocks
from spon.config import CalibrationConfig, DistillConfig, EvalConfig, RunConfig, SparsityConfig
from spon.digest import content_key
from spon.distill import DistillResult, distill_, record_distillation
from spon.errors import SponError
from spon.format import (ALPHA_STAGE_FILE, CALIBRATION_FILE, DISTILL_FILE, EVAL_FILE, QUANT_FILE, SIDECAR,
                         SUMMARY_FILE, THRESHOLDS_FILE)
from spon.fuse import fuse_, load_sparse_model, read_alpha, save_pretrained
from spon.model import host
from spon.perplexity import perplexities
from spon.remote_code import write_model_card
from spon.sources import default_model_path, load_model, weights_digest
from spon.sparse import SparseState, apply_sparse_state_, invalid_threshold, provenance, set_thresholds
from spon.thresholds import sparsify_

log = logging.getLogger(__name__)

SMOKE_PROMPT = "Once upon a time"


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
    return path


# ----------------------------------------------------------------------------- the base model

class ModelHandle:
    """The base model of a run: `path` loaded on `device` in `dtype` at the first `get()`, then the
    same object until `release()`. Stages change it in place (wrap, thresholds, alpha, fusion)."""

    def __init__(self, path: str, device: str = "cpu", dtype: str = "fp32", device_map: str | None = None):
        self.path, self.device, self.dtype, self.device_map = path, device, dtype, device_map
        self._loaded = None
        self._weights: tuple[str | None] | None = None

    def get(self):
        """(model, tokenizer), loaded now if not yet. Under torchrun each rank on its own GPU."""
        if self._loaded is None:
            self._loaded = load_model(self.path, distributed.local_device(self.device), self.dtype, self.device_map)
        return self._loaded

    def weights(self) -> str | None:
        """The digest of the weight files the model was loaded from (spon.sources.weights_digest),
        computed once per load."""
        if self._weights is None:
            m, _ = self.get()
            self._weights = (weights_digest(getattr(m.config, "_name_or_path", "") or self.path),)
        return self._weights[0]

    def release(self) -> None:
        """Forget the model (after fusion it is no longer the base model)."""
        self._loaded = None
        self._weights = None


_SHARED: ContextVar[dict | None] = ContextVar("spon_shared_models", default=None)


@contextmanager
def shared_models() -> Iterator[None]:
    """Within this block `base_model` hands every stage the same handle per (path, device, dtype):
    one load for a whole chain (Prefect copies the context into the threads its tasks run in)."""
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def base_model(path: str | None, device: str = "cpu", dtype: str = "fp32", device_map: str | None = None) -> ModelHandle:
    """The handle of a base model: the shared one inside `shared_models()`, else a new one."""
    key = (path or default_model_path(), device, dtype, device_map)
    shared = _SHARED.get()
    if shared is None:
        return ModelHandle(*key)
    if key not in shared:
        shared[key] = ModelHandle(*key)
    return shared[key]


# ----------------------------------------------------------------------------- stage files

def read_calibration(calib_dir: str | Path) -> Calibration:
    path = Path(calib_dir) / CALIBRATION_FILE
    if not path.is_file():
        raise SponError(f"{calib_dir} has no {CALIBRATION_FILE}: run `spon calibrate --out {calib_dir}` first")
    t = load_file(str(path))
    meta = _metadata(path)
    config = json.loads(meta.get("config", "{}"))
    domains = json.loads(meta.get("heldout_domains", "[]"))
    if domains and len(domains) != len(t["heldout"]):
        raise SponError(f"{path} names {len(domains)} held-out domains for {len(t['heldout'])} held-out blocks: "
                        f"recompute it (spon calibrate)")
    return Calibration(t["train"], t["heldout"], config.get("source", "text"), config, domains)


def calibration_blocks(calib_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    cal = read_calibration(calib_dir)
    return cal.train, cal.heldout


def apply_thresholds(model, thresholds_dir: str | Path, alpha: dict[str, torch.Tensor] | None = None) -> dict:
    """The sparse model thresholds.json describes (and `alpha`), set on `model` in TEAL mode."""
    t = read_json(Path(thresholds_dir) / THRESHOLDS_FILE)
    cfg = SparsityConfig.model_validate(t["config"])
    apply_sparse_state_(model, SparseState(targets=t["targets"], thresholds=t["thresholds"], protocol=cfg.protocol,
                                           criterion=cfg.criterion, alpha=alpha))
    provenance(model).update({"sparsity": t["config"], "per_projection_sparsity": t["sparsities"],
                              "realized_sparsity_heldout": t.get("realized_sparsity_heldout")})
    return t


# ----------------------------------------------------------------------------- the stages

def calibrate(model: ModelHandle, cfg: CalibrationConfig, out: Path) -> None:
    m, tok = model.get()
    cal = calibrate_blocks(m, tok, cfg)
    save_file({"train": cal.train.contiguous(), "heldout": cal.heldout.contiguous()}, str(out / CALIBRATION_FILE),
              metadata={"config": cfg.model_dump_json(), "model": json.dumps(model_identity(model), sort_keys=True),
                        "heldout_domains": json.dumps(cal.heldout_domains)})


def thresholds(model: ModelHandle, calib_dir: str | Path, cfg: SparsityConfig, out: Path) -> None:
    """TEAL thresholds on the training blocks only (the held-out blocks judge alpha later, and
    measure the sparsity the thresholds realize on text they were not taken on)."""
    m, _ = model.get()
    check_made_by(_calibration_model(calib_dir), model, Path(calib_dir) / CALIBRATION_FILE)
    r = sparsify_(m, cfg, read_calibration(calib_dir))
    write_json(out / THRESHOLDS_FILE, {"thresholds": r.thresholds, "sparsities": r.sparsities, "targets": cfg.targets,
                                       "realized_sparsity_heldout": r.realized_heldout,
                                       "config": cfg.model_dump(mode="json"), "model": model_identity(model)})


def distill(model: ModelHandle, calib_dir: str | Path, thresholds_dir: str | Path, cfg: DistillConfig, out: Path,
            checkpoint_dir: Path | None = None, checkpoint_key: str | None = None, progress: bool = False,
            on_step: Callable[[int, float], None] | None = None) -> None:
    m, _ = model.get()
    _check_inputs_made_by(model, calib_dir, thresholds_dir)
    apply_thresholds(m, thresholds_dir)
    if checkpoint_key is None:  # what these checkpoints continue: never another calibration's
        checkpoint_key = content_key(_content(model.path), Path(calib_dir) / CALIBRATION_FILE,
                                     Path(thresholds_dir) / THRESHOLDS_FILE, cfg, model.device, model.dtype)
    r = distill_(m, read_calibration(calib_dir), cfg, checkpoint_dir=checkpoint_dir, checkpoint_key=checkpoint_key,
                 progress=progress, on_step=on_step)
    if not distributed.is_main():  # every rank holds the same result; rank 0 alone writes it
        return
    identity = model_identity(model)
    save_file({k: v.contiguous() for k, v in r.alphas.items()}, str(out / ALPHA_STAGE_FILE),
              metadata={"model": json.dumps(identity, sort_keys=True)})
    write_json(out / DISTILL_FILE, {**r.record(), "config": cfg.model_dump(mode="json"), "model": identity})


def fuse(model: ModelHandle, calib_dir: str | Path, thresholds_dir: str | Path, distill_dir: str | Path, out: Path,
         source: str | None = None, card: bool = True) -> None:
    """b' = b + W alpha into a vanilla transformers checkpoint at `out`, with the sidecar a loader
    needs (thresholds, protocol) and what made it (calibration, sparsity and distillation configs,
    held-out KL and alpha selection, realized sparsity on the held-out blocks, a greedy sample
    that a pulled copy must reproduce). The handle's model is fused in place, then released.
    card=False: a chain that evaluates next writes the model card once, with its perplexities."""
    m, tok = model.get()
    _check_inputs_made_by(model, calib_dir, thresholds_dir)
    d = read_json(Path(distill_dir) / DISTILL_FILE)
    check_made_by(d.get("model"), model, Path(distill_dir) / DISTILL_FILE)
    alpha = read_alpha(Path(distill_dir) / ALPHA_STAGE_FILE)
    _check_alpha_fits(alpha, m, thresholds_dir, Path(distill_dir) / ALPHA_STAGE_FILE)
    t = apply_thresholds(m, thresholds_dir, alpha=alpha)
    if d.get("thresholds"):  # SPON's own tau, re-taken with alpha in place; TEAL keeps thresholds.json's
        _check_spon_thresholds(d["thresholds"], t["thresholds"], Path(distill_dir) / DISTILL_FILE)
        set_thresholds(m, d["thresholds"], teal=t["thresholds"])
    provenance(m)["calibration"] = read_calibration(calib_dir).config
    record_distillation(m, DistillConfig.model_validate(d["config"]), DistillResult(
        alphas={}, heldout_kl_before=d["heldout_kl_before"], heldout_kl_after=d["heldout_kl_after"],
        selected_step=d["selected_step"], selection=d["selection"]))
    fuse_(m)
    smoke = {"prompt": SMOKE_PROMPT, "text": greedy(m, tok, SMOKE_PROMPT)}
    save_pretrained(m, tok, out, source_model=source or model.path, smoke=smoke, card=card)
    model.release()


def evaluate(fused_dir: str | Path, cfg: EvalConfig, device: str, dtype: str, out: Path) -> None:
    """Perplexity of the fused model in dense, TEAL and SPON modes on every eval file."""
    model, tok, _ = load_sparse_model(fused_dir, device, dtype)
    ppl = perplexities(model, tok, cfg.files, ("dense", "teal", "spon"), cfg.window, cfg.stride,
                      cfg.max_tokens) if cfg.files else {}
    write_json(out / EVAL_FILE, ppl)


@torch.no_grad()
def greedy(model, tokenizer, prompt: str = SMOKE_PROMPT, new_tokens: int = 24) -> str:
    """The greedy text a pulled copy must reproduce, on the decode path `spon generate` and the
    served model take (the sparse kernels): the kernels sum in another order than F.linear, so an
    activation within rounding of tau can be kept by one path and dropped by the other, and one
    such flip can change a greedy token (SmolLM2-135M, 2 distillation steps: |x| 4.5e-8 from tau
    in layer 1's o_proj turned "the world was" into "there was")."""
    from spon.kernel_backend import use_kernels

    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    use_kernels(model, True)
    try:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    finally:
        use_kernels(model, False)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def _check_inputs_made_by(model: ModelHandle, calib_dir, thresholds_dir) -> None:
    check_made_by(_calibration_model(calib_dir), model, Path(calib_dir) / CALIBRATION_FILE)
    check_made_by(read_json(Path(thresholds_dir) / THRESHOLDS_FILE).get("model"), model,
                  Path(thresholds_dir) / THRESHOLDS_FILE)


def _check_spon_thresholds(taus, teal: dict, path: Path) -> None:
    """SPON's re-taken tau: a finite number >= 0 for exactly the projections TEAL's name."""
    if not isinstance(taus, dict) or set(taus) != set(teal):
        raise SponError(f"{path}: its thresholds do not name the projections of thresholds.json (another calibration?)")
    bad = invalid_threshold(taus)
    if bad is not None:
        raise SponError(f"{path}: threshold {bad} is {taus[bad]!r}: a threshold is a finite number >= 0")


def _check_alpha_fits(alpha: dict, m, thresholds_dir, path: Path) -> None:
    """alpha for exactly the projections the thresholds name, each a finite fp32 vector of the
    projection's input width in `m` (an alpha of another model or calibration is refused here)."""
    from spon.fuse import projection_info

    names = set(read_json(Path(thresholds_dir) / THRESHOLDS_FILE)["thresholds"])
    missing, extra = sorted(names - set(alpha)), sorted(set(alpha) - names)
    if missing or extra:
        raise SponError(f"{path} does not fit the thresholds in {thresholds_dir}: "
                        + (f"no alpha for {', '.join(missing[:4])}" if missing else f"alpha for {', '.join(extra[:4])}, "
                           "which has no threshold") + " (alpha of another calibration?)")
    widths = projection_info(m)
    for n, t in sorted(alpha.items()):
        want = widths.get(n, (None,))[0]
        if tuple(t.shape) != (want,):
            raise SponError(f"{path}: alpha {n} has shape {list(t.shape)}, the model's projection takes {want} "
                            "(alpha of another model?)")
        if t.dtype != torch.float32 or not bool(torch.isfinite(t).all()):
            raise SponError(f"{path}: alpha {n} must be finite float32, got {t.dtype}"
                            + (" with NaN or inf" if t.is_floating_point() else ""))


def _content(path: str):
    """A local model by its content (a Path: content_key hashes it), a hub id as its name."""
    return Path(path) if Path(path).exists() else path


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


# ----------------------------------------------------------------------------- provenance
# Every stage file records the model that made it (its source, a fingerprint of its config and
# tokenizer, and a digest of its weight files); a stage given another model's files refuses them in
# one line. Files written before the record (or its weights digest) existed are read as before.
_FINGERPRINT_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim")


def model_identity(model: ModelHandle) -> dict:
    """{"source", "fingerprint", "config"}: what a stage file records of the model that made it."""
    import hashlib

    m, tok = model.get()
    config = {k: getattr(m.config, k, None) for k in _FINGERPRINT_KEYS}
    config["tokenizer_size"] = len(tok) if tok is not None else None
    fp = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"source": str(model.path), "fingerprint": fp, "config": config, "weights": model.weights()}


def check_made_by(record, model: ModelHandle, path: str | Path) -> None:
    """Refuse a stage file (`path`) that another model made."""
    if not isinstance(record, dict) or "fingerprint" not in record:
        return  # written before provenance was recorded
    mine = model_identity(model)
    if record["fingerprint"] == mine["fingerprint"]:
        theirs = record.get("weights")  # absent in files written before weights were fingerprinted
        if theirs and mine["weights"] and theirs != mine["weights"]:
            raise SponError(f"{path} was made with other weights than {mine['source']} (the same config and tokenizer; "
                            f"weight files {theirs} vs {mine['weights']}): recompute it with this model, or pass "
                            f"--model {record.get('source')} if that is the model meant")
        return
    diff = ", ".join(f"{k} {record.get('config', {}).get(k)} vs {v}" for k, v in mine["config"].items()
                     if record.get("config", {}).get(k) != v)
    raise SponError(f"{path} was made with model {record.get('source')}, not {mine['source']} ({diff or 'another model'}): "
                    f"pass --model {record.get('source')}, or recompute it with this model")


def _calibration_model(calib_dir) -> dict | None:
    raw = _metadata(Path(calib_dir) / CALIBRATION_FILE).get("model")
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def summarize(cfg: RunConfig, source: str, calib_dir, thresholds_dir, distill_dir, fused_dir, eval_dir,
              walls: dict[str, float]) -> dict:
    """summary.json: what a run produced, read back from the stage outputs. Every writer of
    summary.json calls this, so it also writes the fused checkpoint's model card, with the
    perplexities measured after fusion (a chain's fuse stage leaves the card to it)."""
    ppl = read_json(Path(eval_dir) / EVAL_FILE)
    d = read_json(Path(distill_dir) / DISTILL_FILE)
    sidecar = read_json(Path(fused_dir) / SIDECAR)
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
        # alpha moves every downstream layer's input: SPON drops fewer activations than TEAL with the same tau
        # (SmolLM2-135M at 50 %: 0.465-0.469 vs 0.497 on wikitext-2), which is what its decode speed follows
        "realized_sparsity_spon": first["spon"]["realized_sparsity"] if first else None,
        "realized_sparsity_spon_by_file": {f: by_mode["spon"]["realized_sparsity"] for f, by_mode in ppl.items()},
        "sparsity_warnings": sparsity_warnings(cfg.sparsity.sparsity, ppl),
        "tokens_by_file": {f: by_mode["teal"]["tokens"] for f, by_mode in ppl.items()},
        # spon_init is measured before the first step only: a run resumed from a checkpoint has none (null, not NaN)
        "heldout_kl": {"teal": d["heldout_kl_before"],
                       "spon_init": d["heldout_kl_init"] if math.isfinite(d["heldout_kl_init"]) else None,
                       "spon": d["heldout_kl_after"],
                       "spon_last_step": d["heldout_kl_last"]},
        "heldout_kl_by_step": d["heldout_kl_by_step"],
        "heldout_nll": {"teal": d.get("heldout_nll_before"), "by_step": d.get("heldout_nll_by_step", {})},
        # the NLL guard at every checkpoint: {step: {domain: upper bound of (NLL - TEAL's)}}, eligible when all <= 0
        "heldout_nll_bound": d.get("heldout_nll_bound_by_step", {}),
        "alpha_selection": {"selected_step": d["selected_step"], "selection": d["selection"]},
        # several calibration domains: each domain's held-out (KL, NLL) for TEAL and at every checkpoint
        "heldout_by_domain": d.get("heldout_by_domain", {}),
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


def quality_warnings(ppl: dict) -> list[str]:
    """Every evaluation file on which SPON is worse than TEAL: said, never shipped silently."""
    return [f"SPON perplexity {r['spon']['perplexity']:.4f} is above TEAL's {r['teal']['perplexity']:.4f} on {f}"
            for f, r in ppl.items() if r["spon"]["perplexity"] > r["teal"]["perplexity"]]


# How far below its target a mode's realized sparsity may fall before the run says so (the target's
# tolerance in the transfer issue: within 2 points).
SPARSITY_TOLERANCE = 0.02


def sparsity_warnings(target: float, ppl: dict) -> list[str]:
    """Every evaluation file on which TEAL or SPON realizes more than SPARSITY_TOLERANCE below the
    target: the model skips fewer weight reads than asked for (slower than the level promises)."""
    return [f"{m.upper()} realizes sparsity {r[m]['realized_sparsity']:.3f} on {f}, "
            f"{100 * (target - r[m]['realized_sparsity']):.1f} points below the target {target:.2f}"
            for f, r in ppl.items() for m in ("teal", "spon")
            if r[m].get("realized_sparsity") is not None and target - r[m]["realized_sparsity"] > SPARSITY_TOLERANCE]


STAGES = ("calibrate", "thresholds", "distill", "fuse", "evaluate")


def run(cfg: RunConfig, progress: bool = True, on_stage: Callable[[str, float], None] | None = None) -> dict:
    """The whole chain in this process, each stage's output in a subdirectory of cfg.out, the base
    model loaded once; writes cfg.out/summary.json. The Prefect pipeline runs the same stages."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    source = cfg.model or default_model_path()
    model = ModelHandle(source, cfg.device, cfg.dtype, cfg.device_map)
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

    # Under torchrun only distill runs on every rank; rank 0 alone runs (and writes) the others.
    if distributed.is_main():
        stage("calibrate", calibrate, model, cfg.calibration, dirs["calibration"])
        stage("thresholds", thresholds, model, dirs["calibration"], cfg.sparsity, dirs["thresholds"])
    distributed.barrier()  # the other ranks read what rank 0 just wrote
    stage("distill", distill, model, dirs["calibration"], dirs["thresholds"], cfg.distill, dirs["distill"],
          checkpoint_dir=out / "alpha_checkpoints", progress=progress)
    if not distributed.is_main():
        return {}
    stage("fuse", fuse, model, dirs["calibration"], dirs["thresholds"], dirs["distill"], dirs["fused"], source=source,
          card=False)  # summarize writes it, with the perplexities
    stage("evaluate", evaluate, dirs["fused"], cfg.eval, cfg.device, cfg.dtype, dirs["eval"])
    summary = summarize(cfg, source, dirs["calibration"], dirs["thresholds"], dirs["distill"], dirs["fused"],
                        dirs["eval"], walls)
    write_json(out / SUMMARY_FILE, summary)
    return summary


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
