"""Keep each chapter's paired .ipynb in step with its MyST .md source.

    python scripts/notebooks.py check      # exit 1 if a pair's cells differ
    python scripts/notebooks.py refresh    # re-execute every chapter under the CI
                                           # profile and rewrite its .ipynb

The .md file is the source of truth. ``refresh`` writes the .ipynb from it, executed
under ``BOOK_PROFILE=ci``, keeping only the outputs of the cells marked
``# NBVAL_CHECK_OUTPUT``: those are the reference outputs nbval compares against.
Pass chapter names to refresh only some of them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
CHECK_MARK = "# NBVAL_CHECK_OUTPUT"


def chapters(names=()) -> list[Path]:
    found = sorted(NOTEBOOKS.glob("*.md"))
    if names:
        wanted = {Path(n).stem for n in names}
        unknown = wanted - {p.stem for p in found}
        if unknown:
            raise SystemExit(f"unknown chapter(s): {', '.join(sorted(unknown))}")
        found = [p for p in found if p.stem in wanted]
    return found


def cell_signature(nb) -> list[tuple]:
    """What must agree between the two files of a pair: kinds, sources and tags."""
    return [
        (c.cell_type, c.source.strip(), tuple(c.metadata.get("tags", ())))
        for c in nb.cells
    ]


def out_of_sync() -> list[str]:
    problems = []
    for md in chapters():
        ipynb = md.with_suffix(".ipynb")
        if not ipynb.exists():
            problems.append(f"{ipynb.relative_to(ROOT)} is missing")
            continue
        a = cell_signature(jupytext.read(md))
        b = cell_signature(jupytext.read(ipynb))
        if a != b:
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            problems.append(
                f"{md.name} and {ipynb.name} differ (first at cell {first}); "
                f"run: python scripts/notebooks.py refresh {md.stem}"
            )
    return problems


def refresh(md: Path) -> None:
    nb = jupytext.read(md)
    env = dict(os.environ, BOOK_PROFILE="ci")
    os.environ.update(env)
    NotebookClient(nb, timeout=1800, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.metadata.pop("execution", None)
        if CHECK_MARK not in cell.source:
            # nbval skips cells that were never run; only checked cells keep outputs.
            cell.outputs = []
            cell.execution_count = None
    nb.metadata.pop("widgets", None)
    nbformat.validate(nb)
    jupytext.write(nb, md.with_suffix(".ipynb"))
    print(f"refreshed {md.with_suffix('.ipynb').relative_to(ROOT)}")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("check", "refresh"):
        print(__doc__)
        return 2
    if argv[0] == "check":
        problems = out_of_sync()
        for p in problems:
            print(p)
        return 1 if problems else 0
    for md in chapters(argv[1:]):
        refresh(md)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
