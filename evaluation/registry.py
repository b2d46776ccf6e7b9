"""The task registry: lm-eval task YAMLs in evaluation/tasks/ (and any --task-dir), over local data.

A task is one YAML in lm-eval's own format. Data paths in it are written relative to two roots
substituted at run time, so no YAML holds one machine's absolute path:
  ${SPON_EVAL_DATA}   the shipped eval data (env SPON_EVAL_DATA, default ../shared/assets/data/eval
                      beside the repo)
  ${SPON_EVAL_CACHE}  where converted data goes (env SPON_EVAL_CACHE, default ~/.cache/spon/eval)
An optional `spon_prepare:` block names a converter (evaluation/prepare.py) that builds the jsonl
the task reads; an optional `spon_headline_metric:` names the per-item accuracy that paired
comparisons of variants use (evaluation/paired.py). Adding a task = adding a YAML (+ its data);
names not found here are passed to lm-eval as built-in task names (those need the hub).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from spon.evaluation.prepare import prepare
from spon.assets import assets_root
from spon.errors import SponError

BUILTIN_TASK_DIR = Path(__file__).resolve().parent / "tasks"
DEFAULT_TASKS = (
    "arc_easy", "arc_challenge", "piqa", "openbookqa", "boolq", "copa", "mmlu_cs",
    "winogrande", "hellaswag", "lambada", "gsm8k", "tinystories_ppl", "wikitext2_ppl",
)
_VAR = re.compile(r"\$\{(SPON_EVAL_DATA|SPON_EVAL_CACHE)\}")


def data_root() -> Path:
    return Path(os.environ.get("SPON_EVAL_DATA") or assets_root() / "data" / "eval").resolve()


def cache_root() -> Path:
    return Path(os.environ.get("SPON_EVAL_CACHE") or Path.home() / ".cache" / "spon" / "eval").resolve()


def substitute(obj, roots: dict[str, str]):
    """Replace ${SPON_EVAL_DATA}/${SPON_EVAL_CACHE} in every string of a parsed YAML."""
    if isinstance(obj, str):
        return _VAR.sub(lambda m: roots[m.group(1)], obj)
    if isinstance(obj, dict):
        return {k: substitute(v, roots) for k, v in obj.items()}
    if isinstance(obj, list):
        return [substitute(v, roots) for v in obj]
    return obj


@dataclass
class TaskSpec:
    name: str
    path: Path
    raw: dict  # the YAML as written (placeholders intact)

    @property
    def output_type(self) -> str:
        return self.raw.get("output_type", "")

    @property
    def headline_metric(self) -> str | None:
        """The per-item accuracy the paired comparison uses (`spon_headline_metric:` in the YAML,
        lm-eval's metric key, e.g. "acc_norm,none"); None: the first one the task logs."""
        return self.raw.get("spon_headline_metric")

    def config(self) -> dict:
        """The lm-eval config with data roots resolved and its data prepared."""
        roots = {"SPON_EVAL_DATA": str(data_root()), "SPON_EVAL_CACHE": str(cache_root())}
        cfg = substitute(self.raw, roots)
        spec = cfg.pop("spon_prepare", None)
        cfg.pop("spon_headline_metric", None)  # ours, not lm-eval's
        if spec:
            prepare(spec)
        files = (cfg.get("dataset_kwargs") or {}).get("data_files")
        for f in (files.values() if isinstance(files, dict) else [files] if files else []):
            for p in [f] if isinstance(f, str) else f:
                if not Path(p).is_file():
                    raise SponError(f"task {self.name}: data file does not exist: {p} (set SPON_EVAL_DATA?)")
        return cfg


def discover(task_dirs: list[str | Path] = ()) -> dict[str, TaskSpec]:
    """Every *.yaml under the built-in task dir and the extra dirs; later dirs override earlier."""
    specs: dict[str, TaskSpec] = {}
    for d in [BUILTIN_TASK_DIR, *map(Path, task_dirs)]:
        if not Path(d).is_dir():
            raise SponError(f"task directory does not exist: {d}")
        for path in sorted(Path(d).rglob("*.yaml")):
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
            if not isinstance(raw, dict) or "task" not in raw:
                raise SponError(f"{path}: not an lm-eval task YAML (no `task:` key)")
            specs[raw["task"]] = TaskSpec(raw["task"], path, raw)
    return specs


def export(names: list[str], out_dir: str | Path, task_dirs: list[str | Path] = ()) -> Path:
    """Registry tasks as plain lm-eval YAMLs for lm-eval's own CLI (`lm_eval --include_path
    OUT_DIR --tasks ...`): data roots substituted, data prepared, the spon_prepare block gone.
    lm-eval reads YAMLs as they are, so ${SPON_EVAL_DATA} would reach it as a literal path."""
    specs = discover(task_dirs)
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise SponError(f"not registry tasks: {unknown}; known: {', '.join(sorted(specs))}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        (out / f"{name}.yaml").write_text(yaml.safe_dump(specs[name].config(), sort_keys=False), encoding="utf-8")
    return out


def build_tasks(names: list[str], task_dirs: list[str | Path] = ()) -> dict[str, object]:
    """name -> lm-eval Task object (registry YAMLs) or the plain name (lm-eval built-ins)."""
    from lm_eval.api.task import ConfigurableTask

    specs = discover(task_dirs)
    out: dict[str, object] = {}
    for name in names:
        if name in specs:
            try:
                out[name] = ConfigurableTask(config=specs[name].config())
            except SponError:
                raise
            except Exception as e:  # lm-eval/datasets reject the YAML: say which file
                raise SponError(f"task {name} ({specs[name].path}): {type(e).__name__}: {e}") from e
        else:
            out[name] = name
    return out
