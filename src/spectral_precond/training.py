"""The batched trainer: full-batch preconditioned gradient descent for many models.

This module holds the one place where the book's update is written:

    W1 <- W1 - lr * (dL/dW1) @ P        every other parameter: plain gradient descent

with ``L = mean_n (f(x_n) - y_n)^2 + 0.5 * weight_decay / N * (||W1||^2 + ||W2||^2)``
(weight decay on weights only, divided by the number of training samples, as in the
authors' code). The weight-decay gradient is part of ``dL/dW1`` and is therefore
preconditioned too.

Models are laid out as a ``(G, M)`` grid (see :mod:`networks`): the ``M`` models of a
group share one data set, so their first-layer products with the inputs are one wide
matrix product with their hidden units side by side. Gradients are written by hand;
:mod:`reference` computes the same thing with autograd, one model at a time.

On the CPU a float32 step's forward and backward pass run in one compiled loop per
model (see :data:`FUSED_CPU_STEP`); otherwise, and for the test set, the matrix
products go through NumPy's BLAS rather than torch's (see :data:`CPU_PRODUCTS`).
Everything else stays in torch, on the same memory.
"""

from __future__ import annotations

import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

from . import _fused
from ._checks import finite_real, positive_int
from .networks import Params


def log_spaced_steps(n_steps: int, n_points: int = 100) -> np.ndarray:
    """``n_points`` distinct steps from 0 to ``n_steps``, log-spaced, both ends included.

    Rounding log-spaced values to whole steps merges some of the early ones, so the
    spacing is refined until ``n_points`` distinct steps remain (every step when
    ``n_steps + 1 <= n_points``).
    """
    positive_int("n_steps", n_steps)
    positive_int("n_points", n_points, minimum=2)
    if n_points >= n_steps + 1:
        return np.arange(n_steps + 1, dtype=np.int64)
    if n_points == 2:
        return np.array([0, n_steps], dtype=np.int64)
    k = n_points - 1
    while True:
        steps = np.unique(np.round(np.geomspace(1, n_steps, k)).astype(np.int64))
        if len(steps) >= n_points - 1:
            break
        k += 1
    if len(steps) > n_points - 1:
        # Refining by one point can add two distinct steps: drop interior ones
        # evenly spaced in index until the count is exact.
        drop = np.linspace(1, len(steps) - 2, len(steps) - (n_points - 1)).round().astype(int)
        steps = np.delete(steps, drop)
    return np.concatenate([[0], steps])


@dataclass(frozen=True)
class TrainConfig:
    """Settings of a training run (defaults: the paper's).

    ``log_steps`` lists the steps at which losses are recorded (the loss at step
    ``t`` is that of the parameters after ``t`` updates); by default ``n_log``
    log-spaced steps including 0 and ``n_steps``. ``snapshot_steps`` lists
    the steps at which a copy of all parameters is kept (none by default).
    """

    n_steps: int = 10_000
    lr: float = 1e-2
    weight_decay: float = 1e-6
    n_log: int = 100
    log_steps: Sequence[int] | None = None
    snapshot_steps: Sequence[int] = ()
    divergence_factor: float = 1e6

    def __post_init__(self):
        positive_int("n_steps", self.n_steps)
        lr = finite_real("lr", self.lr)
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        wd = finite_real("weight_decay", self.weight_decay)
        if wd < 0:
            raise ValueError(f"weight_decay must be >= 0, got {wd}")
        if not finite_real("divergence_factor", self.divergence_factor) > 1:
            raise ValueError(f"divergence_factor must be > 1, got {self.divergence_factor}")
        for name in ("log_steps", "snapshot_steps"):
            value = getattr(self, name)
            if value is None or (name == "snapshot_steps" and len(value) == 0):
                continue
            steps = np.asarray(value)
            if steps.ndim != 1 or steps.size == 0 or not np.issubdtype(steps.dtype, np.integer):
                raise ValueError(f"{name} must be a non-empty list of ints, got {value!r}")
            if steps.min() < 0 or steps.max() > self.n_steps:
                raise ValueError(
                    f"{name} must lie in [0, n_steps={self.n_steps}], got "
                    f"[{steps.min()}, {steps.max()}]"
                )

    def schedule(self) -> np.ndarray:
        if self.log_steps is not None:
            return np.unique(np.asarray(self.log_steps, dtype=np.int64))
        return log_spaced_steps(self.n_steps, self.n_log)


@dataclass
class TrainResult:
    """What a run returns.

    ``steps: (L,)``; ``train_loss`` and ``test_loss: (G, M, L)`` hold the mean squared
    error (without the weight-decay term) at those steps; ``test_loss`` is None when
    no test set was given. ``params`` are the final parameters; ``snapshots`` maps
    each step of ``config.snapshot_steps`` to the parameters after that many updates.
    ``diverged_at: (G, M)`` holds the step at which a model was found diverged and
    frozen, or -1 for models that trained to the end.
    """

    steps: np.ndarray
    train_loss: torch.Tensor
    test_loss: torch.Tensor | None
    params: Params
    diverged_at: torch.Tensor
    snapshots: dict[int, Params] = field(default_factory=dict)

    @property
    def diverged(self) -> torch.Tensor:
        """``(G, M)`` boolean mask of the models that diverged."""
        return self.diverged_at >= 0


def _as_groups(name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim == ndim - 1:
        t = t.unsqueeze(0)
    if t.ndim != ndim:
        raise ValueError(f"{name} has {t.ndim} dimensions, expected {ndim} (or {ndim - 1})")
    return t


def _expand_preconditioner(P: torch.Tensor, G: int, M: int, dx: int) -> torch.Tensor:
    if not isinstance(P, torch.Tensor):
        raise TypeError(f"P must be a torch.Tensor, got {type(P).__name__}")
    if P.shape[-2:] != (dx, dx) or P.ndim not in (2, 3, 4):
        raise ValueError(
            f"P must be ({dx}, {dx}), ({M}, {dx}, {dx}) or ({G}, {M}, {dx}, {dx}), "
            f"got {tuple(P.shape)}"
        )
    if not torch.isfinite(P).all():
        raise ValueError("P has non-finite entries")
    # Check the matrices as given, before broadcasting: one check per distinct matrix.
    Pd = P.detach().to("cpu", torch.float64).reshape(-1, dx, dx)
    scale = Pd.abs().amax(dim=(1, 2)).clamp_min(1e-300)
    asym = (Pd - Pd.transpose(1, 2)).abs().amax(dim=(1, 2))
    if (asym > 1e-5 * scale).any():
        i = int((asym / scale).argmax())
        raise ValueError(
            f"P must be symmetric: matrix {i} has max |P - P^T| = {asym[i]:.3g} "
            f"(max |P| = {scale[i]:.3g})"
        )
    smallest = torch.linalg.eigvalsh(0.5 * (Pd + Pd.transpose(1, 2)))[:, 0]
    if (smallest < -1e-5 * scale).any():
        i = int((smallest / scale).argmin())
        raise ValueError(
            f"P must be positive semi-definite: matrix {i} has smallest eigenvalue "
            f"{smallest[i]:.3g}"
        )
    try:
        return P.expand(G, M, dx, dx)
    except RuntimeError:
        raise ValueError(
            f"P of shape {tuple(P.shape)} does not broadcast to the model grid ({G}, {M})"
        ) from None


#: Activations of one chunk of models stay below this size on the CPU, so that the
#: passes over them in one step hit the cache rather than main memory. Larger
#: chunks spread the fixed cost of launching a step's operations over more models;
#: on the 2-core machine of the book's benchmarks (1 MiB of L2 per core, 32 MiB of
#: shared L3) about 3 MiB per chunk was fastest. The fused step keeps one model's
#: activations at a time, but uses the same chunks (8 models at the paper's sizes;
#: 4 were clearly slower, 16 and 32 within the machine's noise).
CPU_CHUNK_BYTES = 7 << 19
#: Same bound for the test-set forward pass.
EVAL_CHUNK_BYTES = 1 << 20
#: The first layer's inputs (dx features and the ones of the bias) are padded with
#: zero columns to a multiple of this: the backward product with 12 rather than 11
#: rows runs about 15 % faster, with OpenBLAS as with MKL (the forward one no slower).
FEATURE_MULTIPLE = 4
#: Losses are checked for divergence at every logged step and every this many steps.
DIVERGENCE_CHECK_EVERY = 50
#: Which library multiplies the matrices of a step on the CPU: ``"numpy"`` (NumPy's
#: BLAS, OpenBLAS in its wheels) or ``"torch"`` (torch's, MKL in its x86 wheels). The
#: step's products have an inner or outer dimension of only dx + 1 (padded to 12).
#: On the AMD EPYC of the book's benchmarks OpenBLAS runs the first-layer product
#: about 20 % faster than MKL and the head, a strided matrix-vector product per
#: model, about twice as fast; its large-product peak is higher too (the throughput
#: benchmark measures both). Results agree to rounding. With ``"numpy"``, the first
#: call on the CPU sets NumPy's BLAS to one thread for the rest of the process. On a
#: GPU, and for dtypes other than float32 and float64, the products are torch's.
CPU_PRODUCTS = "numpy"
_PRODUCTS = ("numpy", "torch")
#: Whether a float32 training step on the CPU runs the fused kernel of
#: ``_fused_step.c``: the first-layer product, the ReLU, the head, the mask and the
#: backward product of each model in one loop, with the activations kept in the
#: core's cache instead of five passes over them in memory. It is built with the
#: system's C compiler on first use (see :mod:`spectral_precond._fused`). Where it
#: cannot be built or run, for other dtypes, and for inputs wider than
#: :data:`FUSED_MAX_FEATURES`, the step uses the products of :data:`CPU_PRODUCTS`.
#: Results agree to rounding. :func:`step_kernel` says which a call would use.
FUSED_CPU_STEP = True
#: The fused kernel reads each model's (dx + 1) x width first layer once per four
#: samples, so its advantage shrinks as dx grows. On the book's benchmark machine it
#: was 1.1 to 1.5 times as fast as the BLAS step from 12 to 64 padded input columns
#: (64 models of the paper's sizes), and 0.98 and 0.93 times at 104 and 204.
FUSED_MAX_FEATURES = 64


def _product(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, backend: str) -> Callable[[], None]:
    """A function that computes ``out = a @ b`` (batched over a leading dimension when
    the operands are 3-D) in place, without allocating, with the given library.

    The NumPy arrays are views of the tensors' memory, made once: the product always
    sees the current values of ``a`` and ``b``.
    """
    if backend == "numpy":
        a_, b_, out_ = (t.detach().numpy() for t in (a, b, out))
        return lambda: np.matmul(a_, b_, out=out_)
    return lambda: torch.matmul(a, b, out=out)


_blas_lock = threading.Lock()


def _blas_is_single_threaded() -> bool:
    return all(lib["num_threads"] == 1 for lib in _blas_controller().info()
               if lib["user_api"] == "blas")


def _single_threaded_blas() -> bool:
    """Set NumPy's BLAS to one thread, for the rest of the process; True if it is now.

    The trainer runs one single-threaded chunk per core, so a multi-threaded BLAS
    would only make its threads compete. The setting is not restored afterwards:
    OpenBLAS (0.3.31, in NumPy's wheels) ignores a change of its thread count made
    from a worker thread once the main thread has changed it, so restoring after a
    call from the main thread would leave later calls from worker threads (a sweep
    run on a thread pool) unable to set it again.
    """
    with _blas_lock:
        if not _blas_is_single_threaded():
            _blas_controller().limit(limits=1, user_api="blas")   # never restored
        return _blas_is_single_threaded()


@lru_cache(maxsize=1)
def _blas_controller() -> ThreadpoolController:
    return ThreadpoolController()


def _padded_width(dx: int) -> int:
    """Input columns of the first layer's products: dx, the ones of the bias, zeros."""
    return -(-(dx + 1) // FEATURE_MULTIPLE) * FEATURE_MULTIPLE


_fused_warned = False


def step_kernel(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                dim: int = 10) -> str:
    """What runs a training step of ``dim``-dimensional inputs of this dtype on this
    device: ``"fused"`` (the fused CPU kernel, see :data:`FUSED_CPU_STEP`), or the
    library of its matrix products, ``"numpy"`` or ``"torch"`` (always on a GPU)."""
    global _fused_warned
    if torch.device(device).type != "cpu" or dtype not in (torch.float32, torch.float64):
        return "torch"
    if FUSED_CPU_STEP and dtype == torch.float32 and _padded_width(dim) <= FUSED_MAX_FEATURES:
        kernel = _fused.kernel()
        if kernel.library is not None:
            return "fused"
        if kernel.failed and not _fused_warned:
            _fused_warned = True
            warnings.warn(f"the fused CPU step is unavailable ({kernel.reason}); training "
                          f"steps use {CPU_PRODUCTS!r} products, which are slower",
                          RuntimeWarning, stacklevel=3)
    return CPU_PRODUCTS


def _padded_inputs(X: torch.Tensor, K: int) -> torch.Tensor:
    """``[X | 1 | 0]`` transposed: ``(G, K, n)`` from ``X: (G, n, dx)``."""
    G, n, dx = X.shape
    X1t = torch.zeros(G, K, n, dtype=X.dtype, device=X.device)
    X1t[:, :dx] = X.transpose(1, 2)
    X1t[:, dx] = 1.0
    return X1t


class _Run:
    """State shared by the chunks of one call to :func:`train`."""

    def __init__(self, X, y, P, params, config, steps, X_test, y_test, chunk_models):
        self.config, self.steps, self.params = config, steps, params
        G, M = params.grid
        N, dx, dh = X.shape[1], params.dim, params.width
        dtype, device = X.dtype, X.device
        self.G, self.M, self.N, self.dx, self.dh = G, M, N, dx, dh
        # Inputs with a column of ones, so that the first-layer bias rides in the
        # product, and zero columns up to a multiple of FEATURE_MULTIPLE.
        self.K = K = _padded_width(dx)
        self.X1t = _padded_inputs(X, K)                 # (G, K, N)
        self.X1 = self.X1t.transpose(1, 2).contiguous()  # (G, N, K)
        self.y, self.P = y.contiguous(), P
        self.X1_test = None
        if X_test is not None:
            self.X1_test = _padded_inputs(X_test, K).transpose(1, 2)   # (G, n_test, K)
            self.y_test = y_test
        if CPU_PRODUCTS not in _PRODUCTS:
            raise ValueError(f"CPU_PRODUCTS must be one of {_PRODUCTS}, got {CPU_PRODUCTS!r}")
        if not isinstance(FUSED_CPU_STEP, bool):
            raise ValueError(f"FUSED_CPU_STEP must be True or False, got {FUSED_CPU_STEP!r}")
        if device.type == "cpu" and dtype in (torch.float32, torch.float64):
            self.products = CPU_PRODUCTS
        else:       # a GPU, or a dtype that NumPy's BLAS lacks (bfloat16, float16)
            self.products = "torch"
        self.fused = step_kernel(dtype, device, dx) == "fused"
        # The first layer [W1 | b1 | 0], stored feature-major as AK of shape
        # (G, K, M, dh): for the models of a chunk, AK[g, :, m0:m1] is one (K, c * dh)
        # matrix (their hidden units side by side, for one wide product), and each
        # model's (K, dh) block has contiguous rows (for the element-wise updates).
        # The zero rows meet the zero rows of X1t and stay zero.
        self.AK = torch.zeros(G, K, M, dh, dtype=dtype, device=device)
        self.AK[:, :dx] = params.W1.permute(0, 3, 1, 2)
        self.AK[:, dx] = params.b1
        self.W2, self.b2 = params.W2.contiguous(), params.b2.contiguous()
        self.log_at = {int(t): i for i, t in enumerate(steps)}
        self.snapshot_at = sorted({int(t) for t in config.snapshot_steps})
        self.snapshot_AK = {t: torch.empty_like(self.AK) for t in self.snapshot_at}
        self.snapshot_W2 = {t: torch.empty_like(self.W2) for t in self.snapshot_at}
        self.snapshot_b2 = {t: torch.empty_like(self.b2) for t in self.snapshot_at}
        self.train_loss = torch.full((G, M, len(steps)), float("nan"), dtype=dtype, device=device)
        self.test_loss = None if X_test is None else torch.full_like(self.train_loss, float("nan"))
        self.diverged_at = torch.full((G, M), -1, dtype=torch.long, device=device)
        itemsize = torch.finfo(dtype).bits // 8
        if chunk_models is None:
            if device.type == "cpu":
                chunk_models = max(1, CPU_CHUNK_BYTES // (dh * N * itemsize))
            else:
                chunk_models = M
        positive_int("chunk_models", chunk_models)
        self.chunk_models = min(chunk_models, M)
        self.itemsize = itemsize

    def chunks(self, at_least: int = 1):
        """The chunks of all groups: as few per group as the bound allows, but
        ``at_least`` in all where there are enough models (one per worker thread), of
        sizes that differ by one at most, so that the workers get even shares."""
        n = max(-(-self.M // self.chunk_models), -(-at_least // self.G))
        n = min(n, self.M)
        bounds = [i * self.M // n for i in range(n + 1)]
        for g in range(self.G):
            for m0, m1 in zip(bounds[:-1], bounds[1:]):
                yield _Chunk(self, g, m0, m1)

    def result(self) -> TrainResult:
        dx = self.dx
        def unpack(AK, W2, b2):
            return Params(AK[:, :dx].permute(0, 2, 3, 1).contiguous(), AK[:, dx].contiguous(),
                          W2, b2)
        snapshots = {
            t: unpack(self.snapshot_AK[t], self.snapshot_W2[t], self.snapshot_b2[t])
            for t in self.snapshot_at
        }
        return TrainResult(
            steps=self.steps, train_loss=self.train_loss, test_loss=self.test_loss,
            params=unpack(self.AK, self.W2, self.b2), diverged_at=self.diverged_at,
            snapshots=snapshots,
        )


class _TestBlock(NamedTuple):
    """A block of test samples: its two products, labels and (shared) buffers."""

    first_layer: Callable[[], None]
    head: Callable[[], None]
    y: torch.Tensor         # (c, 1, w)
    Z: torch.Tensor         # (w, c * dh) activations
    F: torch.Tensor         # (c, 1, w) outputs


class _Chunk:
    """Models ``m0:m1`` of group ``g``: views into the run's tensors, and buffers.

    All models of a chunk share the group's inputs, so the first-layer forward and
    backward products are single wide matrix products with the hidden units of the
    chunk's models side by side (``c * dh`` columns). Every view, buffer and product a
    step needs is made here once, so that a step is a short, fixed list of in-place
    operations.
    """

    def __init__(self, run: _Run, g: int, m0: int, m1: int):
        self.run, self.g = run, g
        c, dh, dx, N = m1 - m0, run.dh, run.dx, run.N
        dtype, device = run.AK.dtype, run.AK.device
        self.c = c
        self.slice = (g, slice(m0, m1))
        K = run.K
        self.AK = AK = run.AK[g, :, m0:m1]             # (K, c, dh), a view
        self.A2T = AK.flatten(1)                       # (K, c * dh), a view
        self.AT = AK.transpose(0, 1)                   # (c, K, dh), a view
        self.W1T = self.AT[:, :dx]                     # (c, dx, dh), a view
        self.slice_K = (g, slice(None), slice(m0, m1))
        self.W2, self.b2 = run.W2[g, m0:m1], run.b2[g, m0:m1]
        self.W2_rows = self.W2.view(c, 1, dh)
        self.W2_cols = self.W2.view(c, dh, 1)
        self.b2_col = self.b2.view(c, 1, 1)
        self.y = run.y[g, m0:m1].unsqueeze(1)          # (c, 1, N)
        # The first layer's step in one product: [dW1 | db1 | 0] @ blockdiag(P, 1, 0),
        # which preconditions the weights and leaves the bias with a plain step.
        Pt = torch.zeros(c, K, K, dtype=dtype, device=device)
        Pt[:, :dx, :dx] = run.P[g, m0:m1].transpose(1, 2)
        Pt[:, dx, dx] = 1.0
        self.Pt = Pt
        self.X1t = run.X1t[g]                          # (K, N)
        self.F = torch.empty(c, 1, N, dtype=dtype, device=device)
        self.GT = torch.empty(c, K, dh, dtype=dtype, device=device)
        self.GT_W1 = self.GT[:, :dx]                   # (c, dx, dh), a view
        self.step_T = torch.empty_like(self.GT)
        self.gW2 = torch.empty(c, dh, dtype=dtype, device=device)
        self.gb2 = torch.empty(c, dtype=dtype, device=device)
        self.products = products = run.products
        self.fused = None
        if run.fused:
            # The kernel's scratch: one model's activations and first layer at a time.
            self.Z = torch.empty(N + K, dh, dtype=dtype, device=device)
            self.fused = _fused.step_function(run.X1[g], AK, self.W2, self.b2, run.y[g, m0:m1],
                                              self.F.view(c, N), self.Z, self.GT, self.gW2,
                                              self.gb2)
        else:
            # Activations sample-major: row n holds the c * dh hidden units of sample
            # n, and each model's (N, dh) block is a strided view.
            self.Z = torch.empty(N, c * dh, dtype=dtype, device=device)
            self.S = self.Z.view(N, c, dh).transpose(0, 1)  # (c, N, dh), a view
            self.Xr = torch.empty(c, K, N, dtype=dtype, device=device)
            self.first_layer = _product(run.X1[g], self.A2T, self.Z, products)
            self.head = _product(self.S, self.W2_cols, self.F.view(c, N, 1), products)
            self.backward = _product(self.Xr, self.S, self.GT, products)
        self._test_blocks = None

    def forward(self):
        """Residuals ``f(x_n) - y_n`` of the training set, ``(c, 1, N)``.

        With the fused kernel, this also leaves the gradients of the step in ``GT``,
        ``gW2`` and ``gb2`` (see :meth:`step`). Otherwise the pre-activations go into
        the buffer ``Z``, the ReLU is applied in place, and the head is one batched
        product.
        """
        if self.fused is not None:
            self.fused()
            return self.F
        self.first_layer()
        self.Z.clamp_min_(0.0)
        self.head()
        return self.F.add_(self.b2_col).sub_(self.y)

    def test_blocks(self):
        """The test set cut into blocks of samples, with their buffers and products.

        Each block's activations take about ``EVAL_CHUNK_BYTES``; the input blocks are
        made contiguous once, so that each block's product reads a dense matrix. All
        blocks share one activation buffer and one output buffer (a shorter last
        block uses the start of them), so the test set costs the chunk no more
        memory than one block.
        """
        if self._test_blocks is None:
            run = self.run
            X1 = run.X1_test[self.g]
            y = run.y_test[self.slice]
            n = X1.shape[0]
            c, dh = self.c, run.dh
            width = min(n, max(1, EVAL_CHUNK_BYTES // (c * dh * run.itemsize)))
            Z = torch.empty(c * dh * width, dtype=X1.dtype, device=X1.device)
            F = torch.empty(c * width, dtype=X1.dtype, device=X1.device)
            blocks = []
            for s in range(0, n, width):
                w = min(n, s + width) - s
                Zb, Fb = Z[: c * dh * w].view(w, c * dh), F[: c * w].view(c, 1, w)
                Sb = Zb.view(w, c, dh).transpose(0, 1)
                blocks.append(_TestBlock(
                    _product(X1[s:s + w].contiguous(), self.A2T, Zb, self.products),
                    _product(Sb, self.W2_cols, Fb.view(c, w, 1), self.products),
                    y[:, s:s + w].unsqueeze(1).contiguous(), Zb, Fb,
                ))
            self._test_blocks = (blocks, n)
        return self._test_blocks

    def test_mse(self):
        blocks, n = self.test_blocks()
        total = torch.zeros(self.c, 1, dtype=self.Z.dtype, device=self.Z.device)
        for first_layer, head, y, Z, F in blocks:
            first_layer()
            Z.clamp_min_(0.0)
            head()
            F.add_(self.b2_col).sub_(y)
            total.add_(torch.linalg.vecdot(F, F))
        return total.squeeze(1) / n

    def train(self):
        # Divergence is detected and reported by the loop itself: NumPy's warnings
        # about overflow in the products of a diverging model would only repeat it.
        with np.errstate(all="ignore"):
            self._train()

    def _train(self):
        run, config = self.run, self.run.config
        c, N = self.c, run.N
        lr, decay = config.lr, config.weight_decay / N
        log_at, train_loss, test_loss = run.log_at, run.train_loss, run.test_loss
        snapshot_at = set(run.snapshot_at)
        diverged_at = run.diverged_at[self.slice]
        active = torch.ones(c, dtype=torch.bool, device=self.Z.device)
        frozen = False          # True once a model of this chunk has diverged
        limit = None
        for t in range(config.n_steps + 1):
            if t in snapshot_at:
                run.snapshot_AK[t][self.slice_K].copy_(self.AK)
                run.snapshot_W2[t][self.slice].copy_(self.W2)
                run.snapshot_b2[t][self.slice].copy_(self.b2)
            if t == config.n_steps and t not in log_at:
                break
            r = self.forward()                               # residuals (c, 1, N)
            if t in log_at or t % DIVERGENCE_CHECK_EVERY == 0 or t == config.n_steps:
                loss = torch.linalg.vecdot(r, r).squeeze(1) / N
                if limit is None:
                    limit = config.divergence_factor * loss.clamp_min(1.0)
                bad = ~(loss <= limit) & active               # NaN-safe
                if bad.any():     # one host synchronisation per check, not per step
                    diverged_at.masked_fill_(bad, t)
                    active &= ~bad
                    frozen = True
                if t in log_at:
                    i = log_at[t]
                    train_loss[self.slice][:, i] = loss.masked_fill(~active, float("nan"))
                    if test_loss is not None:
                        test_loss[self.slice][:, i] = self.test_mse().masked_fill(
                            ~active, float("nan"))
            if t == config.n_steps:
                break
            self.step(r, active if frozen else None, lr, decay)

    def step(self, r, active, lr, decay):
        """One preconditioned gradient step from the residuals ``r`` of shape ``(c, 1, N)``.

        ``dL/df = (2 / N) r``; the factor ``2 / N`` is applied with the learning rate.
        With the mask ``S = 1[Z > 0]`` the first-layer gradient is ``W2 * GX`` with
        ``GX = (S * r) @ X1``, computed as ``S @ (r * X1)`` so that the sample weights
        fall on the small input matrix rather than on the activations. The gradient of
        ``W2`` is the row-wise dot product of ``A`` with ``GX`` (because
        ``relu(z) = 1[z > 0] z`` and ``Z = A X1^T``), so the activations are read by
        one product only. The fused kernel computes the same three gradients, with
        ``GX = X1^T (r * S)``, in :meth:`forward`. Models with ``active`` False
        (diverged) are left unchanged.
        """
        N = self.run.N
        GT, gW2, gb2 = self.GT, self.gW2, self.gb2
        if self.fused is None:    # else the fused kernel has formed all three already
            torch.mul(self.X1t, r, out=self.Xr)              # (c, K, N)
            self.Z.gt_(0.0)                                  # ReLU mask, in place of H
            # Gradients are formed transposed, (c, K, dh): the products are faster
            # with dh as the long output dimension.
            self.backward()
            torch.linalg.vecdot(GT, self.AT, dim=1, out=gW2)
            GT.mul_(self.W2_rows)                            # [dW1 | db1]^T, no decay
            torch.sum(r, dim=(1, 2), out=gb2)
        if decay:
            # Weight decay in the same units as the data term (times N / 2).
            self.GT_W1.add_(self.W1T, alpha=decay * N / 2)
            gW2.add_(self.W2, alpha=decay * N / 2)
        # The preconditioned first-layer step, ([dW1 | db1] blockdiag(P, 1))^T.
        torch.bmm(self.Pt, GT, out=self.step_T)
        if active is not None:
            self.step_T.masked_fill_(~active.view(-1, 1, 1), 0.0)
            gW2.masked_fill_(~active.view(-1, 1), 0.0)
            gb2.masked_fill_(~active, 0.0)
        lr = lr * 2.0 / N
        self.AT.sub_(self.step_T, alpha=lr)
        self.W2.sub_(gW2, alpha=lr)
        self.b2.sub_(gb2, alpha=lr)


def train(
    X_train: torch.Tensor,
    y_train: torch.Tensor,
    P: torch.Tensor,
    params: Params,
    config: TrainConfig = TrainConfig(),
    X_test: torch.Tensor | None = None,
    y_test: torch.Tensor | None = None,
    chunk_models: int | None = None,
) -> TrainResult:
    """Train a ``(G, M)`` grid of networks by full-batch preconditioned gradient descent.

    Parameters
    ----------
    X_train : (G, N, dx)
        Training inputs of each group (``(N, dx)`` for a single group).
    y_train : (G, M, N)
        Labels of each model (``(M, N)`` for a single group).
    P : (dx, dx), (M, dx, dx) or (G, M, dx, dx)
        First-layer preconditioner of each model, broadcast over the grid.
    params : Params
        Initial parameters; not modified. Their dtype and device are taken from
        ``X_train``.
    config : TrainConfig
    X_test, y_test : (G, n_test, dx) and (G, M, n_test), optional
        Test set whose loss is recorded at the logged steps.
    chunk_models : int, optional
        At most how many models of a group are stepped together (a group's models are
        cut into chunks of nearly equal sizes). By default as many as keep
        one chunk's activations within a few MiB on the CPU (so that they stay in
        cache) and whole groups on a GPU. On the CPU there are also at least as many
        chunks as torch has threads, where there are enough models, so that every
        core gets work. Results do not depend on it.

    Returns
    -------
    TrainResult
        A model whose loss becomes non-finite or exceeds ``config.divergence_factor``
        times its initial loss is frozen at that step; ``diverged_at`` records the
        step and its later logged losses are NaN. The other models are unaffected.

    Notes
    -----
    On the CPU the chunks of models run on one worker thread per core, each
    single-threaded; NumPy's BLAS is set to one thread (see :data:`CPU_PRODUCTS`).
    float32 steps run the fused kernel where it is available (see
    :data:`FUSED_CPU_STEP` and :func:`step_kernel`).
    """
    X = _as_groups("X_train", X_train, 3)
    y = _as_groups("y_train", y_train, 3)
    G, N, dx = X.shape
    if params.grid[0] != G or params.dim != dx:
        raise ValueError(
            f"params grid {params.grid} with input dimension {params.dim} does not match "
            f"X_train of shape {tuple(X.shape)} (G={G}, dx={dx})"
        )
    M, dh = params.grid[1], params.width
    if y.shape != (G, M, N):
        raise ValueError(f"y_train must have shape {(G, M, N)}, got {tuple(y.shape)}")
    dtype, device = X.dtype, X.device
    P = _expand_preconditioner(P, G, M, dx).to(dtype=dtype, device=device)
    if (X_test is None) != (y_test is None):
        raise ValueError("give both X_test and y_test, or neither")
    if X_test is not None:
        X_test = _as_groups("X_test", X_test, 3).to(dtype=dtype, device=device)
        y_test = _as_groups("y_test", y_test, 3).to(dtype=dtype, device=device)
        if X_test.shape[0] != G or X_test.shape[2] != dx:
            raise ValueError(f"X_test must have shape ({G}, n_test, {dx}), got {tuple(X_test.shape)}")
        if y_test.shape != (G, M, X_test.shape[1]):
            raise ValueError(
                f"y_test must have shape {(G, M, X_test.shape[1])}, got {tuple(y_test.shape)}"
            )

    steps = config.schedule()
    p = params.to(dtype=dtype, device=device).clone()
    run = _Run(X, y, P.contiguous(), p, config, steps, X_test, y_test, chunk_models)
    if device.type != "cpu":
        for chunk in run.chunks():
            chunk.train()
        return run.result()
    # On the CPU, whole chunks go to worker threads, one per core, each running
    # single-threaded operations: the chunks are independent, the products release
    # the GIL, and this avoids the fork-join of splitting every small operation across
    # cores. It also keeps torch's and the BLAS's thread pools from competing for the
    # cores: with both multi-threaded, their threads spin-wait against each other and
    # a step at the paper's sizes runs tens of times slower.
    threads = torch.get_num_threads()
    if run.products == "numpy" and not _single_threaded_blas():
        warnings.warn(
            "NumPy's BLAS could not be set to one thread from this thread (another "
            "thread has set its thread count); this call uses torch's products, which "
            "are slower on some CPUs", RuntimeWarning, stacklevel=2)
        run.products = "torch"
    chunks = list(run.chunks(at_least=threads))
    workers = min(threads, len(chunks))
    torch.set_num_threads(1)
    try:
        if workers == 1:
            for chunk in chunks:
                chunk.train()
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for future in [pool.submit(chunk.train) for chunk in chunks]:
                    future.result()
    finally:
        torch.set_num_threads(threads)
    return run.result()
