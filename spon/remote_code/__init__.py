"""What makes a fused checkpoint self-contained: its own modeling code and its model card.

`install` copies modeling_spon.py (torch + transformers only) into the checkpoint and names it in
config.json's `auto_map`, so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`
returns the sparse model without spon installed. `model_type` stays the vanilla one and
`architectures` too: without the flag transformers ignores auto_map for an architecture it knows
and loads the dense model with the fused biases, as before.

`write_model_card` writes README.md (Hugging Face model-card metadata + what the checkpoint is);
the fuse stage writes it first, and whatever writes summary.json rewrites it with the
perplexities measured after fusion.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

from spon.format import CARD_FILE, CHANNEL_NORMS_FILE, MODELING_FILE, SIDECAR

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def install(model_dir: str | Path) -> None:
    """modeling_spon.py into the checkpoint, and `auto_map` -> its class for this architecture."""
    from spon.remote_code import modeling_spon

    d = Path(model_dir)
    config_path = d / "config.json"
    config = json.loads(config_path.read_text())
    cls = modeling_spon.SPARSE_CLASSES[config["model_type"]]
    shutil.copyfile(modeling_spon.__file__, d / MODELING_FILE)
    # No AutoConfig entry: the vanilla config class is the right one, and transformers (5.x) then
    # loads the remote model without registering it for that config class process-wide (a later
    # plain from_pretrained of any Llama in the same process still gets LlamaForCausalLM).
    config["auto_map"] = {"AutoModelForCausalLM": _class_ref(cls)}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")  # transformers' own layout


def _class_ref(cls) -> str:
    return f"{Path(MODELING_FILE).stem}.{cls.__name__}"


def check_installed(model_dir: str | Path) -> None:
    """Refuse a fused checkpoint whose config.json no longer names its modeling code (what `install`
    wrote). transformers cannot notice: with no `auto_map`, `from_pretrained(dir,
    trust_remote_code=True)` takes the vanilla path and returns the dense model with the fused
    biases (neither dense nor sparse), without a word. A hub copy's "REPO--modeling_spon.Class" counts."""
    from spon.errors import SponError
    from spon.remote_code import modeling_spon

    d = Path(model_dir)
    try:
        config = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SponError(f"{d / 'config.json'}: cannot read it ({e})") from None
    cls = modeling_spon.SPARSE_CLASSES.get(config.get("model_type")) if isinstance(config, dict) else None
    if cls is None:
        return  # an architecture without remote code: the input checks name it
    want = _class_ref(cls)
    auto_map = config.get("auto_map")
    ref = auto_map.get("AutoModelForCausalLM") if isinstance(auto_map, dict) else None
    if not isinstance(ref, str) or ref.rsplit("--", 1)[-1] != want:
        why = "no auto_map for AutoModelForCausalLM" if ref is None else f"its auto_map names {ref!r}, not {want!r}"
    elif not (d / MODELING_FILE).is_file():
        why = f"no {MODELING_FILE}"
    else:
        return
    raise SponError(f"{d} is a spon checkpoint whose config.json does not load its sparse model ({why}): "
                    "transformers' trust_remote_code load would silently give the dense model with the fused "
                    "biases; fuse it again (`spon fuse`), or restore its auto_map")


def _base_model(source: str) -> str | None:
    """A hub id for the card's `base_model` (the Hub rejects a local path there), else None."""
    repo = source.split(":", 1)[0] if source.endswith(".gguf") else source  # ORG/REPO:FILE.gguf
    return repo if _HUB_ID.fullmatch(repo) and not Path(repo).exists() else None


def _license(source: str) -> str | None:
    """The source model's license when its own card (a local directory's README.md) states one."""
    card = Path(source) / CARD_FILE
    if not card.is_file():
        return None
    m = re.match(r"---\n(.*?)\n---", card.read_text(errors="replace"), re.S)
    found = re.search(r"^license:\s*(\S+)\s*$", m.group(1), re.M) if m else None
    return found.group(1) if found else None


def _versus(p: dict) -> str:
    if p.get("spon") is None or p.get("teal") is None:
        return "–"
    return "better" if p["spon"] < p["teal"] else "equal" if p["spon"] == p["teal"] else "**worse**"


def _fmt(x, spec: str = ".4g") -> str:
    return "–" if x is None else format(x, spec)


def write_model_card(model_dir: str | Path, summary: dict | None = None) -> Path:
    """README.md of a fused checkpoint from its sidecar and, when given, the run's summary.json
    content (perplexities dense/TEAL/SPON per evaluation text, realized sparsity on them).

    Deterministic for the same inputs and command (a resumed run rewrites identical bytes), and
    written to a new file renamed into place: the run's out/fused holds hard links to the cached
    fuse stage's files, which must not change under it."""
    d = Path(model_dir)
    meta = json.loads((d / SIDECAR).read_text())
    model_type = json.loads((d / "config.json").read_text()).get("model_type", "?")
    prov = meta.get("provenance", {})
    source = str(prov.get("source_model", "unknown"))
    base, license_ = _base_model(source), _license(source)
    header = ["---", "library_name: transformers", *([f"base_model: {base}"] if base else []),
              *([f"license: {license_}"] if license_ else []), "pipeline_tag: text-generation",
              "tags:", *(f"- {t}" for t in ("spon", "teal", "activation-sparsity", "sparse", model_type)), "---"]
    protocol = meta.get("protocol", "all")
    protocol_text = {"all": "all (every token sparse, what decoding sees)",
                     "last_half": "last_half (TEAL's protocol: the first half of each prefill sequence dense)"}
    kl = prov.get("heldout_kl", {})
    selection = meta.get("alpha_selection", {})
    rows = [("source model", f"`{source}`"),
            ("target sparsity", f"{_fmt(meta.get('sparsity'))} ({meta.get('allocation', 'uniform')} allocation "
                                f"over {', '.join(meta.get('targets', []))})"),
            ("criterion", {"magnitude": "magnitude (TEAL: drop x_i when |x_i| ≤ τ)",
                           "weighted": "weighted (WINA: drop x_i when |x_i| · ‖W[:, i]‖₂ ≤ τ; ‖W[:, i]‖₂ in "
                                       f"`{CHANNEL_NORMS_FILE}`)"}.get(meta.get("criterion", "magnitude"),
                                                                                 meta.get("criterion"))),
            ("protocol", protocol_text.get(protocol, protocol))]
    if meta.get("realized_sparsity_heldout") is not None:
        rows.append(("realized sparsity, held-out calibration blocks", _fmt(meta["realized_sparsity_heldout"], ".4f")))
    summary = summary or {}
    spon_sparsity = summary.get("realized_sparsity_spon_by_file", {})
    for f, s in summary.get("realized_sparsity_by_file", {}).items():
        rows.append((f"realized sparsity, `{Path(f).name}`", f"TEAL {_fmt(s, '.4f')}, SPON {_fmt(spon_sparsity.get(f), '.4f')}"))
    if kl:
        rows.append(("held-out KL(dense ‖ ·), TEAL → SPON", f"{_fmt(kl.get('teal'))} → {_fmt(kl.get('spon'))}"))
    chosen = selection.get("selected_step")  # None: alpha = 0, which is TEAL
    for dom, rec in (summary or {}).get("heldout_by_domain", {}).items():
        teal = (rec.get("teal") or [None, None])[1]
        spon = teal if chosen is None else (rec.get("by_step", {}).get(str(chosen)) or [None, None])[1]
        rows.append((f"held-out `{dom}` NLL, TEAL → SPON", f"{_fmt(teal)} → {_fmt(spon)}"))
    if selection:
        step = selection.get("selected_step")
        rows.append(("alpha", (f"step {step}: " if step is not None else "") + str(selection.get("selection", ""))))
    if meta.get("unfusable_projections"):
        rows.append(("alpha outside the biases", f"{', '.join(meta['unfusable_projections'])} (no bias slot in "
                     f"{model_type}): added at load by modeling_spon.py and by spon"))
    ppl = summary.get("perplexity_by_file", {})
    if ppl:
        ppl_lines = ["| text | dense | TEAL | SPON | SPON vs TEAL |", "| --- | --- | --- | --- | --- |",
                     *(f"| `{Path(f).name}` | {_fmt(p.get('dense'), '.4f')} | {_fmt(p.get('teal'), '.4f')} | "
                       f"{_fmt(p.get('spon'), '.4f')} | {_versus(p)} |" for f, p in ppl.items())]
        if summary.get("gap_closed") is not None:
            ppl_lines.append(f"\nSPON closes {summary['gap_closed']:.1%} of the TEAL-dense gap on the first text.")
    else:
        ppl_lines = ["Not measured yet: `spon fuse` wrote this card; `spon run` rewrites it after its evaluate "
                     "stage, or measure with `spon ppl DIR --eval-text FILE`."]
    command = shlex.join([Path(sys.argv[0]).name or "python", *sys.argv[1:]])
    text = "\n".join([
        *header, "",
        f"# spon sparse {model_type} checkpoint", "",
        "TEAL activation sparsity (`S(x) = x · 1{|x| > τ}` at the input of each sparsified linear, one τ per "
        "layer and projection) with spontaneous neurons (arXiv 2512.12744): a learned α per projection, fused "
        "into the biases as `b' = b + Wα`, so the sparse model costs what TEAL costs.", "",
        "| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows), "",
        "## Perplexity", "", *ppl_lines, "",
        "## Use", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "tok = AutoTokenizer.from_pretrained(DIR)",
        "model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)  # the sparse model",
        "```", "",
        f"`trust_remote_code=True` runs `{MODELING_FILE}` from this directory (torch and transformers only): "
        f"it reads the thresholds and protocol from `{SIDECAR}` and applies them. Without the flag, transformers "
        "loads the dense model with the fused biases (`W x + b'`): not the sparse model. With spon installed, "
        "`spon.load_sparse_model(DIR)` gives the same model with dense/TEAL/SPON modes and the sparse kernels.", "",
        "lm-eval: `lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True --tasks TASKS`.", "",
        "## Made with", "",
        "```bash", command, "```", "",
    ])
    tmp = d / f".{CARD_FILE}.{os.getpid()}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, d / CARD_FILE)
    return d / CARD_FILE
