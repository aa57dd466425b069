"""Verdicts on the paper's claims, written by the chapters and read by the scorecard.

Each chapter states a claim next to the measurement that checks it, computes a
verdict and writes its list of verdicts to ``<results>/verdicts-<chapter>.json``
(``<results>`` is ``$BOOK_RESULTS`` or ``results/`` under the working directory).
Files are written atomically: a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

VERDICTS = ("reproduced", "not reproduced", "mixed")


@dataclass(frozen=True)
class Verdict:
    """One claim of the paper and what the book measured about it.

    ``claim_id`` is short and stable (e.g. ``"exp1-high-larger-p"``); ``figure`` names
    the figure file (without extension) that shows the measurement, or is empty.
    """

    chapter: str
    claim_id: str
    claim: str
    measurement: str
    verdict: str
    figure: str = ""

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")
        for name in ("chapter", "claim_id"):
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", getattr(self, name)):
                raise ValueError(
                    f"{name} may hold only letters, digits, '.', '-' and '_', got "
                    f"{getattr(self, name)!r}"
                )


def results_dir() -> Path:
    return Path(os.environ.get("BOOK_RESULTS", "results"))


def write_verdicts(chapter: str, verdicts: list[Verdict], folder=None) -> Path:
    """Write ``verdicts`` (all from ``chapter``) atomically; return the file path."""
    if any(v.chapter != chapter for v in verdicts):
        raise ValueError(f"all verdicts must belong to chapter {chapter!r}")
    folder = Path(folder) if folder is not None else results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"verdicts-{chapter}.json"
    payload = json.dumps([asdict(v) for v in verdicts], indent=2, sort_keys=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(payload + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_verdicts(folder=None) -> list[Verdict]:
    """Every verdict found under the results folder, sorted by chapter."""
    folder = Path(folder) if folder is not None else results_dir()
    out = []
    for path in sorted(folder.glob("verdicts-*.json")):
        out += [Verdict(**row) for row in json.loads(path.read_text())]
    return out
