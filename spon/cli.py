"""`spon` command line: every subcommand, registered here explicitly -- the method's
(spon.method_cli), the pipeline's (spon.flows.cli) and `spon eval` (spon.evaluation.cli). Every
failure a user can cause prints one line and exits 2; a missing optional dependency names the
extra to install."""

from __future__ import annotations

import argparse
import os
import sys

from spon.errors import SponError
from spon.method_cli import register_bench, register_method_commands

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


def interrupted_line(args, argv: list[str] | None) -> str:
    """What an interrupted command kept, and how to go on."""
    import shlex

    again = "spon " + shlex.join(sys.argv[1:] if argv is None else argv)
    out = getattr(args, "out", None) or ("out/run" if args.command == "run" else None)  # RunConfig.out's default
    if out and os.path.isdir(out):
        kept = f"what was written under {out} is kept (alpha checkpoints included)"
        return f"spon: interrupted: {kept}; to resume, run the same command again: {again}"
    return f"spon: interrupted: nothing was written; to start again: {again}"


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
    except KeyboardInterrupt:  # Ctrl-C: one line, exit 130 (128 + SIGINT), what was written stays
        print(interrupted_line(args, argv), file=sys.stderr)
        return 130
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
