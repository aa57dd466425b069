"""The size switch shared by the book build, papermill, nbval and Colab.

A chapter's ``parameters`` cell reads every size knob through :func:`pick`, whose
answer depends on the environment variable ``BOOK_PROFILE``:

- ``paper``: the settings of the paper's authors, with several seeds (the default);
- ``ci``: small sizes that execute in seconds, for the tests.

Papermill can still override any single knob (``-p n_steps 500``), because it
injects its values after the ``parameters`` cell.
"""

from __future__ import annotations

import os
from typing import Any

PROFILES = ("paper", "ci")
ENV_VAR = "BOOK_PROFILE"


def book_profile() -> str:
    """The active profile: ``$BOOK_PROFILE``, or ``"paper"`` when unset."""
    name = os.environ.get(ENV_VAR, "paper").strip() or "paper"
    if name not in PROFILES:
        raise ValueError(
            f"{ENV_VAR}={name!r} is not a known profile; allowed: {', '.join(PROFILES)}"
        )
    return name


def pick(profile: str | None = None, **values: Any) -> Any:
    """The value given for the active profile.

    ``pick(paper=10_000, ci=300)`` returns 10000 under the paper profile and 300
    under the CI profile. Every profile must be given a value.
    """
    name = book_profile() if profile is None else profile
    if name not in PROFILES:
        raise ValueError(f"profile {name!r} is not known; allowed: {', '.join(PROFILES)}")
    missing = [p for p in PROFILES if p not in values]
    unknown = [k for k in values if k not in PROFILES]
    if missing or unknown:
        raise ValueError(
            f"pick() needs exactly one value per profile {PROFILES}; "
            f"missing {missing}, unknown {unknown}"
        )
    return values[name]
