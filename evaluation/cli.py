"""`spon eval MODEL_DIR --variants ... --tasks ... --out DIR`: the plugin subcommand."""

from __future__ import annotations

import logging

from spon.evaluation.registry import DEFAULT_TASKS


def register(sub) -> None:
    p = sub.add_parser("eval", help="lm-eval zero-shot suite + perplexity over dense/TEAL/SPON (and quantized) variants")
    p.add_argument("model_dir", help="fused model directory written by `spon run` (DIR/fused)")
    p.add_argument("--variants", default="dense,teal,spon,spon-int8,spon-int4",
                   help="comma list of MODE[-QUANT]: MODE dense|teal|spon, QUANT int8|int4|nf4 (nf4: CUDA)")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help="comma list of registry task names (evaluation/tasks/*.yaml, --task-dir) or lm-eval built-ins")
    p.add_argument("--task-dir", action="append", default=[], help="extra directory of task YAMLs (repeatable)")
    p.add_argument("--out", default="out/eval", help="report directory")
    p.add_argument("--limit", type=float, default=None, help="items per task (int) or fraction (<1); default all")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", help="weights and activations of every variant: fp32, bf16 or fp16")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 is fastest for tiny models (and far faster on a loaded machine)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes; (variant, task) units are spread over them")
    p.add_argument("--resume", action="store_true", help="reuse OUT/variants/VARIANT/TASK.json of finished (variant, task) units")
    p.add_argument("--group-size", type=int, default=32, help="int4 quantization group size")
    p.add_argument("--bootstrap-iters", type=int, default=1000, help="lm-eval bootstrap for perplexity stderr")
    p.set_defaults(func=cmd_eval)


def check_args(args) -> None:
    """Every argument and input of `spon eval`, before any model is loaded or anything written."""
    from pathlib import Path

    from spon import checks
    from spon.cli_args import check_out_dir
    from spon.errors import SponError

    if args.threads < 1 or args.jobs < 1:
        raise SponError("--threads and --jobs must be >= 1")
    if args.limit is not None and not args.limit > 0:
        raise SponError("--limit must be positive")
    checks.check_int(args.batch_size, "--batch-size", 1)
    checks.check_int(args.group_size, "--group-size", 1)
    checks.check_int(args.bootstrap_iters, "--bootstrap-iters", 0)
    checks.check_device(args.device)
    checks.check_dtype(args.dtype)
    for d in args.task_dir:
        if not Path(d).is_dir():
            raise SponError(f"--task-dir {d} is not a directory")
    checks.check_fused_dir(args.model_dir)
    from spon.assets import assets_root

    fidelity_text = assets_root() / "data" / "tinystories" / "sample.txt"  # = spon.evaluation.suite.FIDELITY_TEXT
    check_out_dir(args.out, [("the model directory", args.model_dir), ("the fidelity text", fidelity_text),
                             *(("the task directory", d) for d in args.task_dir)])


def cmd_eval(args) -> int:
    import lm_eval  # noqa: F401 - the eval extra: missing, it is named before any work (spon.cli)

    from spon.evaluation.variants import parse_variants
    from spon.errors import SponError

    variants = parse_variants(args.variants)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise SponError("no tasks given")
    check_args(args)
    from spon.cli_args import new_out_dir

    with new_out_dir(args.out):  # one writer per --out (spon.lock)
        import torch

        from spon.evaluation.suite import run_suite

        for name in ("lm_eval", "httpx", "datasets", "urllib3", "filelock"):
            logging.getLogger(name).setLevel(logging.WARNING)
        torch.set_num_threads(args.threads)
        limit = args.limit
        if limit is not None:
            limit = int(limit) if limit >= 1 else limit
        doc = run_suite(args.model_dir, variants, tasks, args.out, limit, args.task_dir, args.batch_size, args.device,
                        args.bootstrap_iters, args.group_size, jobs=args.jobs, resume=args.resume,
                        dtype=args.dtype)
    print(f"evaluated {len(doc['variants'])} variant(s) x {len(doc['tasks'])} task(s) in {doc['wall_s']:.0f}s")
    if doc["paired"]["comparisons"]:
        from spon.evaluation.report import paired_markdown

        print(f"\npaired differences (same items, 95 % paired-bootstrap interval):\n\n{paired_markdown(doc['paired'])}\n")
    for k, path in doc["outputs"].items():
        print(f"{k}: {path}")
    return 0
