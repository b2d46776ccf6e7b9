"""Bad input through the real CLI (`python -m spon.cli ...` subprocesses): every case exits 2 with
one `spon: error:` line naming the problem, and writes nothing (the out dir stays absent).
Cases run concurrently (a few processes at a time) in one module fixture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline_helpers import free_port
from spon.assets import assets_root

REPO = Path(__file__).resolve().parents[2]
ASSETS = assets_root()
STORIES = ASSETS / "models" / "stories260K"

# (id, argv with {T} = case's tmp dir and {OUT} = the out dir that must stay absent, expected substring)
RUN = ["run", "--out", "{OUT}", "--work-dir", "{OUT}/work", "--tracking-uri", "sqlite:///{T}/mlflow.db", "--store", "{T}/store"]
CAL = ["calibrate", "--out", "{OUT}"]
SWEEP = ["sweep", "--sparsities", "0.3,0.5", "--out", "{OUT}", "--work-dir", "{OUT}/work", "--tracking-uri", "sqlite:///{T}/sweep.db",
         "--store", "{T}/store"]
CASES = [
    ("unknown-key", RUN + ["--config", "{T}/unknown.json"], "bogus: Extra inputs are not permitted"),
    ("unknown-nested-key", RUN + ["--config", "{T}/nested.json"], "distill.stepz: Extra inputs"),
    ("wrong-type-steps", RUN + ["--config", "{T}/wrongtype.json"], "distill.steps"),
    ("wrong-type-section", RUN + ["--config", "{T}/section.json"], "invalid config: sparsity"),
    ("wrong-type-targets", RUN + ["--config", "{T}/targets_str.json"], "sparsity.targets"),
    ("yaml-unparsable", RUN + ["--config", "{T}/bad.yaml"], "cannot parse config"),
    ("json-unparsable", RUN + ["--config", "{T}/bad.json"], "cannot parse config"),
    ("config-not-mapping", RUN + ["--config", "{T}/list.json"], "must be a mapping"),
    ("config-missing", RUN + ["--config", "{T}/nope.json"], "config file does not exist"),
    ("sparsity-1", RUN + ["--sparsity", "1.0"], "sparsity.sparsity"),
    ("sparsity-1.5", RUN + ["--sparsity", "1.5"], "sparsity.sparsity"),
    ("sparsity-negative", RUN + ["--sparsity", "-0.1"], "sparsity.sparsity"),
    ("sparsity-nan", RUN + ["--sparsity", "nan"], "sparsity.sparsity"),
    ("sparsity-inf", RUN + ["--sparsity", "inf"], "sparsity.sparsity"),
    ("protocol", RUN + ["--protocol", "sideways"], "protocol"),
    ("allocation", RUN + ["--allocation", "random"], "sparsity.allocation"),
    ("targets-unknown", RUN + ["--targets", "q,zz"], "sparsity.targets"),
    ("targets-empty", RUN + ["--targets", ""], "sparsity.targets"),
    ("dtype", RUN + ["--dtype", "fp8"], "dtype"),
    ("init", RUN + ["--init", "random"], "distill.init"),
    ("steps-negative", RUN + ["--steps", "-1"], "distill.steps"),
    ("batch-size-zero", RUN + ["--batch-size", "0"], "distill.batch_size"),
    ("lr-zero", RUN + ["--lr", "0"], "distill.lr"),
    ("checkpoint-every-zero", RUN + ["--checkpoint-every", "0"], "distill.checkpoint_every"),
    ("calib-blocks-zero", RUN + ["--calib-blocks", "0"], "calibration.num_blocks"),
    ("calib-len-one", RUN + ["--calib-len", "1"], "calibration.block_len"),
    ("calib-source", RUN + ["--calib-source", "web"], "calibration.source"),
    ("window-one", RUN + ["--window", "1"], "eval.window"),
    ("stride-zero", RUN + ["--stride", "0"], "eval.stride"),
    ("eval-text-missing", RUN + ["--eval-text", "{T}/missing.txt"], "text file does not exist"),
    ("calib-files-missing", RUN + ["--calib-source", "text", "--calib-files", "{T}/missing.txt"], "text file does not exist"),
    ("calib-text-no-files", RUN + ["--calib-source", "text"], "needs at least one file"),
    ("calib-dataset-no-name", RUN + ["--calib-source", "dataset"], "needs calibration.dataset"),
    ("quantize-scheme", RUN + ["--quantize", "int3"], "quantize"),
    ("lm-eval-limit", RUN + ["--lm-eval-limit", "-1"], "lm_eval_limit"),
    ("calib-empty-file", CAL + ["--calib-source", "text", "--calib-files", "{T}/empty.txt"], "calibration data"),
    ("calib-too-short", CAL + ["--calib-source", "text", "--calib-files", "{T}/short.txt", "--calib-len", "64"], "too short"),
    ("model-missing", CAL + ["--model", "{T}/no-such-model"], "model path does not exist"),
    ("unsupported-arch", CAL + ["--model", "{T}/gpt2"], "gpt2"),
    ("tokenizer-mismatch", CAL + ["--model", "{T}/tokmismatch"], "tokenizer/model mismatch"),
    ("models-alias-missing", ["pull", "models:/nosuch@champion", "--out", "{OUT}", "--tracking-uri", "sqlite:///{T}/reg.db"], "cannot resolve models:/nosuch@champion"),
    ("pull-escape-dotdot", ["pull", "{T}/store-dotdot", "--out", "{OUT}"], "'../x' would escape"),
    ("pull-escape-abs", ["pull", "{T}/store-abs", "--out", "{OUT}"], "'/abs' would escape"),
    ("pull-no-manifest", ["pull", "{T}/store-empty", "--out", "{OUT}"], "has no manifest.json"),
    ("pull-bad-scheme", ["pull", "gs://bucket/x", "--out", "{OUT}"], "unsupported store URI"),
    ("publish-not-a-result", ["publish", "{T}/store-empty"], "has no summary.json"),
    ("sweep-dask-workers-zero", SWEEP + ["--dask-workers", "0"], "dask_workers"),
    ("sweep-dask-unreachable", SWEEP + ["--dask-address", "tcp://127.0.0.1:{DEAD}"], "cannot reach the Dask scheduler at tcp://127.0.0.1:"),
]


def _tiny_models(t: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(STORIES)
    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", vocab_size=512, n_embd=16, n_layer=1, n_head=2, n_positions=64))
    gpt2.save_pretrained(t / "gpt2")
    tok.save_pretrained(t / "gpt2")
    small = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=100, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64))
    small.save_pretrained(t / "tokmismatch")
    tok.save_pretrained(t / "tokmismatch")


def _inputs(t: Path) -> None:
    t.mkdir(parents=True, exist_ok=True)
    files = {"unknown.json": {"bogus": 1}, "nested.json": {"distill": {"stepz": 3}}, "wrongtype.json": {"distill": {"steps": "many"}},
             "section.json": {"sparsity": "high"}, "targets_str.json": {"sparsity": {"targets": 5}}, "list.json": [1, 2]}
    for name, data in files.items():
        (t / name).write_text(json.dumps(data))
    (t / "bad.yaml").write_text("distill: [unclosed\n")
    (t / "bad.json").write_text("{not json")
    (t / "empty.txt").write_text("")
    (t / "short.txt").write_text("Once upon a time.")
    for name, path in (("store-dotdot", "../x"), ("store-abs", "/abs")):
        (t / name).mkdir()
        (t / name / "manifest.json").write_text(json.dumps({"format": "spon-store/1", "files": [{"path": path, "size": 1, "sha256": "0" * 64}]}))
    (t / "store-empty").mkdir()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    shared = root / "shared"
    _inputs(shared)
    _tiny_models(shared)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    dead = str(free_port())  # nothing listens there
    env.pop("MLFLOW_TRACKING_URI", None)

    def one(case):
        cid, argv, _ = case
        out = root / cid / "out"
        out.parent.mkdir()
        args = [a.replace("{T}", str(shared)).replace("{OUT}", str(out)).replace("{DEAD}", dead) for a in argv]
        before = sorted(p.name for p in shared.iterdir())
        p = subprocess.run([sys.executable, "-m", "spon.cli", "-q", *args], capture_output=True, text=True, env=env, timeout=240, cwd=root / cid)
        after = sorted(p.name for p in shared.iterdir())
        written = [x for x in after if x not in before and not x.endswith((".db", ".db-journal"))]  # a registry lookup may create an empty sqlite file (and its journal)
        return cid, (p.returncode, p.stderr, out.exists(), written, list((root / cid).iterdir()))

    with ThreadPoolExecutor(4) as ex:
        return dict(ex.map(one, CASES))


@pytest.mark.parametrize("cid,argv,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input(outcomes, cid, argv, expected):
    rc, stderr, out_exists, written, in_cwd = outcomes[cid]
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("spon: error:")]
    assert rc == 2, stderr[-2000:]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert expected in errors[0], errors[0]
    assert not out_exists, "out dir was created"
    assert not written and not [p for p in in_cwd if p.name != "out"], (written, in_cwd)
