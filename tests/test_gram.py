import torch

import spectral_precond as sp


def test_gram_is_invariant_under_p_orthogonal_maps():
    inputs = sp.case_low().inputs
    P = sp.population_power(inputs, 0.7)
    X = inputs.sample(30, sp.generator(0))
    x = inputs.sample(5, sp.generator(1))
    Q, _ = torch.linalg.qr(torch.randn(10, 10, generator=sp.generator(2), dtype=torch.float64))
    R = sp.matrix_sqrt(sp.population_power(inputs, -0.7)) @ Q @ sp.matrix_sqrt(P)
    torch.testing.assert_close(sp.gram(X @ R.T, P), sp.gram(X, P))
    torch.testing.assert_close(sp.cross_gram(X @ R.T, P, x @ R.T), sp.cross_gram(X, P, x))
    # A plain rotation keeps the Euclidean Gram matrix but not this one.
    assert not torch.allclose(sp.gram(X @ Q.T, P), sp.gram(X, P))
    torch.testing.assert_close(sp.gram(X @ Q.T, torch.eye(10)), sp.gram(X, torch.eye(10)))


def test_gram_matches_its_definition():
    X = torch.randn(4, 3, dtype=torch.float64)
    P = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    want = torch.tensor([[sum(X[i, k] * P[k, k] * X[j, k] for k in range(3)) for j in range(4)] for i in range(4)])
    torch.testing.assert_close(sp.gram(X, P), want.double())
    assert sp.cross_gram(X, P, X[:2]).shape == (2, 4)
