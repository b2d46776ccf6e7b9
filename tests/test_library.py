"""spon as a library: the verbs on a model in memory give what the pipeline gives, the base model is
loaded once per run, the protocol is honoured by the thresholds, and one format definition."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import spon
from spon import format as fmt
from spon.config import CalibrationConfig, DistillConfig, EvalConfig, RunConfig, SparsityConfig
from spon.perplexity import perplexities
from spon.sparse import alphas, by_name, thresholds_of

TINY = dict(calibration=CalibrationConfig(num_blocks=32, block_len=48),
            sparsity=SparsityConfig(sparsity=0.5),
            distill=DistillConfig(steps=12, batch_size=8, checkpoint_every=4))


@pytest.fixture(scope="module")
def in_process_run(tmp_path_factory, stories_path, sample_txt):
    """`spon run --in-process` (spon.stages.run) with the TINY recipe."""
    from spon import stages

    out = tmp_path_factory.mktemp("run")
    cfg = RunConfig(model=str(stories_path), out=str(out), eval=EvalConfig(files=[str(sample_txt)]), **TINY)
    return out, stages.run(cfg, progress=False)


@pytest.mark.slow
def test_the_readme_example_gives_the_runs_thresholds_alpha_and_perplexities(in_process_run, stories_path,
                                                                              sample_txt, tmp_path):
    out, summary = in_process_run
    # The README's Python example, with the TINY recipe in place of the defaults:
    model, tok = spon.load_model(str(stories_path))
    cal = spon.calibrate(model, tok, TINY["calibration"])
    report = spon.sparsify_(model, TINY["sparsity"], cal)
    spon.distill_(model, cal, TINY["distill"])
    spon.save_pretrained(model, tok, tmp_path / "fused")

    run_taus = json.loads((out / "thresholds" / fmt.THRESHOLDS_FILE).read_text())["thresholds"]
    assert report.thresholds == run_taus
    # TEAL's tau are the run's thresholds.json; SPON's, re-taken with alpha in place, its distill.json's
    run_spon = json.loads((out / "distill" / fmt.DISTILL_FILE).read_text())["thresholds"]
    f32 = lambda taus: {n: float(torch.tensor(t, dtype=torch.float32)) for n, t in taus.items()}  # noqa: E731
    assert thresholds_of(model, "teal") == f32(run_taus) and thresholds_of(model, "spon") == f32(run_spon)
    assert run_spon != run_taus
    run_alpha = load_file(str(out / "distill" / fmt.ALPHA_STAGE_FILE))
    mine = alphas(model)
    assert mine.keys() == run_alpha.keys() and all(torch.equal(mine[k], run_alpha[k]) for k in mine)
    spon.fuse_(model)  # what the checkpoint holds, in memory
    ppl = perplexities(model, tok, [str(sample_txt)], ("dense", "teal", "spon"), 512, 256)[str(sample_txt)]
    assert {m: r["perplexity"] for m, r in ppl.items()} == summary["perplexity"]
    # The written checkpoint is the run's: same sidecar but for where it came from and its smoke text.
    mine_meta = json.loads((tmp_path / "fused" / fmt.SIDECAR).read_text())
    run_meta = json.loads((out / "fused" / fmt.SIDECAR).read_text())
    for meta in (mine_meta, run_meta):
        meta.pop("smoke", None), meta["provenance"].pop("source_model")
    assert mine_meta == run_meta


@pytest.mark.slow
def test_oneshot_is_the_four_verbs(in_process_run, stories_path, tmp_path):
    out, _ = in_process_run
    model, tok = spon.load_model(str(stories_path))
    spon.oneshot(model, tok, spon.Recipe(**TINY), output_dir=tmp_path / "fused")
    run_alpha = load_file(str(out / "distill" / fmt.ALPHA_STAGE_FILE))
    assert all(torch.equal(a, run_alpha[n]) for n, a in alphas(model).items())
    loaded, _, meta = spon.load_sparse_model(tmp_path / "fused")
    assert meta["sparsity"] == 0.5 and meta["alpha_selection"]["selected_step"] is not None


@pytest.mark.slow
def test_a_run_loads_the_base_model_once(monkeypatch, stories_path, sample_txt, tmp_path):
    """`spon run --in-process` and `spon calibrate` (two stages) each load the base model once; the
    fused checkpoint the evaluation reads is another model."""
    from spon import fuse as spon_fuse, model as spon_model
    from spon.cli import main

    loads: list[str] = []
    real = spon_model.load_pretrained

    def counting(path, *a, **kw):
        loads.append(str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(spon_model, "load_pretrained", counting)  # what spon.sources.load_model calls
    monkeypatch.setattr(spon_fuse, "load_pretrained", counting)  # what load_sparse_model calls
    small = ["--model", str(stories_path), "--sparsity", "0.5", "--steps", "4", "--calib-blocks", "16",
             "--calib-len", "32", "--batch-size", "4", "--checkpoint-every", "2"]
    assert main(["-q", "run", "--in-process", *small, "--out", str(tmp_path / "run"), "--eval-text", str(sample_txt)]) == 0
    assert loads.count(str(stories_path)) == 1
    assert loads.count(str(tmp_path / "run" / "fused")) == 1  # the evaluation reads what was written
    loads.clear()
    assert main(["-q", "calibrate", *small, "--out", str(tmp_path / "cal")]) == 0
    assert loads == [str(stories_path)]


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["all", "last_half"])
def test_thresholds_realize_the_target_on_heldout_text_under_either_protocol(stories_path, sample_txt, protocol):
    """TEAL's last_half sparsifies the second half of each sequence: its thresholds are quantiles
    of those positions, so held-out text realizes the target there (taking them over every
    position, as the pipeline once did, drifts off the target)."""
    model, tok = spon.load_model(str(stories_path))
    cal = spon.calibrate(model, tok, CalibrationConfig(num_blocks=96, block_len=128, heldout_blocks=16))
    r = spon.sparsify_(model, SparsityConfig(sparsity=0.5, protocol=protocol), cal)
    assert all(m.protocol == protocol for m in by_name(model).values())
    assert r.realized_heldout == pytest.approx(0.5, abs=0.01)
    text = perplexities(model, tok, [str(sample_txt)], ("teal",), 512, 256)[str(sample_txt)]["teal"]
    assert text["realized_sparsity"] == pytest.approx(0.5, abs=0.01)


def test_the_thresholds_depend_on_the_protocol(stories_path):
    """The same blocks, the two protocols: different quantiles, and a different thresholds stage key."""
    from spon.runtime.cache import stage_key

    model, tok = spon.load_model(str(stories_path))
    cal = spon.calibrate(model, tok, CalibrationConfig(num_blocks=16, block_len=64, heldout_blocks=0,
                                                       sample_precision="model"))
    taus = {p: spon.sparsify_(model, SparsityConfig(sparsity=0.5, protocol=p), cal).thresholds
            for p in ("all", "last_half")}
    assert taus["all"].keys() == taus["last_half"].keys() and taus["all"] != taus["last_half"]
    keys = {p: stage_key("thresholds", {"cfg": SparsityConfig(protocol=p)}) for p in ("all", "last_half")}
    assert keys["all"] != keys["last_half"]


def test_a_legacy_top_level_protocol_is_the_sparsity_sections():
    from spon.config import validate

    assert validate({"protocol": "last_half"}).sparsity.protocol == "last_half"
    with pytest.raises(spon.SponError, match="^invalid config: protocol: 'last_half' disagrees"):
        validate({"protocol": "last_half", "sparsity": {"protocol": "all"}})
    with pytest.raises(spon.SponError, match="^invalid config: protocol: "):
        validate({"protocol": "first_half"})


def test_the_remote_codes_vendored_format_is_spons():
    """modeling_spon.py travels inside every checkpoint without spon: it spells the format itself."""
    from spon.remote_code import modeling_spon as remote

    assert (remote.SIDECAR, remote.ALPHA_FILE, remote.CHANNEL_NORMS_FILE) == (fmt.SIDECAR, fmt.ALPHA_FILE,
                                                                              fmt.CHANNEL_NORMS_FILE)
    assert (remote.FORMATS, remote.CRITERIA, remote.PROTOCOLS, remote.ATTENTION) == (fmt.FORMATS, fmt.CRITERIA,
                                                                                     fmt.PROTOCOLS, fmt.ATTENTION)


def test_save_pretrained_refuses_a_model_that_is_not_sparse(stories_path, tmp_path):
    model, tok = spon.load_model(str(stories_path))
    with pytest.raises(spon.SponError, match="not sparse"):
        spon.save_pretrained(model, tok, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_calibration_from_documents_in_memory(stories_path, sample_txt):
    from spon.calibration import read_documents

    model, tok = spon.load_model(str(stories_path))
    docs = read_documents(sample_txt)
    cal = spon.calibrate(model, tok, docs)
    assert cal.source == "text" and cal.train.shape[1] == CalibrationConfig().block_len
    with pytest.raises(spon.SponError, match="list of strings"):
        spon.calibrate(model, tok, 42)
