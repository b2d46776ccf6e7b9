"""Typed, strict configuration for a spon run (pydantic). Unknown keys and wrong types fail."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from spon.errors import SponError
from spon.format import PROJECTIONS, PROTOCOLS


class _Strict(BaseModel):
    # allow_inf_nan=False: lr=inf or temperature=inf would otherwise pass and fail (or silently
    # mean uniform sampling) only after the first stages ran.
    model_config = ConfigDict(extra="forbid", strict=False, validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v, info):
        """YAML `steps: true` or `sparsity: false` is a mistake, not 1 and 0.0 (lax mode would cast it)."""
        if isinstance(v, bool) and bool not in _leaf_types(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expected {_kind(cls.model_fields[info.field_name].annotation)}, got {str(v).lower()}")
        if info.field_name == "seed" and isinstance(v, int) and not -(2**63) <= v < 2**63:
            raise ValueError(f"a seed must fit in 64 bits (|seed| < 2**63), got {v}")
        return v


def _leaf_types(annotation) -> set:
    from typing import get_args

    args = get_args(annotation)
    return {annotation} if not args else set().union(*(_leaf_types(a) for a in args))


def _kind(annotation) -> str:
    leaves = _leaf_types(annotation)
    return "a number" if leaves & {int, float} else "a value of the field's type, not a boolean"


class CalibrationConfig(_Strict):
    source: Literal["samples", "text", "dataset"] = "samples"
    files: list[str] = Field(default_factory=list, description="text files for source='text'")
    dataset: str | None = Field(None, description="datasets name or builder ('json', 'text') for source='dataset'")
    dataset_config: str | None = None
    data_files: list[str] | None = None
    split: str = "train"
    text_field: str = "text"
    num_blocks: int = Field(512, ge=1)
    block_len: int = Field(128, ge=2)
    heldout_blocks: int = Field(32, ge=0, description="blocks kept out of training for the held-out KL")
    seed: int = 0
    temperature: float = Field(1.0, gt=0)
    sample_precision: Literal["fp64", "model"] = Field(
        "fp64", description="source='samples': the model's forward in float64 while it samples, so a one-ulp "
        "difference in a logit between CPU kinds or thread counts cannot flip a sampled token (and every "
        "token after it); 'model' samples in the model's own dtype (for models too big to hold in fp64)")


class SparsityConfig(_Strict):
    """What `spon.sparsify_` does: which projections, how sparse, by which criterion, at which
    positions (the protocol), and how the thresholds are allocated and calibrated."""

    sparsity: float = Field(0.5, ge=0.0, lt=1.0)
    allocation: Literal["uniform", "greedy"] = "uniform"
    criterion: Literal["magnitude", "weighted"] = Field(
        "magnitude", description="which activations are dropped: 'magnitude' TEAL's |x_i| <= tau; 'weighted' "
        "WINA's |x_i| * ||W[:, i]||_2 <= tau (a per-input-channel threshold, same kernels and fusion)")
    targets: list[Literal["q", "k", "v", "o", "gate", "up", "down"]] = Field(default_factory=lambda: list(PROJECTIONS))
    greedy_step: float = Field(0.05, gt=0, lt=1)
    greedy_blocks: int = Field(16, ge=1)
    protocol: Literal["all", "last_half"] = Field(
        "all", description="positions made sparse: 'all' (every token, what decoding sees) or 'last_half' (TEAL's "
        "prefill protocol: the first half of each sequence dense); thresholds are quantiles over those positions")
    calibrate_on: Literal["sparse", "dense"] = Field(
        "sparse", description="activations tau is a quantile of: 'sparse' with every upstream projection already "
        "sparse (realized sparsity = target), 'dense' TEAL's original (overshoots at high sparsity)")

    @field_validator("targets")
    @classmethod
    def _nonempty_unique(cls, v):
        if not v:
            raise ValueError("at least one projection")
        return list(dict.fromkeys(v))


class DistillConfig(_Strict):
    targets: list[Literal["q", "k", "v", "o", "gate", "up", "down"]] | None = Field(
        None, description="projections that get a trained alpha (None: every sparsified one); the others "
        "stay sparse with alpha = 0 (the paper's ablation: down only)")
    steps: int = Field(600, ge=0)
    lr: float = Field(1e-2, gt=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup: int = Field(10, ge=0)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    init: Literal["zeros", "closed_form"] = "zeros"
    seed: int = 0
    checkpoint_every: int = Field(50, ge=1)
    compute_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="the student's forward/backward: bf16 autocast is ~1.5x faster on CPUs with "
        "AVX512-BF16 / on GPUs; the teacher and the held-out selection stay in the model's precision")
    teacher_cache_gb: float = Field(2.0, ge=0, description="keep the dense teacher's log-probabilities of the "
                                    "calibration blocks in memory when they fit in this many GB (0: recompute)")
    guard_confidence: float = Field(
        0.95, ge=0.5, lt=1.0, description="the held-out NLL guard: a checkpoint is eligible only if the one-sided "
        "upper bound (Student t, this confidence) of its mean per-block NLL minus TEAL's on the same held-out "
        "blocks is below zero on every domain; 0.5 compares the means alone")
    retake_thresholds: bool = Field(
        True, description="re-take tau with alpha in place (before the first step and at every checkpoint) so "
        "SPON realizes the target sparsity; TEAL keeps its own tau as the baseline. False: SPON runs TEAL's tau "
        "and realizes less sparsity (alpha moves the downstream inputs back toward the dense model)")


class EvalConfig(_Strict):
    files: list[str] = Field(default_factory=list, description="text files for perplexity")
    window: int = Field(512, ge=2)
    stride: int = Field(256, ge=1)
    max_tokens: int | None = Field(None, ge=1, description="score only the first N predicted tokens of each file "
                                   "(documents in order); None = all")


class Recipe(_Strict):
    """The method's whole recipe, one section per verb: calibrate -> sparsify_ -> distill_
    (`spon.oneshot(model, tokenizer, Recipe(...))`)."""

    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    sparsity: SparsityConfig = Field(default_factory=SparsityConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)


    @model_validator(mode="after")
    def _alpha_on_sparsified_projections(self):
        """alpha lives on sparsified projections only: `--alpha-targets down` with `--targets q,k`
        is refused here, not after calibration."""
        extra = [t for t in self.distill.targets or [] if t not in self.sparsity.targets]
        if extra:
            raise ValueError(f"distill.targets (--alpha-targets) {','.join(extra)} not among sparsity.targets "
                             f"(--targets) {','.join(self.sparsity.targets)}: alpha is trained only on sparsified projections")
        return self


class RunConfig(Recipe):
    """A recipe applied to a model by the pipeline: which model, where it runs, where results go,
    and what it is evaluated on."""

    model: str | None = Field(None, description="hub id or local dir; None = embedded stories260K")
    preset: str = Field("none", description="per-model recipe under the config (spon.presets); load_config "
                        "picks the model's own unless told 'none' or another name")
    device: str = "cpu"
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    device_map: str | None = None
    out: str = "out/run"
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @property
    def protocol(self) -> str:
        return self.sparsity.protocol


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> RunConfig:
    """A RunConfig from an optional JSON/YAML file plus dotted overrides ({"sparsity.sparsity": 0.4})."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise SponError(f"config file does not exist: {p}")
        text = p.read_text()
        try:
            if p.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.load(text, Loader=_unique_keys_loader()) or {}
            else:
                data = json.loads(text, object_pairs_hook=_unique_pairs)
        except Exception as e:
            raise SponError(f"cannot parse config {p}: {str(e).splitlines()[0]}") from e
        if not isinstance(data, dict):
            raise SponError(f"config {p} must be a mapping, got {type(data).__name__}")
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SponError(f"invalid config: {key}: {part} is not a section")
        node[leaf] = value
    from spon.presets import layered, preset, preset_name

    name = preset_name(data.get("model"), data.get("preset"))
    return validate({**layered(preset(name), data), "preset": name})


def _unique_pairs(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise ValueError(f"duplicate key {k!r}: a section or key given twice would keep only the last")
        seen[k] = v
    return seen


def _unique_keys_loader():
    """yaml.SafeLoader (no !!python tags) that refuses a key given twice in one mapping."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            keys = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in keys:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}: a section or key given twice would keep only the last",
                        key_node.start_mark)
                keys.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def validate(data: dict) -> RunConfig:
    data = _protocol_in_sparsity(data)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "config"
        raise SponError(f"invalid config: {where}: {err['msg']}") from e


def _protocol_in_sparsity(data):
    """`protocol` was a top-level key before it moved into `sparsity` (the thresholds depend on
    it): a config that still has it there keeps working, and an error about it names `protocol`."""
    if not isinstance(data, dict) or "protocol" not in data:
        return data
    data = dict(data)
    legacy = data.pop("protocol")
    if legacy not in PROTOCOLS:
        raise SponError(f"invalid config: protocol: Input should be {' or '.join(map(repr, PROTOCOLS))}")
    section = data.get("sparsity", {})
    if not isinstance(section, dict):
        return {**data, "sparsity": section}  # the section's own error names it
    if section.get("protocol", legacy) != legacy:
        raise SponError(f"invalid config: protocol: {legacy!r} disagrees with sparsity.protocol {section['protocol']!r}")
    data["sparsity"] = {**section, "protocol": legacy}
    return data
