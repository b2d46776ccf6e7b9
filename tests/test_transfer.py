"""Several calibration domains and built-in code text (issue: alpha that transfers).

The calibration shares its blocks between its text files and keeps held-out blocks of each; a run
records each domain's held-out numbers, and the model card says, per evaluation text, whether
SPON is better or worse than TEAL."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch

from spon import corpora
from spon.calibration import text_blocks
from spon.config import CalibrationConfig
from spon.errors import SponError
from spon.oneshot import calibrate
from spon.sources import load_model


def test_the_code_corpora_split_the_standard_library_by_module_name():
    train = corpora._files("python-stdlib")
    held = corpora._files("python-stdlib-heldout")
    assert not {p.name for p in train} & {p.name for p in held}
    assert len(train) + len(held) == len(corpora._stdlib_modules()) > 100
    assert 0.12 < len(held) / (len(train) + len(held)) < 0.28  # about a fifth
    assert all(zlib.crc32(p.stem.encode()) % 5 == 0 for p in held)
    assert "pathlib.py" in {p.name for p in held} and "os.py" in {p.name for p in train}  # the split is stable
    assert len(corpora.documents("corpus:python-stdlib-heldout")) == len(held)
    assert any("#include" in d for d in corpora.documents("corpus:c-headers"))
    with pytest.raises(SponError, match="unknown corpus 'corpus:nope'; known: corpus:python-stdlib"):
        corpora.documents("corpus:nope")


def test_several_files_are_domains_with_their_own_heldout_blocks(stories_path, sample_txt):
    model, tok = load_model(str(stories_path))
    story = str(sample_txt)
    cfg = CalibrationConfig(source="text", files=[story, "corpus:python-stdlib"], num_blocks=17, block_len=32,
                            heldout_blocks=4)
    cal = calibrate(model, tok, cfg)
    stories, code = text_blocks(tok, [story], 32), text_blocks(tok, ["corpus:python-stdlib"], 32, 8)
    n_story = min(9, len(stories))  # 17 blocks: 9 for the first file (the remainder), 8 for the second
    assert cal.heldout_domains == ["sample.txt"] * 2 + ["python-stdlib"] * 2
    assert torch.equal(cal.heldout, torch.cat([stories[n_story - 2 : n_story], code[6:8]]))
    assert torch.equal(cal.train, torch.cat([stories[: n_story - 2], code[:6]]))
    one = calibrate(model, tok, CalibrationConfig(source="text", files=[story], num_blocks=11, block_len=32,
                                                  heldout_blocks=4))
    assert one.heldout_domains == []  # one file: one domain, as before
    with pytest.raises(SponError, match="name the same domain twice"):
        calibrate(model, tok, CalibrationConfig(source="text", files=[story, story], block_len=32))


def test_a_run_reports_each_domain_and_the_card_marks_spon_against_teal(sample_txt, tmp_path):
    from spon.cli import main

    story, out = str(sample_txt), tmp_path / "run"
    assert main(["-q", "run", "--in-process", "--out", str(out), "--steps", "6", "--checkpoint-every", "3",
                 "--calib-source", "text", "--calib-files", f"{story},corpus:python-stdlib", "--calib-len", "64",
                 "--calib-blocks", "24", "--eval-text", story, "--eval-text", "corpus:python-stdlib-heldout",
                 "--eval-tokens", "600"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert set(s["heldout_by_domain"]) == {"sample.txt", "python-stdlib"}
    for rec in s["heldout_by_domain"].values():
        assert set(rec["by_step"]) == {"0", "3", "6"} and len(rec["teal"]) == 2
    assert s["tokens_by_file"]["corpus:python-stdlib-heldout"] == 600
    card = (out / "fused" / "README.md").read_text()
    ppl = s["perplexity_by_file"]
    for f, p in ppl.items():
        verdict = "better" if p["spon"] < p["teal"] else "equal" if p["spon"] == p["teal"] else "**worse**"
        assert f"| `{Path(f).name}` | {p['dense']:.4f} | {p['teal']:.4f} | {p['spon']:.4f} | {verdict} |" in card
    assert "held-out `python-stdlib` NLL, TEAL → SPON" in card
    worse = [f for f, p in ppl.items() if p["spon"] > p["teal"]]  # each said once, naming its text
    assert sorted(next(f for f in worse if f in w) for w in s["quality_warnings"]) == sorted(worse)


def test_a_mode_realizing_more_than_two_points_below_the_target_is_said():
    from spon.stages import sparsity_warnings

    ppl = {"a.txt": {"teal": {"realized_sparsity": 0.497}, "spon": {"realized_sparsity": 0.465}},
           "b.txt": {"teal": {"realized_sparsity": 0.475}, "spon": {"realized_sparsity": 0.485}}}
    assert sparsity_warnings(0.5, ppl) == [
        "SPON realizes sparsity 0.465 on a.txt, 3.5 points below the target 0.50",
        "TEAL realizes sparsity 0.475 on b.txt, 2.5 points below the target 0.50"]
    assert sparsity_warnings(0.4, ppl) == []  # above the target is not a shortfall
