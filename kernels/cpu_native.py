"""Build and load the native CPU sparse GEMV (``csrc/cpu_sparse_gemv.cpp``).

The op, ``torch.ops.spon_cpu.sparse_gemv(x[M<=8, K], weight_t, bias,
thresholds, seg_sizes, scales, channel_thresholds=None)``, is the decode path
on CPU (``thresholds``: one float per segment; ``channel_thresholds``, when
given, fp32 ``[nseg, K]``, one per segment and input channel, and
``thresholds`` is then ignored): threshold test,
gather-scale-reduce over the rows of Wᵀ some batch row keeps, int8 scales,
bias and cast in one pass (why native: see the comment at the top of the .cpp).

It is compiled on first use with torch's own extension builder (a C++
compiler and the ``ninja`` package; ~10 s on 2 cores) for this machine's
instruction set (AVX-512, AVX2+F16C+FMA, or plain C++; ``SPON_CPU_NATIVE_ARCH``
sets another ``-march``), and cached under ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``).  The cache name carries a digest of the
target and the CPU flags, so a home directory shared by different CPUs never
loads a binary built for another instruction set.  If the build fails — no compiler, no
ninja — one warning is printed and the ``embedding_bag`` path is used
instead; ``SPON_CPU_NATIVE=0`` chooses that path without trying.

Threads: torch's OpenMP team, or the op's own pool when the cores turn out to be busy with other
processes (``SPON_CPU_POOL=openmp`` or ``=own`` fixes it; kernels/README.md, "Threads").
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "cpu_sparse_gemv.cpp"


def _arch() -> str:
    """-march target: this machine by default; SPON_CPU_NATIVE_ARCH=haswell (AVX2)
    or x86-64 (no SIMD path) builds for a fleet, and lets the tests check every path."""
    return os.environ.get("SPON_CPU_NATIVE_ARCH", "native")


def _cpu_tag() -> str:
    """Digest of what the build targets (-march=native depends on the CPU)."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return hashlib.sha1(f"{platform.machine()} {_arch()} {flags}".encode()).hexdigest()[:10]


def instruction_set() -> str:
    """What the built op's hot loop uses: the -march target decides (AVX-512, AVX2+F16C+FMA, or plain C++)."""
    arch = _arch()
    if arch == "native":
        flags = ""
        try:
            flags = next((l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")), "")
        except OSError:
            pass
        words = set(flags.split())
        if {"avx512f", "avx512bw"} <= words:
            return "AVX-512"
        if {"avx2", "f16c", "fma"} <= words:
            return "AVX2"
        return "C++ (no SIMD path)"
    return f"-march={arch}"


def enabled() -> bool:
    return os.environ.get("SPON_CPU_NATIVE", "1") != "0"


def _put_ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; the pip package's binary is
    not on it when the venv's python is run without activating the venv."""
    try:
        import ninja
    except ImportError:
        return
    if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _register_fake() -> None:
    """The op's output shape without running it, so torch.compile can trace a decode step that
    calls it (spon.kernel_backend.compile_decode). [M, sum(seg_sizes)] in x's dtype, as the C++
    allocates it. Once per process (native_op is cached)."""
    @torch.library.register_fake("spon_cpu::sparse_gemv")
    def _(x, weight_t, bias, thresholds, seg_sizes, scales, channel_thresholds=None):
        return x.new_empty((x.shape[0], sum(seg_sizes)))


@functools.cache
def native_op():
    """``torch.ops.spon_cpu.sparse_gemv``, built on first call; None if it cannot be built."""
    if not enabled():
        return None
    try:
        from torch.utils.cpp_extension import get_default_build_root, load

        _put_ninja_on_path()
        name = f"spon_cpu_sparse_gemv_{_cpu_tag()}"
        build_dir = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / name
        build_dir.mkdir(parents=True, exist_ok=True)
        # torch serialises concurrent builds with a lock *file* that a build
        # killed mid-way leaves behind, and every later load then waits on it
        # forever.  An flock dies with its process: holding it, any torch lock
        # file present is stale.
        with open(build_dir / "spon.flock", "w") as held:
            import fcntl  # POSIX; the op's build needs a POSIX toolchain anyway

            fcntl.flock(held, fcntl.LOCK_EX)
            (build_dir / "lock").unlink(missing_ok=True)
            # torch's libgomp is already loaded under the soname libgomp.so.1, so
            # -fopenmp links the extension to torch's OpenMP runtime (one thread pool).
            load(
                name=name,
                sources=[str(SOURCE)],
                extra_cflags=["-O3", f"-march={_arch()}", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=False,
            )
        _register_fake()
        return torch.ops.spon_cpu.sparse_gemv
    except Exception as e:  # no compiler, no ninja, read-only cache, ...
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        warnings.warn(f"spon kernels: native CPU sparse GEMV unavailable ({reason}); using the embedding_bag path", stacklevel=2)
        return None
