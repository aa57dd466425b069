import math

import pytest
import torch

import spectral_precond as sp


def test_inputs_have_the_requested_covariance():
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=sp.generator(0), dtype=torch.float64))
    inputs = sp.GaussianInputs(torch.tensor([4.0, 2.0, 1.0, 0.25]), Q)
    X = inputs.sample(200_000, sp.generator(1))
    emp = X.T @ X / X.shape[0]
    torch.testing.assert_close(emp, inputs.covariance, atol=0.05, rtol=0.02)


def test_cases_match_the_paper():
    high, low = sp.case_high(), sp.case_low()
    assert high.inputs.eigenvalues.tolist() == [10.0] + [0.1] * 9
    assert low.inputs.eigenvalues.tolist() == [10.0] * 9 + [0.1]
    assert high.coefficients.argmax().item() == 0 and low.coefficients.argmax().item() == 9
    beta = high.teacher(sp.generator(3)).beta
    assert torch.count_nonzero(beta) == 1 and beta[0] != 0


def test_labels_are_standardised_with_training_statistics():
    case = sp.case_high()
    data = sp.make_regression_data(case.inputs, case.teacher(sp.generator(0)), 2000, 200,
                                   [0.5, 1.0, math.inf], sp.generator(1))
    assert data.X_train.shape == (200, 10) and data.X_test.shape == (1800, 10)
    assert data.y_train.shape == (3, 200) and data.y_test.shape == (3, 1800)
    torch.testing.assert_close(data.y_train.mean(-1), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(data.y_train.std(-1), torch.ones(3, dtype=torch.float64))


def test_noise_floor_is_one_over_one_plus_snr_squared():
    case = sp.case_high()
    teacher = case.teacher(sp.generator(0))
    data = sp.make_regression_data(case.inputs, teacher, 40_000, 20_000, [1.0, 2.0], sp.generator(4))
    clean = (teacher(data.X_test) - data.label_mean.unsqueeze(-1)) / data.label_std.unsqueeze(-1)
    floor = ((data.y_test - clean) ** 2).mean(-1)
    torch.testing.assert_close(floor, torch.tensor([0.5, 0.2], dtype=torch.float64), rtol=0.05, atol=0)


def test_snr_values_share_one_noise_draw():
    case = sp.case_low()
    data = sp.make_regression_data(case.inputs, case.teacher(sp.generator(0)), 500, 100,
                                   [1.0, 3.0], sp.generator(2))
    raw = data.y_train * data.label_std.unsqueeze(-1) + data.label_mean.unsqueeze(-1)
    clean = data.teacher(data.X_train)
    noise = (raw - clean) / data.noise_std.unsqueeze(-1)
    torch.testing.assert_close(noise[0], noise[1])


def test_same_generator_seed_same_data():
    case = sp.case_high()
    make = lambda: sp.make_regression_data(case.inputs, case.teacher(sp.generator(5, "t")),
                                           100, 20, 1.0, sp.generator(5, "d"))
    a, b = make(), make()
    assert torch.equal(a.X_train, b.X_train) and torch.equal(a.y_test, b.y_test)






@pytest.mark.parametrize(
    "eigenvalues, eigenvectors, message",
    [
        ([1.0, -0.5], None, "eigenvalues must be finite and >= 0"),
        ([1.0, float("inf")], None, "eigenvalues must be finite and >= 0"),
        ([1.0, 2.0], torch.ones(3, 3), r"eigenvectors must have shape \(2, 2\)"),
        ([1.0, 2.0], torch.tensor([[1.0, 1.0], [0.0, 1.0]]), "eigenvectors must be orthogonal"),
    ],
)
def test_bad_spectrum_is_refused(eigenvalues, eigenvectors, message):
    with pytest.raises(ValueError, match=message):
        sp.GaussianInputs(torch.tensor(eigenvalues), eigenvectors)


def test_bad_two_level_case_is_refused():
    with pytest.raises(ValueError, match="need high > low > 0"):
        sp.two_level_case("x", high=0.1, low=10.0)
    with pytest.raises(ValueError, match="teacher_on must be 'high' or 'low'"):
        sp.two_level_case("x", teacher_on="middle")
