"""Synthetic regression data: Gaussian inputs, single-index teachers, label noise.

Layout: a data matrix holds one sample per row, ``X: (n, dx)``. (The paper writes
samples as columns; the Gram matrix ``X^T P X`` of the paper is ``X P X^T`` here.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ._checks import finite_real, positive_int


def softplus10(z: torch.Tensor) -> torch.Tensor:
    """The paper's teacher activation, ``log(1 + exp(10 z))``."""
    return F.softplus(10.0 * z)


@dataclass(frozen=True)
class GaussianInputs:
    """Centred Gaussian inputs ``x ~ N(0, U diag(eigenvalues) U^T)``.

    Parameters
    ----------
    eigenvalues : (dx,) tensor or sequence
        Variances along the eigendirections, all finite and >= 0.
    eigenvectors : (dx, dx) tensor, optional
        Orthogonal matrix whose columns are the eigendirections; identity if omitted.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor | None = None

    def __post_init__(self):
        lam = torch.as_tensor(self.eigenvalues, dtype=torch.float64)
        if lam.ndim != 1 or lam.numel() < 1:
            raise ValueError(
                f"eigenvalues must be a non-empty 1-D sequence, got shape {tuple(lam.shape)}"
            )
        if not torch.isfinite(lam).all() or (lam < 0).any():
            raise ValueError(f"eigenvalues must be finite and >= 0, got {lam.tolist()}")
        dx = lam.numel()
        if self.eigenvectors is None:
            U = torch.eye(dx, dtype=torch.float64)
        else:
            U = torch.as_tensor(self.eigenvectors, dtype=torch.float64)
            if U.shape != (dx, dx):
                raise ValueError(
                    f"eigenvectors must have shape ({dx}, {dx}) to match {dx} "
                    f"eigenvalues, got {tuple(U.shape)}"
                )
            err = (U.T @ U - torch.eye(dx, dtype=torch.float64)).abs().max().item()
            if not math.isfinite(err) or err > 1e-8:
                raise ValueError(
                    f"eigenvectors must be orthogonal: max |U^T U - I| = {err:.3g}"
                )
        object.__setattr__(self, "eigenvalues", lam)
        object.__setattr__(self, "eigenvectors", U)

    @property
    def dim(self) -> int:
        return self.eigenvalues.numel()

    @property
    def covariance(self) -> torch.Tensor:
        """``Sigma = U diag(eigenvalues) U^T``, float64, ``(dx, dx)``."""
        U = self.eigenvectors
        return (U * self.eigenvalues) @ U.T

    def sample(
        self, n: int, generator: torch.Generator, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        """``n`` samples as rows, ``(n, dx)``."""
        positive_int("n", n)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return ((z * self.eigenvalues.sqrt()) @ self.eigenvectors.T).to(dtype)


@dataclass(frozen=True)
class SingleIndexTeacher:
    """``y = activation(<beta, x>)`` with ``beta`` in the standard basis.

    ``activation`` maps a 1-D tensor of projections to a tensor of the same shape.
    """

    beta: torch.Tensor
    activation: Callable[[torch.Tensor], torch.Tensor] = softplus10

    def __post_init__(self):
        beta = torch.as_tensor(self.beta, dtype=torch.float64)
        if beta.ndim != 1:
            raise ValueError(f"beta must be 1-D, got shape {tuple(beta.shape)}")
        if not torch.isfinite(beta).all():
            raise ValueError(f"beta must be finite, got {beta.tolist()}")
        if not callable(self.activation):
            raise TypeError(f"activation must be callable, got {self.activation!r}")
        object.__setattr__(self, "beta", beta)

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        if X.ndim != 2 or X.shape[1] != self.beta.numel():
            raise ValueError(
                f"teacher with beta of length {self.beta.numel()} needs X of shape "
                f"(n, {self.beta.numel()}), got {tuple(X.shape)}"
            )
        z = X.to(torch.float64) @ self.beta
        out = self.activation(z)
        if not isinstance(out, torch.Tensor) or out.shape != z.shape:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"teacher activation must return a tensor of shape {tuple(z.shape)} "
                f"(one value per sample), got {shape}"
            )
        return out


@dataclass(frozen=True)
class Case:
    """A spectrum and where the teacher lives in its eigenbasis.

    ``coefficients`` are the teacher direction's coordinates in the eigenbasis of
    ``inputs``; a data set scales them by one random scalar ``c ~ N(0, 1)``, as the
    paper's code does.
    """

    name: str
    inputs: GaussianInputs
    coefficients: torch.Tensor

    def __post_init__(self):
        coef = torch.as_tensor(self.coefficients, dtype=torch.float64)
        if coef.shape != (self.inputs.dim,):
            raise ValueError(
                f"coefficients must have shape ({self.inputs.dim},), got {tuple(coef.shape)}"
            )
        object.__setattr__(self, "coefficients", coef)

    def teacher(
        self, generator: torch.Generator, activation: Callable = softplus10
    ) -> SingleIndexTeacher:
        """The teacher ``beta = c U coefficients`` with ``c ~ N(0, 1)`` drawn here."""
        c = torch.randn((), generator=generator, dtype=torch.float64)
        return SingleIndexTeacher(c * (self.inputs.eigenvectors @ self.coefficients), activation)


def two_level_case(
    name: str, dx: int = 10, high: float = 10.0, low: float = 0.1, n_high: int = 1,
    teacher_on: str = "high",
) -> Case:
    """A spectrum with ``n_high`` eigenvalues ``high`` and the rest ``low``.

    The teacher sits on one eigendirection: the first high one (``teacher_on="high"``)
    or the last low one (``"low"``). Eigenvectors are the identity, as in the paper.
    """
    positive_int("dx", dx, minimum=2)
    if not 1 <= n_high < dx:
        raise ValueError(f"n_high must be in [1, {dx - 1}], got {n_high}")
    high, low = finite_real("high", high), finite_real("low", low)
    if not high > low > 0:
        raise ValueError(f"need high > low > 0, got high={high}, low={low}")
    if teacher_on not in ("high", "low"):
        raise ValueError(f"teacher_on must be 'high' or 'low', got {teacher_on!r}")
    lam = torch.full((dx,), low, dtype=torch.float64)
    lam[:n_high] = high
    coef = torch.zeros(dx, dtype=torch.float64)
    coef[0 if teacher_on == "high" else dx - 1] = 1.0
    return Case(name, GaussianInputs(lam), coef)


def case_high(dx: int = 10, high: float = 10.0, low: float = 0.1) -> Case:
    """Paper's Case High: eigenvalues ``[high, low x (dx-1)]``, teacher on ``e_1``."""
    return two_level_case("high", dx, high, low, n_high=1, teacher_on="high")


def case_low(dx: int = 10, high: float = 10.0, low: float = 0.1) -> Case:
    """Paper's Case Low: eigenvalues ``[high x (dx-1), low]``, teacher on ``e_dx``."""
    return two_level_case("low", dx, high, low, n_high=dx - 1, teacher_on="low")


@dataclass(frozen=True)
class RegressionData:
    """A train/test split with standardised, possibly noisy labels.

    ``y_train`` and ``y_test`` have shape ``(*snr_shape, n)``: one row of labels per
    SNR when several SNRs were asked for (same inputs, same noise draw, scaled).
    """

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    teacher: SingleIndexTeacher
    snr: torch.Tensor
    noise_std: torch.Tensor = field(repr=False)
    label_mean: torch.Tensor = field(repr=False)
    label_std: torch.Tensor = field(repr=False)


def make_regression_data(
    inputs: GaussianInputs,
    teacher: SingleIndexTeacher,
    n_samples: int,
    n_train: int,
    snr: float | Sequence[float],
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
) -> RegressionData:
    """Draw ``n_samples`` inputs, label them, add noise, split and standardise.

    The noise on every label (train and test) has standard deviation
    ``std(teacher(X)) / snr``, the standard deviation taken over all ``n_samples``
    clean labels. Several SNRs share one standard-normal noise draw, scaled, so that
    curves over SNR are not blurred by independent noise. The first ``n_train``
    samples train (the samples are i.i.d.); labels are standardised with the
    training mean and standard deviation. ``snr = inf`` means no noise.
    """
    positive_int("n_samples", n_samples)
    positive_int("n_train", n_train, minimum=2)
    if n_train >= n_samples:
        raise ValueError(
            f"n_train must be smaller than n_samples to leave a test set, got "
            f"n_train={n_train} >= n_samples={n_samples}"
        )
    if teacher.beta.numel() != inputs.dim:
        raise ValueError(
            f"teacher beta has length {teacher.beta.numel()} but inputs have dimension "
            f"{inputs.dim}"
        )
    snr_t = torch.as_tensor(snr, dtype=torch.float64)
    if snr_t.ndim > 1 or snr_t.numel() == 0:
        raise ValueError(f"snr must be a number or a 1-D sequence, got {snr!r}")
    if torch.isnan(snr_t).any() or (snr_t <= 0).any():
        raise ValueError(f"snr must be > 0 (inf for no noise), got {snr_t.tolist()}")

    X = inputs.sample(n_samples, generator)
    clean = teacher(X)
    eps = torch.randn(n_samples, generator=generator, dtype=torch.float64)
    noise_std = clean.std() / snr_t
    y = clean + noise_std.unsqueeze(-1) * eps
    mean = y[..., :n_train].mean(-1, keepdim=True)
    std = y[..., :n_train].std(-1, keepdim=True)
    if (std == 0).any():
        raise ValueError("training labels are constant; cannot standardise them")
    y = (y - mean) / std
    return RegressionData(
        X_train=X[:n_train].to(dtype),
        y_train=y[..., :n_train].to(dtype),
        X_test=X[n_train:].to(dtype),
        y_test=y[..., n_train:].to(dtype),
        teacher=teacher,
        snr=snr_t,
        noise_std=noise_std,
        label_mean=mean.squeeze(-1),
        label_std=std.squeeze(-1),
    )
