"""A fused checkpoint changed after fusion (or made by hand) is refused in one line by every
reader: spon's input checks (check_fused_dir), spon's loader (load_sparse_model, behind `spon
generate | ppl | eval`) and the checkpoint's own modeling code (from_pretrained with
trust_remote_code=True, no spon involved). Both loaders accept and refuse exactly the same
checkpoints: one parametrised test runs every tampered checkpoint through both."""

from __future__ import annotations

import inspect
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from spon.checks import check_fused_dir
from spon.errors import SponError
from spon.format import ALPHA_FILE, DIGEST_KEY, SIDECAR
from spon.fuse import load_sparse_model


def _side(fn):
    def tamper(d: Path):
        meta = json.loads((d / SIDECAR).read_text())
        fn(meta)
        (d / SIDECAR).write_text(json.dumps(meta))
    return tamper


def _set_tau(value):
    return _side(lambda m: m["thresholds"].__setitem__("0.q", value))


def _alpha(fn):
    def tamper(d: Path):
        a = load_file(str(d / ALPHA_FILE))
        save_file(fn(a), str(d / ALPHA_FILE))
    return tamper


def _config(**kw):
    def tamper(d: Path):
        c = json.loads((d / "config.json").read_text())
        c.update(kw)
        (d / "config.json").write_text(json.dumps(c))
    return tamper


def _drop_layer(m):
    for key in ("thresholds", "fused_in_checkpoint"):
        m[key] = {n: v for n, v in m[key].items() if not n.startswith("4.")}


def _write(text):
    def tamper(d: Path):
        (d / SIDECAR).write_text(text)
    return tamper


# (id, tamper(dir), substring both loaders' one-line error holds)
TAMPERED = [
    ("tau-nan", _set_tau(math.nan), "a threshold is a finite number >= 0"),
    ("tau-inf", _set_tau(math.inf), "a threshold is a finite number >= 0"),
    ("tau-negative", _set_tau(-0.5), "threshold 0.q is -0.5"),
    ("tau-true", _set_tau(True), "threshold 0.q is True, not a number"),
    ("tau-null", _set_tau(None), "threshold 0.q is None, not a number"),
    ("tau-list", _set_tau([0.1]), "not a number"),
    ("tau-string", _set_tau("abc"), "threshold 0.q is 'abc', not a number"),
    ("tau-changed-after-fusion", _side(lambda m: m["thresholds"].__setitem__("0.q", m["thresholds"]["0.q"] * 1.5)),
     "changed after fusion"),
    ("tau-missing-one", _side(lambda m: m["thresholds"].pop("3.down")), "thresholds has no entry for 3.down"),
    ("tau-missing-layer", _side(_drop_layer), "has no entry for 4.q"),
    ("tau-empty", _side(lambda m: m.__setitem__("thresholds", {})), "thresholds has no entry for 0.q"),
    ("no-thresholds", _side(lambda m: m.pop("thresholds")), "it has no 'thresholds'"),
    ("no-targets", _side(lambda m: m.pop("targets")), "it has no 'targets'"),
    ("no-fused-in-checkpoint", _side(lambda m: m.pop("fused_in_checkpoint")), "it has no 'fused_in_checkpoint'"),
    ("targets-cut-to-q", _side(lambda m: m.__setitem__("targets", ["q"])), "entries outside targets q"),
    ("targets-unknown", _side(lambda m: m.__setitem__("targets", ["q", "zz"])), "targets must be a non-empty list"),
    ("targets-empty", _side(lambda m: m.__setitem__("targets", [])), "targets must be a non-empty list"),
    ("thresholds-a-list", _side(lambda m: m.__setitem__("thresholds", [0.1])), "thresholds must be an object"),
    ("fused-all-false", _side(lambda m: m.__setitem__("fused_in_checkpoint", {n: False for n in m["fused_in_checkpoint"]})),
     "alpha would be added twice"),
    ("fused-not-bool", _side(lambda m: m["fused_in_checkpoint"].__setitem__("0.q", "yes")), "is 'yes', not true or false"),
    ("protocol-unknown", _side(lambda m: m.__setitem__("protocol", "sideways")), "unknown protocol 'sideways'"),
    ("criterion-unknown", _side(lambda m: m.__setitem__("criterion", "wanda")), "unknown criterion 'wanda'"),
    ("format-criterion-mismatch", _side(lambda m: m.__setitem__("criterion", "weighted")), "does not fit criterion"),
    ("digest-garbage", _side(lambda m: m.__setitem__(DIGEST_KEY, "0" * 64)), "changed after fusion"),
    ("sidecar-not-json", _write("{not json"), "is not valid JSON"),
    ("sidecar-a-list", _write("[1, 2]"), "JSON object"),
    ("config-attention-bias-false", _config(attention_bias=False), "has no bias"),
    ("config-mlp-bias-false", _config(mlp_bias=False), "has no bias"),
    ("alpha-zeros", _alpha(lambda a: {n: torch.zeros_like(t) for n, t in a.items()}), "changed after fusion"),
    ("alpha-missing-entry", _alpha(lambda a: {n: t for n, t in a.items() if n != "2.up"}), "has no tensor 2.up"),
    ("alpha-empty", _alpha(lambda a: {}), "the alpha file has no tensor 0.q"),
    ("alpha-shape-1", _alpha(lambda a: {**a, "0.q": torch.zeros(1)}), "alpha 0.q has shape [1], expected [64]"),
    ("alpha-scalar", _alpha(lambda a: {**a, "0.q": torch.tensor(0.0)}), "alpha 0.q has shape [], expected ["),
    ("alpha-shape-8", _alpha(lambda a: {**a, "0.q": torch.zeros(8)}), "has shape [8], expected [64]"),
    ("alpha-shape-2x172", _alpha(lambda a: {**a, "0.down": torch.zeros(2, 172)}), "alpha 0.down has shape [2, 172], expected ["),
    ("alpha-other-model", _alpha(lambda a: {n: torch.zeros(2 * t.numel()) for n, t in a.items()}), "expected [64]"),
    ("alpha-int", _alpha(lambda a: {**a, "0.q": a["0.q"].long()}), "expected float32"),
    ("alpha-nan", _alpha(lambda a: {**a, "0.q": torch.full_like(a["0.q"], math.nan)}), "alpha 0.q holds NaN or inf"),
]


@pytest.fixture(scope="module")
def tampered(fused_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tampered")
    dirs = {}
    for cid, tamper, _ in TAMPERED:
        d = root / cid
        shutil.copytree(fused_dir, d)
        tamper(d)
        dirs[cid] = d
    return dirs


def _remote(d):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(d), trust_remote_code=True)


@pytest.mark.parametrize("cid,expected", [(c, e) for c, _, e in TAMPERED], ids=[c for c, _, _ in TAMPERED])
def test_both_loaders_refuse_the_same_tampered_checkpoint(tampered, cid, expected):
    d = tampered[cid]
    with pytest.raises(SponError) as spon_err:
        check_fused_dir(d)
        load_sparse_model(d)  # what check_fused_dir cannot see without the model (bias flags, alpha data)
    with pytest.raises(ValueError) as remote_err:
        _remote(d)
    for e in (spon_err.value, remote_err.value):
        msg = str(e)
        assert "\n" not in msg.strip() and expected in msg, msg


def test_an_untampered_copy_loads_the_same_in_both(fused_dir):
    x = torch.tensor([[1, 403, 407, 261, 378, 25, 354, 67]])
    check_fused_dir(fused_dir)
    ref, _, _ = load_sparse_model(fused_dir)
    with torch.no_grad():
        torch.testing.assert_close(_remote(fused_dir)(x).logits, ref(x).logits, atol=1e-5, rtol=0)


def test_a_sidecar_without_a_digest_still_loads(fused_dir, tmp_path):
    """Checkpoints written before the digest existed are read as before (every other check holds)."""
    d = tmp_path / "old"
    shutil.copytree(fused_dir, d)
    _side(lambda m: m.pop(DIGEST_KEY))(d)
    check_fused_dir(d)
    load_sparse_model(d)
    _remote(d)


def test_the_remote_code_validates_with_spons_own_functions():
    """validate_sidecar and sidecar_digest are vendored verbatim into modeling_spon.py (which
    cannot import spon), with the constants they read."""
    import spon.format as fmt
    from spon.remote_code import modeling_spon as remote

    for name in ("validate_sidecar", "sidecar_digest"):
        assert inspect.getsource(getattr(remote, name)) == inspect.getsource(getattr(fmt, name)), name
    for name in ("FORMATS", "CRITERIA", "PROTOCOLS", "PROJECTIONS", "FORMAT_BY_CRITERION", "DIGEST_KEY", "ALPHA_DTYPES",
                 "SIDECAR", "ALPHA_FILE", "CHANNEL_NORMS_FILE"):
        assert getattr(remote, name) == getattr(fmt, name), name


@pytest.mark.parametrize("cid,tamper,expected", [
    ("auto-map-removed", lambda c: c.pop("auto_map"), "(no auto_map for AutoModelForCausalLM)"),
    ("auto-map-other-class", lambda c: c.__setitem__("auto_map", {"AutoModelForCausalLM": "modeling_spon.Other"}),
     "its auto_map names 'modeling_spon.Other', not 'modeling_spon.SponLlamaForCausalLM'"),
    ("modeling-file-removed", None, "(no modeling_spon.py)"),
])
def test_a_checkpoint_whose_config_no_longer_loads_its_sparse_model_is_refused_by_spon(fused_dir, tmp_path, cid,
                                                                                        tamper, expected):
    """transformers cannot notice an `auto_map` removed from config.json: `from_pretrained(dir,
    trust_remote_code=True)` then takes the vanilla path (the documented plain load) and returns
    the dense model with the fused biases, no warning. spon's loader refuses such a checkpoint."""
    from transformers import LlamaForCausalLM

    d = tmp_path / cid
    shutil.copytree(fused_dir, d)
    if tamper is None:
        (d / "modeling_spon.py").unlink()
    else:
        c = json.loads((d / "config.json").read_text())
        tamper(c)
        (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(SponError) as e:
        load_sparse_model(d)
    msg = str(e.value)
    assert "\n" not in msg and expected in msg and "trust_remote_code load would silently give the dense model" in msg, msg
    if cid == "auto-map-removed":  # the limitation, as it stands: transformers loads the vanilla class, silently
        assert type(_remote(d)) is LlamaForCausalLM


def test_a_hub_copys_auto_map_still_loads(fused_dir, tmp_path):
    """A copy pushed to the hub may name its code as "REPO--modeling_spon.Class": still spon's."""
    d = tmp_path / "hub"
    shutil.copytree(fused_dir, d)
    c = json.loads((d / "config.json").read_text())
    c["auto_map"] = {"AutoModelForCausalLM": "someone/repo--" + c["auto_map"]["AutoModelForCausalLM"]}
    (d / "config.json").write_text(json.dumps(c))
    load_sparse_model(d)
