"""One seeding helper for the whole book.

Every random draw in the library takes a ``torch.Generator`` made here from an
integer seed and the name of a stream ("data", "init", "noise", ...). Streams are
independent of each other and of the order in which they are created, so adding a
draw to one part of an experiment never shifts the numbers of another part.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def generator(seed: int, stream: str = "default") -> torch.Generator:
    """A CPU generator for ``(seed, stream)``, the same on every platform.

    Parameters
    ----------
    seed : int
        A non-negative integer.
    stream : str
        Name of the independent stream within that seed.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {seed!r} ({type(seed).__name__})")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    key = zlib.crc32(stream.encode("utf-8"))
    state = np.random.SeedSequence(int(seed), spawn_key=(key,)).generate_state(2)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(state[0]) << 32 | int(state[1]))
    return gen
