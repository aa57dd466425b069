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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .profiles import book_profile

VERDICTS = ("reproduced", "not reproduced", "mixed")


@dataclass(frozen=True)
class Verdict:
    """One claim of the paper and what the book measured about it.

    ``claim_id`` is short and stable (e.g. ``"exp1-high-larger-p"``); ``figure`` names
    the figure file (without extension) that shows the measurement, or is empty;
    ``profile`` is the ``BOOK_PROFILE`` the measurement ran under (filled in by
    :func:`write_verdicts`).
    """

    chapter: str
    claim_id: str
    claim: str
    measurement: str
    verdict: str
    figure: str = ""
    profile: str = ""

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
    profile = book_profile()
    _write_json(path, [asdict(replace(v, profile=v.profile or profile)) for v in verdicts])
    return path


def _write_json(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def record_resources(chapter: str, folder=None) -> Path:
    """Write the peak memory of this process (a chapter's kernel) for the execution page.

    Call it in a chapter's last cell: ``resources-<chapter>.json`` holds the peak
    resident memory in MiB and the profile it ran under.
    """
    import resource
    import sys

    if not re.fullmatch(r"[A-Za-z0-9_.-]+", chapter):
        raise ValueError(f"chapter may hold only letters, digits, '.', '-' and '_', got {chapter!r}")
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_mib = peak / 2**20 if sys.platform == "darwin" else peak / 2**10
    folder = Path(folder) if folder is not None else results_dir()
    path = folder / f"resources-{chapter}.json"
    _write_json(path, {"chapter": chapter, "peak_rss_mib": round(peak_mib, 1),
                       "profile": book_profile()})
    return path


def read_resources(folder=None) -> list[dict]:
    """Every record written by :func:`record_resources`, sorted by chapter."""
    folder = Path(folder) if folder is not None else results_dir()
    return [json.loads(p.read_text()) for p in sorted(folder.glob("resources-*.json"))]


def read_verdicts(folder=None) -> list[Verdict]:
    """Every verdict found under the results folder, sorted by chapter."""
    folder = Path(folder) if folder is not None else results_dir()
    out = []
    for path in sorted(folder.glob("verdicts-*.json")):
        out += [Verdict(**row) for row in json.loads(path.read_text())]
    return out


def chapter_pages(notebooks) -> dict[str, tuple[str, Path]]:
    """``{"ch4": (title, path)}`` for each ``NN_name.md`` chapter under ``notebooks``."""
    pages = {}
    for path in sorted(Path(notebooks).glob("[0-9][0-9]_*.md")):
        title = next((line[2:].strip() for line in path.read_text().splitlines()
                      if line.startswith("# ")), path.stem)
        pages[f"ch{int(path.name[:2])}"] = (title, path)
    return pages


def scorecard_markdown(verdicts: list[Verdict], pages: dict, figures=None) -> str:
    """The scorecard as MyST Markdown: a summary per chapter, then each chapter's claims.

    ``pages`` maps chapter ids to ``(title, link)`` (:func:`chapter_pages`); a
    chapter of ``pages`` that wrote no verdict is listed as such, and a verdict from
    a chapter not in ``pages`` is an error. ``figures`` is the folder the figure files
    are linked from (a verdict naming a figure that does not exist there is an error).
    """
    unknown = sorted({v.chapter for v in verdicts} - set(pages))
    if unknown:
        raise ValueError(f"verdicts from chapters without a page: {unknown}")

    def cell(text: str) -> str:
        return " ".join(str(text).split()).replace("|", "\\|")

    def count(rows, kind):
        n = sum(v.verdict == kind for v in rows)
        return f"**{n}**" if kind == "not reproduced" and n else str(n)

    total = ", ".join(f"{count(verdicts, k)} {k}" for k in VERDICTS)
    lines = [f"**{len(verdicts)} claims checked:** {total}.", "",
             "| chapter | " + " | ".join(VERDICTS) + " |", "|---" * (len(VERDICTS) + 1) + "|"]
    for chapter, (title, link) in pages.items():
        rows = [v for v in verdicts if v.chapter == chapter]
        counts = " | ".join(count(rows, k) for k in VERDICTS) if rows else \
            "*no verdict written* |" + " |" * (len(VERDICTS) - 1)
        lines.append(f"| [{cell(title)}]({link}) | {counts} |")
    marks = {"reproduced": "reproduced", "mixed": "mixed", "not reproduced": "**NOT REPRODUCED**"}
    for chapter, (title, link) in pages.items():
        rows = [v for v in verdicts if v.chapter == chapter]
        if not rows:
            continue
        lines += ["", f"**[{cell(title)}]({link})**", "",
                  "| claim | measurement | verdict | figure |", "|---|---|---|---|"]
        for v in rows:
            figure = ""
            if v.figure:
                if figures is not None and not (Path(figures) / f"{v.figure}.png").exists():
                    raise ValueError(f"verdict {v.claim_id!r} names a missing figure {v.figure!r}")
                target = f"{figures}/{v.figure}.png" if figures is not None else v.figure
                figure = f"[{cell(v.figure)}]({target})"
            profile = f" ({v.profile} profile)" if v.profile and v.profile != "paper" else ""
            lines.append(f"| {cell(v.claim)} | {cell(v.measurement)}{profile} "
                         f"| {marks[v.verdict]} | {figure} |")
    return "\n".join(lines)
