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
CHUNK_BYTES = 2 << 20
#: Same bound for the test-set forward pass.
EVAL_CHUNK_BYTES = 2 << 20


def gradient_and_hvp(
    params: Params,
    X: torch.Tensor,
    y: torch.Tensor,
    probe: Params | None = None,
    weight_decay: float = 0.0,
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
    hvp = None
    if probe is not None:
        hvp = Params(*(torch.empty_like(t) for t in probe.tensors()))

    def chunk(g, m0, m1):
        sl = (g, slice(m0, m1))
        W1, b1, W2, b2 = (t[sl] for t in params.tensors())
        v = None
        if probe is not None:
            V1, c1, V2, c2 = (t[sl] for t in probe.tensors())
            v = (torch.cat([V1, c1.unsqueeze(-1)], dim=-1), V2, c2)
        A = torch.cat([W1, b1.unsqueeze(-1)], dim=-1)
        out = _products(A, W2, b2, X1t[g], y[sl], v, decay)
        loss[sl] = out[0]
        for target, (dA, dW2, db2) in ((grad, out[1]), (hvp, out[2])):
            if target is not None:
                target.W1[sl], target.b1[sl] = dA[..., :dx], dA[..., dx]
                target.W2[sl], target.b2[sl] = dW2, db2

    for job in _chunks(G, M, dh, N, X.element_size()):
        chunk(*job)
    return loss, grad, hvp


def _with_ones(X: torch.Tensor) -> torch.Tensor:
    """``(G, dx + 1, N)``: the inputs transposed, with a row of ones (for the bias)."""
    ones = torch.ones(X.shape[0], X.shape[1], 1, dtype=X.dtype)
    return torch.cat([X, ones], dim=2).transpose(1, 2).contiguous()


def _chunks(G: int, M: int, dh: int, N: int, itemsize: int) -> list[tuple[int, ...]]:
    step = max(1, CHUNK_BYTES // (dh * N * itemsize))
    return [(g, m0, min(M, m0 + step)) for g in range(G) for m0 in range(0, M, step)]


_workspace = threading.local()


def _buffers(rows: int, N: int, dtype) -> tuple[torch.Tensor, ...]:
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
    e = (e + c2.unsqueeze(-1)) * (2.0 / N)               # (2/N) * change of f along v
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


def probe_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """The generators of the Hutchinson probes, one per group, from the groups' seeds.

    A group's probes depend only on its own seed, not on the other groups or on how
    the groups are split across threads.
    """
    return [generator(int(s), "adahessian-probe") for s in seeds]


def _draw_probe(M: int, dh: int, dx: int, gen: torch.Generator, dtype):
    """Rademacher ``(VA: (M, dh, dx + 1), V2: (M, dh), c2: (M,))`` for one group."""
    out = []
    for shape in ((M, dh, dx + 1), (M, dh), (M,)):
        bits = torch.randint(0, 2, shape, generator=gen, dtype=torch.int8)
        out.append((2 * bits - 1).to(dtype))
    return out


def rademacher_like(params: Params, gens: Sequence[torch.Generator]) -> Params:
    """A Rademacher (+-1) direction with the shapes and dtype of ``params``.

    ``gens`` holds one generator per group (:func:`probe_generators`); the first-layer
    weights and biases are drawn together, as :func:`train_adahessian` draws its
    probes, so that the same generator states give the same direction.
    """
    G, M = params.grid
    if len(gens) != G:
        raise ValueError(f"need one generator per group ({G}), got {len(gens)}")
    draws = [_draw_probe(M, params.width, params.dim, g, params.W1.dtype) for g in gens]
    VA, V2, c2 = (torch.stack(t) for t in zip(*draws))
    return Params(VA[..., :-1], VA[..., -1], V2, c2)


def _power_runs(hessian_power, M: int) -> list[tuple[int, int, float]]:
    """``(m0, m1, power)`` for each run of equal consecutive powers along the models."""
    number = (int, float, np.integer, np.floating)
    if isinstance(hessian_power, number) and not isinstance(hessian_power, bool):
        powers = [finite_real("hessian_power", float(hessian_power))] * M
    else:
        powers = [finite_real("hessian_power", float(k)) for k in hessian_power]
        if len(powers) != M:
            raise ValueError(
                f"hessian_power must be one number or one per model ({M}), got "
                f"{len(powers)}"
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
    seed: int | Sequence[int] = 0,
    betas: tuple[float, float] = (0.9, 0.999),
) -> TrainResult:
    """Train a ``(G, M)`` grid of networks by full-batch AdaHessian steps.

    Each step forms the gradient and one Hutchinson estimate ``v * (H v)`` of the
    Hessian diagonal (``v`` Rademacher, one stream per group,
    :func:`probe_generators`) in closed form, and calls
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
    seed : int or (G,) sequence of int
        Seeds the Hutchinson probes, of all groups or of each group.
    betas : the optimizer's averaging constants for the gradient and the Hessian

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
        raise ValueError(
            "train_adahessian does not keep snapshots; leave snapshot_steps empty")
    if not isinstance(params, Params):
        raise TypeError(f"params must be Params, got {type(params).__name__}")
    if not isinstance(X_train, torch.Tensor) or X_train.ndim != 3:
        got = getattr(X_train, "shape", X_train)
        raise ValueError(f"X_train must be a (G, N, dx) tensor, got {got!r}")
    G, N, dx = X_train.shape
    M = params.grid[1]
    if params.grid[0] != G or params.dim != dx:
        raise ValueError(
            f"params grid {params.grid} with input dimension {params.dim} does not "
            f"match X_train of shape {tuple(X_train.shape)}"
        )
    if not isinstance(y_train, torch.Tensor) or y_train.shape != (G, M, N):
        got = getattr(y_train, "shape", y_train)
        raise ValueError(f"y_train must have shape {(G, M, N)}, got {got!r}")
    if (X_test is None) != (y_test is None):
        raise ValueError("give both X_test and y_test, or neither")
    if X_test is not None and (
            X_test.ndim != 3 or X_test.shape[0] != G or X_test.shape[2] != dx
            or y_test.shape != (G, M, X_test.shape[1])):
        raise ValueError(
            f"X_test must be (G={G}, n_test, dx={dx}) and y_test (G, M={M}, n_test), "
            f"got {tuple(X_test.shape)} and {tuple(y_test.shape)}"
        )
    runs = _power_runs(hessian_power, M)
    dtype = X_train.dtype
    seeds = [seed] * G if isinstance(seed, (int, np.integer)) else list(seed)
    if len(seeds) != G or not all(isinstance(s, (int, np.integer)) for s in seeds):
        raise ValueError(
            f"seed must be an int or one int per group ({G}), got {seed!r}")
    gens = probe_generators(seeds)
    # As in spectral_precond.train: on the CPU, blocks of groups go to worker threads
    # that each run single-threaded operations, and each block is a run of its own
    # (its own optimizer and probe generators), so that nothing is shared per step.
    threads = torch.get_num_threads()
    blocks = [b.tolist() for b in np.array_split(np.arange(G), min(threads, G))]

    def part(t, block):
        return None if t is None else t[block[0] : block[-1] + 1].to(dtype)

    parts = [
        _Run(config, part(X_train, b), part(y_train, b),
             Params(*(part(t, b) for t in params.tensors())), runs, part(X_test, b),
             part(y_test, b), gens[b[0] : b[-1] + 1], betas)
        for b in blocks
    ]
    torch.set_num_threads(1)
    try:
        if len(parts) == 1:
            parts[0].train()
        else:
            with ThreadPoolExecutor(max_workers=len(parts)) as pool:
                for future in [pool.submit(r.train) for r in parts]:
                    future.result()
    finally:
        torch.set_num_threads(threads)
    finals = [r.params() for r in parts]
    final = Params(*(torch.cat([getattr(f, k) for f in finals]).contiguous()
                     for k in ("W1", "b1", "W2", "b2")))
    return TrainResult(
        steps=parts[0].steps,
        train_loss=torch.cat([r.train_loss for r in parts]),
        test_loss=None if X_test is None else torch.cat([r.test_loss for r in parts]),
        params=final, diverged_at=torch.cat([r.diverged_at for r in parts]),
    )


class _Run:
    """Some groups of models of one call to :func:`train_adahessian`, and their steps.

    Parameters are kept model-major, ``(M, G, ...)``, with ``W1`` and ``b1`` side by
    side in ``A = [W1 | b1]``: a run of models with one power is then one contiguous
    view, and the optimizer's parameter groups, gradients and Hessian estimates are
    views of ``state``, ``grads`` and ``hess``, filled in place chunk by chunk (the
    update is elementwise, so how the tensors are cut does not change it).
    """

    def __init__(self, config, X, y, params, runs, X_test, y_test, gens, betas):
        G, M = params.grid
        dh, dx = params.width, params.dim
        self.config, self.shape, self.gens = config, (G, M, dh, dx), gens
        self.X1t, self.y = _with_ones(X), y
        self.X1t_test = None if X_test is None else _with_ones(X_test)
        self.y_test = y_test
        A = torch.cat([params.W1, params.b1.unsqueeze(-1)], dim=-1)
        self.state = [t.transpose(0, 1).clone(memory_format=torch.contiguous_format)
                      for t in (A, params.W2, params.b2)]
        self.grads = [torch.zeros_like(t) for t in self.state]
        self.hess = [torch.zeros_like(t) for t in self.state]
        groups = [{"params": [t[m0:m1] for t in self.state], "hessian_power": k}
                  for m0, m1, k in runs]
        self.opt = RelaxedAdaHessian(groups, lr=config.lr, betas=betas)
        self.hess_views = []
        for (m0, m1, _), group in zip(runs, self.opt.param_groups):
            for p, g, h in zip(group["params"], self.grads, self.hess):
                p.grad = g[m0:m1]
                self.hess_views.append(h[m0:m1])
        self.steps = config.schedule()
        self.log_at = {int(t): i for i, t in enumerate(self.steps)}
        nan = float("nan")
        self.train_loss = torch.full((G, M, len(self.steps)), nan, dtype=X.dtype)
        self.test_loss = None
        if X_test is not None:
            self.test_loss = torch.full_like(self.train_loss, nan)
        self.diverged_at = torch.full((G, M), -1, dtype=torch.long)
        self.jobs = _chunks(G, M, dh, X.shape[1], X.element_size())
        self.decay = config.weight_decay / X.shape[1]
        self.loss = torch.empty(G, M, dtype=X.dtype)

    def chunk(self, g, m0, m1, probe):
        sl = (slice(m0, m1), g)
        A, W2, b2 = (t[sl] for t in self.state)
        v = None if probe is None else tuple(t[m0:m1] for t in probe[g])
        loss, grad, hvp = _products(A, W2, b2, self.X1t[g], self.y[g, m0:m1], v,
                                    self.decay)
        self.loss[g, m0:m1] = loss
        if probe is None:
            return
        for target, value in zip(self.grads, grad):
            target[sl] = value
        for target, value, direction in zip(self.hess, hvp, v):
            torch.mul(value, direction, out=target[sl])      # Hutchinson: v * (H v)

    @torch.no_grad()
    def test_mse(self) -> torch.Tensor:
        """``(G, M)`` mean squared error on the test set, in cache-sized pieces."""
        A, W2, b2 = self.state
        M, G, dh, dx1 = A.shape
        n = self.X1t_test.shape[2]
        width = max(1, EVAL_CHUNK_BYTES // (M * dh * A.element_size()))
        buffer = _buffers(M * dh, width, A.dtype)[0].view(-1)
        total = torch.zeros(G, M, dtype=A.dtype)
        for g in range(G):
            A2 = A[:, g].reshape(M * dh, dx1)
            for s in range(0, n, width):
                X1t = self.X1t_test[g][:, s : s + width]
                out = buffer[: M * dh * X1t.shape[1]].view(M * dh, -1)
                H = torch.mm(A2, X1t, out=out).clamp_min_(0.0)
                f = torch.bmm(W2[:, g].unsqueeze(1), H.view(M, dh, -1)).squeeze(1)
                r = f + b2[:, g].unsqueeze(-1) - self.y_test[g, :, s : s + width]
                total[g] += torch.linalg.vecdot(r, r)
        return total / n

    def params(self) -> Params:
        A, W2, b2 = (t.transpose(0, 1) for t in self.state)
        dx = self.shape[3]
        return Params(A[..., :dx], A[..., dx], W2, b2)

    def train(self):
        config, (G, M, dh, dx) = self.config, self.shape
        active = torch.ones(G, M, dtype=torch.bool)
        frozen, limit = None, None
        for t in range(config.n_steps + 1):
            probe = None
            if t < config.n_steps:
                dtype = self.X1t.dtype
                probe = [_draw_probe(M, dh, dx, gen, dtype) for gen in self.gens]
            for job in self.jobs:
                self.chunk(*job, probe)
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
                if self.X1t_test is not None:
                    test = self.test_mse()
                    self.test_loss[:, :, i] = test.masked_fill(~active, float("nan"))
            if t == config.n_steps:
                break
            self.opt.step(hessian=self.hess_views)
            if frozen is not None:
                # Diverged models keep the parameters they had when they were found.
                dead = ~active.transpose(0, 1)
                for x, f in zip(self.state, frozen):
                    x[dead] = f[dead]
