"""Optimizer adapters, the first-layer preconditioner and the classifier trainer."""

import numpy as np
import pytest
import torch

import spectral_precond as sp
from spectral_precond import optimizers as so
from spectral_precond.digits import load_digits


@pytest.fixture(scope="module")
def small_task():
    """Three seeds' worth of a 120-image digit task, float64."""
    images, labels = load_digits()
    X = torch.stack([images[120 * s : 120 * (s + 1)] for s in range(3)])
    y = torch.stack([labels[120 * s : 120 * (s + 1)] for s in range(3)])
    return X, y


def test_unknown_names_and_options_are_refused():
    params = [p for p in so.TwoLayerNets([0], 4, 5, 3).params[0]]
    with pytest.raises(ValueError, match="unknown optimizer 'adamw'; allowed: sgd, momentum, adam"):
        so.make_optimizer("adamw", params, 0.1)
    with pytest.raises(ValueError, match=r"option\(s\) \['rho'\] not understood by 'adam'"):
        so.make_optimizer("adam", params, 0.1, rho=0.1)
    with pytest.raises(ValueError, match="needs options={'preconditioner'"):
        so.make_optimizer("exact", params, 0.1)
    with pytest.raises(ValueError, match="lr must be > 0"):
        so.make_optimizer("sgd", params, 0.0)
    with pytest.raises(ValueError, match=r"must be \(4, 4\)"):
        so.make_optimizer("exact", params, 0.1, preconditioner=torch.eye(3))


@pytest.mark.parametrize("name", so.OPTIMIZER_NAMES)
def test_every_optimizer_builds_and_fits_the_training_set(name, small_task):
    X, y = small_task
    lr = {"sgd": 0.5, "momentum": 0.05, "adam": 3e-3, "sam": 0.05, "lbfgs": 0.3, "kfac": 0.03,
          "adahessian": 0.02, "shampoo": 0.1, "soap": 0.01, "muon": 0.02, "exact": 0.5}[name]
    options = {"preconditioner": sp.empirical_power(X[0], -0.5)} if name == "exact" else None
    if name == "shampoo":
        options = {"preconditioning_compute_steps": 1}
    assert isinstance(so.make_optimizer(name, so.TwoLayerNets([0], 64, 8, 10).params[0], lr,
                                        **(options or {})), torch.optim.Optimizer)
    res = so.train_classifiers(X[:2], y[:2], name, lr, [0, 1], n_steps=60, width=32,
                               options=options, eval_sets={"train": (X[:2], y[:2])})
    assert not res.diverged.any()
    assert (res.train_loss[:, -1] < 0.6 * res.train_loss[:, 0]).all(), res.train_loss[:, [0, -1]]
    assert (res.accuracy["train"] > 0.6).all()


def test_exact_preconditioning_reproduces_the_batched_regression_trainer():
    """The classifier trainer with optimizer 'exact' and an MSE loss takes the same
    steps as spectral_precond.train, to float64 round-off."""
    case = sp.case_high()
    data = sp.make_regression_data(case.inputs, case.teacher(sp.generator(0, "teacher")),
                                   n_samples=60, n_train=40, snr=1.0,
                                   generator=sp.generator(0, "data"))
    P = sp.population_power(case.inputs, 0.5)
    init = sp.kaiming_init([[3]], dx=10, dh=16, scale=0.3)
    wd, lr, n_steps = 1e-2, 2e-2, 25
    ref = sp.train(data.X_train, data.y_train.reshape(1, -1), P, init,
                   sp.TrainConfig(n_steps=n_steps, lr=lr, weight_decay=wd,
                                  log_steps=list(range(n_steps + 1))))
    W1, b1, W2, b2 = init.model(0, 0)
    ours = so.train_classifiers(
        data.X_train, data.y_train, "exact", lr, [0], n_steps=n_steps, width=16,
        options={"preconditioner": P}, weight_decay=wd / 40, loss="mse", dtype=torch.float64,
        init=[[W1, b1, W2[None, :], b2[None]]])
    W1_ref, b1_ref, W2_ref, b2_ref = ref.params.model(0, 0)
    got = [t.detach() for t in ours.nets.params[0]]
    torch.testing.assert_close(got[0], W1_ref, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(got[1], b1_ref, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(got[2][0], W2_ref, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(got[3][0], b2_ref, rtol=1e-10, atol=1e-13)
    # the recorded objective adds the decay term to the trainer's MSE
    decay = 0.5 * wd / 40 * (got[0].pow(2).sum() + got[2].pow(2).sum()).item()
    np.testing.assert_allclose(ours.train_loss[0, -1], ref.train_loss[0, 0, -1].item() + decay,
                               rtol=1e-10)
    assert not torch.allclose(got[0], W1.to(torch.float64))


@pytest.mark.parametrize("name", ["sgd", "adam", "sam", "kfac", "shampoo", "soap", "muon",
                                  "exact", "lbfgs"])
def test_models_trained_together_match_models_trained_alone(name, small_task):
    X, y = small_task
    lrs = [0.3, 0.1, 0.05] if name in ("sgd", "exact", "lbfgs") else [3e-3, 1e-3, 2e-3]
    options = None
    if name == "exact":
        options = {"preconditioner": torch.stack([sp.empirical_power(x, 0.5) for x in X])}
    together = so.train_classifiers(X, y, name, lrs, [4, 5, 6], n_steps=12, width=16,
                                    options=options, dtype=torch.float64)
    for k in range(3):
        opt_k = None if options is None else {"preconditioner": options["preconditioner"][k]}
        alone = so.train_classifiers(X[k], y[k], name, lrs[k], [4 + k], n_steps=12, width=16,
                                     options=opt_k, dtype=torch.float64)
        np.testing.assert_allclose(together.train_loss[k], alone.train_loss[0], rtol=1e-9)


def test_sam_is_not_momentum_sgd(small_task):
    X, y = small_task
    a = so.train_classifiers(X[0], y[0], "sam", 0.05, [0], n_steps=20, width=16, dtype=torch.float64)
    b = so.train_classifiers(X[0], y[0], "momentum", 0.05, [0], n_steps=20, width=16, dtype=torch.float64)
    assert np.abs(a.train_loss - b.train_loss).max() > 1e-6


def test_a_diverging_model_is_flagged_and_leaves_the_others_alone(small_task):
    X, y = small_task
    both = so.train_classifiers(X[:2], y[:2], "sgd", [1e200, 0.3], [0, 1], n_steps=15, width=16,
                                eval_sets={"train": (X[:2], y[:2])}, dtype=torch.float64)
    alone = so.train_classifiers(X[1], y[1], "sgd", 0.3, [1], n_steps=15, width=16,
                                 eval_sets={"train": (X[1], y[1])}, dtype=torch.float64)
    assert both.diverged.tolist() == [True, False]
    assert np.isnan(both.accuracy["train"][0])
    np.testing.assert_allclose(both.train_loss[1], alone.train_loss[0], rtol=1e-10)


def test_tune_lr_chooses_on_validation_only(small_task):
    X, y = small_task
    val = (X.flip(1), y.flip(1))
    rng = torch.Generator().manual_seed(0)
    scrambled = {"test": (X, torch.randint(0, 10, y.shape, generator=rng))}
    kw = dict(n_steps=30, width=16, dtype=torch.float64)
    res = so.tune_lr(X, y, val, "sgd", [1e-4, 0.5, 1e200], [0, 1, 2], eval_sets=scrambled,
                     n_select=2, **kw)
    assert res.lr == 0.5
    assert res.val_accuracy.shape == (3, 2) and res.accuracy["test"].shape == (3,)
    assert res.accuracy["validation"][0] == res.val_accuracy[1, 0]
    assert np.isnan(res.val_accuracy[2]).all()  # the huge lr diverged, counted as 0
    assert res.grid_diverged.tolist() == [[False, False], [False, False], [True, True]]
    other = so.tune_lr(X, y, val, "sgd", [1e-4, 0.5, 1e200], [0, 1, 2], eval_sets={"test": (X, y)},
                       n_select=2, **kw)
    assert other.lr == res.lr
    np.testing.assert_array_equal(other.accuracy["validation"], res.accuracy["validation"])
    with pytest.raises(ValueError, match="n_select=4 exceeds the 3 seeds"):
        so.tune_lr(X, y, val, "sgd", [0.1], [0, 1, 2], n_select=4, **kw)


def test_train_classifiers_validates_its_inputs(small_task):
    X, y = small_task
    with pytest.raises(ValueError, match="lrs holds 2 values for 3 models"):
        so.train_classifiers(X, y, "sgd", [0.1, 0.2], [0, 1, 2], n_steps=2)
    with pytest.raises(ValueError, match="labels must lie in 0..9"):
        so.train_classifiers(X, y + 5, "sgd", 0.1, [0, 1, 2], n_steps=2)
    with pytest.raises(ValueError, match="loss must be one of"):
        so.train_classifiers(X, y, "sgd", 0.1, [0, 1, 2], n_steps=2, loss="hinge")
    with pytest.raises(ValueError, match="every lr must be finite and > 0"):
        so.train_classifiers(X, y, "sgd", -1.0, [0, 1, 2], n_steps=2)


def test_curvature_scale_and_nearest_p():
    X = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, -2.0], [1.0, 0.0]])
    assert so.curvature_scale(X) == pytest.approx(2.0)
    assert so.curvature_scale(X, torch.diag(torch.tensor([8.0, 0.25]))) == pytest.approx(4.0)
    curve = np.array([[0.2, 0.6], [0.5, 0.4], [0.8, 0.2]])
    assert so.nearest_p([-1, 0, 1], curve, [0.65, 0.3]) == pytest.approx(0.5)
    assert so.nearest_p([-1, 0, 1], curve, [0.0, 0.9]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="increasing"):
        so.nearest_p([0, -1, 1], curve, [0.5, 0.5])
