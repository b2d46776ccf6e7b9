"""`spon` command line. Every failure a user can cause prints one line and exits 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from spon.errors import SponError

# flag -> dotted config key; one table shared by `run` and the stage commands.
CONFIG_FLAGS = {
    "--model": ("model", str, "hub id or local directory (default: embedded stories260K)"),
    "--device": ("device", str, "cpu or cuda[:N]"),
    "--dtype": ("dtype", str, "fp32, bf16 or fp16"),
    "--device-map": ("device_map", str, "e.g. 'auto' for a model larger than one GPU"),
    "--protocol": ("protocol", str, "all (every token sparse) or last_half (TEAL's prefill protocol)"),
    "--sparsity": ("sparsity.sparsity", float, "target sparsity in [0, 1)"),
    "--allocation": ("sparsity.allocation", str, "uniform or greedy"),
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
    "--seed": ("distill.seed", int, "batch-order seed"),
    "--checkpoint-every": ("distill.checkpoint_every", int, "alpha checkpoint interval (steps)"),
    "--window": ("eval.window", int, "perplexity window"),
    "--stride": ("eval.stride", int, "perplexity stride"),
}


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="JSON or YAML RunConfig; flags override it")
    for flag, (_, typ, help_) in CONFIG_FLAGS.items():
        p.add_argument(flag, type=typ, default=None, help=help_)
    p.add_argument("--eval-text", action="append", default=None, help="text file for perplexity (repeatable)")


def config_from_args(args):
    from spon.config import load_config

    overrides = {key: getattr(args, flag[2:].replace("-", "_")) for flag, (key, _, _) in CONFIG_FLAGS.items()}
    overrides["eval.files"] = args.eval_text
    overrides["out"] = getattr(args, "out", None)
    return load_config(args.config, overrides)


def cmd_run(args) -> int:
    from spon.run import run

    cfg = config_from_args(args)
    summary = run(cfg, progress=not args.quiet)
    print(json.dumps({k: summary[k] for k in ("model", "sparsity", "protocol", "realized_sparsity", "perplexity", "gap_closed", "fused_model_dir") if k in summary}, indent=2))
    print(f"summary: {Path(cfg.out) / 'summary.json'}")
    return 0


def cmd_calibrate(args) -> int:
    """Calibration blocks + thresholds -> DIR/calibration.safetensors, DIR/thresholds.json."""
    from safetensors.torch import save_file

    from spon.model import load_model
    from spon.run import build_calibration
    from spon.sparse import sparsify
    from spon.thresholds import compute_thresholds

    cfg = config_from_args(args)
    out = Path(cfg.out)
    model, tok = load_model(cfg.model, cfg.device, cfg.dtype, cfg.device_map)
    sparsify(model, cfg.sparsity.targets)
    blocks = build_calibration(model, tok, cfg.calibration)
    taus, sp = compute_thresholds(model, blocks, cfg.sparsity.sparsity, cfg.sparsity.allocation, cfg.sparsity.greedy_step, cfg.sparsity.greedy_blocks)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"blocks": blocks.contiguous()}, str(out / "calibration.safetensors"))
    (out / "thresholds.json").write_text(json.dumps({"thresholds": taus, "sparsities": sp, "config": cfg.model_dump()}, indent=2))
    print(f"{len(blocks)} blocks x {blocks.shape[1]} tokens, {len(taus)} thresholds -> {out}")
    return 0


def _load_calibrated(args, cfg):
    from safetensors.torch import load_file

    from spon.model import load_model
    from spon.sparse import set_protocol, set_thresholds, sparsify

    calib = Path(args.calib)
    for f in ("calibration.safetensors", "thresholds.json"):
        if not (calib / f).is_file():
            raise SponError(f"{calib} has no {f}: run `spon calibrate --out {calib}` first")
    model, tok = load_model(cfg.model, cfg.device, cfg.dtype, cfg.device_map)
    taus = json.loads((calib / "thresholds.json").read_text())["thresholds"]
    sparsify(model, sorted({n.split(".")[1] for n in taus}))
    set_thresholds(model, taus)
    set_protocol(model, cfg.protocol)
    return model, tok, load_file(str(calib / "calibration.safetensors"))["blocks"]


def cmd_distill(args) -> int:
    from safetensors.torch import save_file

    from spon.distill import distill
    from spon.run import split_heldout

    cfg = config_from_args(args)
    model, _, blocks = _load_calibrated(args, cfg)
    train, heldout = split_heldout(blocks, cfg.calibration.heldout_blocks)
    d = cfg.distill
    out = Path(cfg.out)
    r = distill(model, train, heldout, steps=d.steps, lr=d.lr, batch_size=d.batch_size, grad_accum=d.grad_accum,
                weight_decay=d.weight_decay, schedule=d.schedule, warmup=d.warmup, init=d.init, seed=d.seed,
                checkpoint_dir=out / "alpha_checkpoints", checkpoint_every=d.checkpoint_every, progress=not args.quiet)
    save_file({k: v.contiguous() for k, v in r.alphas.items()}, str(out / "alpha.safetensors"))
    print(f"held-out KL: teal {r.heldout_kl_before:.4f} -> spon {r.heldout_kl_after:.4f}; alpha -> {out / 'alpha.safetensors'}")
    return 0


def cmd_fuse(args) -> int:
    from safetensors.torch import load_file

    from spon.fuse import save_fused
    from spon.sparse import load_alphas

    cfg = config_from_args(args)
    model, tok, _ = _load_calibrated(args, cfg)
    if not Path(args.alpha).is_file():
        raise SponError(f"alpha file does not exist: {args.alpha}")
    load_alphas(model, load_file(args.alpha))
    meta = {"sparsity": cfg.sparsity.sparsity, "protocol": cfg.protocol,
            "provenance": {"source_model": cfg.model, "calibration_dir": str(args.calib), "alpha": str(args.alpha)}}
    out = save_fused(model, tok, cfg.out, meta)
    print(f"fused checkpoint -> {out}")
    return 0


def cmd_ppl(args) -> int:
    from spon.fuse import SIDECAR, load_sparse_model
    from spon.model import load_model
    from spon.perplexity import perplexities

    if not args.eval_text:
        raise SponError("ppl needs at least one --eval-text FILE")
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
    import torch

    from spon.fuse import load_sparse_model

    model, tok, _ = load_sparse_model(args.model_dir, args.device, args.dtype)
    ids = tok(args.prompt, return_tensors="pt").input_ids.to(model.device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(tok.decode(out[0], skip_special_tokens=True))
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
    q.set_defaults(func=func)


def register_method_commands(sub) -> None:
    r = sub.add_parser("run", help="calibrate -> thresholds -> distill -> fuse -> perplexity (in this process)")
    add_config_args(r)
    r.add_argument("--out", default=None, help="output directory (default out/run)")
    r.set_defaults(func=cmd_run)

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
    """`spon bench ...` forwards its arguments to kernels.bench (torch + triton only)."""
    b = sub.add_parser("bench", help="kernel and decode benchmarks (kernels/bench.py; --help there)", add_help=False)

    def run_bench(args) -> int:
        from kernels.bench import main as bench_main

        return bench_main(args.passthrough)

    b.set_defaults(func=run_bench)


class _Subparsers:
    """argparse's subparsers, but a later registration of a name replaces the earlier one, so a
    plugin (e.g. the Prefect pipeline's `run`) can take over a method-level command."""

    def __init__(self, action):
        self._action = action

    def add_parser(self, name, **kw):
        self._action._name_parser_map.pop(name, None)
        self._action._choices_actions[:] = [a for a in self._action._choices_actions if a.dest != name]
        return self._action.add_parser(name, **kw)


def plugin_registrars():
    """Subcommands contributed by the other packages through the `spon.commands` entry point group
    (evaluation, pipeline, kernels); the method itself depends on none of them."""
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group="spon.commands"), key=lambda e: e.name):
        try:
            yield ep.load()
        except (ImportError, AttributeError) as e:  # an optional part is not installed: its commands are absent
            logging.getLogger(__name__).debug("spon plugin %s unavailable: %s", ep.name, e)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spon", description="TEAL activation sparsity + spontaneous neurons")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = _Subparsers(p.add_subparsers(dest="command", required=True))
    register_method_commands(sub)
    for register in plugin_registrars():
        register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":  # everything after `bench` belongs to kernels.bench
        args.passthrough = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except SponError as e:  # plugins raise SponError (or a subclass) for every user-caused failure
        print(f"spon: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
