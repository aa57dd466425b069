import pytest
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


from spectral_precond.gram import (  # noqa: E402
    empirical_gradient_direction,
    gradient_alignment_law,
    gradient_direction,
    gram_spectrum_law,
)


def test_spectrum_law_is_exact_for_the_uncentred_empirical_covariance():
    inputs = sp.GaussianInputs(torch.tensor([5.0, 2.0, 1.0, 0.3, 0.05]))
    X = inputs.sample(40, sp.generator(3))
    s = torch.linalg.svdvals(X)
    for p in [-1.0, -0.5, 0.0, 0.5, 1.0, 1.7]:
        P = sp.empirical_power(X, p, damping=0.0, center=False)
        eig = torch.linalg.eigvalsh(sp.gram(X, P)).flip(0)[: len(s)]
        law = gram_spectrum_law(s, p, 40)
        torch.testing.assert_close(eig, law, rtol=1e-9, atol=0.0)
        # The remaining N - dx eigenvalues are zero.
        rest = torch.linalg.eigvalsh(sp.gram(X, P)).flip(0)[len(s):]
        assert rest.abs().max() < 1e-9 * eig.max()


def test_spectrum_law_is_approximate_for_the_population_power():
    inputs = sp.GaussianInputs(torch.tensor([10.0, 1.0, 0.1]))
    n = 2_000
    X = inputs.sample(n, sp.generator(4))
    s = torch.linalg.svdvals(X)
    P = sp.population_power(inputs, 1.0)
    eig = torch.linalg.eigvalsh(sp.gram(X, P)).flip(0)[:3]
    law = gram_spectrum_law(s, 1.0, n)
    assert ((eig / law - 1).abs() < 0.1).all()
    # ... and both approach n lambda^{p+1}.
    assert ((law / (n * inputs.eigenvalues ** 2) - 1).abs() < 0.15).all()


def test_gradient_direction_matches_steins_lemma_by_monte_carlo():
    A = torch.randn(4, 4, generator=sp.generator(5), dtype=torch.float64)
    Q, _ = torch.linalg.qr(A)
    inputs = sp.GaussianInputs(torch.tensor([4.0, 1.0, 0.5, 0.25]), Q)
    beta = torch.tensor([0.3, -0.2, 0.5, 0.4], dtype=torch.float64)
    X = inputs.sample(200_000, sp.generator(6))
    y = sp.softplus10(X @ beta)
    for p in [-1.0, 0.0, 1.0]:
        P = sp.population_power(inputs, p)
        mc = empirical_gradient_direction(X, y, P)
        want = gradient_direction(inputs, beta, p)
        cos = mc @ want / (mc.norm() * want.norm())
        assert cos > 0.999, (p, cos)
    # Not parallel to beta unless p = -1.
    g = gradient_direction(inputs, beta, 1.0)
    assert g @ beta / (g.norm() * beta.norm()) < 0.95
    torch.testing.assert_close(gradient_direction(inputs, beta, -1.0), beta)


def test_empirical_direction_is_the_head_weighted_gradient_of_a_linear_layer():
    # f(x) = a . (W x) at W = 0: the gradient of the mean squared error is
    # -(2 / N) a y^T X, so a^T (dL/dW P) = -(2 / N) |a|^2 P X^T y.
    X = torch.randn(30, 3, generator=sp.generator(7), dtype=torch.float64)
    y = torch.randn(30, generator=sp.generator(8), dtype=torch.float64)
    a = torch.randn(5, generator=sp.generator(9), dtype=torch.float64)
    Sigma = torch.diag(torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64))
    P = sp.population_power(Sigma, 0.5)
    W = torch.zeros(5, 3, dtype=torch.float64, requires_grad=True)
    loss = ((X @ W.T @ a - y) ** 2).mean()
    (grad,) = torch.autograd.grad(loss, W)
    want = -2 * a.square().sum() * empirical_gradient_direction(X, y, P)
    torch.testing.assert_close(a @ (grad @ P), want)


def test_alignment_law_matches_monte_carlo_over_training_sets():
    inputs = sp.GaussianInputs(torch.tensor([10.0, 0.1, 0.1, 0.1, 0.1]))
    beta = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    n, reps = 60, 3000
    X = inputs.sample(n * reps, sp.generator(10)).reshape(reps, n, 5)
    noise = torch.randn(reps, n, generator=sp.generator(11), dtype=torch.float64)
    raw = torch.tanh(X @ beta) + 2.0 * noise
    mean, std = raw.mean(), raw.std()
    y = (raw - mean) / std
    # E[y x] from a large independent sample, with the same standardisation.
    big = inputs.sample(200_000, sp.generator(12))
    noise_big = torch.randn(200_000, generator=sp.generator(13), dtype=torch.float64)
    mu = big.T @ ((torch.tanh(big @ beta) + 2.0 * noise_big - mean) / std) / 200_000
    for p in [-1.0, -0.5, 0.0]:
        Sp = sp.population_power(inputs, p)
        g = torch.einsum("ij,rnj,rn->ri", Sp, X, y) / n
        cos2 = (g @ beta).square() / g.square().sum(-1)
        law = gradient_alignment_law(inputs, mu, p, n, beta)
        assert abs(law ** 2 - cos2.mean()) < 0.05, (p, law ** 2, cos2.mean())
    assert gradient_alignment_law(inputs, mu, -1.0, n, beta) < gradient_alignment_law(
        inputs, mu, 0.0, n, beta)


@pytest.mark.parametrize("call, message", [
    (lambda: gram_spectrum_law(torch.tensor([1.0, 0.0]), 1.0, 10), "singular values"),
    (lambda: gram_spectrum_law(torch.tensor([1.0]), float("nan"), 10),
     "p must be finite"),
    (lambda: gram_spectrum_law(torch.tensor([1.0]), 1.0, 0), "n must be >= 1"),
    (lambda: gradient_direction(torch.eye(3), torch.ones(2), 0.5), "beta has length 2"),
    (lambda: gradient_direction(torch.eye(3), torch.ones(3, 1), 0.5), "beta must be"),
    (lambda: empirical_gradient_direction(torch.ones(4, 2), torch.ones(3),
                                          torch.eye(2)),
     "3 labels for 4 rows"),
    (lambda: empirical_gradient_direction(torch.ones(4, 2), torch.ones(4),
                                          torch.eye(3)),
     r"P must be \(2, 2\)"),
    (lambda: gradient_alignment_law(torch.eye(2), torch.ones(2), 0.0, 5,
                                    torch.zeros(2)),
     "direction must be non-zero"),
    (lambda: gradient_alignment_law(torch.eye(2), torch.ones(3), 0.0, 5, torch.ones(3)),
     "share one dimension"),
])
def test_closed_forms_name_bad_input(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()
