"""Fixtures for the evaluation tests: tiny task data made here (the fused model, `fused_dir`, is
shared from tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TASK_YAML = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: ${SPON_EVAL_DATA}/tiny_mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{query}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{gold}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

# Story openings with one in-domain and one out-of-domain ending; gold labels are mixed so that
# the expected accuracy (computed by direct scoring in the test) is neither 0 nor 1.
ITEMS = [
    ("Once upon a time, there was a little girl named", ["Lily.", "quantum chromodynamics."], 0),
    ("One day, Tom went to the park with his", ["mom.", "tax returns."], 1),
    ("The cat was very", ["happy.", "bureaucratic."], 0),
    ("She wanted to play with her", ["ball.", "derivatives portfolio."], 0),
    ("The little bird flew up into the", ["sky.", "spreadsheet."], 1),
    ("Ben and Mia liked to eat", ["cake.", "sulfuric acid."], 0),
    ("The dog ran to the", ["tree", "house"], 1),
    ("They were very", ["sad", "happy"], 0),
]


@pytest.fixture(scope="session")
def tiny_items():
    return ITEMS


@pytest.fixture()
def tiny_task_dir(tmp_path, monkeypatch) -> Path:
    """A task dir with one YAML and its jsonl under a data root given by SPON_EVAL_DATA."""
    data = tmp_path / "data"
    tasks = tmp_path / "tasks"
    data.mkdir()
    tasks.mkdir()
    with open(data / "tiny_mc.jsonl", "w") as f:
        for q, c, g in ITEMS:
            f.write(json.dumps({"query": q, "choices": c, "gold": g}) + "\n")
    (tasks / "tiny_mc.yaml").write_text(TASK_YAML)
    monkeypatch.setenv("SPON_EVAL_DATA", str(data))
    monkeypatch.setenv("SPON_EVAL_CACHE", str(tmp_path / "cache"))
    return tasks
