"""The comparison report: one JSON (the source of truth), a markdown table rendered from it, charts.

Rows are task/metric pairs, columns are variants, cells are "value ± stderr". Markdown is always
generated from the JSON document, so the two cannot disagree.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

HEADER = (
    "Zero-shot accuracy of a 260K-parameter TinyStories model (stories260K) is near chance on these "
    "tasks (ARC, PIQA, BoolQ, HellaSwag, MMLU, ...), which are far outside what it was trained on: "
    "the accuracy columns prove the evaluation path, not the method. Perplexity and KL on in-domain "
    "text (TinyStories) are the signal that responds to sparsification."
)
# Metrics where lower is better (shown with ↓); everything else is higher-is-better.
LOWER = ("perplexity", "bits_per_byte", "kl_to_dense")
ACCURACY = ("acc", "acc_norm", "exact_match")
PERPLEXITY = ("word_perplexity", "perplexity", "token_perplexity")


def rows(doc: dict) -> list[tuple[str, str, str]]:
    """(task, metric key, filter) for every metric any variant has, in a stable order."""
    seen: dict[tuple[str, str, str], None] = {}
    for v in doc["variants"].values():
        for task, r in v["tasks"].items():
            for key in r["metrics"]:
                metric, _, filt = key.partition(",")
                if metric.endswith("_stderr") or metric == "sample_len":
                    continue
                seen[(task, metric, filt)] = None
    return list(seen)


def cell(metrics: dict, metric: str, filt: str) -> tuple[float | None, float | None]:
    key = f"{metric},{filt}" if filt else metric
    val = metrics.get(key)
    err = metrics.get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr")
    ok = lambda x: isinstance(x, (int, float)) and math.isfinite(x)  # noqa: E731
    return (float(val) if ok(val) else None, float(err) if ok(err) else None)


def fmt(x: float | None) -> str:
    if x is None:
        return "–"
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.3e}"
    return f"{x:.4f}"


def markdown(doc: dict) -> str:
    names = list(doc["variants"])
    out = [f"# spon evaluation: {doc['model_dir']}", "", f"> {HEADER}", ""]
    meta = doc.get("meta", {})
    out.append(
        f"Target sparsity {meta.get('sparsity')}, protocol {meta.get('protocol')}, "
        f"limit {doc.get('limit')}, wall time {doc.get('wall_s', 0):.0f} s ({doc.get('host', '')})."
    )
    out += ["", "## In-domain fidelity (TinyStories sample, direct)", ""]
    out.append("| metric | " + " | ".join(names) + " |")
    out.append("| --- |" + " --- |" * len(names))
    for key in ("token_perplexity", "kl_to_dense", "realized_sparsity"):
        vals = [doc["variants"][n].get("fidelity", {}).get(key) for n in names]
        arrow = " ↓" if key in LOWER else ""
        out.append(f"| {key}{arrow} | " + " | ".join(fmt(v) for v in vals) + " |")
    out += ["", "## lm-eval tasks (value ± stderr)", ""]
    out.append("| task | metric | " + " | ".join(names) + " |")
    out.append("| --- | --- |" + " --- |" * len(names))
    for task, metric, filt in rows(doc):
        label = metric + (f" ({filt})" if filt and filt != "none" else "")
        label += " ↓" if any(metric.endswith(s) for s in LOWER) else ""
        cells = []
        for n in names:
            r = doc["variants"][n]["tasks"].get(task)
            val, err = cell(r["metrics"], metric, filt) if r else (None, None)
            cells.append(fmt(val) + (f" ± {fmt(err)}" if err is not None else ""))
        out.append(f"| {task} | {label} | " + " | ".join(cells) + " |")
    if doc.get("paired", {}).get("comparisons"):
        out += ["", "## Paired differences (same items, 95 % paired-bootstrap interval)", "", paired_markdown(doc["paired"])]
    out += ["", "## Realized sparsity per task (fraction of sparse-linear inputs zeroed, weight-weighted)", ""]
    out.append("| task | " + " | ".join(names) + " |")
    out.append("| --- |" + " --- |" * len(names))
    for task in dict.fromkeys(t for t, _, _ in rows(doc)):
        vals = [doc["variants"][n]["tasks"].get(task, {}).get("realized_sparsity") for n in names]
        out.append(f"| {task} | " + " | ".join(fmt(v) for v in vals) + " |")
    q = {n: v["quantization"] for n, v in doc["variants"].items() if v.get("quantization")}
    if q:
        out += ["", "## Quantization", ""]
        for n, info in q.items():
            out.append(f"- **{n}**: `{json.dumps(info, sort_keys=True)}`")
    out += ["", "Charts: `accuracy.png`, `perplexity.png`. Numbers: `results.json`.", ""]
    return "\n".join(out)


def signed(x: float) -> str:
    return f"{x:+.3f}"


def paired_markdown(paired: dict) -> str:
    """The paired table (evaluation/paired.compare): task, n, the headline accuracy of every
    variant, and each comparison a - b as "difference [lo, hi]"; the last row averages the tasks
    (its interval resamples within each task). An interval that excludes 0 is in bold."""
    labels = paired["comparisons"]
    names = list(next(iter(paired["tasks"].values()))["accuracy"])

    def interval(d: dict) -> str:
        text = f"{signed(d['diff'])} [{signed(d['lo'])}, {signed(d['hi'])}]"
        return f"**{text}**" if d["lo"] > 0 or d["hi"] < 0 else text

    out = ["| task | metric | n | " + " | ".join(names) + " | " + " | ".join(labels) + " |",
           "| --- | --- | --- |" + " --- |" * (len(names) + len(labels))]
    for task, row in paired["tasks"].items():
        out.append(f"| {task} | {row['metric'].split(',')[0]} | {row['n']} | "
                   + " | ".join(f"{row['accuracy'][n]:.3f}" for n in names) + " | "
                   + " | ".join(interval(row["diff"][c]) for c in labels) + " |")
    avg = paired["average"]
    n_total = sum(row["n"] for row in paired["tasks"].values())
    out.append(f"| **average ({len(avg['tasks'])} tasks)** | | {n_total} | "
               + " | ".join(f"{avg['accuracy'][n]:.3f}" for n in names) + " | "
               + " | ".join(interval(avg["diff"][c]) for c in labels) + " |")
    out += ["", f"Method: {paired['method']}."]
    return "\n".join(out)


def charts(doc: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["variants"])
    written = []
    acc_rows = [(t, m, f) for t, m, f in rows(doc) if m in ACCURACY and (m != "acc_norm")]
    acc_rows = list({t: (t, m, f) for t, m, f in acc_rows}.values())  # one accuracy per task
    ppl_rows = [(t, m, f) for t, m, f in rows(doc) if m in PERPLEXITY]
    for fname, selected, ylabel, log in (
        ("accuracy.png", acc_rows, "accuracy", False),
        ("perplexity.png", ppl_rows, "perplexity (log scale)", True),
    ):
        labels = [f"{t}\n{m}" for t, m, _ in selected]
        if fname == "perplexity.png":
            labels.append("tinystories\ntoken ppl")
        if not labels:
            continue
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) * max(1, len(names)) / 3), 4.5))
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            vals, errs = [], []
            for t, m, f in selected:
                r = doc["variants"][n]["tasks"].get(t)
                v, e = cell(r["metrics"], m, f) if r else (None, None)
                vals.append(v if v is not None else float("nan"))
                errs.append(e if (e is not None and not log) else 0.0)
            if fname == "perplexity.png":
                vals.append(doc["variants"][n].get("fidelity", {}).get("token_perplexity", float("nan")))
                errs.append(0.0)
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(labels))]
            ax.bar(xs, vals, width, yerr=errs if not log else None, label=n, capsize=2)
        ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=45, ha="right")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.set_title(f"{ylabel.split(' ')[0]} per task per variant")
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=120)
        plt.close(fig)
        written.append(out_dir / fname)
    return written


def write(doc: dict, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=2, default=float))
    (out / "report.md").write_text(markdown(doc))
    paths = {"json": out / "results.json", "markdown": out / "report.md"}
    for p in charts(doc, out):
        paths[p.stem] = p
    return paths
