"""Public API: dispatch, custom op registration (opcheck), torch.compile, bench/script smoke."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import spon.kernels as kernels
from helpers import assert_close, make_case

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 172), (2, 3, 172), (4, 1, 172), (20, 172)])
def test_sparse_linear_dispatch_matches_reference(dtype, shape):
    # (20, 172) has > 8 rows and exercises the reference fallback.
    x, w, b = make_case(1, 172, 64, dtype, "cpu")
    x = torch.randn(shape).to(dtype)
    wt = kernels.prepare_weight(w)
    y = kernels.sparse_linear(x, wt, b, 0.6)
    assert y.shape == (*shape[:-1], 64)
    assert_close(y, kernels.sparse_linear_reference(x.float(), wt.float(), b.float(), 0.6), dtype)


def test_threshold_tensor_and_no_bias():
    x, w, _ = make_case(3, 172, 64, torch.float32, "cpu")
    wt = kernels.prepare_weight(w)
    tau = torch.tensor(0.4)
    torch.testing.assert_close(
        kernels.sparse_linear(x, wt, None, tau), kernels.sparse_linear_reference(x, wt, None, 0.4)
    )


def test_grad_falls_back_to_reference():
    x, w, b = make_case(2, 64, 32, torch.float32, "cpu")
    x.requires_grad_(True)
    wt = kernels.prepare_weight(w)
    y = kernels.sparse_linear(x, wt, b, 0.3)
    y.sum().backward()
    mask = (x.detach().abs() > 0.3).float()
    torch.testing.assert_close(x.grad, mask * wt.sum(1)[None, :])


def test_int8_api():
    x, w, b = make_case(1, 172, 64, torch.float32, "cpu")
    q, s = kernels.quantize_weight_int8(w)
    assert q.dtype == torch.int8 and q.shape == (172, 64) and s.shape == (64,)
    # quantization error is small relative to the weights
    assert (kernels.dequantize_weight_t(q, s) - w.t()).abs().max() <= s.max() / 2 + 1e-6
    y = kernels.sparse_linear_int8(x, q, s, b, 0.5)
    torch.testing.assert_close(y, kernels.sparse_linear_int8_reference(x, q, s, b, 0.5))


@pytest.mark.parametrize("thresholds", [0.5, [0.1, 0.5, 2.0]])
def test_fused_api(thresholds):
    sizes = [64, 17, 172]
    x = torch.randn(2, 1, 172)
    ws = [torch.randn(n, 172) / 13 for n in sizes]
    bs = [torch.randn(64), None, torch.randn(172)]
    wt = kernels.prepare_weight_fused(ws)
    outs = kernels.sparse_linear_fused(x, wt, sizes, bs, thresholds)
    taus = thresholds if isinstance(thresholds, list) else [thresholds] * 3
    for y, w, b, t in zip(outs, ws, bs, taus):
        torch.testing.assert_close(y, kernels.sparse_linear_reference(x, w.t(), b, t), atol=1e-5, rtol=1e-5)


def test_sparse_linear_module():
    lin = torch.nn.Linear(172, 64)
    m = kernels.SparseGemvLinear.from_linear(lin, threshold=0.5)
    x = torch.randn(1, 172)
    with torch.no_grad():
        torch.testing.assert_close(m(x), lin(x * (x.abs() > 0.5)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("M", [1, 5, 12])
@pytest.mark.parametrize("int8", [False, True])
def test_opcheck(M, int8):
    x, w, b = make_case(M, 96, 40, torch.float32, "cpu")
    if int8:
        wt, s = kernels.quantize_weight_int8(w)
    else:
        wt, s = kernels.prepare_weight(w), None
    taus = torch.tensor([0.5, 0.2])
    torch.library.opcheck(torch.ops.spon_kernels.sparse_gemv.default, (x, wt, b, taus, [30, 10], s))


def test_torch_compile_fullgraph_cpu():
    x, w, b = make_case(1, 172, 64, torch.float32, "cpu")
    wt = kernels.prepare_weight(w)

    def f(x):
        return torch.relu(kernels.sparse_linear(x, wt, b, 0.5)) * 2

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(cf(x), f(x))


@pytest.mark.slow
def test_bench_help_imports():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, "-m", "kernels.bench", "--help"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert "--device" in r.stdout


def test_bench_gpu_script_syntax():
    r = subprocess.run(["bash", "-n", str(ROOT / "kernels" / "bench_gpu.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_imports_and_cpu_path_without_triton():
    # A bare machine may lack triton: kernels must import and the CPU path work.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, kernels\n"
        "assert not kernels.HAS_TRITON\n"
        "x = torch.randn(1, 64); w = torch.randn(32, 64)\n"
        "y = kernels.sparse_linear(x, kernels.prepare_weight(w), None, 0.5)\n"
        "torch.testing.assert_close(y, torch.nn.functional.linear(x * (x.abs() > 0.5), w))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
