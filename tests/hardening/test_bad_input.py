"""Bad input through the real CLI (`python -m spon.cli ...` subprocesses): every case exits 2 with
one `spon: error:` line naming the problem, and writes nothing (the out dir stays absent).
Cases run concurrently (a few processes at a time) in one module fixture."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from pipeline_helpers import free_port
from spon.assets import assets_root
from spon.format import ALPHA_FILE, SIDECAR, format_for

pytestmark = pytest.mark.slow  # services / subprocesses: not in the fast tier

REPO = Path(__file__).resolve().parents[2]
ASSETS = assets_root()
STORIES = ASSETS / "models" / "stories260K"
SAMPLE = str(ASSETS / "data" / "tinystories" / "sample.txt")

# (id, argv with {T} = case's tmp dir and {OUT} = the out dir that must stay absent, expected substring)
RUN = ["run", "--out", "{OUT}", "--work-dir", "{OUT}/work", "--tracking-uri", "sqlite:///{T}/mlflow.db", "--store", "{T}/store"]
CAL = ["calibrate", "--out", "{OUT}"]
SWEEP = ["sweep", "--sparsities", "0.3,0.5", "--out", "{OUT}", "--work-dir", "{OUT}/work", "--tracking-uri", "sqlite:///{T}/sweep.db",
         "--store", "{T}/store"]
# A sweep whose registry and store would lie in the out dir: out staying absent shows nothing was run, registered or stored.
SWEEP_IN_OUT = ["sweep", "--out", "{OUT}", "--work-dir", "{OUT}/work", "--tracking-uri", "sqlite:///{OUT}/sweep.db", "--store", "{OUT}/store"]
PPL = ["ppl", str(STORIES), "--eval-text", SAMPLE]
FUSE = ["fuse", "--calib", "{T}/fakecal", "--alpha", "{T}/goodalpha/alpha.safetensors"]
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
    # item 9: non-UTF-8 or binary text files, at every entry point that reads one
    ("eval-text-binary", RUN + ["--eval-text", "{T}/binary.txt"], "binary.txt is binary, not text (NUL byte at offset 2)"),
    ("eval-text-latin1", RUN + ["--eval-text", "{T}/latin1.txt"], "latin1.txt is not UTF-8 text (invalid byte 0xe9 at offset 3)"),
    ("eval-text-latin1-in-process", RUN + ["--in-process", "--eval-text", "{T}/latin1.txt"], "latin1.txt is not UTF-8"),
    ("calib-file-binary", CAL + ["--calib-source", "text", "--calib-files", "{T}/binary.txt"], "calibration data file"),
    ("calib-file-latin1-run", RUN + ["--calib-source", "text", "--calib-files", "{T}/latin1.txt"], "latin1.txt is not UTF-8"),
    ("config-binary", RUN + ["--config", "{T}/binary.yaml"], "config file"),
    ("ppl-eval-text-latin1", ["ppl", str(STORIES), "--eval-text", "{T}/latin1.txt"], "latin1.txt is not UTF-8"),
    ("ppl-eval-text-empty", ["ppl", str(STORIES), "--eval-text", "{T}/empty.txt"], "eval text is empty"),
    # item 9: numbers that crashed deep inside
    ("ppl-window-one", PPL + ["--window", "1"], "--window must be >= 2"),
    ("ppl-stride-over-window", PPL + ["--window", "64", "--stride", "128"], "--stride must be in [1, --window 64]"),
    ("run-stride-over-window", RUN + ["--eval-text", SAMPLE, "--window", "64", "--stride", "128"], "--stride must be in"),
    ("generate-zero-tokens", ["generate", "{T}/fakefused", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    ("generate-negative-tokens", ["generate", "{T}/fakefused", "--prompt", "hi", "--max-new-tokens", "-5"], "--max-new-tokens must be >= 1, got -5"),
    ("generate-not-fused", ["generate", str(STORIES), "--prompt", "hi"], "is not a spon model: no spon.json"),
    # item 9: directories that are not models, broken weights
    ("ppl-not-a-model-empty-dir", ["ppl", "{T}/store-empty", "--eval-text", SAMPLE], "store-empty is not a model directory: it has no config.json"),
    ("ppl-not-a-model-config", ["ppl", "{T}/badconfig", "--eval-text", SAMPLE], "is not a usable model config"),
    ("model-truncated", CAL + ["--model", "{T}/truncated"], "model.safetensors: truncated"),
    ("model-zero-byte", CAL + ["--model", "{T}/zerobyte"], "model.safetensors: the file is empty (0 bytes)"),
    ("model-is-weights-file", CAL + ["--model", "{T}/zerobyte/model.safetensors"], "is a file, not a model directory"),
    ("run-model-truncated", RUN + ["--model", "{T}/truncated"], "model.safetensors: truncated"),
    ("ppl-model-truncated", ["ppl", "{T}/truncated", "--eval-text", SAMPLE], "model.safetensors: truncated"),
    ("fuse-corrupt-alpha", FUSE[:3] + ["--alpha", "{T}/badalpha/alpha.safetensors", "--out", "{OUT}"], "cannot read alpha file"),
    ("fuse-calib-not-calibrated", ["fuse", "--calib", "{T}/store-empty", "--alpha", "{T}/goodalpha/alpha.safetensors", "--out", "{OUT}"],
     "has no calibration.safetensors"),
    ("distill-calib-not-calibrated", ["distill", "--calib", "{T}/store-empty", "--out", "{OUT}"], "has no calibration.safetensors"),
    # item 9: --out that is an existing file or read-only
    ("eval-out-file", ["eval", "{T}/fakefused", "--out", "{T}/file.out"], "file.out is an existing file, not a directory"),
    ("fuse-out-file", FUSE + ["--out", "{T}/file.out"], "file.out is an existing file, not a directory"),
    ("run-out-file", RUN + ["--out", "{T}/file.out"], "file.out is an existing file, not a directory"),
    ("run-in-process-out-file", ["run", "--in-process", "--out", "{T}/file.out"], "file.out is an existing file"),
    ("calibrate-out-read-only", CAL + ["--out", "{T}/readonly/out"], "readonly is read-only"),
    ("run-out-read-only", RUN + ["--out", "{T}/readonly/out"], "readonly is read-only"),
    ("eval-out-read-only", ["eval", "{T}/fakefused", "--out", "{T}/readonly/out"], "readonly is read-only"),
    # item 9: devices
    ("device-gpu", RUN + ["--device", "gpu"], "unknown device 'gpu'"),
    ("calibrate-device-gpu", CAL + ["--device", "gpu"], "unknown device 'gpu'"),
    ("ppl-device-gpu", PPL + ["--device", "gpu"], "unknown device 'gpu'"),
    ("eval-device-gpu", ["eval", "{T}/fakefused", "--out", "{OUT}", "--device", "gpu"], "unknown device 'gpu'"),
    *([("device-cuda-cpu-torch", CAL + ["--device", "cuda"], "--device cuda:"),
       ("run-device-cuda-cpu-torch", RUN + ["--device", "cuda"], "--device cuda:")] if not torch.cuda.is_available() else []),
    # item 9: kernels/bench.py arguments
    ("bench-shapes", ["bench", "--shapes", "abc"], "invalid shape 'abc'"),
    ("bench-sparsities", ["bench", "--sparsities", "1.5"], "sparsity 1.5 is not in [0, 1)"),
    ("bench-batches-zero", ["bench", "--batches", "0"], "--batches: 0 must be >= 1"),
    # 8(d): every input checked before the first stage
    ("run-model-no-config", RUN + ["--model", "{T}/store-empty"], "is not a model directory"),
    ("run-in-process-model-no-config", RUN + ["--in-process", "--model", "{T}/store-empty"], "is not a model directory"),
    # 8(e): sequence lengths beyond the model's context
    ("run-window-over-context", RUN + ["--eval-text", SAMPLE, "--window", "2048", "--stride", "256"],
     "2048 exceeds the model's max_position_embeddings 512"),
    ("run-window-over-context-no-eval-text", RUN + ["--window", "2048"], "2048 exceeds the model's max_position_embeddings 512"),
    ("calib-len-over-context", CAL + ["--calib-len", "700"], "--calib-len (calibration.block_len) 700 exceeds the model's max_position_embeddings 512"),
    ("run-calib-len-over-context", RUN + ["--calib-len", "700"], "700 exceeds the model's max_position_embeddings 512"),
    ("run-in-process-calib-len-over-context", RUN + ["--in-process", "--calib-len", "700"], "700 exceeds"),
    ("ppl-window-over-context", PPL + ["--window", "2048"], "--window 2048 exceeds the model's max_position_embeddings 512"),
    ("generate-beyond-context", ["generate", "{T}/fakefused", "--prompt", "hi", "--max-new-tokens", "5000"], "--max-new-tokens 5000 exceeds"),
    # 8(f): an empty model name is not the embedded default
    ("model-empty-run", RUN + ["--model", ""], "empty model name"),
    ("model-empty-calibrate", CAL + ["--model", ""], "empty model name"),
    ("model-empty-config", RUN + ["--config", "{T}/model_empty.json"], "empty model name"),
    ("model-empty-sweep", SWEEP_IN_OUT + ["--model", ""], "empty model name"),
    # 8(g): every sweep level before any level runs (registry and store would be created in OUT)
    ("sweep-level-out-of-range", SWEEP_IN_OUT + ["--sparsities", "0.5,1.5"], "--sparsities: 1.5 is not a sparsity in [0, 1)"),
    ("sweep-level-negative", SWEEP_IN_OUT + ["--sparsities=-0.1,0.5"], "-0.1 is not a sparsity"),
    ("sweep-level-nan", SWEEP_IN_OUT + ["--sparsities", "0.5,nan"], "nan is not a sparsity"),
    ("sweep-level-duplicate", SWEEP_IN_OUT + ["--sparsities", "0.5,0.3,0.5"], "0.5 and 0.5 are the same level (s0.50)"),
    ("sweep-level-same-dir", SWEEP_IN_OUT + ["--sparsities", "0.501,0.502"], "0.501 and 0.502 are the same level (s0.50)"),
    ("sweep-levels-empty", SWEEP_IN_OUT + ["--sparsities", ""], "no sparsity levels"),
    ("sweep-level-empty-item", SWEEP_IN_OUT + ["--sparsities", "0.3,,0.5"], "empty item"),
    ("sweep-level-not-number", SWEEP_IN_OUT + ["--sparsities", "0.3,abc"], "'abc' is not a number"),
    # issue #22 items 2-4: a fused checkpoint's sidecar and alpha are validated by every load path
    ("generate-tau-nan", ["generate", "{T}/fused-tau-nan", "--prompt", "hi"], "a threshold is a finite number >= 0"),
    ("ppl-tau-negative", ["ppl", "{T}/fused-tau-negative", "--eval-text", SAMPLE], "threshold 0.q is -0.5"),
    ("eval-tau-true", ["eval", "{T}/fused-tau-true", "--out", "{OUT}"], "threshold 0.q is True, not a number"),
    ("generate-tau-missing-layer", ["generate", "{T}/fused-tau-missing", "--prompt", "hi"], "thresholds has no entry for 4.q"),
    ("ppl-no-thresholds", ["ppl", "{T}/fused-no-thresholds", "--eval-text", SAMPLE], "it has no 'thresholds'"),
    ("ppl-bias-flag-off", ["ppl", "{T}/fused-bias-off", "--eval-text", SAMPLE], "has no bias"),
    ("generate-bias-flag-off", ["generate", "{T}/fused-bias-off", "--prompt", "hi"], "has no bias"),
    ("eval-alpha-shape", ["eval", "{T}/fused-alpha-shape", "--out", "{OUT}"], "alpha 0.q has shape [8]"),
    ("ppl-alpha-nan", ["ppl", "{T}/fused-alpha-nan", "--eval-text", SAMPLE], "alpha 1.q holds NaN or inf"),
    # issue #22 item 5: pipeline settings checked before the first stage (no Prefect traceback, no retry loop)
    ("run-store-s3-no-bucket", RUN + ["--store", "s3://"], "--store 's3://' names no bucket"),
    ("run-store-s3-empty-bucket", RUN + ["--store", "s3:///prefix"], "--store 's3:///prefix' names no bucket"),
    ("run-store-existing-file", RUN + ["--store", "{T}/file.out"], "file.out is an existing file, not a directory"),
    ("run-store-proc", RUN + ["--store", "/proc/x"], "--store /proc/x: /proc is read-only"),
    ("run-tracking-garbage", RUN + ["--tracking-uri", "garbage"], "--tracking-uri 'garbage' is not a tracking URI"),
    ("run-experiment-empty", RUN + ["--experiment", ""], "--experiment '': an MLflow experiment name is a non-empty line"),
    ("run-lm-eval-unknown-task", RUN + ["--lm-eval-tasks", "nope_task"], "--lm-eval-tasks: unknown task(s) nope_task"),
    ("distill-calib-seed-huge", ["distill", "--calib", "{T}/fakecal", "--out", "{OUT}", "--calib-seed", "1180591620717411303424"],
     "a seed must fit in 64 bits"),
    ("models-fetch-empty", ["models", "--fetch", ""], "--fetch: empty model name"),
    ("model-dir-named-gguf", CAL + ["--model", "{T}/dir.gguf"], "is a directory, not a GGUF file"),
    ("run-alpha-targets-not-sparsified", RUN + ["--in-process", "--targets", "q,k", "--alpha-targets", "down"],
     "distill.targets (--alpha-targets) down not among sparsity.targets (--targets) q,k"),
    ("distill-alpha-targets-not-calibrated", ["distill", "--calib", "{T}/fakecal", "--out", "{OUT}", "--alpha-targets", "down"],
     "/fakecal sparsifies only q; alpha is trained only on sparsified projections"),
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
        num_key_value_heads=1, max_position_embeddings=256))  # holds the default calibration.block_len (128)
    small.save_pretrained(t / "tokmismatch")
    tok.save_pretrained(t / "tokmismatch")


def _model_copies(t: Path) -> None:
    """Copies of stories260K with broken parts, a fake calibration dir, alpha dirs and a fused-looking dir."""
    import shutil

    from safetensors.torch import save_file

    def copy(name):
        shutil.copytree(STORIES, t / name, copy_function=shutil.copyfile)  # the assets are read-only
        return t / name

    w = copy("truncated") / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    (copy("zerobyte") / "model.safetensors").write_bytes(b"")
    (copy("badconfig") / "config.json").write_text(json.dumps({"hidden_size": 64}))
    # fused-looking: stories260K (no biases) with a well-formed sidecar for q in its 5 layers
    side = {"format": format_for("magnitude"), "targets": ["q"], "thresholds": {f"{i}.q": 0.1 for i in range(5)},
            "fused_in_checkpoint": {f"{i}.q": False for i in range(5)}}
    alpha = {f"{i}.q": torch.zeros(64) for i in range(5)}
    tampered = {"fakefused": (side, alpha),  # item 2-4 of issue #22: every reader validates the checkpoint
                "fused-tau-nan": ({**side, "thresholds": {**side["thresholds"], "0.q": float("nan")}}, alpha),
                "fused-tau-negative": ({**side, "thresholds": {**side["thresholds"], "0.q": -0.5}}, alpha),
                "fused-tau-true": ({**side, "thresholds": {**side["thresholds"], "0.q": True}}, alpha),
                "fused-tau-missing": ({**side, "thresholds": {f"{i}.q": 0.1 for i in range(4)}}, alpha),
                "fused-no-thresholds": ({k: v for k, v in side.items() if k != "thresholds"}, alpha),
                "fused-bias-off": ({**side, "fused_in_checkpoint": {f"{i}.q": True for i in range(5)}}, alpha),
                "fused-alpha-shape": (side, {**alpha, "0.q": torch.zeros(8)}),
                "fused-alpha-nan": (side, {**alpha, "1.q": torch.full((64,), float("nan"))})}
    for name, (meta, tensors) in tampered.items():
        d = copy(name)
        (d / SIDECAR).write_text(json.dumps(meta))
        save_file(tensors, str(d / ALPHA_FILE))
    (t / "fakecal").mkdir()
    save_file({"train": torch.zeros(4, 8, dtype=torch.long), "heldout": torch.zeros(1, 8, dtype=torch.long)},
              str(t / "fakecal" / "calibration.safetensors"))
    (t / "fakecal" / "thresholds.json").write_text(json.dumps({"thresholds": {}, "sparsities": {}, "targets": ["q"], "config": {}}))
    for name in ("goodalpha", "badalpha"):
        (t / name).mkdir()
        (t / name / "distill.json").write_text("{}")
    save_file({"0.q": torch.zeros(64)}, str(t / "goodalpha" / "alpha.safetensors"))
    (t / "badalpha" / "alpha.safetensors").write_bytes(b"this is not a safetensors file at all" * 4)


def _inputs(t: Path) -> None:
    t.mkdir(parents=True, exist_ok=True)
    files = {"unknown.json": {"bogus": 1}, "nested.json": {"distill": {"stepz": 3}}, "wrongtype.json": {"distill": {"steps": "many"}},
             "section.json": {"sparsity": "high"}, "targets_str.json": {"sparsity": {"targets": 5}}, "list.json": [1, 2]}
    for name, data in files.items():
        (t / name).write_text(json.dumps(data))
    (t / "bad.yaml").write_text("distill: [unclosed\n")
    (t / "bad.json").write_text("{not json")
    (t / "empty.txt").write_text("")
    (t / "binary.txt").write_bytes(b"PK\x00\x03\x04 binary")
    (t / "latin1.txt").write_bytes("Caf\u00e9 au lait, once upon a time.".encode("latin-1"))
    (t / "binary.yaml").write_bytes(b"\xff\xfed\x00i\x00")
    (t / "model_empty.json").write_text(json.dumps({"model": ""}))
    (t / "file.out").write_text("an existing file, not a directory\n")
    (t / "readonly").mkdir()
    (t / "readonly").chmod(0o555)
    (t / "short.txt").write_text("Once upon a time.")
    for name, path in (("store-dotdot", "../x"), ("store-abs", "/abs")):
        (t / name).mkdir()
        (t / name / "manifest.json").write_text(json.dumps({"format": "spon-store/1", "files": [{"path": path, "size": 1, "sha256": "0" * 64}]}))
    (t / "store-empty").mkdir()
    (t / "dir.gguf").mkdir()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    shared = root / "shared"
    _inputs(shared)
    _tiny_models(shared)
    _model_copies(shared)
    hashes = _hashes(shared)
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
        results = dict(ex.map(one, CASES))
    results["_shared_unchanged"] = (hashes, _hashes(shared))
    return results


def _hashes(root: Path) -> dict[str, tuple[str, int]]:
    """Content hash and mtime of every input file (a registry lookup may add sqlite files: not inputs)."""
    return {str(f.relative_to(root)): (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns)
            for f in sorted(root.rglob("*")) if f.is_file() and not f.name.endswith((".db", ".db-journal"))}


def test_inputs_unchanged(outcomes):
    """No refused command changed any input (an existing --out file included)."""
    before, after = outcomes["_shared_unchanged"]
    assert {k: v for k, v in after.items() if k in before} == before
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
