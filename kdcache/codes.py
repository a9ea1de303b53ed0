"""The integer codes stored in the cache's `status` and `splits` arrays (their values are the format)."""
from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    """One row's state in `status`."""

    TODO = 0  # not computed yet (recomputed on resume)
    DONE = 1  # features, logits and views written
    BAD = 2  # the input could not be read or decoded; `reasons` says why


class Split(IntEnum):
    """One row's split in `splits` (the dataset's own split; scenarios choose from the train split)."""

    TRAIN = 0
    TEST = 1
    VAL = 2


SPLIT_NAMES = tuple(s.name.lower() for s in Split)  # "train", "test", "val": the names stored in the attributes
