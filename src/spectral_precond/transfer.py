"""Forward transfer: a frozen first layer, a new task, a ridge-regression head.

The paper's third experiment pre-trains a network on one teacher, freezes its first
layer, draws a new data set with the same input distribution but the teacher on
another eigendirection, and fits only the head by ridge regression on the centred
ReLU features of the training inputs (penalty ``1e-3 * N`` times the identity, as
in the authors' code). The head's intercept is the training-label mean minus the
training-feature mean times the weights: that is what centring means, and it is
what scikit-learn's ``Ridge(alpha=penalty * N, fit_intercept=True)`` computes.

Everything works on a ``(G, M)`` grid of networks (see :mod:`networks`): the ``M``
models of group ``g`` share the new task's data ``X[g]``. :func:`stack_groups` turns
several per-seed grids of a sweep into such a grid.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ._checks import finite_real
from .data import Case
from .metrics import check_inputs
from .networks import Params, predict

#: Bound on the bytes of one chunk of hidden activations in :func:`mse`.
CHUNK_BYTES = 16 << 20


def transfer_case(source: Case, direction: int, name: str | None = None) -> Case:
    """The inputs of ``source`` with the teacher on eigendirection ``direction``.

    Parameters
    ----------
    source : Case
        The pre-training case; its spectrum and eigenvectors are kept.
    direction : int
        Index (0-based) of the eigendirection that carries the new teacher.
    name : str, optional
        Name of the new case; ``"<source>-to-e<direction + 1>"`` by default.
    """
    if not isinstance(source, Case):
        raise TypeError(f"source must be a Case, got {type(source).__name__}")
    dx = source.inputs.dim
    if isinstance(direction, bool) or not isinstance(direction, int):
        raise TypeError(f"direction must be an int, got {direction!r}")
    if not 0 <= direction < dx:
        raise ValueError(
            f"direction must be in [0, {dx - 1}] for dx = {dx}, got {direction}"
        )
    coef = torch.zeros(dx, dtype=torch.float64)
    coef[direction] = 1.0
    return Case(name or f"{source.name}-to-e{direction + 1}", source.inputs, coef)


def stack_groups(grids: Sequence[Params]) -> Params:
    """Stack grids as groups: ``k`` grids ``(A, B)`` -> one grid ``(k, A * B)``.

    Use it to give each grid its own data set, for instance one per seed of a sweep
    (whose :meth:`~spectral_precond.sweeps.SweepResult.params` is a ``(P, R)`` grid
    of models that share one data set).
    """
    grids = list(grids)
    if not grids or not all(isinstance(g, Params) for g in grids):
        raise TypeError("grids must be a non-empty sequence of Params")
    shapes = {tuple(g.W1.shape) for g in grids}
    if len(shapes) != 1:
        raise ValueError(f"all grids must have one shape, got {sorted(shapes)}")
    return Params(*(
        torch.stack([t.reshape(-1, *t.shape[2:]) for t in parts])
        for parts in zip(*(g.tensors() for g in grids))
    ))


def _check_task(
    params: Params, X: torch.Tensor, y: torch.Tensor, names: tuple[str, str]
) -> tuple[torch.Tensor, torch.Tensor]:
    X = check_inputs(params, X, names[0]).to(torch.float64)
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{names[1]} must be a torch.Tensor, got {type(y).__name__}")
    G, M = params.grid
    n = X.shape[1]
    if y.ndim == 2:
        y = y.unsqueeze(1)
    if y.ndim != 3 or y.shape[0] != G or y.shape[1] not in (1, M) or y.shape[2] != n:
        raise ValueError(
            f"{names[1]} must have shape ({G}, n) or ({G}, 1 or {M}, n) with n = {n}, "
            f"got {tuple(y.shape)}"
        )
    if not torch.isfinite(y).all():
        raise ValueError(f"{names[1]} must be finite")
    return X, y.to(torch.float64).expand(G, M, n)


def _check_penalty(penalty, X: torch.Tensor) -> tuple[float, int]:
    penalty = finite_real("penalty", penalty)
    if penalty <= 0:
        raise ValueError(f"penalty must be > 0, got {penalty}")
    N = X.shape[1]
    if N < 2:
        raise ValueError(
            f"need at least 2 training samples to centre features, got {N}"
        )
    return penalty, N


def _centred_features(W1: torch.Tensor, b1: torch.Tensor, X: torch.Tensor):
    """ReLU features of one group, centred over samples: ``(M, dh, N)`` and the mean."""
    H = torch.relu(W1 @ X.T + b1.unsqueeze(-1))
    mu = H.mean(-1, keepdim=True)
    return H - mu, mu


def fit_ridge_head(
    params: Params, X_train: torch.Tensor, y_train: torch.Tensor, penalty: float = 1e-3
) -> Params:
    """Freeze the first layer of every model and fit a new head by ridge regression.

    With ``H: (N, dh)`` the ReLU features of the training inputs, ``mu`` their mean
    over samples and ``Hc = H - mu``, the head solves

        W2 = argmin ||yc - Hc w||^2 + penalty * N * ||w||^2,   b2 = mean(y) - mu . W2

    with ``yc`` the centred labels (scikit-learn's ``Ridge(alpha=penalty * N)`` with
    ``fit_intercept=True``). The system is solved in float64, in its ``N x N`` (dual)
    or ``dh x dh`` (primal) form, whichever is smaller; both give the same head.

    Parameters
    ----------
    params : Params
        A ``(G, M)`` grid; its ``W1`` and ``b1`` are kept.
    X_train : (G, N, dx)
        The new task's training inputs, one set per group.
    y_train : (G, N), (G, 1, N) or (G, M, N)
        Its labels, shared by a group's models or one row per model.
    penalty : float
        Ridge penalty per training sample, > 0 (the authors use 1e-3).

    Returns
    -------
    Params
        The frozen ``W1, b1`` (as given) and the fitted float64 ``W2: (G, M, dh)``,
        ``b2: (G, M)``.
    """
    X, y = _check_task(params, X_train, y_train, ("X_train", "y_train"))
    penalty, N = _check_penalty(penalty, X)
    W1, b1 = params.W1.to(torch.float64), params.b1.to(torch.float64)
    G, M = params.grid
    dh = params.width
    alpha = penalty * N
    W2 = torch.empty(G, M, dh, dtype=torch.float64)
    b2 = torch.empty(G, M, dtype=torch.float64)
    for g in range(G):
        Hc, mu = _centred_features(W1[g], b1[g], X[g])
        yc = (y[g] - y[g].mean(-1, keepdim=True)).unsqueeze(-1)     # (M, N, 1)
        if N <= dh:
            K = Hc.transpose(1, 2) @ Hc + alpha * torch.eye(N, dtype=torch.float64)
            dual = torch.cholesky_solve(yc, torch.linalg.cholesky(K))   # (M, N, 1)
            W2[g] = (Hc @ dual).squeeze(-1)
        else:
            A = Hc @ Hc.transpose(1, 2) + alpha * torch.eye(dh, dtype=torch.float64)
            W2[g] = torch.cholesky_solve(Hc @ yc, torch.linalg.cholesky(A)).squeeze(-1)
        b2[g] = y[g].mean(-1) - (mu.squeeze(-1) * W2[g]).sum(-1)
    return Params(params.W1.clone(), params.b1.clone(), W2, b2)


def effective_dof(
    params: Params, X_train: torch.Tensor, penalty: float = 1e-3
) -> torch.Tensor:
    """Effective degrees of freedom of each model's ridge head, ``(G, M)`` float64.

    ``df = trace(Hc (Hc^T Hc + penalty * N * I)^{-1} Hc^T) = sum_k s_k^2 / (s_k^2 +
    penalty * N)`` over the singular values ``s_k`` of the centred training features
    ``Hc: (N, dh)``: the number of directions the head can fit, between 0 (the
    penalty wins everywhere) and ``N - 1`` (centred features span every centred
    label vector, and the head interpolates). The labels play no part.

    Parameters are those of :func:`fit_ridge_head` without the labels.
    """
    X = check_inputs(params, X_train, "X_train").to(torch.float64)
    penalty, N = _check_penalty(penalty, X)
    W1, b1 = params.W1.to(torch.float64), params.b1.to(torch.float64)
    out = torch.empty(params.grid, dtype=torch.float64)
    for g in range(params.grid[0]):
        Hc, _ = _centred_features(W1[g], b1[g], X[g])
        gram = Hc.transpose(1, 2) @ Hc if N <= params.width else Hc @ Hc.transpose(1, 2)
        ev = torch.linalg.eigvalsh(gram).clamp_min(0.0)
        out[g] = (ev / (ev + penalty * N)).sum(-1)
    return out


def mse(params: Params, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error of every model on its group's data, ``(G, M)`` float64.

    ``X: (G, n, dx)``; ``y: (G, n)``, ``(G, 1, n)`` or ``(G, M, n)``. The network is
    evaluated in the dtype of ``params.W1`` (float32 runs in float32, several times
    faster on a CPU; relative error about 1e-6) and the squared errors are summed in
    float64. The inputs are taken a chunk at a time, all models of a group at once,
    so that a large test set fits in memory.
    """
    X, y = _check_task(params, X, y, ("X", "y"))
    G, M = params.grid
    n = X.shape[1]
    dtype = params.W1.dtype
    step = max(1, CHUNK_BYTES // (M * params.width * dtype.itemsize))
    out = torch.zeros(G, M, dtype=torch.float64)
    for g in range(G):
        group = Params(*(t[g:g + 1].to(dtype) for t in params.tensors()))
        Xg = X[g:g + 1].to(dtype)
        for a in range(0, n, step):
            f = predict(group, Xg[:, a:a + step])[0]                  # (M, chunk)
            out[g] += (f.double() - y[g, :, a:a + step]).square().sum(-1)
    return out / n
