"""A fused checkpoint is self-contained: in a process where spon cannot be imported,
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` gives spon's sparse model
(its logits), plain `from_pretrained(dir)` the vanilla dense-with-biases model, and lm-eval's own
CLI scores the sparse model as `spon eval` does. The model card says what the checkpoint is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from spon.fuse import load_sparse_model
from spon.model import SUPPORTED
from spon.remote_code import CARD_FILE, MODELING_FILE
from spon.remote_code.modeling_spon import SPARSE_CLASSES
from spon.runtime import store
from spon.sparse import mode
from spon.format import CHANNEL_NORMS_FILE, SIDECAR, format_for

# Prepended to every subprocess script: the process stands for a machine without spon. The venv
# has spon installed (editable), so it must be blocked actively, before anything imports it.
NO_SPON = """
import importlib.abc, sys

class NoSpon(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "spon" or name.startswith("spon."):
            raise ImportError(f"{name} is blocked: this process stands for a machine without spon")

sys.meta_path.insert(0, NoSpon())
try:
    import spon
    raise SystemExit("spon is importable: the block does not work")
except ImportError:
    pass
"""
NO_SPON_AT_EXIT = """
assert not [m for m in sys.modules if m == "spon" or m.startswith("spon.")], "spon was imported"
"""

# Loads every checkpoint three ways and saves the logits on fixed ids: trust_remote_code in fp32
# and bf16, and plain (no flag). Then a vanilla Llama without auto_map in the same process must
# still load as transformers' own class: the remote class is not registered process-wide.
LOAD = """
import json, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

dirs, ids, out, vanilla_llama = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2])), sys.argv[3], sys.argv[4]
classes = {}
for name, d in dirs.items():
    sparse = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)
    sparse_bf16 = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, dtype=torch.bfloat16)
    plain = AutoModelForCausalLM.from_pretrained(d)
    with torch.no_grad():
        save_file({"sparse": sparse(ids).logits, "sparse_bf16": sparse_bf16(ids).logits.float(),
                   "plain": plain(ids).logits}, f"{out}/{name}.safetensors")
    classes[name] = {"sparse": type(sparse).__name__, "plain": type(plain).__name__,
                     "sparse_linears": sum(type(m).__name__ == "SponSparseLinear" for m in sparse.modules())}
classes["vanilla_llama"] = type(AutoModelForCausalLM.from_pretrained(vanilla_llama)).__name__
print(json.dumps(classes))
"""


def run_without_spon(script: str, args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -I` (no PYTHONPATH, no script dir on sys.path) in a directory outside the repo,
    spon blocked; the remote code is cached under cwd, not in the user's home."""
    env = {**os.environ, "HF_MODULES_CACHE": str(cwd / "hf-modules"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-I", "-c", NO_SPON + script + NO_SPON_AT_EXIT, *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


def test_every_supported_architecture_has_a_sparse_class():
    assert set(SPARSE_CLASSES) == set(SUPPORTED)


def test_the_checkpoint_carries_its_code_and_card(tiny_fused):
    source = Path(sys.modules[SPARSE_CLASSES["llama"].__module__].__file__)
    imports = {ln.split()[1].split(".")[0] for ln in source.read_text().splitlines() if ln.startswith(("import ", "from "))}
    assert imports <= {"__future__", "json", "torch", "transformers", "safetensors"}, imports
    for arch, d in tiny_fused.items():
        config = json.loads((d / "config.json").read_text())
        assert config["model_type"] == arch and config["architectures"] == [type(  # vanilla, as transformers writes it
            AutoModelForCausalLM.from_pretrained(d)).__name__]
        assert config["auto_map"] == {"AutoModelForCausalLM": f"modeling_spon.{SPARSE_CLASSES[arch].__name__}"}
        assert (d / MODELING_FILE).read_bytes() == source.read_bytes()  # verbatim
        meta = json.loads((d / SIDECAR).read_text())
        card = (d / CARD_FILE).read_text()
        header = card.split("---\n")[1]
        assert "library_name: transformers" in header and "- spon" in header and f"- {arch}" in header
        assert "| target sparsity | 0.5 (uniform allocation over q, k, v, o, gate, up, down) |" in card
        assert f"| protocol | {meta['protocol']} " in card and "trust_remote_code=True" in card
        assert f"| criterion | {meta['criterion']} " in card
        # the weighted criterion's channel norms travel with the checkpoint (and its format says so)
        assert (d / CHANNEL_NORMS_FILE).is_file() == (meta["criterion"] == "weighted")
        assert meta["format"] == format_for(meta["criterion"])
        assert ("alpha outside the biases" in card) == bool(meta["unfusable_projections"])
        assert "Not measured yet" in card  # save_pretrained alone has no perplexities


@pytest.mark.slow  # subprocesses and the fused stories260K (~40 s)
@torch.no_grad()
def test_trust_remote_code_without_spon_gives_spons_sparse_model(fused_dir, tiny_fused, stories_path, tmp_path):
    """stories260K (through a store push + verified pull, as a user gets it) and a tiny model of
    each architecture, last_half on two of them; alpha outside the biases on mistral/qwen2/qwen3."""
    pulled = store.pull(store.push(fused_dir, str(tmp_path / "store"), "m", "run"), tmp_path / "pulled")
    assert (pulled / MODELING_FILE).is_file() and (pulled / CARD_FILE).is_file()
    dirs = {"stories260K": str(pulled), **{a: str(d) for a, d in tiny_fused.items()}}
    ids = [[1, 403, 407, 261, 378, 25, 354, 67, 9, 300, 70, 29], [1, 59, 17, 460, 316, 73, 11, 2, 448, 47, 99, 6]]
    work = tmp_path / "without-spon"
    work.mkdir()
    p = run_without_spon(LOAD, [json.dumps(dirs), json.dumps(ids), str(work), str(stories_path)], work)
    classes = json.loads(p.stdout.strip().splitlines()[-1])
    assert classes.pop("vanilla_llama") == "LlamaForCausalLM"
    x = torch.tensor(ids)
    for name, d in dirs.items():
        got = load_file(str(work / f"{name}.safetensors"))
        meta = json.loads((Path(d) / SIDECAR).read_text())
        arch = json.loads((Path(d) / "config.json").read_text())["model_type"]
        plain = AutoModelForCausalLM.from_pretrained(d)  # this process: no flag, the vanilla model
        assert type(plain).__module__.startswith("transformers.models."), type(plain)
        assert classes[name] == {"sparse": SPARSE_CLASSES[arch].__name__, "plain": type(plain).__name__,
                                 "sparse_linears": len(meta["thresholds"])}, (name, classes[name])
        ref, _, _ = load_sparse_model(d)
        torch.testing.assert_close(got["sparse"], ref(x).logits, atol=1e-5, rtol=0, msg=name)
        ref_bf16, _, _ = load_sparse_model(d, dtype="bf16")
        torch.testing.assert_close(got["sparse_bf16"], ref_bf16(x).logits.float(), atol=1e-5, rtol=0, msg=name)
        # (b) no flag: the vanilla dense model with the fused biases, as plain transformers loads it here
        torch.testing.assert_close(got["plain"], plain(x).logits, atol=0, rtol=0, msg=name)
        # Thresholds and alpha are non-trivial, so matching spon's SPON logits means both were applied
        # (alpha outside the checkpoint's biases too: mistral, qwen2, qwen3).
        assert (got["sparse"] - got["plain"]).abs().max() > 1e-2, name
        with mode(ref, "teal"):
            assert (got["sparse"] - ref(x).logits).abs().max() > 1e-3, name


@pytest.mark.slow  # lm-eval's CLI in a subprocess (~45 s)
def test_lm_eval_cli_scores_the_sparse_model_as_spon_eval_does(fused_dir, tmp_path):
    """`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True` over a registry task
    exported for lm-eval's own CLI, spon blocked in that process: the accuracies of `spon eval
    --variants spon` with the same limit."""
    from spon.cli import main
    from spon.evaluation.registry import export

    limit = "40"
    tasks = export(["copa"], tmp_path / "tasks")
    assert main(["eval", str(fused_dir), "--variants", "spon", "--tasks", "copa", "--limit", limit,
                 "--out", str(tmp_path / "spon-eval")]) == 0
    ours = json.loads((tmp_path / "spon-eval" / "results.json").read_text())["variants"]["spon"]["tasks"]["copa"]

    work = tmp_path / "lm-eval"
    work.mkdir()
    cli = """
import runpy
sys.argv = ["lm_eval", *sys.argv[1:]]
try:
    runpy.run_module("lm_eval", run_name="__main__")
except SystemExit as e:
    if e.code not in (None, 0):
        raise
assert [m for m in sys.modules if m.endswith(".modeling_spon")], "lm-eval did not run the checkpoint's code"
"""
    run_without_spon(cli, ["--model", "hf", "--model_args", f"pretrained={fused_dir},trust_remote_code=True",
                           "--include_path", str(tasks), "--tasks", "copa", "--limit", limit,
                           "--output_path", str(work / "results")], work)
    (results,) = (work / "results").rglob("results_*.json")
    theirs = json.loads(results.read_text())["results"]["copa"]
    assert ours["n"] == int(limit)
    for metric in ("acc,none", "acc_norm,none"):
        # The same model and requests; spon eval batches and shares contexts (evaluation/README.md:
        # an activation within float error of tau may flip), so equal within one stderr. Measured
        # on this checkpoint: exactly equal.
        stderr = ours["metrics"][metric.replace(",", "_stderr,")]
        assert abs(theirs[metric] - ours["metrics"][metric]) <= stderr, (metric, theirs[metric], ours["metrics"][metric])


@pytest.mark.slow  # the whole chain, tiny settings (1-8 s here, depending on load)
def test_spon_run_writes_the_perplexities_into_the_card(stories_path, sample_txt, tmp_path):
    """The fuse stage writes the card without perplexities; summary.json's writer fills them in."""
    from spon.config import load_config
    from spon.stages import run

    cfg = load_config(None, {"model": str(stories_path), "out": str(tmp_path / "run"), "eval.files": [str(sample_txt)],
                             "eval.max_tokens": 256, "sparsity.sparsity": 0.5, "calibration.num_blocks": 32,
                             "calibration.block_len": 48, "calibration.heldout_blocks": 8, "distill.steps": 4, "distill.batch_size": 8,
                             "distill.checkpoint_every": 2})
    summary = run(cfg, progress=False)
    card = (Path(summary["fused_model_dir"]) / CARD_FILE).read_text()
    ppl = summary["perplexity"]
    assert f"| `{sample_txt.name}` | {ppl['dense']:.4f} | {ppl['teal']:.4f} | {ppl['spon']:.4f} |" in card
    assert (f"| realized sparsity, `{sample_txt.name}` | TEAL {summary['realized_sparsity']:.4f}, "
            f"SPON {summary['realized_sparsity_spon']:.4f} |") in card
    assert f"| source model | `{stories_path}` |" in card and "Not measured yet" not in card
    assert "| protocol | all " in card and "## Made with" in card
