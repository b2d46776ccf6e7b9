"""The native op's threads (the OpenMP team, or its own pool): concurrent callers, a forked child (whose threads are gone),
thread counts changing between calls; every result bit-identical to the 1-thread one."""
import os
import threading

import pytest
import torch

from helpers import require_native
from spon.kernels import cpu_native as native


@pytest.fixture
def op():
    require_native()
    return native.native_op()


def _case():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2048, generator=g).to(torch.bfloat16)
    wt = (torch.randn(2048, 2048, generator=g) / 45).to(torch.bfloat16)  # 8 MiB: the threaded split
    return x, wt


def _serial(op, x, wt):
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return op(x, wt, None, [0.3], [wt.shape[1]], None)
    finally:
        torch.set_num_threads(prev)


def test_concurrent_callers_and_changing_thread_counts(op):
    x, wt = _case()
    want = _serial(op, x, wt)
    prev = torch.get_num_threads()
    errors = []

    def call(n):
        try:
            for _ in range(n):
                if not torch.equal(op(x, wt, None, [0.3], [2048], None), want):
                    errors.append("mismatch")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    try:
        for threads in (2, 3, 1, 2):
            torch.set_num_threads(threads)
            ts = [threading.Thread(target=call, args=(20,)) for _ in range(3)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(timeout=60)
            assert not any(t.is_alive() for t in ts), "a call never returned"
    finally:
        torch.set_num_threads(prev)
    assert not errors, errors[:3]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_computes_without_the_pool_threads(op):
    x, wt = _case()
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        want = op(x, wt, None, [0.3], [2048], None)  # the pool's worker exists in this process now
        pid = os.fork()
        if pid == 0:  # the child has no worker thread: the caller must take every chunk itself
            ok = torch.equal(op(x, wt, None, [0.3], [2048], None), want)
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
    finally:
        torch.set_num_threads(prev)
    assert os.waitstatus_to_exitcode(status) == 0
    assert torch.equal(want, _serial(op, x, wt))


# Which threads run the chunks is chosen once per process (SPON_CPU_POOL), so each choice runs in a
# fresh one: the row split and the column split, 2 threads against 1, then again in a forked child.
_CHOICE_CHECK = """
import os, torch
from spon.kernels import cpu_native
op = cpu_native.native_op()
g = torch.Generator().manual_seed(0)
cases = []
for K, N in ((2048, 2048), (8192, 1024)):  # column split; row split (K >= 2N)
    x = torch.randn(1, K, generator=g).to(torch.bfloat16)
    cases.append((x, (torch.randn(K, N, generator=g) / 45).to(torch.bfloat16)))
torch.set_num_threads(1)
want = [op(x, wt, None, [0.3], [wt.shape[1]], None) for x, wt in cases]
torch.set_num_threads(2)
for _ in range(50):
    assert all(torch.equal(op(x, wt, None, [0.3], [wt.shape[1]], None), w) for (x, wt), w in zip(cases, want))
pid = os.fork()
if pid == 0:  # no threads here: libgomp's team would wait for them forever
    ok = all(torch.equal(op(x, wt, None, [0.3], [wt.shape[1]], None), w) for (x, wt), w in zip(cases, want))
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
print("ok")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize(  # the fast tier runs the one a fork would hang without the atfork handler
    "choice", [pytest.param("auto", marks=pytest.mark.slow), "openmp", pytest.param("own", marks=pytest.mark.slow)]
)
def test_every_choice_of_threads_gives_the_one_thread_result_and_survives_fork(choice, op):
    import subprocess
    import sys

    env = {**os.environ, "SPON_CPU_POOL": choice}
    r = subprocess.run([sys.executable, "-c", _CHOICE_CHECK], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
