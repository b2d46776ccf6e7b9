"""What the command lines share: the flag table that maps flags onto RunConfig keys, and the
checks of what a command takes as a whole (its out dir against its inputs, a calibrated
directory, an alpha file, a sweep's levels, everything `spon run` takes) -- made before anything
is written, each failure one line (a SponError).

Imported by spon.method_cli, spon.flows.cli and spon.evaluation.cli; imports only the layers
below it (spon.checks, spon.sources, spon.format, spon.config)."""

from __future__ import annotations

import argparse
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from spon import corpora
from spon.checks import check_device, check_json_file, check_safetensors, check_text_file, check_window
from spon.errors import SponError
from spon.format import CALIBRATION_FILE, DISTILL_FILE, THRESHOLDS_FILE
from spon.sources import check_model, model_label

Inputs = Iterable["tuple[str, str | Path] | str | Path | None"]

# flag -> dotted config key; one table shared by `run` and the stage commands.
CONFIG_FLAGS = {
    "--model": ("model", str, "hub id, local directory, .gguf file (or ORG/REPO:FILE.gguf) or a named model "
                          "such as smollm2-135m (`spon models`; default: embedded stories260K)"),
    "--device": ("device", str, "cpu or cuda[:N]"),
    "--dtype": ("dtype", str, "fp32, bf16 or fp16"),
    "--device-map": ("device_map", str, "e.g. 'auto' for a model larger than one GPU"),
    "--preset": ("preset", str, "per-model recipe under the flags: the named model's own by default "
                 "(spon/presets.py), or none"),
    "--protocol": ("sparsity.protocol", str, "all (every token sparse) or last_half (TEAL's prefill protocol)"),
    "--sparsity": ("sparsity.sparsity", float, "target sparsity in [0, 1)"),
    "--allocation": ("sparsity.allocation", str, "uniform or greedy"),
    "--criterion": ("sparsity.criterion", str, "which activations are dropped: magnitude (TEAL, |x| <= tau) or "
                    "weighted (WINA, |x| * ||W[:, i]|| <= tau)"),
    "--targets": ("sparsity.targets", lambda s: s.split(","), "comma list of q,k,v,o,gate,up,down"),
    "--calib-source": ("calibration.source", str, "samples (model's own), text or dataset"),
    "--calib-files": ("calibration.files", lambda s: s.split(","), "comma list of text files"),
    "--calib-dataset": ("calibration.dataset", str, "datasets name or builder"),
    "--calib-blocks": ("calibration.num_blocks", int, "number of calibration blocks"),
    "--calib-len": ("calibration.block_len", int, "tokens per block"),
    "--calib-seed": ("calibration.seed", int, "sampling seed"),
    "--steps": ("distill.steps", int, "optimizer steps for alpha"),
    "--lr": ("distill.lr", float, "AdamW learning rate"),
    "--batch-size": ("distill.batch_size", int, "blocks per step"),
    "--grad-accum": ("distill.grad_accum", int, "micro-batches per step"),
    "--init": ("distill.init", str, "zeros or closed_form"),
    "--alpha-targets": ("distill.targets", lambda s: s.split(","), "projections that get a trained alpha "
                        "(default: every sparsified one), e.g. down"),
    "--compute-dtype": ("distill.compute_dtype", str, "the student's forward/backward: fp32 or bf16 (autocast)"),
    "--calibrate-on": ("sparsity.calibrate_on", str, "thresholds from the sparse model's activations "
                       "(sparse, default: realized = target) or the dense model's (dense, TEAL's original)"),
    "--seed": ("distill.seed", int, "batch-order seed"),
    "--checkpoint-every": ("distill.checkpoint_every", int, "alpha checkpoint interval (steps)"),
    "--window": ("eval.window", int, "perplexity window"),
    "--stride": ("eval.stride", int, "perplexity stride"),
    "--eval-tokens": ("eval.max_tokens", int, "score only the first N tokens of each eval file"),
}


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="JSON or YAML RunConfig; flags override it")
    for flag, (_, typ, help_) in CONFIG_FLAGS.items():
        p.add_argument(flag, type=typ, default=None, help=help_)
    p.add_argument("--eval-text", action="append", default=None, help="text file for perplexity (repeatable)")


def config_from_args(args):
    from spon.config import load_config

    if args.config is not None:  # load_config parses it; a binary or non-UTF-8 file is refused first
        check_text_file(args.config, "config", allow_empty=True)
    overrides = {key: getattr(args, flag[2:].replace("-", "_")) for flag, (key, _, _) in CONFIG_FLAGS.items()}
    overrides["eval.files"] = args.eval_text
    overrides["out"] = getattr(args, "out", None)
    return load_config(args.config, overrides)


# ----------------------------------------------------------------------------- values

def check_sparsities(text: str) -> list[float]:
    """`spon sweep --sparsities`: every level a number in [0, 1), no two the same (levels sharing
    an output directory s<0.xx> count as the same), at least one."""
    items = [s.strip() for s in (text or "").split(",")]
    if not any(items):
        raise SponError(f"--sparsities {text!r}: no sparsity levels given")
    levels: list[float] = []
    seen: dict[str, str] = {}
    for s in items:
        if not s:
            raise SponError(f"--sparsities {text!r}: empty item")
        try:
            v = float(s)
        except ValueError:
            raise SponError(f"--sparsities: {s!r} is not a number") from None
        if not math.isfinite(v) or not 0.0 <= v < 1.0:
            raise SponError(f"--sparsities: {s} is not a sparsity in [0, 1)")
        name = f"s{v:.2f}"  # the level's output directory (flows/sweep.py run_level)
        if name in seen:
            raise SponError(f"--sparsities: {seen[name]} and {s} are the same level ({name})")
        seen[name] = s
        levels.append(v)
    return levels


# ----------------------------------------------------------------------------- out dirs

def _labelled(inputs: Inputs) -> list[tuple[str, Path]]:
    out = []
    for item in inputs:
        if item is None:
            continue
        label, path = item if isinstance(item, tuple) else ("the input", item)
        if path is None or not str(path).strip():
            continue
        out.append((label, Path(path).expanduser().resolve()))
    return out


def check_out_dir(out: str | Path | None, inputs: Inputs = (), flag: str = "--out") -> Path:
    """A directory a command may write: not an existing file, not an input, not inside one, not
    containing one (model dir, calibration dir, alpha dir, text files, config), and writable
    (a directory with no write permission bits counts as read-only, also for root)."""
    if out is None or not str(out).strip():
        raise SponError(f"{flag}: empty path")
    p = Path(out).expanduser().resolve()
    if p.exists() and not p.is_dir():
        raise SponError(f"{flag} {out} is an existing file, not a directory")
    existing = next(a for a in (p, *p.parents) if a.exists())
    if not existing.is_dir():
        raise SponError(f"{flag} {out}: {existing} is a file, not a directory")
    for label, inp in _labelled(inputs):
        if p == inp:
            raise SponError(f"{flag} {out} is {label} {inp}: refusing to write over an input")
        if inp in p.parents:
            raise SponError(f"{flag} {out} lies inside {label} {inp}: refusing to write into an input")
        if p in inp.parents:
            raise SponError(f"{flag} {out} contains {label} {inp}: refusing to write over an input")
    if not os.access(existing, os.W_OK | os.X_OK) or not existing.stat().st_mode & 0o222:
        raise SponError(f"{flag} {out}: {existing} is read-only")
    return p


@contextmanager
def new_out_dir(out: str | Path, flag: str = "--out", check: Callable[[], object] | None = None) -> Iterator[Path]:
    """Create `out` (and missing parents) for a command and hold its writer lock (spon.lock: a
    second command writing the same directory is refused in one line naming this one); if the
    command then fails with a SponError, remove what this created, so a refused command leaves no
    half-made out dir. A directory that already existed is never removed (it may hold checkpoints
    to resume), and neither is anything on an interrupt or a crash. `check` (the command's input
    checks, which may import torch and transformers) runs once the lock is held and before `out`
    is made: a second writer is refused before those imports, and a refused check writes nothing."""
    from spon.lock import writer_lock

    check_out_dir(out, (), flag)  # the lock lives in out's parent: that must be creatable
    p = Path(out).expanduser().resolve()
    created = first_missing(p)
    try:
        lock = writer_lock(p, flag)
        lock.__enter__()
    except SponError:
        remove_made_dirs(created, p.parent)  # the parents made for the lock, nothing else
        raise
    if check is not None:
        try:
            check()
        except SponError:
            lock.__exit__(None, None, None)  # its file first: it lives in the parent removed next
            remove_made_dirs(created, p.parent)
            raise
        except BaseException:
            lock.__exit__(None, None, None)
            raise
    try:
        if p.exists():  # made by a writer that finished between our look and our lock: not ours
            created = None
        p.mkdir(parents=True, exist_ok=True)
        try:
            yield p
        except SponError:
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            raise
    finally:
        lock.__exit__(None, None, None)


def first_missing(p: Path) -> Path | None:
    """The outermost directory of `p` (itself or a parent) that does not exist yet."""
    return next((a for a in reversed((p, *p.parents)) if not a.exists()), None)


def remove_made_dirs(created: Path | None, deepest: Path) -> None:
    """Remove the directories from `deepest` up to `created` that this command made, if empty
    (none when `created` is not `deepest` or one of its parents: nothing above it was made)."""
    if created is None or (created != deepest and created not in deepest.parents):
        return
    for d in (deepest, *deepest.parents):
        try:
            d.rmdir()
        except OSError:
            return
        if d == created:
            return


# ----------------------------------------------------------------------------- entry points

def check_calibration(c) -> list[Path]:
    """CalibrationConfig: its files exist and are UTF-8 text. Returns the local input files."""
    files: list[Path] = []
    if c.source == "text":
        if not c.files:
            raise SponError("calibration source 'text' needs at least one file (--calib-files)")
        files = [check_text_file(f, "calibration data") for f in c.files]
        files = [f for f in files if not corpora.is_corpus(f)]  # built-in text: not a file of the user's
    elif c.source == "dataset":
        if not c.dataset:
            raise SponError("calibration source 'dataset' needs calibration.dataset (--calib-dataset)")
        for f in c.data_files or []:
            if "://" not in f and not Path(f).expanduser().exists():
                raise SponError(f"calibration data file does not exist: {f}")
            if "://" not in f:
                files.append(Path(f))
    return files


def check_calib_dir(calib: str | Path, flag: str = "--calib") -> Path:
    """A directory written by `spon calibrate`: calibration blocks and thresholds."""
    p = Path(calib).expanduser()
    if not p.is_dir():
        raise SponError(f"{flag} {calib} is not a directory written by `spon calibrate`")
    if not (p / CALIBRATION_FILE).is_file():
        raise SponError(f"{calib} has no {CALIBRATION_FILE}: run `spon calibrate --out {calib}` first")
    check_safetensors(p / CALIBRATION_FILE, "calibration file", keys=("train", "heldout"))
    t = check_json_file(p / THRESHOLDS_FILE, "thresholds file")
    if not isinstance(t.get("thresholds"), dict) or not isinstance(t.get("targets"), list):
        raise SponError(f"thresholds file {p / THRESHOLDS_FILE} was not written by `spon calibrate`")
    return p


def check_alpha(alpha: str | Path) -> Path:
    """`spon fuse --alpha`: a readable alpha file beside the distill.json that `spon distill` wrote."""
    p = Path(alpha).expanduser()
    if not p.is_file():
        raise SponError(f"alpha file does not exist: {alpha}")
    if not (p.parent / DISTILL_FILE).is_file():
        raise SponError(f"{p.parent} has no {DISTILL_FILE}: pass the alpha file `spon distill` wrote")
    check_safetensors(p, "alpha file")
    check_json_file(p.parent / DISTILL_FILE, "distillation record")
    return p


def check_run_out_dirs(cfg, config_path: str | None = None, work_dir: str | Path | None = None) -> None:
    """The out (and work) dir against the run's local inputs as named (check_run validates them
    later), with neither torch nor transformers: run before the out dir's lock is taken, so an out
    dir that is, holds or lies inside an input is refused as such, and no lock goes beside an input."""
    from spon.sources import classify

    try:
        model = classify(cfg.model).path
    except SponError:
        model = None  # check_run names what is wrong with it
    c = cfg.calibration
    calib = (c.files or []) if c.source == "text" else [f for f in c.data_files or [] if "://" not in f]
    inputs = [(model_label(model), model), ("the config file", config_path),
              *(("the calibration file", f) for f in calib if not corpora.is_corpus(f)),
              *(("the eval text file", f) for f in cfg.eval.files if not corpora.is_corpus(f))]
    check_out_dir(cfg.out, inputs)
    if work_dir is not None:
        check_out_dir(work_dir, inputs, "--work-dir")


def check_run(cfg, config_path: str | None = None, pipeline: bool = False, work_dir: str | Path | None = None) -> None:
    """Everything `spon run` / `spon sweep` take, checked before the first stage runs."""
    check_device(cfg.device)
    calib_files = check_calibration(cfg.calibration)
    eval_files = [f for f in (check_text_file(f, "eval text") for f in cfg.eval.files) if not corpora.is_corpus(f)]
    window = None
    if cfg.eval.files or "window" in cfg.eval.model_fields_set:  # the window is used (or was asked for)
        check_window(cfg.eval.window, cfg.eval.stride)
        window = cfg.eval.window
    model = check_model(cfg, pipeline, calib_len=cfg.calibration.block_len, window=window)
    inputs = [(model_label(model), model), ("the config file", config_path),
              *(("the calibration file", f) for f in calib_files), *(("the eval text file", f) for f in eval_files)]
    check_out_dir(cfg.out, inputs)
    if work_dir is not None:
        check_out_dir(work_dir, inputs, "--work-dir")
