"""One progress bar for every long phase: items per second and an ETA, quiet when not on a terminal."""
from __future__ import annotations

from tqdm import tqdm


def bar(total: int | None, unit: str, desc: str, enabled: bool = True, leave: bool = False,
        iterable=None) -> tqdm:
    """A tqdm bar (over `iterable` when given); `enabled=False` silences it, and it is silent anyway when
    stderr is not a terminal (logs and CI stay clean)."""
    return tqdm(iterable, total=total, unit=unit, desc=desc, disable=None if enabled else True, dynamic_ncols=True,
                leave=leave)
