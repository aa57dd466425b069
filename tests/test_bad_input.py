"""Bad input gets a clear error that names the value and what is allowed.

One test per case. The table lists each bad input and the message it gets (a
regular expression the test matches):

| entry point | bad input | error | message |
|---|---|---|---|
| population_power | p = nan or inf | ValueError | p must be finite, got nan |
| population_power | p < 0, singular covariance | ValueError | p=-0.5 < 0 needs a non-singular covariance, but its smallest eigenvalue is 0 ... add damping |
| population_power | p < 0, covariance not PSD | ValueError | covariance must be positive semi-definite: smallest eigenvalue -1 < 0 |
| empirical_power | p < 0, singular data, no damping | ValueError | ... needs a non-singular damped empirical covariance ... add damping |
| validate_preconditioner | P not square | ValueError | preconditioner P must be a square matrix, got shape (2, 3) |
| validate_preconditioner | P not symmetric | ValueError | preconditioner P must be symmetric: max \\|A - A^T\\| = 2 ... |
| validate_preconditioner | P not PSD | ValueError | preconditioner P must be positive semi-definite: smallest eigenvalue -1 < 0 |
| train | P not symmetric / not PSD | ValueError | P must be symmetric: matrix 1 has ... / P must be positive semi-definite: matrix 0 ... |
| make_regression_data | SNR <= 0 or nan | ValueError | snr must be > 0 (inf for no noise), got [0.0] |
| make_regression_data | n_train >= n_samples | ValueError | n_train must be smaller than n_samples to leave a test set, got n_train=200 >= n_samples=100 |
| make_regression_data | teacher and inputs of different dimension | ValueError | teacher beta has length 5 but inputs have dimension 10 |
| train | labels, data and model of mismatched shapes | ValueError | y_train must have shape (2, 1, 40), got ... / params grid ... does not match X_train ... |
| TrainConfig | lr <= 0 or not finite | ValueError | lr must be > 0, got 0.0 / lr must be finite, got nan |
| kaiming_init | width < 1 | ValueError | dh must be >= 1, got 0 |
| TrainConfig | n_steps < 1 | ValueError | n_steps must be >= 1, got 0 |
| make_optimizer | unknown optimizer name | ValueError | unknown optimizer 'adamw'; allowed: sgd, momentum, ... |
| book_profile | unknown profile name | ValueError | BOOK_PROFILE='huge' is not a known profile; allowed: paper, ci |
| SingleIndexTeacher | activation returns the wrong shape | ValueError | teacher activation must return a tensor of shape (4,) (one value per sample), got (4, 1) |
"""

import pytest
import torch

import spectral_precond as sp


def _data(n_samples=100, n_train=20, snr=1.0, teacher=None):
    case = sp.case_high()
    teacher = teacher or case.teacher(sp.generator(0))
    return sp.make_regression_data(case.inputs, teacher, n_samples, n_train, snr, sp.generator(1))


def _small_run():
    data = _data(n_samples=80, n_train=40, snr=[1.0])
    X = data.X_train.expand(2, 40, 10)
    y = data.y_train.expand(2, 1, 40)
    return X, y, sp.kaiming_init([[0], [1]], 10, 8)


@pytest.mark.parametrize("p", [float("nan"), float("inf")])
def test_non_finite_p(p):
    with pytest.raises(ValueError, match="p must be finite"):
        sp.population_power(sp.case_high().inputs, p)


def test_negative_p_with_singular_covariance():
    with pytest.raises(ValueError, match=r"p=-0.5 < 0 needs a non-singular covariance.*add damping"):
        sp.population_power(sp.GaussianInputs(torch.tensor([1.0, 0.0])), -0.5)


def test_negative_p_with_non_psd_covariance():
    with pytest.raises(ValueError, match="covariance must be positive semi-definite: smallest eigenvalue -1"):
        sp.population_power(torch.diag(torch.tensor([1.0, -1.0])), -0.5)


def test_negative_p_with_singular_empirical_covariance_and_no_damping():
    X = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    with pytest.raises(ValueError, match="non-singular damped empirical covariance.*add damping"):
        sp.empirical_power(X, -1.0, damping=0.0)


def test_preconditioner_not_square():
    with pytest.raises(ValueError, match=r"preconditioner P must be a square matrix, got shape \(2, 3\)"):
        sp.validate_preconditioner(torch.ones(2, 3))


def test_preconditioner_not_symmetric():
    with pytest.raises(ValueError, match=r"preconditioner P must be symmetric: max \|A - A\^T\| = 2"):
        sp.validate_preconditioner(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))


def test_preconditioner_not_psd():
    with pytest.raises(ValueError, match="preconditioner P must be positive semi-definite: smallest eigenvalue -1"):
        sp.validate_preconditioner(torch.tensor([[1.0, 2.0], [2.0, 1.0]]))


def test_train_refuses_a_non_symmetric_or_non_psd_preconditioner():
    X, y, params = _small_run()
    cfg = sp.TrainConfig(n_steps=1)
    bad = torch.eye(10).expand(2, 1, 10, 10).clone()
    bad[1, 0, 0, 1] = 3.0
    with pytest.raises(ValueError, match="P must be symmetric: matrix 1"):
        sp.train(X, y, bad, params, cfg)
    with pytest.raises(ValueError, match="P must be positive semi-definite: matrix 0 has smallest eigenvalue -1"):
        sp.train(X, y, -torch.eye(10), params, cfg)


@pytest.mark.parametrize("snr", [0.0, -1.0, float("nan")])
def test_snr_not_positive(snr):
    with pytest.raises(ValueError, match=r"snr must be > 0 \(inf for no noise\)"):
        _data(snr=snr)


def test_more_training_samples_than_samples():
    with pytest.raises(ValueError, match="n_train must be smaller than n_samples.*n_train=200 >= n_samples=100"):
        _data(n_samples=100, n_train=200)


def test_teacher_and_inputs_of_different_dimension():
    with pytest.raises(ValueError, match="teacher beta has length 5 but inputs have dimension 10"):
        _data(teacher=sp.SingleIndexTeacher(torch.ones(5)))


def test_mismatched_shapes_between_data_labels_and_model():
    X, y, params = _small_run()
    cfg = sp.TrainConfig(n_steps=1)
    with pytest.raises(ValueError, match=r"y_train must have shape \(2, 1, 40\)"):
        sp.train(X, y[..., :30], torch.eye(10), params, cfg)
    with pytest.raises(ValueError, match="does not match X_train"):
        sp.train(X[..., :5], y, torch.eye(5), params, cfg)
    with pytest.raises(ValueError, match=r"P must be \(10, 10\)"):
        sp.train(X, y, torch.eye(5), params, cfg)


@pytest.mark.parametrize("lr, message", [(0.0, "lr must be > 0, got 0.0"), (-1e-2, "lr must be > 0"),
                                         (float("nan"), "lr must be finite"),
                                         (float("inf"), "lr must be finite")])
def test_learning_rate_not_positive_and_finite(lr, message):
    with pytest.raises(ValueError, match=message):
        sp.TrainConfig(lr=lr)


def test_width_below_one():
    with pytest.raises(ValueError, match="dh must be >= 1, got 0"):
        sp.kaiming_init([[0]], dx=10, dh=0)


def test_step_count_below_one():
    with pytest.raises(ValueError, match="n_steps must be >= 1, got 0"):
        sp.TrainConfig(n_steps=0)


def test_unknown_optimizer_name():
    W1, b1, W2, b2 = (torch.zeros(4, 3, requires_grad=True), torch.zeros(4, requires_grad=True),
                      torch.zeros(2, 4, requires_grad=True), torch.zeros(2, requires_grad=True))
    with pytest.raises(ValueError, match=r"adamw.*allowed.*sgd"):
        sp.make_optimizer("adamw", [W1, b1, W2, b2], lr=0.1)


def test_unknown_profile_name(monkeypatch):
    monkeypatch.setenv("BOOK_PROFILE", "huge")
    with pytest.raises(ValueError, match="BOOK_PROFILE='huge' is not a known profile; allowed: paper, ci"):
        sp.book_profile()


def test_teacher_activation_returning_the_wrong_shape():
    teacher = sp.SingleIndexTeacher(torch.ones(3), activation=lambda z: z.unsqueeze(-1))
    with pytest.raises(ValueError, match=r"must return a tensor of shape \(4,\) \(one value per sample\), got \(4, 1\)"):
        teacher(torch.zeros(4, 3))
