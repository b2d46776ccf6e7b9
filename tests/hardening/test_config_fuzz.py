"""Fuzz spon.config: random (nested) dicts and dotted overrides -> a RunConfig that holds exactly the
values given (and survives a round trip), or a one-line SponError naming a key that was given;
never any other exception."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from spon.config import RunConfig, load_config, validate
from spon.errors import SponError

KEYS = ["model", "device", "dtype", "protocol", "out", "calibration", "sparsity", "distill", "eval", "sparsity.sparsity",
        "num_blocks", "block_len", "steps", "targets", "files", "window", "stride", "lr", "init", "bogus", ""]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.text(max_size=8),
                    st.sampled_from(["fp32", "all", "q", "uniform", "zeros", "text", "0.5", "cpu"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)), max_leaves=12)
SECTIONS = {"calibration": ["source", "files", "num_blocks", "block_len", "heldout_blocks", "temperature", "bogus"],
            "sparsity": ["sparsity", "allocation", "targets", "greedy_step", "protocol"], "distill": ["steps", "lr", "init", "checkpoint_every"],
            "eval": ["files", "window", "stride"]}
structured = st.fixed_dictionaries({}, optional={s: st.dictionaries(st.sampled_from(ks), values, max_size=4) for s, ks in SECTIONS.items()}
                                   | {k: values for k in ("model", "device", "dtype", "out", "bogus")})


def _same(given, got) -> bool:
    """`got` is what pydantic (lax mode) makes of `given`: numbers equal as numbers (a numeric
    string as its number), lists element by element, everything else equal."""
    if isinstance(got, float) or (isinstance(got, int) and not isinstance(got, bool)):
        if isinstance(given, str):
            return float(given.strip()) == got
        return isinstance(given, (int, float)) and given == got
    if isinstance(got, list):
        return isinstance(given, (list, tuple)) and len(given) == len(got) and all(map(_same, given, got))
    return type(given) is type(got) and given == got


def _check_fields(data: dict, cfg: RunConfig) -> None:
    """Every key that was given holds the given value; every key that was not keeps its default."""
    defaults = RunConfig()
    for name in RunConfig.model_fields:
        got = getattr(cfg, name)
        if name not in data:
            assert got == getattr(defaults, name), name
        elif isinstance(got, BaseModel):  # a section
            section = data[name]
            assert isinstance(section, dict), (name, section)
            for field in type(got).model_fields:
                value = getattr(got, field)
                if field not in section:
                    assert value == getattr(getattr(defaults, name), field), (name, field)
                elif field == "targets":  # deduplicated, order kept
                    assert value == list(dict.fromkeys(section[field])), (name, field, section[field], value)
                else:
                    assert _same(section[field], value), (name, field, section[field], value)
        else:
            assert _same(data[name], got), (name, data[name], got)


def _round_trips(cfg: RunConfig) -> None:
    assert validate(cfg.model_dump()) == cfg
    assert validate(json.loads(cfg.model_dump_json())) == cfg


def _names_a_given_key(message: str, data: dict) -> bool:
    assert message.startswith("invalid config: ") and "\n" not in message, message
    where = message[len("invalid config: "):].split(": ")[0]
    if where == "config":  # pydantic's location for the empty key
        return "" in data
    return any(k and (where == k or where.startswith(k + ".")) for k in data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.dictionaries(st.sampled_from(KEYS), values, max_size=6), structured))
def test_validate_fuzz(data):
    try:
        cfg = validate(data)
    except SponError as e:
        assert _names_a_given_key(str(e), data), (str(e), data)
        return
    assert isinstance(cfg, RunConfig)
    _check_fields(data, cfg)
    _round_trips(cfg)


# Configs that are valid field by field (each field optional, drawn from its documented domain):
# validate must accept every one and hold exactly what was drawn.
names = st.text(max_size=8)
opt_names = st.none() | names
ints = lambda lo: st.integers(lo, 10**6)  # noqa: E731
positive = st.floats(min_value=0, exclude_min=True, allow_infinity=False, allow_nan=False)
valid_sections = {
    "calibration": {"source": st.sampled_from(["samples", "text", "dataset"]), "files": st.lists(names, max_size=3),
                    "dataset": opt_names, "dataset_config": opt_names, "data_files": st.none() | st.lists(names, max_size=3),
                    "split": names, "text_field": names, "num_blocks": ints(1), "block_len": ints(2),
                    "heldout_blocks": ints(0), "seed": st.integers(-10**6, 10**6), "temperature": positive},
    "sparsity": {"sparsity": st.floats(0.0, 1.0, exclude_max=True), "allocation": st.sampled_from(["uniform", "greedy"]),
                 "targets": st.lists(st.sampled_from(["q", "k", "v", "o", "gate", "up", "down"]), min_size=1, max_size=9),
                 "greedy_step": st.floats(0.0, 1.0, exclude_min=True, exclude_max=True), "greedy_blocks": ints(1),
                 "protocol": st.sampled_from(["all", "last_half"])},
    "distill": {"steps": ints(0), "lr": positive, "schedule": st.sampled_from(["cosine", "constant"]), "warmup": ints(0),
                "batch_size": ints(1), "grad_accum": ints(1), "weight_decay": st.floats(0.0, 10.0),
                "init": st.sampled_from(["zeros", "closed_form"]), "seed": st.integers(-10**6, 10**6), "checkpoint_every": ints(1)},
    "eval": {"files": st.lists(names, max_size=3), "window": ints(2), "stride": ints(1)},
}
valid_top = {"model": opt_names, "device": names, "dtype": st.sampled_from(["fp32", "bf16", "fp16"]), "device_map": opt_names,
             "out": names}
valid_configs = st.fixed_dictionaries({}, optional={**valid_top, **{s: st.fixed_dictionaries({}, optional=f) for s, f in valid_sections.items()}})

# One field out of its domain (the rest valid): a SponError that names exactly that field.
BAD = [("sparsity", "sparsity", [1.0, -0.1, "half", None]), ("sparsity", "targets", [[], ["lm_head"], "q"]),
       ("sparsity", "allocation", ["random"]), ("sparsity", "greedy_step", [0.0, 1.0]), ("sparsity", "greedy_blocks", [0]),
       ("calibration", "num_blocks", [0, -3, 1.5]), ("calibration", "block_len", [1]), ("calibration", "heldout_blocks", [-1]),
       ("calibration", "temperature", [0.0, -1.0, float("nan")]), ("calibration", "source", ["web"]),
       ("distill", "lr", [0.0, -1e-3, float("nan")]), ("distill", "steps", [-1, "many"]), ("distill", "checkpoint_every", [0]),
       ("distill", "batch_size", [0]), ("distill", "init", ["ones"]), ("distill", "bogus", [1]),
       ("eval", "window", [1]), ("eval", "stride", [0]), (None, "dtype", ["fp8", 32]), ("sparsity", "protocol", ["first_half"]),
       (None, "model", [5]), (None, "bogus", [True])]
broken = st.tuples(valid_configs, st.sampled_from(BAD).flatmap(lambda b: st.tuples(st.just(b[:2]), st.sampled_from(b[2]))))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_configs)
def test_valid_configs_hold_what_was_given(data):
    cfg = validate(data)
    _check_fields(data, cfg)
    _round_trips(cfg)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(broken)
def test_one_bad_field_is_named(case):
    data, ((section, field), bad) = case
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    if section is None:
        data[field] = bad
    else:
        data.setdefault(section, {})[field] = bad
    where = field if section is None else f"{section}.{field}"
    with pytest.raises(SponError) as e:
        validate(data)
    msg = str(e.value)
    assert msg.startswith(f"invalid config: {where}") and "\n" not in msg, (msg, where)


# Override keys none of which is a prefix of another, so each given value lands at its own path
# and must be found there (overlapping keys -- a scalar over a section, a section over a dotted
# key -- are the example tests below).
OVERRIDE_KEYS = ["sparsity.sparsity", "sparsity.allocation", "distill.steps", "distill.bogus.deep", "calibration",
                 "eval.window", "dtype", "model", "out"]


def _at(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _holds(given, got, default) -> bool:
    """`got` is `given` as load_config keeps it: a section holds every field given and the
    default of every other; a value as _same says."""
    if isinstance(got, BaseModel):
        return isinstance(given, dict) and all(
            _same(given[f], getattr(got, f)) if f in given else getattr(got, f) == getattr(default, f)
            for f in type(got).model_fields)
    return _same(given, got)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(OVERRIDE_KEYS), values, max_size=5))
def test_load_config_overrides_fuzz(overrides):
    """Dotted overrides through the public load_config: a RunConfig holding every value given at
    its key (None: not given, the default stays), or a one-line SponError naming a given key."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        cfg = load_config(None, overrides)
    except SponError as e:
        msg = str(e)
        assert msg.startswith("invalid config: ") and "\n" not in msg, msg
        where = msg[len("invalid config: "):].split(": ")[0]
        assert any(where == k or where.startswith(k + ".") or k.startswith(where + ".") for k in given), (msg, given)
        return
    assert "distill.bogus.deep" not in given  # an unknown key is never accepted
    defaults = RunConfig()
    for key in OVERRIDE_KEYS:
        if key == "distill.bogus.deep":
            continue
        if key in given:
            assert _holds(given[key], _at(cfg, key), _at(defaults, key)), (key, given[key], _at(cfg, key))
        else:
            assert _at(cfg, key) == _at(defaults, key), key
    _round_trips(cfg)


def test_dotted_overrides_equal_the_same_values_as_sections():
    nested = {"sparsity": {"sparsity": 0.3, "allocation": "greedy"}, "distill": {"steps": 5}, "dtype": "bf16"}
    dotted = {"sparsity.sparsity": 0.3, "sparsity.allocation": "greedy", "distill.steps": 5, "dtype": "bf16"}
    assert load_config(None, dotted) == load_config(None, nested) == validate(nested)
    with pytest.raises(SponError, match=r"^invalid config: distill\.bogus"):
        load_config(None, {"distill.bogus.deep": 1})


def test_override_into_a_scalar_is_a_spon_error():
    with pytest.raises(SponError, match=r"^invalid config: sparsity\.sparsity: sparsity is not a section$"):
        load_config(None, {"sparsity": 5, "sparsity.sparsity": 0.5})
    with pytest.raises(SponError, match=r"^invalid config: sparsity: "):  # the later scalar replaces the section
        load_config(None, {"sparsity.sparsity": 0.5, "sparsity": 5})
    assert load_config(None, {"sparsity": {"allocation": "greedy"}, "sparsity.sparsity": 0.3}).sparsity.model_dump() == {
        **RunConfig().sparsity.model_dump(), "allocation": "greedy", "sparsity": 0.3}


def test_config_file_and_overrides_give_the_given_values(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("model: some/model\nsparsity:\n  sparsity: 0.4\n  targets: [down, up, down]\ndistill:\n  steps: 7\n")
    cfg = load_config(p, {"distill.lr": "0.5", "dtype": "bf16", "out": None})
    assert (cfg.model, cfg.dtype, cfg.out) == ("some/model", "bf16", RunConfig().out)
    assert (cfg.sparsity.sparsity, cfg.sparsity.targets) == (0.4, ["down", "up"])
    assert (cfg.distill.steps, cfg.distill.lr) == (7, 0.5)
    _round_trips(cfg)


# ----------------------------------------------------------------------------- issue #22, item 11
@pytest.mark.parametrize("text,expected", [
    ("distill:\n  steps: true\n", "distill.steps: Value error, expected a number, got true"),
    ("sparsity:\n  sparsity: false\n", "sparsity.sparsity: Value error, expected a number, got false"),
    ("eval:\n  window: yes\n", "eval.window: Value error, expected a number, got true"),
    ("distill:\n  steps: 3\ndistill:\n  steps: 4\n", "duplicate key 'distill'"),
    ("distill:\n  steps: 3\n  steps: 4\n", "duplicate key 'steps'"),
    ("calibration:\n  seed: 1180591620717411303424\n", "a seed must fit in 64 bits"),
])
def test_booleans_duplicates_and_huge_seeds_are_refused(tmp_path, text, expected):
    from spon.config import load_config
    from spon.errors import SponError

    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(SponError, match=re.escape(expected)):
        load_config(f)


def test_duplicate_json_keys_are_refused(tmp_path):
    from spon.config import load_config
    from spon.errors import SponError

    f = tmp_path / "c.json"
    f.write_text('{"distill": {"steps": 3}, "distill": {"steps": 4}}')
    with pytest.raises(SponError, match="duplicate key 'distill'"):
        load_config(f)
