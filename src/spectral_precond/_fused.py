"""The fused CPU kernel of a training step (``_fused_step.c``), built on first use.

The kernel is plain C with x86-64 vector intrinsics. It is compiled once per source
version with the system's C compiler (``$CC``, else ``cc``) into a cache folder
(``$SPECTRAL_PRECOND_CACHE``, else ``~/.cache/spectral_precond``) and loaded with
:mod:`ctypes`, which releases the GIL during each call. Where there is no compiler,
the build fails or the CPU has neither AVX-512 nor AVX2, :func:`kernel` says why
and the trainer multiplies with BLAS instead; the results agree to rounding.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Callable, NamedTuple

import torch

SOURCE = Path(__file__).with_name("_fused_step.c")
#: The instruction sets of the kernel's two builds, by the number it reports.
VARIANTS = {2: "avx512", 1: "avx2"}


class Kernel(NamedTuple):
    """The loaded kernel, or why there is none (``library`` None)."""

    library: ctypes.CDLL | None
    variant: str | None       # "avx512" or "avx2", the best this CPU runs
    reason: str               # what was built, or why nothing could be
    failed: bool = False      # True if building or loading failed (not just an old CPU)


def _cache_dir() -> Path:
    root = os.environ.get("SPECTRAL_PRECOND_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "spectral_precond"


def _build(target: Path, compiler: str) -> None:
    """Compile the kernel to ``target``, atomically: a failed or concurrent build never
    leaves a partial library under the final name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, "-O3", "-shared", "-fPIC", "-std=c11", "-o", tmp, str(SOURCE)],
            capture_output=True, text=True, timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-400:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@lru_cache(maxsize=1)
def kernel() -> Kernel:
    """The fused kernel for this CPU, built if it is not in the cache yet."""
    compiler = os.environ.get("CC", "cc")
    digest = hashlib.sha256(SOURCE.read_bytes() + compiler.encode()).hexdigest()[:16]
    target = _cache_dir() / f"fused_step-{digest}.so"
    try:
        if not target.exists():
            try:
                _build(target, compiler)
            except PermissionError:     # a read-only home: build in the temporary folder
                user = os.getuid() if hasattr(os, "getuid") else "user"
                target = Path(tempfile.gettempdir()) / f"spectral_precond-{user}" / target.name
                if not target.exists():
                    _build(target, compiler)
        library = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        return Kernel(None, None, f"the kernel could not be built or loaded: {error}", True)
    library.fused_step_variant.restype = ctypes.c_int
    library.fused_step_variant.argtypes = []
    level = library.fused_step_variant()
    if level not in VARIANTS:
        return Kernel(None, None, "this CPU has neither AVX-512 nor AVX2 with FMA")
    size, pointer = ctypes.c_ssize_t, ctypes.c_void_p
    library.fused_step.restype = None
    library.fused_step.argtypes = [ctypes.c_int] + [size] * 4 + [pointer] * 2 + [size] * 2 \
        + [pointer] * 8
    return Kernel(library, VARIANTS[level], f"built from {SOURCE.name} for {VARIANTS[level]}")


def step_function(X: torch.Tensor, A: torch.Tensor, W: torch.Tensor, b: torch.Tensor,
                  Y: torch.Tensor, R: torch.Tensor, D: torch.Tensor, G: torch.Tensor,
                  GW: torch.Tensor, GB: torch.Tensor,
                  variant: str | None = None) -> Callable[[], None]:
    """A function that runs the kernel on these tensors' current values, in place.

    For model ``m`` with first layer ``A_m = A[:, m]``, inputs ``X``, head ``W[m]``
    and bias ``b[m]``, it writes the residuals ``R[m] = relu(X A_m) W[m] + b[m] - Y[m]``,
    ``G[m] = (X^T (R[m] * 1[X A_m > 0])) * W[m]`` (scaled column by column),
    ``GW[m] = sum_k (X^T (R[m] * 1[X A_m > 0]))_k * A_m[k]`` and ``GB[m] = sum R[m]``.

    Shapes, for ``c`` models with ``n`` samples, ``k`` input columns and ``h`` hidden
    units: ``X (n, k)``, ``A (k, c, h)`` (rows of any stride, each model's ``h``
    units contiguous), ``W (c, h)``, ``b (c,)``, ``Y (c, n)``; outputs ``R (c, n)``,
    ``G (c, k, h)``, ``GW (c, h)``, ``GB (c,)``; scratch ``D`` of at least
    ``(n + k) * h`` elements. All float32 on the CPU. The pointers are taken once: the tensors must
    not be reallocated. ``variant`` forces a build ("avx2" on an AVX-512 CPU).
    """
    k_ = kernel()
    if k_.library is None:
        raise RuntimeError(f"no fused kernel: {k_.reason}")
    variant = variant or k_.variant
    levels = {name: level for level, name in VARIANTS.items()}
    if variant not in levels or levels[variant] > levels[k_.variant]:
        raise ValueError(f"variant must be one this CPU runs, up to {k_.variant!r}; got {variant!r}")
    n, k = X.shape
    c, h = W.shape
    expected = {"X": (X, (n, k)), "A": (A, (k, c, h)), "W": (W, (c, h)), "b": (b, (c,)),
                "Y": (Y, (c, n)), "R": (R, (c, n)), "G": (G, (c, k, h)),
                "GW": (GW, (c, h)), "GB": (GB, (c,))}
    for name, (t, shape) in expected.items():
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError(f"{name} must be float32 on the CPU, got {t.dtype} on {t.device}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    for name in ("X", "W", "b", "Y", "R", "G", "GW", "GB"):
        if not expected[name][0].is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if A.stride(2) != 1:
        raise ValueError("A must have unit stride along the hidden units")
    if D.dtype != torch.float32 or not D.is_contiguous() or D.numel() < (n + k) * h:
        raise ValueError(f"D must be contiguous float32 with at least {(n + k) * h} elements")
    args = (levels[variant], c, n, k, h, X.data_ptr(), A.data_ptr(), A.stride(0), A.stride(1),
            W.data_ptr(), b.data_ptr(), Y.data_ptr(), R.data_ptr(), D.data_ptr(), G.data_ptr(),
            GW.data_ptr(), GB.data_ptr())
    run = k_.library.fused_step
    return lambda: run(*args)
