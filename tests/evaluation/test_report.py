"""The report: markdown numbers equal results.json; charts written; variant parsing; data prep."""

from __future__ import annotations

import bz2
import json
import re

import pytest

from spon.evaluation.prepare import prepare
from spon.evaluation.suite import run_suite
from spon.evaluation.variants import parse_variants
from spon.errors import SponError


def _table(md: str, title: str) -> list[list[str]]:
    section = md.split(title, 1)[1].split("\n## ", 1)[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("|")][2:]


@pytest.mark.slow
def test_report_numbers_equal_the_json(fused_dir, tiny_task_dir, tmp_path, sample_txt):
    # tinystories_ppl reads ${SPON_EVAL_DATA}/../tinystories/sample.txt: mirror that layout here.
    (tmp_path / "tinystories").mkdir()
    (tmp_path / "tinystories" / "sample.txt").write_bytes(sample_txt.read_bytes())
    doc = run_suite(str(fused_dir), parse_variants("dense,spon-int8"), ["tiny_mc", "tinystories_ppl"],
                    tmp_path / "out", task_dirs=[tiny_task_dir], batch_size=8)
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    md = (tmp_path / "out" / "report.md").read_text()
    assert "near chance" in md
    assert (tmp_path / "out" / "accuracy.png").stat().st_size > 1000
    assert (tmp_path / "out" / "perplexity.png").stat().st_size > 1000
    names = list(on_disk["variants"])
    assert names == ["dense", "spon-int8"]

    checked = 0
    for task, metric, *cells in _table(md, "## lm-eval tasks"):
        m = re.match(r"(\w+)", metric).group(1)
        for name, text in zip(names, cells):
            metrics = on_disk["variants"][name]["tasks"][task]["metrics"]
            val, _, err = text.partition(" ± ")
            assert float(val) == pytest.approx(metrics[f"{m},none"], rel=1e-4, abs=1e-4)
            if err:
                assert float(err) == pytest.approx(metrics[f"{m}_stderr,none"], rel=1e-4, abs=1e-4)
            checked += 1
    assert checked >= 8  # tiny_mc acc + 3 perplexity metrics, two variants

    for key, *cells in _table(md, "## In-domain fidelity"):
        key = key.split(" ")[0]
        for name, text in zip(names, cells):
            assert float(text) == pytest.approx(on_disk["variants"][name]["fidelity"][key], rel=1e-4, abs=1e-4)
    fid = on_disk["variants"]
    assert fid["dense"]["fidelity"]["kl_to_dense"] == pytest.approx(0.0, abs=1e-6)
    assert fid["spon-int8"]["fidelity"]["kl_to_dense"] > 0.05
    assert fid["spon-int8"]["tasks"]["tiny_mc"]["realized_sparsity"] == pytest.approx(0.5, abs=0.15)
    assert fid["spon-int8"]["quantization"]["scheme"] == "int8"
    assert doc["variants"]["dense"]["tasks"]["tinystories_ppl"]["n"] == 5


def test_variant_names():
    vs = parse_variants("dense, teal,spon-int4")
    assert [(v.mode, v.quant, v.sparse) for v in vs] == [("dense", None, False), ("teal", None, True), ("spon", "int4", True)]
    for bad in ("sparse", "spon-int2", "dense,dense", ""):
        with pytest.raises(SponError):
            parse_variants(bad)


def test_hellaswag_conversion_is_deterministic(tmp_path):
    src = tmp_path / "hs.txt.bz2"
    src.write_bytes(bz2.compress(b"Ctx one: a man\n2\nends a.\nends b.\nends c.\nends d.\nCtx two\n0\nw\nx\ny\nz\n"))
    spec = {"converter": "hellaswag_lines", "source": str(src), "output": str(tmp_path / "c" / "hs.jsonl")}
    out = prepare(spec)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0] == {"query": "Ctx one: a man", "choices": ["ends a.", "ends b.", "ends c.", "ends d."], "gold": 2}
    assert rows[1]["gold"] == 0 and len(rows) == 2
    first = out.read_bytes()
    out.unlink()
    assert prepare(spec).read_bytes() == first


def test_cli_rejects_bad_input_with_exit_2(tmp_path, capsys, stories_path):
    from spon.cli import main

    assert main(["eval", str(tmp_path), "--variants", "dense"]) == 2
    assert "is not a model directory" in capsys.readouterr().err
    # A real model directory that was never fused (no spon.json) is refused by name.
    assert main(["eval", str(stories_path), "--variants", "dense"]) == 2
    assert "is not a spon model" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--variants", "spon-fp3"]) == 2
    assert main(["eval", str(tmp_path), "--variants", "dense", "--dtype", "fp8"]) == 2
    assert "unknown dtype 'fp8' (--dtype)" in capsys.readouterr().err


@pytest.mark.slow
def test_units_spread_over_workers_and_resume_one_unit(fused_dir, tiny_task_dir, tmp_path, sample_txt):
    """--jobs 2 runs (variant, task) units in two worker processes and gives the in-process
    numbers; --resume after losing one unit's checkpoint recomputes only that unit."""
    (tmp_path / "tinystories").mkdir()
    (tmp_path / "tinystories" / "sample.txt").write_bytes(sample_txt.read_bytes())
    args = dict(task_dirs=[tiny_task_dir], batch_size=8, fidelity_text=sample_txt)
    variants = parse_variants("dense,teal")
    serial = run_suite(str(fused_dir), variants, ["tiny_mc"], tmp_path / "serial", **args)
    out = tmp_path / "par"
    par = run_suite(str(fused_dir), variants, ["tiny_mc"], out, jobs=2, **args)
    for name in ("dense", "teal"):
        assert par["variants"][name]["tasks"]["tiny_mc"]["metrics"] == serial["variants"][name]["tasks"]["tiny_mc"]["metrics"]
        assert par["variants"][name]["fidelity"]["token_perplexity"] == pytest.approx(
            serial["variants"][name]["fidelity"]["token_perplexity"], rel=1e-6)
    units = sorted(p.relative_to(out / "variants").as_posix() for p in (out / "variants").rglob("*.json"))
    assert units == ["dense/_fidelity.json", "dense/tiny_mc.json", "teal/_fidelity.json", "teal/tiny_mc.json"]

    (out / "variants" / "teal" / "tiny_mc.json").unlink()
    again = run_suite(str(fused_dir), variants, ["tiny_mc"], out, jobs=2, resume=True, **args)
    assert sorted(again["resumed"]) == ["dense/_fidelity", "dense/tiny_mc", "teal/_fidelity"]
    assert again["variants"]["teal"]["tasks"]["tiny_mc"]["metrics"] == par["variants"]["teal"]["tasks"]["tiny_mc"]["metrics"]
    assert (out / "variants" / "teal" / "tiny_mc.json").is_file()


@pytest.mark.slow
def test_resume_never_reuses_results_of_a_replaced_model_or_other_options(fused_dir, tiny_task_dir, tmp_path, sample_txt):
    """The resume key is the model's content digest plus every option: re-fusing into the same
    directory, another int4 group size or another batch size recomputes instead of reusing."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(fused_dir, model)
    args = dict(task_dirs=[tiny_task_dir], batch_size=8, fidelity_text=sample_txt)
    variants = parse_variants("teal")
    out = tmp_path / "out"
    run_suite(str(model), variants, ["tiny_mc"], out, **args)
    same = run_suite(str(model), variants, ["tiny_mc"], out, resume=True, **args)
    assert sorted(same["resumed"]) == ["teal/_fidelity", "teal/tiny_mc"]
    assert run_suite(str(model), variants, ["tiny_mc"], out, resume=True, group_size=64, **args)["resumed"] == []
    assert run_suite(str(model), variants, ["tiny_mc"], out, resume=True, **{**args, "batch_size": 4})["resumed"] == []
    bf16 = run_suite(str(model), variants, ["tiny_mc"], out, resume=True, dtype="bf16", **args)
    assert bf16["resumed"] == [] and bf16["dtype"] == "bf16"
    assert run_suite(str(model), variants, ["tiny_mc"], out, resume=True, **args)["dtype"] == "fp32"
    # the same directory, another model in it (one weight changed, as a re-fuse would)
    w = load_file(str(model / "model.safetensors"))
    name = next(k for k in w if k.endswith("down_proj.weight"))
    w[name] = w[name] * 1.01
    save_file(w, str(model / "model.safetensors"), metadata={"format": "pt"})
    assert run_suite(str(model), variants, ["tiny_mc"], out, resume=True, **args)["resumed"] == []
