"""spectral_precond: preconditioned two-layer networks, trained many at a time.

The library behind the book *Preconditioning and Feature Learning*, a reproduction
and extension of Yoshida & Nitanda (2025), arXiv 2509.25637.
"""

from .data import (
    Case,
    GaussianInputs,
    RegressionData,
    SingleIndexTeacher,
    case_high,
    case_low,
    make_regression_data,
    softplus10,
    two_level_case,
)
from .digits import (
    TEST_SETS,
    OODDigits,
    load_digits,
    load_mnist,
    make_ood_digits,
    noise_patterns,
    read_idx,
)
from .gram import (
    cross_gram,
    empirical_gradient_direction,
    gradient_alignment_law,
    gradient_direction,
    gram,
    gram_spectrum_law,
)
from .metrics import eigendirection_energy, input_gradients, input_sensitivity
from .kfac import KFAC
from .networks import Params, kaiming_init, p_isotropic_init, preactivations, predict
from .preconditioners import (
    empirical_power,
    identity,
    matrix_sqrt,
    population_power,
    validate_preconditioner,
)
from .optimizers import (
    OPTIMIZER_NAMES,
    ClassifierResult,
    RightPreconditionedSGD,
    TuneResult,
    curvature_scale,
    make_optimizer,
    nearest_p,
    train_classifiers,
    tune_lr,
)
from .profiles import book_profile, pick
from .reference import reference_train
from .seeding import generator
from .sweeps import PAPER_PS, PAPER_SNRS, Sweep, SweepResult, paper_sweep, run_sweep
from .transfer import effective_dof, fit_ridge_head, stack_groups, transfer_case
from . import cache, metrics, results, transfer
from .training import TrainConfig, TrainResult, log_spaced_steps, train

__version__ = "0.1.0"

__all__ = [
    "Case", "ClassifierResult", "GaussianInputs", "KFAC", "OODDigits", "OPTIMIZER_NAMES",
    "Params", "RegressionData", "RightPreconditionedSGD", "SingleIndexTeacher", "TEST_SETS",
    "TuneResult", "curvature_scale", "load_digits", "load_mnist", "make_ood_digits",
    "make_optimizer", "nearest_p", "noise_patterns", "read_idx", "train_classifiers",
    "tune_lr",
    "TrainConfig", "TrainResult", "book_profile", "case_high", "case_low",
    "cross_gram", "empirical_power", "generator", "gram", "identity", "kaiming_init",
    "log_spaced_steps", "make_regression_data", "matrix_sqrt", "p_isotropic_init",
    "pick", "population_power", "preactivations", "predict", "reference_train",
    "softplus10", "train", "two_level_case", "validate_preconditioner",
    "PAPER_PS", "PAPER_SNRS", "Sweep", "SweepResult", "paper_sweep", "run_sweep",
    "cache", "results", "metrics", "transfer",
    "empirical_gradient_direction", "gradient_alignment_law", "gradient_direction",
    "gram_spectrum_law", "eigendirection_energy", "input_gradients", "input_sensitivity",
    "effective_dof", "fit_ridge_head", "stack_groups", "transfer_case",
]
