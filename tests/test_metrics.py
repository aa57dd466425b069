"""Feature metrics against autograd and against direct per-unit sums."""

import numpy as np
import pytest
import torch

import spectral_precond as sp
from spectral_precond.metrics import (
    eigendirection_energy,
    input_gradients,
    input_sensitivity,
)


def _grid(G=2, M=3, dh=7, dx=4, seed=0):
    gen = sp.generator(seed, "metrics-test")
    shapes = [(G, M, dh, dx), (G, M, dh), (G, M, dh), (G, M)]
    return sp.Params(*(torch.randn(*s, generator=gen, dtype=torch.float64)
                       for s in shapes))


def _rotation(dx, seed=1):
    A = torch.randn(dx, dx, generator=sp.generator(seed), dtype=torch.float64)
    Q, _ = torch.linalg.qr(A)
    return Q


def test_input_gradients_match_autograd():
    params = _grid()
    X = torch.randn(2, 11, 4, generator=sp.generator(2), dtype=torch.float64)
    got = input_gradients(params, X)
    for g in range(2):
        for m in range(3):
            W1, b1, W2, b2 = params.model(g, m)
            x = X[g].clone().requires_grad_(True)
            f = torch.relu(x @ W1.T + b1) @ W2 + b2
            (want,) = torch.autograd.grad(f.sum(), x)
            torch.testing.assert_close(got[g, m], want)


def test_input_sensitivity_is_mean_squared_directional_derivative():
    params = _grid()
    X = torch.randn(2, 13, 4, generator=sp.generator(3), dtype=torch.float64)
    U = _rotation(4)
    got = input_sensitivity(params, X, U)
    assert got.shape == (2, 3, 4)
    for g in range(2):
        for m in range(3):
            W1, b1, W2, b2 = params.model(g, m)
            x = X[g].clone().requires_grad_(True)
            f = torch.relu(x @ W1.T + b1) @ W2 + b2
            (J,) = torch.autograd.grad(f.sum(), x)
            for i in range(4):
                terms = [(J[n] @ U[:, i]) ** 2 for n in range(13)]
                want = torch.mean(torch.stack(terms))
                torch.testing.assert_close(got[g, m, i], want)


def test_sensitivity_of_a_network_that_is_linear_on_the_data():
    # With all pre-activations positive the network is x -> (W2 W1) x + const, so the
    # sensitivity along u is (W2 W1 . u)^2 at every input.
    params = _grid(G=1, M=2)
    params.b1.fill_(1e6)
    X = torch.randn(1, 5, 4, generator=sp.generator(4), dtype=torch.float64)
    U = _rotation(4, seed=5)
    slope = torch.einsum("gmh,gmhd->gmd", params.W2, params.W1)
    torch.testing.assert_close(input_sensitivity(params, X, U), (slope @ U) ** 2)


def test_energy_sums_over_hidden_units_and_directions():
    params, ref = _grid(seed=6), _grid(seed=7)
    U = _rotation(4, seed=8)
    E = eigendirection_energy(params, U, reference=ref)
    D = params.W1 - ref.W1
    for g in range(2):
        for m in range(3):
            want = [sum(float(D[g, m, j] @ U[:, i]) ** 2 for j in range(7))
                    for i in range(4)]
            np.testing.assert_allclose(E[g, m].numpy(), want, rtol=1e-12)
    # An orthonormal basis splits the squared Frobenius norm.
    torch.testing.assert_close(E.sum(-1), D.square().sum((-1, -2)))
    torch.testing.assert_close(eigendirection_energy(params, U).sum(-1),
                               params.W1.square().sum((-1, -2)))


def test_chunking_does_not_change_the_result(monkeypatch):
    params = _grid(M=5)
    X = torch.randn(2, 9, 4, generator=sp.generator(9), dtype=torch.float64)
    U = torch.eye(4, dtype=torch.float64)
    whole = input_sensitivity(params, X, U)
    monkeypatch.setattr("spectral_precond.metrics.MASK_CHUNK_BYTES", 1)
    torch.testing.assert_close(input_sensitivity(params, X, U), whole)


@pytest.mark.parametrize("call, message", [
    (lambda p: eigendirection_energy(p, torch.eye(3)), "eigenvectors must be"),
    (lambda p: eigendirection_energy(p, np.eye(4)), "must be a torch.Tensor"),
    (lambda p: eigendirection_energy(p, torch.eye(4), reference=_grid(M=2)),
     "reference W1"),
    (lambda p: input_sensitivity(p, torch.zeros(3, 5, 4), torch.eye(4)),
     "X must have shape"),
    (lambda p: input_sensitivity(p.W1, torch.zeros(2, 5, 4), torch.eye(4)),
     "params must be"),
])
def test_bad_input_is_named(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call(_grid())
