import pytest
import torch

import spectral_precond as sp


def _random_spectrum(seed=0, dx=6):
    gen = sp.generator(seed)
    Q, _ = torch.linalg.qr(torch.randn(dx, dx, generator=gen, dtype=torch.float64))
    lam = torch.rand(dx, generator=gen, dtype=torch.float64) * 5 + 0.1
    return sp.GaussianInputs(lam, Q)


def test_powers_compose_and_invert():
    inputs = _random_spectrum()
    S = inputs.covariance
    P_half, P_neg = sp.population_power(inputs, 0.5), sp.population_power(inputs, -1.0)
    torch.testing.assert_close(P_half @ P_half, S)
    torch.testing.assert_close(P_neg @ S, torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(sp.population_power(inputs, 0.0), torch.eye(6, dtype=torch.float64))
    # A covariance matrix given directly gives the same power as its spectrum.
    torch.testing.assert_close(sp.population_power(S, -0.5), sp.population_power(inputs, -0.5))


def test_empirical_power_of_many_samples_approaches_the_population_one():
    inputs = _random_spectrum(seed=1)
    X = inputs.sample(200_000, sp.generator(2))
    torch.testing.assert_close(
        sp.empirical_power(X, -0.5, damping=0.0), sp.population_power(inputs, -0.5), atol=0.02, rtol=0.02
    )


def test_empirical_damping_is_added_before_the_power():
    X = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)  # singular covariance
    P = sp.empirical_power(X, -1.0, damping=0.5)
    torch.testing.assert_close(P, torch.diag(torch.tensor([1 / 1.5, 1 / 0.5], dtype=torch.float64)))


def test_matrix_sqrt_squares_back():
    S = _random_spectrum(seed=3).covariance
    R = sp.matrix_sqrt(S)
    torch.testing.assert_close(R @ R, S)



def test_non_negative_p_of_a_singular_covariance_is_allowed():
    singular = sp.GaussianInputs(torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(sp.population_power(singular, 0.5),
                               torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64)))



@pytest.mark.parametrize(
    "P, message",
    [
        (torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), "non-finite"),
    ],
)
def test_bad_user_preconditioner_is_refused(P, message):
    with pytest.raises(ValueError, match=message):
        sp.validate_preconditioner(P)


def test_user_preconditioner_of_wrong_size_is_refused():
    with pytest.raises(ValueError, match=r"must be \(3, 3\)"):
        sp.validate_preconditioner(torch.eye(2), dx=3)


def test_good_user_preconditioner_passes():
    P = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    assert torch.equal(sp.validate_preconditioner(P, dx=2), P.double())
    assert torch.equal(sp.identity(3), torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="dx must be an int >= 1"):
        sp.identity(0)


def test_bad_damping_is_refused():
    with pytest.raises(ValueError, match="damping must be >= 0"):
        sp.empirical_power(torch.randn(10, 2), 1.0, damping=-1.0)
