"""Seeding, profiles, initialisation and figure files."""

import hashlib
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

import spectral_precond as sp
from spectral_precond.plotting import save_figure, use_book_style


def test_generator_streams_are_reproducible_and_independent():
    a = torch.rand(3, generator=sp.generator(1, "data"))
    assert torch.equal(a, torch.rand(3, generator=sp.generator(1, "data")))
    assert not torch.equal(a, torch.rand(3, generator=sp.generator(1, "init")))
    assert not torch.equal(a, torch.rand(3, generator=sp.generator(2, "data")))
    with pytest.raises(ValueError, match="seed must be >= 0"):
        sp.generator(-1)
    with pytest.raises(TypeError, match="seed must be an int"):
        sp.generator(1.5)


def test_profile_switch(monkeypatch):
    monkeypatch.setenv("BOOK_PROFILE", "paper")
    assert sp.pick(paper=10_000, ci=50) == 10_000
    monkeypatch.setenv("BOOK_PROFILE", "ci")
    assert sp.pick(paper=10_000, ci=50) == 50
    monkeypatch.setenv("BOOK_PROFILE", "huge")
    with pytest.raises(ValueError, match="BOOK_PROFILE='huge' is not a known profile; allowed: paper, ci"):
        sp.book_profile()
    with pytest.raises(ValueError, match="one value per profile"):
        sp.pick(profile="ci", ci=1)


def test_kaiming_init_depends_on_the_seed_not_the_position():
    grid = sp.kaiming_init([[3, 4], [5, 6]], dx=10, dh=50)
    alone = sp.kaiming_init([[6]], dx=10, dh=50)
    assert torch.equal(grid.W1[1, 1], alone.W1[0, 0])
    bound = 1e-3 * np.sqrt(6 / 10)
    assert grid.W1.abs().max() <= bound and grid.W1.abs().max() > 0.9 * bound
    assert torch.count_nonzero(grid.b1) == 0 and torch.count_nonzero(grid.b2) == 0


def test_p_isotropic_rows_have_covariance_proportional_to_p():
    P = torch.diag(torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64))
    params = sp.p_isotropic_init([[0]], P, dh=100_000, scale=1.0)
    W = params.W1[0, 0]
    torch.testing.assert_close(W.T @ W / W.shape[0], P * 2 / 3, atol=0.02, rtol=0.02)


def test_params_stack_and_shape_checks():
    a = sp.kaiming_init([[1]], 3, 4).model(0, 0)
    b = sp.kaiming_init([[2]], 3, 4).model(0, 0)
    grid = sp.Params.stack([[a, b]])
    assert grid.grid == (1, 2) and torch.equal(grid.W1[0, 1], b[0])
    with pytest.raises(ValueError, match="b1 must have shape"):
        sp.Params(grid.W1, grid.b1[..., :2], grid.W2, grid.b2)


def _figure():
    use_book_style()
    fig, ax = plt.subplots()
    ax.plot([0, 1, 2], [1, 0, 2], label="a line")
    ax.legend()
    return fig


def test_saved_figures_are_byte_identical_on_rerun(tmp_path):
    digests = []
    for _ in range(2):
        fig = _figure()
        png, pdf = save_figure(fig, "demo", tmp_path)
        plt.close(fig)
        digests.append([hashlib.sha256(f.read_bytes()).hexdigest() for f in (png, pdf)])
    assert digests[0] == digests[1]
    with pytest.raises(ValueError, match="figure name"):
        save_figure(_figure(), "../escape", tmp_path)


def test_verdicts_round_trip_and_are_validated(tmp_path):
    from spectral_precond.results import Verdict, read_verdicts, write_verdicts

    v = Verdict("ch3", "exp1-high", "larger p resists noise", "slope -0.2 +- 0.05", "reproduced", "fig-a")
    write_verdicts("ch3", [v], tmp_path)
    (back,) = read_verdicts(tmp_path)
    assert back.profile == "ci" and back == Verdict(**{**v.__dict__, "profile": "ci"})
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="verdict must be one of"):
        Verdict("ch3", "x", "c", "m", "sort of")
    with pytest.raises(ValueError, match="must belong to chapter 'ch4'"):
        write_verdicts("ch4", [v], tmp_path)


def test_the_scorecard_lists_every_verdict_and_every_silent_chapter(tmp_path):
    from spectral_precond.results import Verdict, chapter_pages, scorecard_markdown

    for name, title in [("03_noise.md", "Label noise"), ("05_transfer.md", "Transfer")]:
        (tmp_path / name).write_text(f"---\nfront: matter\n---\n\n# {title}\n\ntext\n")
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "fig-a.png").write_bytes(b"png")
    pages = chapter_pages(tmp_path)
    assert {k: v[0] for k, v in pages.items()} == {"ch3": "Label noise", "ch5": "Transfer"}
    verdicts = [
        Verdict("ch3", "a", "larger p | resists", "slope -0.2", "reproduced", "fig-a"),
        Verdict("ch3", "b", "trend reverses", "slope +0.1", "not reproduced"),
        Verdict("ch3", "c", "early stopping", "gap 0.01", "mixed", profile="ci"),
    ]
    text = scorecard_markdown(verdicts, pages, figures=tmp_path / "figures")
    assert "3 claims checked:** 1 reproduced, **1** not reproduced, 1 mixed" in text
    summary = [line for line in text.splitlines() if line.startswith("| [")]
    assert summary[0].startswith("| [Label noise](") and summary[0].endswith("| 1 | **1** | 1 |")
    assert "Transfer" in summary[1] and "no verdict written" in summary[1]
    claims = [line for line in text.splitlines() if line.startswith("| ") and "|---" not in line
              and not line.startswith(("| [", "| chapter", "| claim"))]
    assert len(claims) == 3
    assert "larger p \\| resists" in claims[0] and "fig-a.png" in claims[0]
    assert "NOT REPRODUCED" in claims[1] and "(ci profile)" in claims[2]
    with pytest.raises(ValueError, match="missing figure 'nope'"):
        scorecard_markdown([Verdict("ch3", "d", "c", "m", "mixed", "nope")], pages,
                           figures=tmp_path / "figures")
    with pytest.raises(ValueError, match="chapters without a page"):
        scorecard_markdown([Verdict("ch9", "d", "c", "m", "mixed")], pages)


def test_resources_are_recorded_per_chapter(tmp_path, monkeypatch):
    from spectral_precond.results import read_resources, record_resources

    import resource

    monkeypatch.setenv("BOOK_PROFILE", "ci")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    # The peak the kernel reports, in KiB on Linux: a fake one of 100 MiB above
    # the real peak, so the record must come from getrusage, not a fixed number.
    fake_mib = math.ceil(before) + 100
    fake = type("Usage", (), {"ru_maxrss": fake_mib * 2**10})()
    monkeypatch.setattr(resource, "getrusage", lambda who: fake)
    record_resources("ch2", tmp_path)
    (record,) = read_resources(tmp_path)
    assert record["chapter"] == "ch2" and record["profile"] == "ci"
    assert record["peak_rss_mib"] >= before + 100
    assert record["peak_rss_mib"] == fake_mib
    with pytest.raises(ValueError, match="chapter may hold only"):
        record_resources("../x", tmp_path)
