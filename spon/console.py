"""What a person running `spon` sees: one line per stage with its wall time, progress bars where
work is long, the results table at the end. Library chatter (per-request HTTP logs, import-time
warnings of optional backends, weight-loading bars, Prefect's per-task state lines) stays out
unless -v asks for it."""

from __future__ import annotations

import logging
import os
import sys
import warnings

# Loggers that narrate every HTTP request, every state change or every optional .so they fail to load.
CHATTY = ("httpx", "httpcore", "urllib3", "botocore", "boto3", "s3transfer", "werkzeug", "filelock", "datasets",
          "prefect", "prefect.flow_runs", "prefect.task_runs", "prefect.server", "mlflow", "alembic", "distributed",
          "torchao", "torch.utils._pytree", "lm_eval", "transformers", "huggingface_hub")


def configure(verbose: bool = False, quiet: bool = False) -> None:
    """Logging for the command line: spon's own INFO lines (or WARNING with -q), libraries at
    WARNING (ERROR for the ones that warn on every import), all of it back with -v."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    if verbose:
        return
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.ERROR if name in ("torchao", "torch.utils._pytree", "alembic") else logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*is an Enum subclass.*")
    # Weight-loading and shard-writing bars of transformers: one per stage, none of them long. Not
    # imported yet, transformers reads the same settings from the environment when it is: a command
    # refused before it loads a model (its checks, another writer's lock) never imports it.
    if "transformers" not in sys.modules:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def stage_line(name: str, seconds: float, cached: bool = False, detail: str = "") -> str:
    what = "cached" if cached else "done"
    line = f"  {name:<12} {what:<6} {seconds:7.1f} s"
    return f"{line}  {detail}" if detail else line


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def result_lines(s: dict) -> list[str]:
    """The final table of one run (summary.json), a few lines."""
    from pathlib import Path

    p, kl, sel = s.get("perplexity", {}), s.get("heldout_kl", {}), s.get("alpha_selection", {})
    fmt = lambda x, spec=".3f": "-" if x is None else format(x, spec)  # noqa: E731
    lines = [f"{Path(str(s.get('model'))).name}: sparsity {s['sparsity']:.2f} (realized TEAL {fmt(s.get('realized_sparsity'))}, "
             f"SPON {fmt(s.get('realized_sparsity_spon'))} on the eval text), {s.get('allocation', 'uniform')}, {s.get('criterion', 'magnitude')} criterion, "
             f"protocol {s.get('protocol')}"
             + (f", preset {s['preset']}" if s.get("preset", "none") != "none" else "")]
    if p:
        lines.append(f"  perplexity   dense {fmt(p.get('dense'))}   TEAL {fmt(p.get('teal'))}   SPON {fmt(p.get('spon'))}"
                     f"   gap closed {fmt(s.get('gap_closed'), '.1%')}")
    lines.append(f"  held-out KL  TEAL {fmt(kl.get('teal'), '.4f')} -> SPON {fmt(kl.get('spon'), '.4f')}"
                 f"   alpha: {sel.get('selection', '-')}")
    lines += [f"  WARNING      {w}" for w in s.get("quality_warnings", []) + s.get("sparsity_warnings", [])]
    if "registered_model" in s:
        refused = (s.get("gate") or {}).get("refused")
        lines.append(f"  registered   {s['registered_model']} v{s['version']} (candidate"
                     + ("; champion" if s.get("champion") else "; champion refused: SPON worse than TEAL" if refused
                        else "; champion unchanged") + ")")
    if s.get("store_uri"):
        lines.append(f"  stored       {s['store_uri']}")
    lines.append(f"  fused model  {s.get('fused_model_dir')}")
    return lines
