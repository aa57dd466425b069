"""One figure style for the whole book, and reproducible figure files.

:func:`save_figure` writes each figure as PNG (for the web) and PDF (for papers)
under a ``figures/`` folder (or ``$BOOK_FIGURES``), with the metadata fixed so that
rerunning a chapter rewrites byte-identical files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import matplotlib as mpl
import matplotlib.pyplot as plt

STYLE = {
    "figure.figsize": (6.4, 3.6),
    "figure.dpi": 110,
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
    "font.size": 10,
    "axes.titlesize": 10,
    "axes.labelsize": 10,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "lines.linewidth": 1.6,
    "image.cmap": "viridis",
    "svg.hashsalt": "spectral-precond",
    "pdf.compression": 6,
}

_PNG_METADATA = {"Software": None}
_PDF_METADATA = {"Creator": None, "Producer": None, "CreationDate": None, "ModDate": None}


def use_book_style() -> None:
    """Apply the book's matplotlib style."""
    mpl.rcParams.update(STYLE)


def p_colors(ps) -> dict:
    """One colour per value of ``p``, from the same colormap across chapters."""
    ps = sorted(set(float(p) for p in ps))
    cmap = plt.get_cmap("coolwarm")
    lo, hi = min(ps), max(ps)
    span = hi - lo if hi > lo else 1.0
    return {p: cmap(0.05 + 0.9 * (p - lo) / span) for p in ps}


def figure_dir() -> Path:
    return Path(os.environ.get("BOOK_FIGURES", "figures"))


def save_figure(fig, name: str, folder: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Save ``fig`` as ``<folder>/<name>.png`` and ``.pdf``; return both paths.

    ``name`` may hold letters, digits, ``-`` and ``_`` only.
    """
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ValueError(f"figure name {name!r} may hold only letters, digits, '-' and '_'")
    folder = Path(folder) if folder is not None else figure_dir()
    folder.mkdir(parents=True, exist_ok=True)
    png, pdf = folder / f"{name}.png", folder / f"{name}.pdf"
    fig.savefig(png, metadata=_PNG_METADATA)
    fig.savefig(pdf, metadata=_PDF_METADATA)
    return png, pdf
