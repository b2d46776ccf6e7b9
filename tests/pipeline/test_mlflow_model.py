"""The registry serves what it holds: every registered version is an MLflow Model (pyfunc from
code over the fused checkpoint). Against a real `mlflow server` (artifacts on moto S3): the
pipeline with tiny settings, then the champion loaded by `mlflow.pyfunc.load_model` in a fresh
process, `mlflow models serve` answering HTTP (a batch, bad requests), the run's dataset inputs,
the model card, the quantized variants, and a version registered the old way (bare artifacts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline_helpers import BIN, REPO, free_port, stop, tiny_config

NAME = "spon-serve-test"  # its own registry entry: test_flow_e2e's champion gate is not disturbed
PROMPTS = ["Once upon a time", "The little dog", "Lily and Ben went to the park"]
FIGURES: dict = {}  # the measured numbers, printed at the end of the module (pytest -s)


@pytest.fixture(scope="module")
def settings(mlflow_server, s3_endpoint, work_dir):
    from pipeline_helpers import BUCKET

    from spon.runtime.settings import PipelineSettings

    return PipelineSettings(work_dir=str(work_dir), tracking_uri=mlflow_server, store=f"s3://{BUCKET}/models",
                            registered_model=NAME, quantize=["int8", "int4"])


@pytest.fixture(scope="module")
def result(prefect_harness, settings, tmp_path_factory, sample_txt):
    from spon.flows.pipeline import spon_pipeline

    t0 = time.perf_counter()
    out = spon_pipeline(tiny_config(tmp_path_factory.mktemp("serve-run"), sample_txt, quality=True), settings)
    FIGURES["pipeline_s"] = round(time.perf_counter() - t0, 1)
    assert out["champion"] is True, out["gate"]
    return out


@pytest.fixture(scope="module")
def pulled(result, settings, tmp_path_factory):
    """The champion pulled from the model store, and `spon generate`'s text for every prompt."""
    from spon.cli import main

    dest = tmp_path_factory.mktemp("pulled") / "m"
    os.environ["MLFLOW_TRACKING_URI"] = settings.tracking_uri
    try:
        assert main(["-q", "pull", f"models:/{NAME}@champion", "--out", str(dest)]) == 0
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    return dest


def spon_generate(model_dir: Path, prompt: str, n: int = 24) -> tuple[str, str, float]:
    """`spon generate` as a user runs it: its text, its timing line, its wall time."""
    t0 = time.perf_counter()
    r = subprocess.run([str(BIN / "spon"), "-q", "generate", str(model_dir), "--prompt", prompt, "--max-new-tokens", str(n)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip(), r.stderr.strip().splitlines()[-1], time.perf_counter() - t0


@pytest.fixture(scope="module")
def reference(pulled):
    """spon generate's greedy text per prompt: the first timed as a subprocess, the others in-process."""
    from spon.cli import main

    text, line, wall = spon_generate(pulled, PROMPTS[0])
    FIGURES["spon_generate_24_tokens"] = {"process_wall_s": round(wall, 2), "reported": line}
    refs = [text]
    import contextlib
    import io

    for p in PROMPTS[1:]:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["-q", "generate", str(pulled), "--prompt", p, "--max-new-tokens", "24"]) == 0
        refs.append(buf.getvalue().strip())
    return refs


pytestmark = pytest.mark.slow  # services, subprocesses


def test_registry_shows_an_mlflow_model_with_lineage_and_card(result, settings, sample_txt):
    from mlflow import MlflowClient

    c = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    run = c.get_run(result["mlflow_run_id"])
    # lineage: the calibration set and the evaluation text as dataset inputs (name, digest, source)
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert "calibration-samples" in inputs and "sample.txt" in inputs, sorted(inputs)
    ctx = {n: {t.key: t.value for t in d.tags}["mlflow.data.context"] for n, d in inputs.items()}
    assert ctx["calibration-samples"] == "calibration" and ctx["sample.txt"] == "evaluation"
    import hashlib

    assert inputs["sample.txt"].dataset.digest == hashlib.sha256(sample_txt.read_bytes()).hexdigest()[:36]
    assert json.loads(inputs["sample.txt"].dataset.source)["uri"] == str(sample_txt.resolve())

    # the version's source is an MLflow Model: MLmodel, the code file, the checkpoint inside
    mv = c.get_model_version_by_alias(NAME, "champion")
    assert mv.version == result["version"] and mv.source.endswith("/fused_model")
    names = {Path(f.path).name for f in c.list_artifacts(run.info.run_id, "fused_model")}
    assert {"MLmodel", "mlflow_model.py", "requirements.txt", "input_example.json", "artifacts"} <= names, names
    from mlflow.models import Model

    mlmodel = Model.load(c.download_artifacts(run.info.run_id, "fused_model/MLmodel"))
    pyfunc = mlmodel.flavors["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "fused_model" in pyfunc["artifacts"]
    assert {p.name for p in mlmodel.signature.params.params} == {"max_new_tokens", "temperature", "do_sample"}
    reqs = Path(c.download_artifacts(run.info.run_id, "fused_model/requirements.txt")).read_text().split()
    import torch

    assert "spon==0.1.0" in reqs and f"torch=={torch.__version__}" in reqs
    # the checkpoint is inside the model once; the run holds no second bare copy
    ckpt = pyfunc["artifacts"]["fused_model"]["path"]
    inside = {Path(f.path).name for f in c.list_artifacts(run.info.run_id, f"fused_model/{ckpt}")}
    assert {"model.safetensors", "spon.json", "spon_alpha.safetensors"} <= inside
    assert "model.safetensors" not in names

    # the model card is the description
    desc = mv.description
    for needle in ("target sparsity | 0.60", "realized sparsity", "perplexity dense / TEAL / SPON", "Quality warnings: none",
                   f"{result['perplexity']['spon']:.3f}", run.info.run_id):
        assert needle in desc, (needle, desc)
    assert "Champion refused" not in desc


def test_pyfunc_in_a_fresh_process_gives_spon_generates_text(result, reference, settings):
    code = (
        "import sys, json\n"
        "import mlflow\n"
        "assert not any(m == 'spon' or m.startswith('spon.') for m in sys.modules), 'spon imported before the load'\n"
        f"m = mlflow.pyfunc.load_model('models:/{NAME}@champion')\n"
        "inner = m.unwrap_python_model()\n"
        "from spon.sparse import sparse_linears\n"
        "mods = sparse_linears(inner.model)\n"
        "assert inner.kernels and mods and all(x.mode == 'spon' and x.kernel is not None for x in mods)\n"
        "print(json.dumps(m.predict(['Once upon a time'])))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": settings.tracking_uri, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd="/")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [reference[0]]


def post(url: str, body: bytes, timeout: float = 120) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def served(result, settings, tmp_path_factory):
    """`mlflow models serve -m models:/NAME@champion --env-manager local` on 127.0.0.1."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": settings.tracking_uri, "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
           "TRITON_INTERPRET": "1"}
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion",
                                 "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
    url = f"http://127.0.0.1:{port}/invocations"
    try:
        body = json.dumps({"inputs": [PROMPTS[0]]}).encode()
        end = time.time() + 240
        while True:  # time to the first answer: download, load, first generation
            if proc.poll() is not None or time.time() > end:
                raise RuntimeError(f"mlflow models serve did not answer:\n{log_path.read_text()[-3000:]}")
            try:
                status, first = post(url, body, timeout=60)
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.25)
        FIGURES["serve_time_to_first_response_s"] = round(time.perf_counter() - t0, 2)
        assert status == 200, first
        yield url, first, log_path
    finally:
        stop(proc)


def test_served_champion_answers_batches_like_spon_generate(served, reference, pulled):
    url, first, _ = served
    assert first["predictions"] == [reference[0]]
    t0 = time.perf_counter()
    status, out = post(url, json.dumps({"inputs": PROMPTS}).encode())
    FIGURES["serve_batch_of_3_x24_tokens_s"] = round(time.perf_counter() - t0, 2)
    assert status == 200 and out["predictions"] == reference, out
    # throughput through the endpoint vs spon generate, same prompt and token count
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pulled)
    n = 24
    walls = []
    for _ in range(3):
        t0 = time.perf_counter()
        status, out = post(url, json.dumps({"inputs": [PROMPTS[0]], "params": {"max_new_tokens": n}}).encode())
        walls.append(time.perf_counter() - t0)
        assert status == 200
    new = len(tok(out["predictions"][0]).input_ids) - len(tok(PROMPTS[0]).input_ids)
    FIGURES["serve_request_24_tokens"] = {"best_wall_s": round(min(walls), 3), "new_tokens": new,
                                          "tokens_per_s": round(new / min(walls), 1)}
    sampled = post(url, json.dumps({"inputs": [PROMPTS[0]], "params": {"do_sample": True, "temperature": 0.8,
                                                                         "max_new_tokens": 8}}).encode())
    assert sampled[0] == 200 and sampled[1]["predictions"][0].startswith(PROMPTS[0])


@pytest.mark.parametrize("body,needle", [
    ({"inputs": ["Once upon a time", ""]}, "prompt 1 is empty"),
    ({"inputs": ["Once upon a time"], "params": {"max_new_tokens": 0}}, "max_new_tokens must be >= 1"),
    ({"inputs": ["Once upon a time"], "params": {"max_new_tokens": 100000}}, "context"),
    ({"inputs": ["Once upon a time"], "params": {"max_new_tokens": "many"}}, "max_new_tokens"),
    ({"inputs": [3]}, "str"),
    ({"prompts": ["Once upon a time"]}, "inputs"),
    (b"{not json", ""),
])
def test_bad_requests_get_a_4xx_with_a_message(served, body, needle):
    url, _, log_path = served
    status, out = post(url, body if isinstance(body, bytes) else json.dumps(body).encode())
    assert 400 <= status < 500, (status, out)
    assert out.get("message") and needle in out["message"], out
    assert "Traceback" not in json.dumps(out) and "stack_trace" not in out


def test_quantized_variants_load_the_same_way_still_sparse(result, settings):
    import mlflow

    from spon.quantize import quantized_weight_bytes
    from spon.sparse import sparse_linears

    assert set(result["variants"]) == {"int8", "int4"}
    mlflow.set_tracking_uri(settings.tracking_uri)
    try:
        for scheme, v in result["variants"].items():
            assert v["registered_model"] == f"{NAME}-{scheme}"
            m = mlflow.pyfunc.load_model(f"models:/{NAME}-{scheme}@candidate")
            inner = m.unwrap_python_model()
            assert inner.quantized and not inner.kernels
            mods = sparse_linears(inner.model)
            assert mods and all(x.mode == "spon" for x in mods)  # still sparse: spon mode on every projection
            fp32_bytes = sum(x.linear.in_features * x.linear.out_features * 4 for x in mods)
            assert quantized_weight_bytes(inner.model) < fp32_bytes / 2  # the weights are quantized
            text = m.predict(["Once upon a time"])[0]
            assert text.startswith("Once upon a time") and len(text) > len("Once upon a time")
            assert scheme in mlflow.MlflowClient().get_model_version(f"{NAME}-{scheme}", v["version"]).description
    finally:
        mlflow.set_tracking_uri(None)


def test_old_artifact_only_version_one_line_error_then_republish(pulled, tmp_path, capsys):
    """A version registered the old way (bare safetensors directory): one line naming `spon
    publish models:/...`; that command makes it an MLflow Model, aliases moved."""
    from mlflow import MlflowClient

    from spon.cli import main
    from spon.errors import SponError
    from spon.runtime import store, tracking
    from spon.runtime.settings import PipelineSettings

    s = PipelineSettings(tracking_uri=f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}", store=str(tmp_path / "store"),
                         registered_model="old-model")
    # what an older spon did: summary + bare checkpoint as artifacts, version source = that directory
    summary = {"model": "stories260K", "sparsity": 0.5, "protocol": "all", "perplexity": {"spon": 6.0, "teal": 7.0},
               "heldout_kl": {"teal": 0.7, "spon": 0.5}, "quality_warnings": [], "config": {}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    run = tracking.start_run(s, {}, "old", None, {})
    tracking.log_artifacts(s, run, {"": str(tmp_path / "summary.json"), "fused_model": str(pulled)})
    tracking.end_run(s, run)
    store_uri = store.push(pulled, s.resolved_store(), "old-model", run)
    v = tracking.register(s, "old-model", run, tracking.artifact_uri(s, run, "fused_model"), {"store_uri": store_uri})
    c = MlflowClient(s.tracking_uri, s.tracking_uri)
    c.set_registered_model_alias("old-model", "champion", v)
    # artifacts beside the sqlite database, not in the current directory
    assert (tmp_path / "db" / "mlartifacts").is_dir() and c.get_run(run).info.artifact_uri.startswith(
        (tmp_path / "db" / "mlartifacts").as_uri())

    with pytest.raises(SponError) as e:
        tracking.require_mlflow_model(s, "models:/old-model@champion")
    msg = str(e.value)
    assert "\n" not in msg and f"spon publish models:/old-model/{v}" in msg and "older spon" in msg

    assert main(["-q", "publish", f"models:/old-model/{v}", "--tracking-uri", s.tracking_uri,
                 "--store", s.resolved_store()]) == 0
    out = capsys.readouterr().out
    assert "mlflow models serve -m models:/old-model/2" in out
    new = tracking.require_mlflow_model(s, "models:/old-model@champion")  # alias moved to the MLflow Model
    assert str(new.version) == "2" and new.source.endswith("/mlflow_model") and new.run_id == run
    assert c.get_model_version("old-model", v).tags["republished_as"] == "2"
    # a second publish of the same reference: nothing to do
    assert main(["-q", "publish", "models:/old-model@champion", "--tracking-uri", s.tracking_uri]) == 0
    assert '"republished": false' in capsys.readouterr().out


def test_zzz_report_figures():
    print("\nserving figures:", json.dumps(FIGURES, indent=2))


def test_refused_version_says_why_in_its_description(pulled, tmp_path):
    from mlflow import MlflowClient

    from spon.runtime import tracking
    from spon.runtime.settings import PipelineSettings
    from spon.tasks.publish import publish

    s = PipelineSettings(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", store=str(tmp_path / "store"),
                         registered_model="refused-model")
    worse = {"model": "stories260K", "sparsity": 0.5, "protocol": "all", "realized_sparsity": 0.5,
             "perplexity": {"dense": 3.5, "teal": 7.0, "spon": 7.2}, "heldout_kl": {"teal": 0.6, "spon": 0.5},
             "quality_warnings": ["SPON perplexity 7.2000 is above TEAL's 7.0000 on t.txt"], "config": {}}
    run = tracking.start_run(s, {}, "r", None, {})
    tracking.end_run(s, run)
    r = publish.fn(str(pulled), run, worse, s)
    assert r["champion"] is False
    mv = MlflowClient(s.tracking_uri, s.tracking_uri).get_model_version("refused-model", r["version"])
    assert "Champion refused**: SPON perplexity 7.2000 is above TEAL's 7.0000 on t.txt" in mv.description
    assert "Quality warnings: SPON perplexity 7.2000" in mv.description and "7.200" in mv.description
    assert mv.tags["champion_refused"].startswith("SPON perplexity 7.2000")
    assert mv.source.endswith("/fused_model") and tracking.is_mlflow_model(s, mv)
