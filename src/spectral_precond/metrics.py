"""Feature-level metrics: how a trained grid of networks uses each input direction.

Both metrics take the eigendirections ``u_i`` of the input covariance (the columns of
``eigenvectors``) and return one number per model and direction, ``(G, M, dx)``:

- :func:`eigendirection_energy`: ``E_i = ||(W1 - W1_ref) u_i||^2``, the energy of the
  first layer along ``u_i`` (of what was learned when ``W1_ref`` is the
  initialisation);
- :func:`input_sensitivity`: ``S_i = mean_x (df(x)/dx . u_i)^2``, how strongly the
  network's output moves when its input moves along ``u_i``.

For the two-layer ReLU network ``f(x) = W2 . relu(W1 x + b1) + b2`` the input gradient
is ``df/dx = W1^T (W2 * 1[W1 x + b1 > 0])``, so no autograd is needed.
"""

from __future__ import annotations

import torch

from .networks import Params

#: Bound on the size of one group's ReLU mask in :func:`input_sensitivity`.
MASK_CHUNK_BYTES = 16 << 20


def _check_eigenvectors(eigenvectors: torch.Tensor, dx: int) -> torch.Tensor:
    if not isinstance(eigenvectors, torch.Tensor):
        raise TypeError(
            f"eigenvectors must be a torch.Tensor, got {type(eigenvectors).__name__}"
        )
    if eigenvectors.ndim != 2 or eigenvectors.shape[0] != dx:
        raise ValueError(
            f"eigenvectors must be ({dx}, k) with one direction per column, got "
            f"{tuple(eigenvectors.shape)}"
        )
    return eigenvectors


def eigendirection_energy(
    params: Params, eigenvectors: torch.Tensor, reference: Params | None = None
) -> torch.Tensor:
    """Energy of the first-layer weights along each direction, ``(G, M, k)``.

    Parameters
    ----------
    params : Params
        A ``(G, M)`` grid with ``W1: (G, M, dh, dx)``.
    eigenvectors : (dx, k)
        Directions ``u_i`` as columns (usually the eigenvectors of the covariance).
    reference : Params, optional
        Weights to subtract first (usually the initialisation), so that
        ``E_i = ||(W1 - W1_ref) u_i||^2`` measures what training added. Must have the
        grid and shapes of ``params``.

    Returns
    -------
    (G, M, k) tensor, ``E[g, m, i] = sum_j ((W1 - W1_ref)[g, m, j] . u_i)^2``.
    """
    if not isinstance(params, Params):
        raise TypeError(f"params must be Params, got {type(params).__name__}")
    U = _check_eigenvectors(eigenvectors, params.dim).to(params.W1)
    W1 = params.W1
    if reference is not None:
        if not isinstance(reference, Params):
            raise TypeError(
                f"reference must be Params or None, got {type(reference).__name__}"
            )
        if reference.W1.shape != W1.shape:
            raise ValueError(
                f"reference W1 has shape {tuple(reference.W1.shape)}, params W1 has "
                f"{tuple(W1.shape)}; they must match"
            )
        W1 = W1 - reference.W1.to(W1)
    return (W1 @ U).square().sum(-2)


def input_gradients(params: Params, X: torch.Tensor) -> torch.Tensor:
    """``df/dx`` of every model at every input of its group, ``(G, M, n, dx)``.

    ``X: (G, n, dx)``. At a kink (a pre-activation exactly 0) the ReLU's derivative is
    taken as 0, as in PyTorch.
    """
    X = check_inputs(params, X).to(params.W1)
    G, M = params.grid
    out = torch.empty(G, M, X.shape[1], params.dim, dtype=params.W1.dtype)
    for g in range(G):
        for m0, m1 in _model_chunks(M, params.width, X.shape[1]):
            out[g, m0:m1] = _group_gradients(params, g, m0, m1, X[g])
    return out


def input_sensitivity(
    params: Params, X: torch.Tensor, eigenvectors: torch.Tensor
) -> torch.Tensor:
    """Mean squared input derivative along each direction, ``(G, M, k)``.

    Parameters
    ----------
    params : Params
        A ``(G, M)`` grid of networks.
    X : (G, n, dx)
        Inputs at which the derivative is averaged (group ``g``'s models use ``X[g]``),
        usually fresh draws from the input distribution.
    eigenvectors : (dx, k)
        Directions ``u_i`` as columns.

    Returns
    -------
    (G, M, k) tensor, ``S[g, m, i] = mean_n (df_{g,m}(x_n)/dx . u_i)^2``.
    """
    X = check_inputs(params, X).to(params.W1)
    U = _check_eigenvectors(eigenvectors, params.dim).to(params.W1)
    G, M = params.grid
    out = torch.empty(G, M, U.shape[1], dtype=params.W1.dtype)
    for g in range(G):
        for m0, m1 in _model_chunks(M, params.width, X.shape[1]):
            J = _group_gradients(params, g, m0, m1, X[g])
            out[g, m0:m1] = (J @ U).square().mean(-2)
    return out


def _model_chunks(M: int, dh: int, n: int):
    itemsize = 8
    step = max(1, MASK_CHUNK_BYTES // (dh * n * itemsize))
    for m0 in range(0, M, step):
        yield m0, min(M, m0 + step)


def _group_gradients(
    params: Params, g: int, m0: int, m1: int, X: torch.Tensor
) -> torch.Tensor:
    """``df/dx`` of models ``m0:m1`` of group ``g`` at ``X: (n, dx)``: (c, n, dx)."""
    W1, b1, W2 = params.W1[g, m0:m1], params.b1[g, m0:m1], params.W2[g, m0:m1]
    Z = W1 @ X.T + b1.unsqueeze(-1)                     # (c, dh, n)
    # Row n of the result is (W2 * 1[z_n > 0]) @ W1.
    gate = (Z > 0).to(W1.dtype) * W2.unsqueeze(-1)
    return gate.transpose(1, 2) @ W1


def check_inputs(params: Params, X: torch.Tensor, name: str = "X") -> torch.Tensor:
    """Check that ``X: (G, n, dx)`` holds finite inputs for the grid of ``params``."""
    if not isinstance(params, Params):
        raise TypeError(f"params must be Params, got {type(params).__name__}")
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(X).__name__}")
    G = params.grid[0]
    if X.ndim != 3 or X.shape[0] != G or X.shape[2] != params.dim:
        raise ValueError(
            f"{name} must have shape ({G}, n, {params.dim}) for this grid, got "
            f"{tuple(X.shape)}"
        )
    if not torch.isfinite(X).all():
        raise ValueError(f"{name} must be finite")
    return X
