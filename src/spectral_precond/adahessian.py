"""AdaHessian at any Hessian power, and a batched trainer for the synthetic regression.

The paper's label-noise experiment repeats exact preconditioning with AdaHessian
(Yao et al., 2021), whose ``hessian_power`` ``k`` plays the role of ``-p``: the update
divides the (momentum-averaged) gradient by the root mean square of Hutchinson
estimates of the Hessian diagonal, raised to the power ``k``,

    theta <- theta - lr * m_hat / (sqrt(v_hat)^k + eps),

so ``k = 1`` is the usual AdaHessian (``p = -1``), ``k = 0`` is plain momentum-averaged
gradient descent (``p = 0``), and a negative ``k`` *multiplies* each coordinate's step
by its curvature, ``|H_ii|^{-k}`` (``p > 0``). The maintained class of
``pytorch-optimizer`` refuses ``k`` outside ``(0, 1]``; :class:`RelaxedAdaHessian`
lifts that one check and changes nothing else.

AdaHessian preconditions every parameter (both layers, biases included), diagonally,
with a curvature estimate that changes during training. The theorems' ``P`` acts on
the first layer only and is a fixed matrix. The analogy is ``P ~ diag(H)^{-k}``
restricted to ``W1``, whose Hessian diagonal is ``(2/N) sum_n W2_j^2 1[z_j > 0] x_i^2``:
proportional to the input variance along ``e_i`` when the axes are the eigenbasis
of ``Sigma``, as in the paper's data.

:func:`train_adahessian` trains a ``(G, M)`` grid of two-layer networks (the layout of
:func:`spectral_precond.train`) with the maintained update. The classifier trainer
(:func:`spectral_precond.optimizers.train_classifiers`) can run this regression too,
but with autograd's double backward it costs about 10 ms per model and step here, and
it records the test loss only at the end; this trainer writes the gradient and the
Hessian-vector product of the network in closed form (:func:`gradient_and_hvp`,
checked against autograd in the tests), hands both to the optimizer's
``step(hessian=...)``, and logs train and test losses on the schedule of a
:class:`~spectral_precond.training.TrainConfig`.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch
from pytorch_optimizer import AdaHessian

from ._checks import finite_real
from .networks import Params
from .seeding import generator
from .training import TrainConfig, TrainResult

#: The name under which the maintained class checks its ``hessian_power`` range.
_POWER_CHECK = "Hessian Power"


class RelaxedAdaHessian(AdaHessian):
    """pytorch-optimizer's ``AdaHessian`` accepting any finite ``hessian_power``.

    Identical to the maintained class (same state, same update; its tests compare
    the two step by step for powers in ``(0, 1]``) except that ``hessian_power``
    may be ``0`` (momentum-averaged gradient steps, the analogue of ``p = 0``) or
    negative (steps scaled up by the curvature, the analogue of ``p > 0``). The
    maintained class validates the power in ``(0, 1]``; only that check is lifted.
    """

    @staticmethod
    def validate_range(x, name: str, low, high, range_type: str = "[)") -> None:
        if name == _POWER_CHECK:
            finite_real("hessian_power", x)
            return
        AdaHessian.validate_range(x, name, low, high, range_type)


#: Activations of one chunk of models stay below this size, so that the dozen passes
#: over them in one step hit the cache rather than main memory.
CHUNK_BYTES = 1 << 20


def gradient_and_hvp(
    params: Params,
    X: torch.Tensor,
    y: torch.Tensor,
    probe: Params | None = None,
    weight_decay: float = 0.0,
    pool: ThreadPoolExecutor | None = None,
) -> tuple[torch.Tensor, Params, Params | None]:
    """Loss, gradient and Hessian-vector product of a grid of two-layer ReLU networks.

    The loss of each model is ``mean_n (f(x_n) - y_n)^2 + 0.5 * weight_decay / N *
    (||W1||^2 + ||W2||^2)``, as in :func:`spectral_precond.train`. The ReLU has zero
    second derivative almost everywhere, so with the mask ``S = 1[Z > 0]``, the
    residuals ``r`` and ``e = (2/N) * (d f / d theta) . v`` the product is

        H v = (2/N) sum_n [(grad f . v) grad f + r (d^2 f) v],

    whose only second-derivative terms pair ``W2_j`` with ``(W1_j, b1_j)``: every
    part is a product of ``S`` with a small matrix, written out without autograd.

    Parameters
    ----------
    params : Params
        A ``(G, M)`` grid (``W1: (G, M, dh, dx)``).
    X : (G, N, dx)
        Inputs of each group.
    y : (G, M, N)
        Targets of each model.
    probe : Params, optional
        Direction ``v`` with the shapes of ``params``; without it no product is formed.
    weight_decay : float
    pool : ThreadPoolExecutor, optional
        Runs chunks of models in parallel (each on one thread).

    Returns
    -------
    loss : (G, M)
        The mean squared error, without the decay term.
    grad : Params
        The gradient of the loss with decay.
    hvp : Params or None
        ``H v`` for ``probe = v``.
    """
    G, M = params.grid
    N, dx, dh = X.shape[1], params.dim, params.width
    decay = finite_real("weight_decay", weight_decay) / N
    X1t = _with_ones(X)
    loss = torch.empty(G, M, dtype=X.dtype)
    grad = Params(*(torch.empty_like(t) for t in params.tensors()))
    hvp = None if probe is None else Params(*(torch.empty_like(t) for t in probe.tensors()))

    def chunk(g, m0, m1):
        sl = (g, slice(m0, m1))
        W1, b1, W2, b2 = (t[sl] for t in params.tensors())
        v = None
        if probe is not None:
            V1, c1, V2, c2 = (t[sl] for t in probe.tensors())
            v = (torch.cat([V1, c1.unsqueeze(-1)], dim=-1), V2, c2)
        out = _products(torch.cat([W1, b1.unsqueeze(-1)], dim=-1), W2, b2, X1t[g], y[sl],
                        v, decay)
        loss[sl] = out[0]
        for target, (dA, dW2, db2) in ((grad, out[1]), (hvp, out[2])):
            if target is not None:
                target.W1[sl], target.b1[sl] = dA[..., :dx], dA[..., dx]
                target.W2[sl], target.b2[sl] = dW2, db2

    _run_chunks(chunk, _chunks(G, M, dh, N, X.element_size()), pool)
    return loss, grad, hvp


def _with_ones(X: torch.Tensor) -> torch.Tensor:
    """``(G, dx + 1, N)``: the inputs transposed, with a row of ones (the bias input)."""
    ones = torch.ones(X.shape[0], X.shape[1], 1, dtype=X.dtype)
    return torch.cat([X, ones], dim=2).transpose(1, 2).contiguous()


def _chunks(G: int, M: int, dh: int, N: int, itemsize: int) -> list[tuple[int, int, int]]:
    step = max(1, CHUNK_BYTES // (dh * N * itemsize))
    return [(g, m0, min(M, m0 + step)) for g in range(G) for m0 in range(0, M, step)]


def _run_chunks(fn, jobs, pool) -> None:
    if pool is None:
        for job in jobs:
            fn(*job)
    else:
        for future in [pool.submit(fn, *job) for job in jobs]:
            future.result()


_workspace = threading.local()


def _buffers(rows: int, N: int, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three ``(rows, N)`` scratch matrices of this thread, reused from step to step.

    Fresh large tensors at every step would be fresh pages from the system, whose
    faults cost more than the passes over them.
    """
    cache = getattr(_workspace, "buffers", None)
    if cache is None:
        cache = _workspace.buffers = {}
    key = (rows, N, dtype)
    if key not in cache:
        cache[key] = tuple(torch.empty(rows, N, dtype=dtype) for _ in range(3))
    return cache[key]


def _products(A, W2, b2, X1t, y, probe, decay):
    """Loss, gradient and ``H v`` of ``c`` models sharing inputs ``X1t: (dx + 1, N)``.

    ``A = [W1 | b1]: (c, dh, dx + 1)``; ``probe = (VA, V2, c2)`` in the same layout, or
    None. Returns ``loss: (c,)``, ``(gA, gW2, gb2)`` and ``(hA, hW2, hb2)`` (or None).
    Products with the mask and the activations are formed as ``(c, k, N) @ (c, N, dh)``
    with the transposed views: on the CPU that is several times faster than the
    ``(c, dh, N) @ (c, N, k)`` order for the thin ``k`` here.
    """
    c, dh, dx1 = A.shape
    dx, N = dx1 - 1, X1t.shape[1]
    Z, H, V = _buffers(c * dh, N, A.dtype)
    Z = torch.mm(A.reshape(c * dh, dx1), X1t, out=Z).view(c, dh, N)
    H = torch.clamp_min(Z, 0.0, out=H.view(c, dh, N))
    r = torch.bmm(W2.unsqueeze(1), H).squeeze(1) + b2.unsqueeze(-1) - y
    loss = torch.linalg.vecdot(r, r) / N
    delta = r * (2.0 / N)
    S = torch.sign(H, out=Z)                                 # ReLU mask, 0 or 1
    St, Ht = S.transpose(1, 2), H.transpose(1, 2)
    if probe is None:
        D = delta.unsqueeze(1)                               # (c, 1, N)
        gA = torch.bmm(X1t * D, St).transpose(1, 2) * W2.unsqueeze(-1)
        gA[..., :dx] += decay * A[..., :dx]
        gW2 = torch.bmm(D, Ht).squeeze(1) + decay * W2
        return loss, (gA, gW2, delta.sum(-1)), None
    VA, V2, c2 = probe
    SVZ = torch.mm(VA.reshape(c * dh, dx1), X1t, out=V).view(c, dh, N).mul_(S)
    e = (torch.bmm(W2.unsqueeze(1), SVZ) + torch.bmm(V2.unsqueeze(1), H)).squeeze(1)
    e = (e + c2.unsqueeze(-1)) * (2.0 / N)                   # (2/N) * change of f along v
    D = torch.stack([delta, e], dim=1)                       # (c, 2, N)
    HD = torch.bmm(D, Ht)                                    # (c, 2, dh)
    XD = (X1t * D.unsqueeze(2)).reshape(c, 2 * dx1, N)       # [delta * X1t ; e * X1t]
    SX = torch.bmm(XD, St).transpose(1, 2)                   # (c, dh, 2 (dx + 1))
    gA = SX[..., :dx1] * W2.unsqueeze(-1)
    hA = SX[..., dx1:] * W2.unsqueeze(-1) + SX[..., :dx1] * V2.unsqueeze(-1)
    gA[..., :dx] += decay * A[..., :dx]
    hA[..., :dx] += decay * VA[..., :dx]
    gW2 = HD[:, 0] + decay * W2
    hW2 = HD[:, 1] + torch.bmm(D[:, :1], SVZ.transpose(1, 2)).squeeze(1) + decay * V2
    return loss, (gA, gW2, delta.sum(-1)), (hA, hW2, e.sum(-1))


def _draw_probe(G: int, M: int, dh: int, dx: int, gen: torch.Generator, dtype):
    """Rademacher ``(VA: (G, M, dh, dx + 1), V2: (G, M, dh), c2: (G, M))``."""
    out = []
    for shape in ((G, M, dh, dx + 1), (G, M, dh), (G, M)):
        bits = torch.randint(0, 2, shape, generator=gen, dtype=torch.int8)
        out.append((2 * bits - 1).to(dtype))
    return out


def rademacher_like(params: Params, gen: torch.Generator) -> Params:
    """A Rademacher (+-1) direction with the shapes and dtype of ``params``.

    Draws the first-layer weights and biases together, as :func:`train_adahessian`
    draws its probes, so that the same generator state gives the same direction.
    """
    G, M = params.grid
    VA, V2, c2 = _draw_probe(G, M, params.width, params.dim, gen, params.W1.dtype)
    return Params(VA[..., :-1], VA[..., -1], V2, c2)


def _power_runs(hessian_power, M: int) -> list[tuple[int, int, float]]:
    """``(m0, m1, power)`` for each run of equal consecutive powers along the models."""
    if isinstance(hessian_power, (int, float, np.integer, np.floating)) and not isinstance(
            hessian_power, bool):
        powers = [finite_real("hessian_power", float(hessian_power))] * M
    else:
        powers = [finite_real("hessian_power", float(k)) for k in hessian_power]
        if len(powers) != M:
            raise ValueError(
                f"hessian_power must be one number or one per model ({M}), got {len(powers)}"
            )
    runs, m0 = [], 0
    for m in range(1, M + 1):
        if m == M or powers[m] != powers[m0]:
            runs.append((m0, m, powers[m0]))
            m0 = m
    return runs


def train_adahessian(
    X_train: torch.Tensor,
    y_train: torch.Tensor,
    params: Params,
    hessian_power: float | Sequence[float],
    config: TrainConfig = TrainConfig(),
    X_test: torch.Tensor | None = None,
    y_test: torch.Tensor | None = None,
    seed: int = 0,
    betas: tuple[float, float] = (0.9, 0.999),
    test_chunk: int = 1000,
) -> TrainResult:
    """Train a ``(G, M)`` grid of networks by full-batch AdaHessian steps.

    Each step forms the gradient and one Hutchinson estimate ``v * (H v)`` of the
    Hessian diagonal (``v`` Rademacher, drawn from ``generator(seed,
    "adahessian-probe")``) in closed form, and calls
    :class:`RelaxedAdaHessian.step` with that estimate. Models whose powers are equal
    and adjacent along ``M`` share one parameter group (the update is elementwise,
    so this equals one optimizer per model; the tests check it).

    Parameters
    ----------
    X_train : (G, N, dx)
    y_train : (G, M, N)
    params : Params
        Initial ``(G, M)`` grid; not modified; cast to the dtype of ``X_train``.
    hessian_power : float or (M,) sequence
        The power ``k`` of every model, or of the models ``m`` of each group.
    config : TrainConfig
        ``n_steps``, ``lr``, ``weight_decay`` (in the loss, as in
        :func:`spectral_precond.train`), the logging schedule and
        ``divergence_factor``; ``snapshot_steps`` is not supported.
    X_test, y_test : (G, n_test, dx) and (G, M, n_test), optional
    seed : int
        Seeds the Hutchinson probes.
    betas : the optimizer's averaging constants for the gradient and the Hessian
    test_chunk : test points evaluated at a time

    Returns
    -------
    TrainResult
        As :func:`spectral_precond.train` returns it (no snapshots). A model whose
        loss becomes non-finite or exceeds ``divergence_factor`` times its initial
        loss is frozen; its later logged losses are NaN.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if len(config.snapshot_steps):
        raise ValueError("train_adahessian does not keep snapshots; leave snapshot_steps empty")
    if not isinstance(params, Params):
        raise TypeError(f"params must be Params, got {type(params).__name__}")
    if not isinstance(X_train, torch.Tensor) or X_train.ndim != 3:
        raise ValueError(f"X_train must be a (G, N, dx) tensor, got {getattr(X_train, 'shape', X_train)!r}")
    G, N, dx = X_train.shape
    M = params.grid[1]
    if params.grid[0] != G or params.dim != dx:
        raise ValueError(
            f"params grid {params.grid} with input dimension {params.dim} does not match "
            f"X_train of shape {tuple(X_train.shape)}"
        )
    if not isinstance(y_train, torch.Tensor) or y_train.shape != (G, M, N):
        raise ValueError(f"y_train must have shape {(G, M, N)}, got {getattr(y_train, 'shape', y_train)!r}")
    if (X_test is None) != (y_test is None):
        raise ValueError("give both X_test and y_test, or neither")
    if X_test is not None and (X_test.ndim != 3 or X_test.shape[0] != G or X_test.shape[2] != dx
                               or y_test.shape != (G, M, X_test.shape[1])):
        raise ValueError(
            f"X_test must be (G={G}, n_test, dx={dx}) and y_test (G, M={M}, n_test), got "
            f"{tuple(X_test.shape)} and {tuple(y_test.shape)}"
        )
    runs = _power_runs(hessian_power, M)
    dtype = X_train.dtype
    # Parameters are kept model-major, (M, G, ...), with W1 and b1 side by side in
    # A = [W1 | b1]: a run of models with one power is then one contiguous view, and
    # the optimizer's parameter groups are views of the grid (its update is
    # elementwise, so how the tensors are cut does not change it).
    W1, b1, W2, b2 = (t.to(dtype) for t in params.tensors())
    A = torch.cat([W1, b1.unsqueeze(-1)], dim=-1)
    state = [t.transpose(0, 1).clone(memory_format=torch.contiguous_format)
             for t in (A, W2, b2)]
    grads = [torch.zeros_like(t) for t in state]
    hess = [torch.zeros_like(t) for t in state]
    groups = [{"params": [t[m0:m1] for t in state], "hessian_power": k} for m0, m1, k in runs]
    opt = RelaxedAdaHessian(groups, lr=config.lr, betas=betas)
    hess_views = []
    for (m0, m1, _), group in zip(runs, opt.param_groups):
        for p, g, h in zip(group["params"], grads, hess):
            p.grad = g[m0:m1]
            hess_views.append(h[m0:m1])

    steps = config.schedule()
    log_at = {int(t): i for i, t in enumerate(steps)}
    train_loss = torch.full((G, M, len(steps)), float("nan"), dtype=dtype)
    test_loss = None if X_test is None else torch.full_like(train_loss, float("nan"))
    diverged_at = torch.full((G, M), -1, dtype=torch.long)
    run = _Run(config, _with_ones(X_train), y_train.to(dtype), X_test, y_test, state, grads,
               hess, opt, hess_views, generator(seed, "adahessian-probe"), log_at,
               train_loss, test_loss, diverged_at, test_chunk)
    # As in spectral_precond.train: on the CPU, chunks of models go to worker threads
    # that each run single-threaded operations.
    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(max_workers=threads) if threads > 1 else None
    torch.set_num_threads(1)
    try:
        run.train(pool)
    finally:
        torch.set_num_threads(threads)
        if pool is not None:
            pool.shutdown()
    A, W2, b2 = (t.transpose(0, 1) for t in state)
    final = Params(A[..., :dx].contiguous(), A[..., dx].contiguous(), W2.contiguous(),
                   b2.contiguous())
    return TrainResult(steps=steps, train_loss=train_loss, test_loss=test_loss,
                       params=final, diverged_at=diverged_at)


class _Run:
    """The state of one call to :func:`train_adahessian` and its steps.

    ``state``, ``grads`` and ``hess`` hold ``[A, W2, b2]`` in the ``(M, G, ...)``
    layout; the optimizer's parameters, gradients and Hessian estimates are views of
    them, filled in place chunk by chunk.
    """

    def __init__(self, config, X1t, y, X_test, y_test, state, grads, hess, opt, hess_views,
                 probe_gen, log_at, train_loss, test_loss, diverged_at, test_chunk):
        self.__dict__.update(locals())
        del self.__dict__["self"]
        M, G, dh, dx1 = state[0].shape
        self.shape = (G, M, dh, dx1 - 1)
        self.jobs = _chunks(G, M, dh, X1t.shape[2], X1t.element_size())
        self.decay = config.weight_decay / X1t.shape[2]
        self.loss = torch.empty(G, M, dtype=X1t.dtype)

    def chunk(self, g, m0, m1, probe):
        sl = (slice(m0, m1), g)
        A, W2, b2 = (t[sl] for t in self.state)
        v = None if probe is None else tuple(t[g, m0:m1] for t in probe)
        loss, grad, hvp = _products(A, W2, b2, self.X1t[g], self.y[g, m0:m1], v, self.decay)
        self.loss[g, m0:m1] = loss
        if probe is None:
            return
        for target, value in zip(self.grads, grad):
            target[sl] = value
        for target, value, direction in zip(self.hess, hvp, v):
            torch.mul(value, direction, out=target[sl])      # Hutchinson: v * (H v)

    def params(self) -> Params:
        A, W2, b2 = (t.transpose(0, 1) for t in self.state)
        dx = self.shape[3]
        return Params(A[..., :dx], A[..., dx], W2, b2)

    def train(self, pool):
        config, (G, M, dh, dx) = self.config, self.shape
        active = torch.ones(G, M, dtype=torch.bool)
        frozen, limit = None, None
        for t in range(config.n_steps + 1):
            probe = None
            if t < config.n_steps:
                probe = _draw_probe(G, M, dh, dx, self.probe_gen, self.X1t.dtype)
            _run_chunks(lambda g, m0, m1: self.chunk(g, m0, m1, probe), self.jobs, pool)
            loss = self.loss
            if limit is None:
                limit = config.divergence_factor * loss.clamp_min(1.0)
            bad = ~(loss <= limit) & active                      # NaN-safe
            if bad.any():
                self.diverged_at.masked_fill_(bad, t)
                active &= ~bad
                frozen = [x.clone() for x in self.state]
            if t in self.log_at:
                i = self.log_at[t]
                self.train_loss[:, :, i] = loss.masked_fill(~active, float("nan"))
                if self.X_test is not None:
                    test = _test_mse(self.params(), self.X_test, self.y_test, self.test_chunk)
                    self.test_loss[:, :, i] = test.masked_fill(~active, float("nan"))
            if t == config.n_steps:
                break
            self.opt.step(hessian=self.hess_views)
            if frozen is not None:
                # Diverged models keep the parameters they had when they were found.
                dead = ~active.transpose(0, 1)
                for x, f in zip(self.state, frozen):
                    x[dead] = f[dead]


@torch.no_grad()
def _test_mse(params: Params, X: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:
    """``(G, M)`` mean squared error on ``X: (G, n, dx)``, ``y: (G, M, n)``."""
    W1, b1, W2, b2 = params.tensors()
    total = torch.zeros(params.grid, dtype=X.dtype)
    n = X.shape[1]
    for s in range(0, n, chunk):
        Xc = X[:, s : s + chunk].to(W1.dtype)
        Z = torch.matmul(W1, Xc.transpose(1, 2).unsqueeze(1)) + b1.unsqueeze(-1)
        f = (W2.unsqueeze(-2) @ Z.clamp_min_(0.0)).squeeze(-2) + b2.unsqueeze(-1)
        total += (f - y[..., s : s + chunk].to(f.dtype)).square().sum(-1)
    return total / n
