"""Calibration data: fixed-length token blocks from text files, a `datasets` dataset, or the
model's own samples (data-free: the only in-domain source for a model whose data you lack)."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from spon.config import CalibrationConfig
from spon.errors import SponError
from spon.sparse import mode

DOC_SEPARATOR = "<|endoftext|>"


def read_documents(path: str | Path) -> list[str]:
    """A text file as documents: split on <|endoftext|> when present (TinyStories), else one.
    `corpus:NAME` is a built-in corpus (spon.corpora: the Python standard library's sources)."""
    from spon import corpora

    if corpora.is_corpus(path):
        return corpora.documents(str(path))
    path = Path(path)
    if not path.is_file():
        raise SponError(f"text file does not exist: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SponError(f"text file {path} is not UTF-8 text (invalid byte 0x{e.object[e.start]:02x} "
                        f"at offset {e.start})") from e
    except OSError as e:
        raise SponError(f"cannot read text file {path}: {e.strerror or type(e).__name__}") from e
    docs = [d.strip() for d in text.split(DOC_SEPARATOR)]
    return [d for d in docs if d]


def token_stream(tokenizer, documents: list[str]) -> torch.Tensor:
    """Documents tokenized and concatenated, each starting with BOS as the model was trained."""
    ids: list[int] = []
    for doc in documents:
        toks = tokenizer(doc, add_special_tokens=False)["input_ids"]
        if tokenizer.bos_token_id is not None:
            ids.append(tokenizer.bos_token_id)
        ids.extend(toks)
    return torch.tensor(ids, dtype=torch.long)


def blocks_from_stream(stream: torch.Tensor, block_len: int, num_blocks: int | None, what: str) -> torch.Tensor:
    if block_len < 2:
        raise SponError(f"block_len must be at least 2, got {block_len}")
    n = stream.numel() // block_len
    if n == 0:
        raise SponError(
            f"calibration data is empty or too short: {what} gave {stream.numel()} tokens, "
            f"fewer than one block of {block_len}"
        )
    if num_blocks is not None:
        n = min(n, num_blocks)
    return stream[: n * block_len].view(n, block_len)


def text_blocks(tokenizer, files: list[str], block_len: int, num_blocks: int | None = None) -> torch.Tensor:
    if not files:
        raise SponError("calibration source 'text' needs at least one file")
    docs = [d for f in files for d in read_documents(f)]
    return blocks_from_stream(token_stream(tokenizer, docs), block_len, num_blocks, ", ".join(map(str, files)))


def dataset_blocks(
    tokenizer,
    name: str,
    block_len: int,
    num_blocks: int | None = None,
    config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    data_files: list[str] | None = None,
) -> torch.Tensor:
    """Blocks from a `datasets` dataset: a hub name, or a builder ('json', 'text') with local files."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split, data_files=data_files)
    except Exception as e:  # datasets raises many types; the user needs the one line
        raise SponError(f"cannot load dataset {name!r} (split {split!r}): {str(e).splitlines()[0]}") from e
    if text_field not in ds.column_names:
        raise SponError(f"dataset {name!r} has no field {text_field!r}; fields: {ds.column_names}")
    docs = [t for t in ds[text_field] if t and t.strip()]
    return blocks_from_stream(token_stream(tokenizer, docs), block_len, num_blocks, f"dataset {name}")


@torch.no_grad()
def sample_blocks(
    model,
    tokenizer,
    num_blocks: int,
    block_len: int,
    seed: int = 0,
    temperature: float = 1.0,
    batch_size: int = 64,
) -> torch.Tensor:
    """N sequences of L tokens sampled from the model itself, starting at BOS.

    Sampling is plain ancestral sampling at `temperature` (no top-k/top-p) with a seeded
    generator, so the same seed gives the same blocks on the same device. The model must be
    dense here (calibration describes the dense model).
    """
    if num_blocks < 1:
        raise SponError(f"calibration data is empty: num_blocks={num_blocks}")
    if temperature <= 0:
        raise SponError(f"temperature must be > 0, got {temperature}")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0
    out = []
    for start in range(0, num_blocks, batch_size):
        b = min(batch_size, num_blocks - start)
        ids = torch.full((b, 1), bos, dtype=torch.long, device=device)
        cache = None
        for _ in range(block_len - 1):
            step = model(ids if cache is None else ids[:, -1:], cache=cache, use_cache=True)
            cache = step.cache
            probs = torch.softmax(step.logits[:, -1].double() / temperature, dim=-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], dim=1)
        out.append(ids.cpu())
    return torch.cat(out)


def domain_name(file: str) -> str:
    """A calibration file's name as a domain: the corpus name (corpus:python-stdlib ->
    python-stdlib) or the file's name."""
    from spon import corpora

    return str(file)[len(corpora.PREFIX):] if corpora.is_corpus(file) else Path(file).name


def build_calibration(model, tokenizer, cfg: CalibrationConfig) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Token blocks [N, L] from the configured source, split once into (train, heldout), and the
    domain of each held-out block.

    The split is made here and stored with the blocks, so thresholds, distillation and the
    held-out measurements of every entry point see the same blocks. `model` must be dense.
    Several text files are several domains: the blocks are shared out evenly between them and
    each keeps its own held-out blocks, so alpha is selected on every domain (spon.distill).
    """
    if cfg.source == "text" and len(cfg.files) > 1:
        return domain_blocks(tokenizer, cfg.files, cfg.block_len, cfg.num_blocks, cfg.heldout_blocks)
    if cfg.source == "samples":
        blocks = sample_blocks(model, tokenizer, cfg.num_blocks, cfg.block_len, cfg.seed, cfg.temperature)
    elif cfg.source == "text":
        blocks = text_blocks(tokenizer, cfg.files, cfg.block_len, cfg.num_blocks)
    else:
        if not cfg.dataset:
            raise SponError("calibration source 'dataset' needs calibration.dataset")
        blocks = dataset_blocks(tokenizer, cfg.dataset, cfg.block_len, cfg.num_blocks, cfg.dataset_config, cfg.split,
                                cfg.text_field, cfg.data_files)
    train, heldout = split_heldout(blocks, cfg.heldout_blocks)
    return train, heldout, []


def domain_blocks(tokenizer, files: list[str], block_len: int, num_blocks: int | None,
                  heldout_blocks: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """`num_blocks` shared out evenly between the files (the first ones get the remainder; a file
    too short for its share gives what it has), each file's own last `heldout_blocks / k` held
    out (at least one when any are): one held-out set per domain."""
    k = len(files)
    names = [domain_name(f) for f in files]
    if len(set(names)) < k:
        raise SponError(f"calibration files name the same domain twice: {', '.join(names)}")
    trains, heldouts, labels = [], [], []
    for i, f in enumerate(files):
        share = None if num_blocks is None else num_blocks // k + (i < num_blocks % k)
        if share == 0:
            raise SponError(f"calibration.num_blocks {num_blocks} is fewer than the {k} domains (files) to share it")
        blocks = text_blocks(tokenizer, [f], block_len, share)
        held = heldout_blocks // k + (i < heldout_blocks % k) if heldout_blocks else 0
        train, heldout = split_heldout(blocks, max(held, 1) if heldout_blocks else 0)
        trains.append(train)
        heldouts.append(heldout)
        labels += [names[i]] * len(heldout)
    return torch.cat(trains), torch.cat(heldouts), labels


def split_heldout(blocks: torch.Tensor, heldout: int) -> tuple[torch.Tensor, torch.Tensor]:
    heldout = min(heldout, len(blocks) // 2)  # never starve training on tiny calibration sets
    if len(blocks) - heldout < 1:
        raise SponError(f"calibration data too short: {len(blocks)} block(s)")
    return blocks[: len(blocks) - heldout], blocks[len(blocks) - heldout :]


@dataclass
class Calibration:
    """Token blocks [N, L] the method calibrates on, split once into training and held-out blocks
    (thresholds and alpha train on `train`; `heldout` selects alpha and measures realized sparsity).
    `source`: "samples" (the model's own), "text" or "dataset"; `config`: what made them;
    `heldout_domains`: the domain of each held-out block when there are several (several text
    files), else empty (one domain)."""

    train: torch.Tensor
    heldout: torch.Tensor
    source: str
    config: dict = field(default_factory=dict)
    heldout_domains: list[str] = field(default_factory=list)


def calibrate(model, tokenizer, data: CalibrationConfig | Sequence[str] | object | None = None) -> Calibration:
    """Calibration blocks from a CalibrationConfig (the model's own samples, text files or a
    `datasets` dataset by name), from documents in memory (a list of strings), or from a
    `datasets.Dataset` object (its "text" column). The model is used dense and left unchanged."""
    if data is None:
        data = CalibrationConfig()
    if isinstance(data, CalibrationConfig):
        cfg = data
        ctx = _in_float64(model) if cfg.source == "samples" and cfg.sample_precision == "fp64" else nullcontext()
        # float64 while sampling: a one-ulp logit difference between CPU kinds cannot flip a token
        with ctx, mode(model, "dense"):
            train, heldout, domains = build_calibration(model, tokenizer, cfg)
        return Calibration(train, heldout, cfg.source, cfg.model_dump(mode="json"), domains)
    cfg = CalibrationConfig(source="text")
    if hasattr(data, "column_names"):  # a datasets.Dataset
        if cfg.text_field not in data.column_names:
            raise SponError(f"dataset has no field {cfg.text_field!r}; fields: {data.column_names}")
        docs, what = [t for t in data[cfg.text_field] if t and t.strip()], "the dataset"
    elif isinstance(data, (list, tuple)) and all(isinstance(d, str) for d in data):
        docs, what = [d for d in data if d.strip()], f"{len(data)} documents"
    else:
        raise SponError(f"calibration data must be a CalibrationConfig, a list of strings or a datasets.Dataset, "
                        f"got {type(data).__name__}")
    blocks = blocks_from_stream(token_stream(tokenizer, docs), cfg.block_len, cfg.num_blocks, what)
    train, heldout = split_heldout(blocks, cfg.heldout_blocks)
    return Calibration(train, heldout, "text", {**cfg.model_dump(mode="json"), "files": [f"<{what} in memory>"]})


@contextmanager
def _in_float64(model) -> Iterator[None]:
    """The model in float64 for the duration, then every parameter and buffer back in its own
    dtype (fp32/bf16 -> fp64 -> back is exact). Buffers are replaced, not converted in place, by
    Module.double(), so they are restored by name."""
    params = {n: p.dtype for n, p in model.named_parameters()}
    buffers = {n: b.dtype for n, b in model.named_buffers()}
    model.double()
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            p.data = p.data.to(params[n])
        for n, b in list(model.named_buffers()):
            owner, _, attr = n.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = b.to(buffers[n])
