"""Fuzz spon.config: random (nested) dicts and dotted overrides -> a RunConfig or a SponError,
never any other exception."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spon.config import RunConfig, load_config, validate
from spon.errors import SponError

KEYS = ["model", "device", "dtype", "protocol", "out", "calibration", "sparsity", "distill", "eval", "sparsity.sparsity",
        "num_blocks", "block_len", "steps", "targets", "files", "window", "stride", "lr", "init", "bogus", ""]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.text(max_size=8),
                    st.sampled_from(["fp32", "all", "q", "uniform", "zeros", "text", "0.5", "cpu"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)), max_leaves=12)
SECTIONS = {"calibration": ["source", "files", "num_blocks", "block_len", "heldout_blocks", "temperature", "bogus"],
            "sparsity": ["sparsity", "allocation", "targets", "greedy_step"], "distill": ["steps", "lr", "init", "checkpoint_every"],
            "eval": ["files", "window", "stride"]}
structured = st.fixed_dictionaries({}, optional={s: st.dictionaries(st.sampled_from(ks), values, max_size=4) for s, ks in SECTIONS.items()}
                                   | {k: values for k in ("model", "device", "dtype", "protocol", "out", "bogus")})


def _check(fn, *a):
    try:
        assert isinstance(fn(*a), RunConfig)
    except SponError as e:
        assert str(e) and "\n" not in str(e)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.dictionaries(st.sampled_from(KEYS), values, max_size=6), structured))
def test_validate_fuzz(data):
    _check(validate, data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["sparsity.sparsity", "sparsity.sparsity", "sparsity", "distill.steps", "calibration.files", "eval.window", "dtype",
                                        "model", "sparsity", "distill.bogus.deep", "out"]), values, max_size=5))
def test_load_config_overrides_fuzz(overrides):
    _check(load_config, None, overrides)


def test_override_into_a_scalar_is_a_spon_error():
    _check(load_config, None, {"sparsity": 5, "sparsity.sparsity": 0.5})
