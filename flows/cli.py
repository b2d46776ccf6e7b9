"""`spon run | sweep | pull | publish | deploy`: the pipeline's commands (registered by spon.cli).
`spon run` is the Prefect flow; `spon run --in-process` is the method's own chain (spon.stages.run)
with no Prefect, MLflow or store -- the same stage functions either way.

Nothing here imports prefect or mlflow at module level: the environment for the embedded
defaults (temporary Prefect server, result storage beside the work dir) must be in place first.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

from spon.cli_args import add_config_args, check_run_out_dirs, config_from_args
from spon.errors import SponError

RESULTS_SUBDIR = "prefect-results"  # = spon.tasks.policies.RESULTS_SUBDIR (not imported: it would load prefect)

REPO = Path(__file__).resolve().parent.parent
SHOWN = ("model", "sparsity", "protocol", "realized_sparsity", "perplexity", "gap_closed", "fused_model_dir",
         "mlflow_run_id", "registered_model", "version", "champion", "store_uri", "candidate_uri")


def add_pipeline_args(p) -> None:
    g = p.add_argument_group("pipeline (defaults: embedded, see deployments/README.md)")
    g.add_argument("--work-dir", help="stage outputs and cache (default <out>/work)")
    g.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///out/mlflow.db)")
    g.add_argument("--artifact-root", help="MLflow artifacts of a new experiment on a sqlite store (default mlartifacts/ "
                   "beside the database; a tracking server keeps its own)")
    g.add_argument("--store", help="model store: s3://BUCKET/PREFIX or a directory (default $SPON_STORE or out/store)")
    g.add_argument("--experiment", default=None, help="MLflow experiment (default spon)")
    g.add_argument("--registered-model", default=None, help="registry name (default spon-<model>-s<NN>-<protocol>)")
    g.add_argument("--bench", action="store_true", help="also run the kernel benchmark stage")
    g.add_argument("--quantize", default=None, help="quantization stage: comma list of int8,int4,nf4 (default off)")
    g.add_argument("--lm-eval-tasks", default=None, help="lm-eval stage: comma list of evaluation/tasks names (default off)")
    g.add_argument("--lm-eval-limit", type=float, default=None, help="items per lm-eval task (int) or fraction (< 1)")
    g.add_argument("--refresh", action="store_true", help="recompute every stage, ignoring cached results")


def settings_from_args(args):
    from pydantic import ValidationError

    from spon.runtime.settings import PipelineSettings

    fields = {"work_dir": args.work_dir, "tracking_uri": args.tracking_uri, "store": args.store,
              "artifact_root": getattr(args, "artifact_root", None),
              "experiment": getattr(args, "experiment", None), "registered_model": getattr(args, "registered_model", None),
              "bench": getattr(args, "bench", False) or None, "progress": not args.quiet,
              "quantize": _comma(getattr(args, "quantize", None)), "lm_eval_tasks": _comma(getattr(args, "lm_eval_tasks", None)),
              "lm_eval_limit": getattr(args, "lm_eval_limit", None),
              "dask_address": getattr(args, "dask_address", None), "dask_workers": getattr(args, "dask_workers", None)}
    try:
        return PipelineSettings(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        raise SponError(f"invalid pipeline setting: {'.'.join(map(str, err['loc']))}: {err['msg']}") from e


def _comma(text: str | None) -> list[str] | None:
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


@contextmanager
def embedded_env(work_dir: Path, refresh: bool = False, verbose: bool = False) -> Iterator[None]:
    """Defaults for running without any service; explicit environment always wins.

    The environment is for subprocesses (the temporary Prefect server). Prefect itself read its
    settings when it was first imported, which `tasks` does before the work dir is known, so
    the same values are applied to the loaded settings for the duration of the command."""
    from prefect import settings as ps

    defaults = {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
        # A cold temporary server on a busy 2-core box needs more than the 20 s default.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        # Cache records live beside the stage outputs they point to: delete the work dir, lose both.
        # A path every Dask worker of a sweep sees too (the work dir has to be shared anyway).
        "PREFECT_LOCAL_STORAGE_PATH": str(work_dir / RESULTS_SUBDIR),
        # Prefect narrates every state change at INFO; spon prints one line per stage instead (-v: all).
        "PREFECT_LOGGING_LEVEL": "INFO" if verbose else "WARNING",
    }
    for k, v in defaults.items():
        os.environ.setdefault(k, v)
    if refresh:
        os.environ["PREFECT_TASKS_REFRESH_CACHE"] = "true"
    if not verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow configures its logger
        # Prefect set its loggers' levels from its logging config when it was imported; lower them now.
        import logging

        for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", "prefect.server", "mlflow", "distributed",
                     "distributed.scheduler", "distributed.nanny", "distributed.core", "distributed.worker", "distributed.http.proxy"):
            logging.getLogger(name).setLevel(logging.WARNING)
    names = [*defaults, "PREFECT_TASKS_REFRESH_CACHE"]
    updates = {getattr(ps, k): os.environ[k] for k in names if k in os.environ and hasattr(ps, k)}
    with ps.temporary_settings(updates=updates):
        yield


def where_to_look(settings) -> str:
    uri = settings.resolved_tracking_uri()
    lines = [f"MLflow UI:    mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite") else f"MLflow:       {uri}",
             f"model store:  {settings.resolved_store()}"]
    return "\n".join(lines)


def check_inputs(cfg, settings=None, config_path: str | None = None) -> None:
    """What the flow would only find out after starting Prefect and loading the model (or after
    calibrating, distilling and fusing): every input file, the model directory, the sequence
    lengths against the model's context, the out and work dirs against the inputs."""
    from spon.cli_args import check_run

    work = settings.resolved_work_dir(cfg.out) if settings is not None else None
    check_run(cfg, config_path, pipeline=True, work_dir=work)


def _prepare(args):
    """(config, settings, the command's checks): `writers` runs the checks once it holds the locks."""
    cfg = config_from_args(args)
    settings = settings_from_args(args)
    check_run_out_dirs(cfg, args.config, settings.resolved_work_dir(cfg.out))  # before the locks: no lock beside an input

    def check() -> None:
        check_pipeline_settings(settings, cfg.out)  # first: it needs neither torch nor transformers
        check_inputs(cfg, settings, args.config)

    return cfg, settings, check


TRACKING_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")


def check_pipeline_settings(settings, out) -> None:
    """What the pipeline would otherwise find out after its stages ran (or never, retrying): the
    experiment name, the tracking URI (a server answers within a bounded connect timeout), the model
    store (an S3 URI names a bucket; a directory is writable), the lm-eval task names."""
    from spon.cli_args import check_out_dir

    name = settings.experiment
    if not name.strip() or any(ord(c) < 32 for c in name) or len(name) > 500:
        raise SponError(f"--experiment {name!r}: an MLflow experiment name is a non-empty line of at most 500 characters")
    uri = settings.resolved_tracking_uri()
    scheme = urlsplit(uri).scheme.split("+")[0].lower()
    if scheme not in TRACKING_SCHEMES and not (scheme == "" and uri.startswith("/")):  # an absolute path: file store
        raise SponError(f"--tracking-uri {uri!r} is not a tracking URI: use sqlite:///FILE.db, http(s)://HOST:PORT, "
                        "file:///DIR or a database URI")
    if scheme == "sqlite":
        from spon.runtime.settings import sqlite_path

        db = sqlite_path(uri)
        if db is not None:
            if db.is_dir():
                raise SponError(f"--tracking-uri {uri}: {db} is a directory, not a database file")
            if not db.exists():
                check_out_dir(db.parent, [], "--tracking-uri's directory")
    elif scheme in ("http", "https"):
        u = urlsplit(uri)
        if not u.hostname:
            raise SponError(f"--tracking-uri {uri!r} names no host")
        try:
            socket.create_connection((u.hostname, u.port or (443 if scheme == "https" else 80)), timeout=10).close()
        except (OSError, ValueError) as e:
            # Refused before the first stage, nothing written. A server that answers now and goes
            # away mid-run is another case: the stages keep their results and `spon publish OUT`
            # tracks them later (tasks/track.py).
            raise SponError(f"cannot reach the MLflow tracking server at {uri} ({getattr(e, 'strerror', None) or e}): "
                            "start it, or choose another --tracking-uri (e.g. sqlite:///out/mlflow.db)") from None
    store = settings.resolved_store()
    if store.startswith("s3://"):
        bucket, _, prefix = store[len("s3://"):].partition("/")
        if not bucket:
            raise SponError(f"--store {store!r} names no bucket: use s3://BUCKET/PREFIX")
        if "//" in prefix or prefix.startswith("/"):
            raise SponError(f"--store {store!r}: empty path segment in the prefix")
    elif "://" in store:
        raise SponError(f"--store {store!r}: unsupported store URI (s3://BUCKET/PREFIX or a directory)")
    else:
        check_out_dir(store, [], "--store")
    if settings.lm_eval_tasks:
        _check_task_names(settings.lm_eval_tasks)


def _check_task_names(names: list[str]) -> None:
    from spon.evaluation.registry import discover

    known = set(discover())
    unknown = [n for n in names if n not in known]
    if not unknown:
        return
    try:  # lm-eval's own task index, when installed (slow to build: only for names that are not ours)
        from lm_eval.tasks import TaskManager

        known |= set(TaskManager().all_tasks)
        unknown = [n for n in names if n not in known]
    except ImportError:
        pass
    if unknown:
        raise SponError(f"--lm-eval-tasks: unknown task(s) {', '.join(unknown)}; spon's own: {', '.join(sorted(discover()))}")


@contextmanager
def writers(cfg, settings, check: Callable[[], None] | None = None) -> Iterator[None]:
    """The writer locks of a pipeline command (spon.lock): its --out and its --work-dir, so a second
    command on either is refused in one line instead of mixing its results with this one's. `check`
    (the command's checks, which import torch and transformers) runs once both are held, before
    Prefect and MLflow are imported: a second writer is refused in about a second, and a refused
    check leaves nothing behind (the empty parents made for the locks are removed)."""
    from contextlib import ExitStack

    from spon.cli_args import check_out_dir, first_missing, remove_made_dirs
    from spon.lock import writer_lock

    out = Path(cfg.out).expanduser().resolve()
    work = Path(settings.resolved_work_dir(cfg.out)).expanduser().resolve()
    dirs = [(out, "--out")] + ([(work, "--work-dir")] if work != out and out not in work.parents else [])
    for d, flag in dirs:
        check_out_dir(d, (), flag)  # each lock lives in its directory's parent
    made = [first_missing(d) for d, _ in dirs]
    stack = ExitStack()
    try:
        for d, flag in dirs:
            stack.enter_context(writer_lock(d, flag))
        if check is not None:
            check()
    except BaseException as e:
        stack.close()
        if isinstance(e, SponError):
            for (d, _), m in zip(dirs, made):
                remove_made_dirs(m, d.parent)
        raise
    with stack:
        yield


def cmd_run(args) -> int:
    if args.in_process:
        from spon.method_cli import cmd_run_in_process

        return cmd_run_in_process(args)
    cfg, settings, check = _prepare(args)
    with writers(cfg, settings, check):  # the checks and Prefect's import once the locks are held
        from spon.flows.pipeline import spon_pipeline

        with embedded_env(settings.resolved_work_dir(cfg.out), args.refresh, args.verbose):
            summary = spon_pipeline(cfg, settings)
    from spon.console import result_lines

    print("\n".join(result_lines(summary)))
    print(f"summary:      {Path(cfg.out) / 'summary.json'}\n{where_to_look(settings)}")
    return 0


def check_dask_address(address: str | None) -> None:
    """An unreachable scheduler fails here, before Prefect starts (the flow checks again itself)."""
    if not address:
        return
    u = urlsplit(address if "://" in address else f"tcp://{address}")
    if u.scheme not in ("tcp", "tls"):  # other comms: left to the flow's own check
        return
    try:
        socket.create_connection((u.hostname, u.port or 8786), timeout=10).close()
    except (OSError, ValueError) as e:
        raise SponError(f"cannot reach the Dask scheduler at {address}: {e}") from e


def cmd_sweep(args) -> int:
    from spon.cli_args import check_sparsities

    if args.out is None:
        args.out = "out/sweep"
    levels = check_sparsities(args.sparsities)  # every level, before any level runs
    cfg, settings, check = _prepare(args)

    def check_sweep() -> None:
        check()
        check_dask_address(settings.resolved_dask_address())

    with writers(cfg, settings, check_sweep):
        from spon.flows.sweep import sparsity_sweep

        with embedded_env(settings.resolved_work_dir(cfg.out), args.refresh, args.verbose):
            summaries = sparsity_sweep(levels, cfg, settings)
    for s in summaries:
        print(json.dumps({k: s[k] for k in ("sparsity", "perplexity", "version", "store_uri") if k in s}))
    print(f"plot:         {Path(cfg.out) / 'perplexity_vs_sparsity.png'}\n{where_to_look(settings)}")
    return 0


def cmd_pull(args) -> int:
    from spon.runtime import store
    from spon.tasks.fetch import resolve_store_uri
    from spon.runtime.settings import PipelineSettings

    uri = args.uri
    if uri.startswith("models:/"):
        uri = resolve_store_uri(uri, PipelineSettings(tracking_uri=args.tracking_uri))
    from spon.lock import writer_lock

    with writer_lock(args.out, "--out"):
        out = store.pull(uri, args.out)
    print(f"{uri} -> {out} (all checksums verified)")
    return 0


def cmd_publish(args) -> int:
    """Finish what a run left undone (tracking or store down): log the run if it has no MLflow
    run id yet, then store + log the MLflow Model + register. Every step is idempotent.
    `spon publish models:/NAME/VERSION` re-publishes a version an older spon registered as bare
    artifacts as an MLflow Model (a new version of the same run; its aliases move to it)."""
    from spon.format import SIDECAR, SUMMARY_FILE

    settings = settings_from_args(args)
    if args.result_dir.startswith("models:/"):
        with embedded_env(settings.resolved_work_dir("out/run")):
            from spon.tasks.publish import republish

            result = republish(settings, args.result_dir)
        result["serve"] = f"mlflow models serve -m {result['model_uri']} --env-manager local"
        print(json.dumps(result, indent=2))
        return 0
    result = Path(args.result_dir)
    path = result / SUMMARY_FILE
    if not path.is_file():
        raise SponError(f"{result} has no {SUMMARY_FILE}: not a finished `spon run` output")
    summary = json.loads(path.read_text())
    fused = Path(summary["fused_model_dir"])
    if not (fused / SIDECAR).is_file():
        raise SponError(f"fused model missing at {fused}")
    from spon.lock import writer_lock

    with writer_lock(result, "result directory"), embedded_env(settings.resolved_work_dir(str(result))):
        from spon.tasks.publish import publish
        from spon.tasks.track import track_run

        run_id = summary.get("mlflow_run_id")
        if not run_id:
            files = {"": str(path), "thresholds": str(result / "thresholds.json"), "fused_model": str(fused)}
            run_id = track_run.fn(summary, files, settings, f"publish-{result.name}")
            # Recorded before storing: if the store fails now, the next publish reuses this run and
            # its store prefix (push skips what is already there), so one stored copy results.
            summary["mlflow_run_id"] = run_id
            path.write_text(json.dumps(summary, indent=2))
        published = publish.fn(str(fused), run_id, summary, settings)
    summary.update({"mlflow_run_id": run_id, **published})
    path.write_text(json.dumps(summary, indent=2))
    shown = {k: summary[k] for k in SHOWN + ("model_uri", "variants") if k in summary}
    shown["serve"] = f"mlflow models serve -m {summary['model_uri']} --env-manager local"
    print(json.dumps(shown, indent=2))
    return 0


def cmd_deploy(args) -> int:
    """`prefect deploy` of deployments/prefect.yaml from the repo root (entrypoints are relative)."""
    prefect_file = REPO / "deployments" / "prefect.yaml"
    if not prefect_file.is_file():  # an installed wheel carries the package, not the repository's deployments/
        raise SponError(f"spon deploy runs from a repository checkout: {prefect_file} does not exist")
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file", str(prefect_file)]
    cmd += [x for n in args.name for x in ("--name", n)] if args.name else ["--all"]
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():  # env or the active Prefect profile
        raise SponError("spon deploy needs a running Prefect server: set PREFECT_API_URL (see deployments/README.md)")
    return subprocess.call(cmd, cwd=REPO, env=env)


def register(sub) -> None:
    r = sub.add_parser("run", help="the spon_pipeline Prefect flow: method + MLflow + model store (embedded defaults)")
    add_config_args(r)
    r.add_argument("--out", default=None, help="output directory (default out/run)")
    r.add_argument("--in-process", action="store_true",
                   help="the method's stages in this process only: no Prefect, MLflow or model store")
    add_pipeline_args(r)
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("sweep", help="the pipeline over several sparsity levels, with a perplexity plot")
    add_config_args(s)
    s.add_argument("--out", default=None, help="output directory (default out/sweep)")
    s.add_argument("--sparsities", default="0.3,0.5,0.7", help="comma list")
    add_pipeline_args(s)
    d = s.add_argument_group("Dask (levels run on a DaskTaskRunner; see deployments/README.md)")
    d.add_argument("--dask-address", default=None, help="scheduler of an existing cluster, e.g. tcp://host:8786 "
                   "(default $SPON_DASK_ADDRESS, else a LocalCluster of worker processes)")
    d.add_argument("--dask-workers", type=int, default=None, help="LocalCluster worker processes (default min(levels, CPUs))")
    s.set_defaults(func=cmd_sweep)

    p = sub.add_parser("pull", help="download a stored model (URI or models:/NAME@ALIAS), verifying checksums")
    p.add_argument("uri", help="s3://BUCKET/PREFIX/<model>/<run_id>, a store directory, or models:/NAME@ALIAS")
    p.add_argument("--out", required=True, help="destination directory (must not exist or be empty)")
    p.add_argument("--tracking-uri", default=None, help="registry for models:/ URIs")
    p.set_defaults(func=cmd_pull)

    u = sub.add_parser("publish", help="store + register a finished local result (e.g. after the store was down)")
    u.add_argument("result_dir", help="a `spon run --out` directory")
    add_pipeline_args(u)
    u.set_defaults(func=cmd_publish)

    d = sub.add_parser("deploy", help="register the Prefect deployments in deployments/prefect.yaml")
    d.add_argument("--name", action="append", default=None, help="deployment name (repeatable; default all)")
    d.set_defaults(func=cmd_deploy)
