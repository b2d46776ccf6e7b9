"""Item 8: nothing a user types destroys or silently corrupts work. Through the real CLI (subprocesses)
on a writable copy of stories260K and real stage outputs:

(a)/(h) an output directory that is, contains or lies inside an input (the model directory, --calib,
        alpha's directory, eval or calibration text, the config file) is refused by fuse, calibrate,
        distill, run (--in-process and the pipeline), eval and sweep, and nothing changes: every file
        under the work tree keeps its hash, size and mtime, and no out dir appears;
(b)     `spon distill` into a directory holding another distillation's checkpoints is refused and
        leaves that directory as it was;
and `spon distill --steps 0` works end to end: alpha = its initialisation, fused and scored.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cli_helpers import TINY, cli_env, error_lines, spon, tree_state
from spon.assets import assets_root
from spon.format import SIDECAR

pytestmark = pytest.mark.slow  # services / subprocesses: not in the fast tier

STORIES = assets_root() / "models" / "stories260K"
SAMPLE = assets_root() / "data" / "tinystories" / "sample.txt"
ENV = cli_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")

# {name} = a path of the `work` fixture; {refused} = a directory that a refused command must not create.
BASE = ["--config", "{cfg}", "--model", "{model}"]
CALIBRATE = ["calibrate", *BASE]
DISTILL = ["distill", *BASE, "--calib", "{calA}"]
FUSE = ["fuse", *BASE, "--calib", "{calA}", "--alpha", "{zero}/alpha.safetensors"]
RUN_IP = ["run", "--in-process", *BASE]
PIPE = ["--tracking-uri", "sqlite:///{refused}/mlflow.db", "--store", "{refused}/store"]
RUN = ["run", *BASE, *PIPE]
SWEEP = ["sweep", *BASE, *PIPE, "--sparsities", "0.3,0.5"]
EVAL = ["eval", "{fused}", "--variants", "dense", "--tasks", "tinystories_ppl"]

# (id, argv, expected substring of the one error line)
REFUSALS = [
    ("fuse-out-is-model", FUSE + ["--out", "{model}"], "is the model directory"),
    ("fuse-out-inside-model", FUSE + ["--out", "{model}/fused"], "lies inside the model directory"),
    ("fuse-out-contains-model", FUSE + ["--out", "{root}"], "contains the model directory"),
    ("fuse-out-is-calib", FUSE + ["--out", "{calA}"], "is the --calib directory"),
    ("fuse-out-inside-calib", FUSE + ["--out", "{calA}/fused"], "lies inside the --calib directory"),
    ("fuse-out-is-alpha-dir", FUSE + ["--out", "{zero}"], "is the alpha directory"),
    ("fuse-out-inside-alpha-dir", FUSE + ["--out", "{zero}/fused"], "lies inside the alpha directory"),
    ("fuse-out-contains-config", FUSE + ["--out", "{cfgdir}"], "contains the config file"),
    ("calibrate-out-is-model", CALIBRATE + ["--out", "{model}"], "is the model directory"),
    ("calibrate-out-inside-model", CALIBRATE + ["--out", "{model}/cal"], "lies inside the model directory"),
    ("calibrate-out-contains-calib-file", CALIBRATE + ["--calib-source", "text", "--calib-files", "{data}/sample.txt", "--out", "{data}"],
     "contains the calibration file"),
    ("calibrate-out-contains-config", CALIBRATE + ["--out", "{root}/cfg"], "contains the config file"),
    ("distill-out-is-calib", DISTILL + ["--out", "{calA}"], "is the --calib directory"),
    ("distill-out-inside-calib", DISTILL + ["--out", "{calA}/alpha"], "lies inside the --calib directory"),
    ("distill-out-inside-model", DISTILL + ["--out", "{model}/alpha"], "lies inside the model directory"),
    ("distill-out-contains-inputs", DISTILL + ["--out", "{root}"], "contains the model directory"),
    ("run-in-process-out-is-model", RUN_IP + ["--out", "{model}"], "is the model directory"),
    ("run-in-process-out-inside-model", RUN_IP + ["--out", "{model}/run"], "lies inside the model directory"),
    ("run-in-process-out-contains-eval-text", RUN_IP + ["--eval-text", "{data}/sample.txt", "--out", "{data}"], "contains the eval text file"),
    ("run-out-is-model", RUN + ["--out", "{model}"], "is the model directory"),
    ("run-out-inside-model", RUN + ["--out", "{model}/run"], "lies inside the model directory"),
    ("run-out-contains-eval-text", RUN + ["--eval-text", "{data}/sample.txt", "--out", "{data}"], "contains the eval text file"),
    ("run-work-dir-is-model", RUN + ["--out", "{refused}/run", "--work-dir", "{model}"], "is the model directory"),
    ("eval-out-is-model", EVAL + ["--out", "{fused}"], "is the model directory"),
    ("eval-out-inside-model", EVAL + ["--out", "{fused}/report"], "lies inside the model directory"),
    ("sweep-out-is-model", SWEEP + ["--out", "{model}"], "is the model directory"),
    ("sweep-out-inside-model", SWEEP + ["--out", "{model}/sweep"], "lies inside the model directory"),
]


def _fill(argv: list[str], paths: dict[str, Path]) -> list[str]:
    return [a.format(**{k: str(v) for k, v in paths.items()}) for a in argv]


def _ok(p, what: str) -> None:
    assert p.returncode == 0, f"{what}: {p.stderr[-3000:]}"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    """A writable model copy, text and config in their own dirs, two calibrations (sparsity 0.3
    and 0.6), a 2-step distillation with checkpoints, a 0-step one, and the latter fused."""
    root = tmp_path_factory.mktemp("nodestroy")
    paths = {"root": root, "model": root / "model", "data": root / "data", "cfgdir": root / "cfg", "calA": root / "calA",
             "calB": root / "calB", "ckpt": root / "ckpt", "zero": root / "zero", "fused": root / "fused",
             "refused": root / "refused"}
    shutil.copytree(STORIES, paths["model"], copy_function=shutil.copyfile)  # the shared assets are read-only
    paths["data"].mkdir()
    shutil.copyfile(SAMPLE, paths["data"] / "sample.txt")
    paths["cfgdir"].mkdir()
    paths["cfg"] = paths["cfgdir"] / "tiny.json"
    paths["cfg"].write_text(json.dumps(TINY))

    def run(argv):
        return spon(["-q", *_fill(argv, paths)], ENV)

    with ThreadPoolExecutor(2) as ex:
        cal = list(ex.map(run, [CALIBRATE + ["--sparsity", "0.3", "--out", "{calA}"],
                                CALIBRATE + ["--sparsity", "0.6", "--out", "{calB}"]]))
    for p in cal:
        _ok(p, "calibrate")
    with ThreadPoolExecutor(2) as ex:
        ckpt, zero = ex.map(run, [DISTILL + ["--out", "{ckpt}", "--steps", "2", "--checkpoint-every", "1"],
                                  DISTILL + ["--out", "{zero}", "--steps", "0"]])
    _ok(ckpt, "distill --steps 2")
    _ok(zero, "distill --steps 0")
    _ok(run(FUSE + ["--out", "{fused}"]), "fuse of the 0-step alpha")
    return paths


@pytest.fixture(scope="module")
def refusals(work):
    """Every refusal, a few at a time, with the state of the whole work tree before and after."""
    before = tree_state(work["root"])

    def one(case):
        cid, argv, _ = case
        return cid, spon(["-q", *_fill(argv, work)], ENV, timeout=300)

    with ThreadPoolExecutor(4) as ex:
        results = dict(ex.map(one, REFUSALS))
    return results, before, tree_state(work["root"])


@pytest.mark.parametrize("cid,argv,expected", REFUSALS, ids=[c[0] for c in REFUSALS])
def test_out_dir_overlapping_an_input_is_refused(refusals, work, cid, argv, expected):
    results, before, after = refusals
    p = results[cid]
    errors = error_lines(p)
    assert p.returncode == 2, p.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert expected in errors[0] and "refusing" in errors[0], errors[0]
    out = Path(_fill([argv[argv.index("--out") + 1]], work)[0])
    assert out.exists() == (out in work.values()), f"{out} was created"
    assert not work["refused"].exists(), "a refused pipeline command created its registry or store"


def test_refusals_changed_nothing(refusals, work):
    """Every file of the model copy, the text, the config, both calibrations, both alpha dirs and
    the fused model: same bytes, same mtime."""
    _, before, after = refusals
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, changed


def test_distill_refuses_another_distillations_checkpoints(work):
    """(b): `spon distill --calib B --out X` where X holds checkpoints of `--calib A`: exit 2, one
    line, and X exactly as it was (checkpoints, alpha, distill.json)."""
    ckpt = work["ckpt"]
    assert sorted(p.name for p in (ckpt / "alpha_checkpoints").iterdir()) == ["alpha_step0000001.pt", "alpha_step0000002.pt"]
    before = tree_state(ckpt)
    p = spon(["-q", *_fill(DISTILL, work)[:-1], str(work["calB"]), "--out", str(ckpt), "--steps", "2", "--checkpoint-every", "1"], ENV)
    errors = error_lines(p)
    assert p.returncode == 2, p.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "holds alpha checkpoints of another distillation" in errors[0], errors[0]
    assert tree_state(ckpt) == before


def test_distill_zero_steps_end_to_end(work):
    """`spon distill --steps 0`: alpha is its initialisation (zeros), written like any other
    distillation, fused, and scored: SPON with alpha = 0 is TEAL."""
    zero = work["zero"]
    alpha = load_file(str(zero / "alpha.safetensors"))
    assert alpha and all(float(t.abs().max()) == 0.0 for t in alpha.values())
    d = json.loads((zero / "distill.json").read_text())
    assert d["kl_history"] == [] and d["selected_step"] in (None, 0) and d["config"]["steps"] == 0
    assert not (zero / "alpha_checkpoints").exists() or not any((zero / "alpha_checkpoints").iterdir())
    sidecar = json.loads((work["fused"] / SIDECAR).read_text())
    assert sidecar["provenance"]["distill"]["steps"] == 0
    p = spon(["-q", "ppl", str(work["fused"]), "--eval-text", str(work["data"] / "sample.txt"), "--window", "128", "--stride", "128"], ENV)
    _ok(p, "ppl of the fused 0-step model")
    ppl = json.loads(p.stdout)["perplexity"][str(work["data"] / "sample.txt")]
    assert ppl["spon"]["perplexity"] == pytest.approx(ppl["teal"]["perplexity"], rel=1e-5)
