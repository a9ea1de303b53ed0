"""The work split of an extraction: a job-array task's part of the shards (`--part`) and each rank's turn."""
from __future__ import annotations

import os

from kdcache.options import ConfigError, env_int


def parse_part(text: str | None) -> tuple[int, int]:
    """`--part i/N` (a job-array task's share: shards k with k % N == i), `auto/N` or `auto` (the index,
    and the count where the scheduler gives it, from SLURM_ARRAY_TASK_ID / _MIN / _COUNT or a Kubernetes
    indexed job's JOB_COMPLETION_INDEX); None: the whole cache."""
    if not text:
        return 0, 1
    env = os.environ
    index_text, _, count_text = text.partition("/")
    if index_text == "auto":
        if "SLURM_ARRAY_TASK_ID" in env:
            index = env_int("SLURM_ARRAY_TASK_ID", "--part") - env_int("SLURM_ARRAY_TASK_MIN", "--part", 0)
            count_text = count_text or str(env_int("SLURM_ARRAY_TASK_COUNT", "--part", ""))
        elif "JOB_COMPLETION_INDEX" in env:
            index = env_int("JOB_COMPLETION_INDEX", "--part")
        else:
            raise ConfigError(f"--part {text}: no job-array index in the environment (SLURM_ARRAY_TASK_ID or "
                             "JOB_COMPLETION_INDEX); give it as --part i/N")
        if not count_text:
            raise ConfigError(f"--part {text}: the number of parts is not in the environment; give it as "
                             "--part auto/N")
        index_text = str(index)
    try:
        part, parts = int(index_text), int(count_text)
    except ValueError:
        raise ConfigError(f"--part {text!r}: expected i/N (e.g. 0/4), auto/N or auto") from None
    if parts < 1 or not 0 <= part < parts:
        raise ConfigError(f"--part {text}: need 0 <= i < N")
    return part, parts


def my_shards(num_shards: int, part: int, parts: int, rank: int, world: int) -> list[int]:
    """The shards a (part, rank) starts with: part i of N owns k % N == i, its ranks take turns."""
    return [k for k in range(num_shards) if k % parts == part][rank::world]
