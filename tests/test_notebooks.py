"""Each chapter's .md and its paired .ipynb hold the same cells.

The chapters themselves are executed and checked by nbval (``pytest --nbval-lax``
collects ``notebooks/*.ipynb``); this test only guards the pairing that makes the
nbval run and the Colab button use the same code as the book.
"""

import importlib.util
from pathlib import Path

import jupytext

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("notebooks_tool", ROOT / "scripts" / "notebooks.py")
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)


def test_every_chapter_is_paired_and_in_sync():
    assert tool.chapters(), "no chapter found under notebooks/"
    assert tool.out_of_sync() == []


def test_the_sync_check_notices_an_edited_code_cell(tmp_path, monkeypatch):
    md = tool.chapters()[0]
    nb = jupytext.read(md)
    code = next(c for c in nb.cells if c.cell_type == "code")
    code.source += "\nx = 1"
    (tmp_path / md.name).write_text(md.read_text())
    jupytext.write(nb, tmp_path / md.with_suffix(".ipynb").name)
    monkeypatch.setattr(tool, "NOTEBOOKS", tmp_path)
    monkeypatch.setattr(tool, "ROOT", tmp_path)
    problems = tool.out_of_sync()
    assert len(problems) == 1 and "differ" in problems[0]


def test_every_chapter_has_one_parameters_cell_and_checked_outputs():
    for md in tool.chapters():
        nb = jupytext.read(md)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", ())]
        assert len(tagged) == 1, f"{md.name} needs exactly one cell tagged 'parameters'"
        assert any(tool.CHECK_MARK in c.source for c in nb.cells), (
            f"{md.name} marks no cell for output checking"
        )


def test_chapters_are_in_the_table_of_contents():
    toc = (ROOT / "_toc.yml").read_text()
    for md in tool.chapters():
        assert f"notebooks/{md.stem}" in toc, f"{md.name} is not in _toc.yml"
