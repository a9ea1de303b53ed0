"""torch.distributed helpers: a no-op single process unless launched by torchrun."""
from __future__ import annotations

import os
import signal
import sys

import torch
import torch.distributed as dist

from kdcache.options import ConfigError


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def under_torchrun(env=None) -> bool:
    """True in a rank that torchrun (torch.distributed.run) started."""
    env = os.environ if env is None else env
    return "LOCAL_RANK" in env or any(k.startswith("TORCHELASTIC_") for k in env)


def end_with_launcher() -> bool:
    """Ask Linux to send this rank SIGTERM when its parent (torchrun's agent) dies. torchrun starts each rank in
    a session of its own, so a launcher killed by SIGKILL (an out-of-memory kill, a scheduler's hard stop) takes
    no rank with it: the orphans would wait in a collective for peers that are gone, holding their GPUs. True
    when the request was made; a no-op (False) outside torchrun and on other systems."""
    if not sys.platform.startswith("linux") or not under_torchrun():
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
    except (OSError, AttributeError):  # no C library with prctl here (a static or unusual build)
        return False


def init() -> tuple[int, int]:
    """(rank, world size); joins the process group when WORLD_SIZE > 1. A rank that torchrun started ends with
    its launcher (`end_with_launcher`)."""
    end_with_launcher()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart is None or "MASTER_ADDR" not in os.environ:
            dist.init_process_group(backend)
        else:  # torchrun elastic: a key space of this attempt's own, so a restarted group never reads the
            # addresses that the ranks of an earlier attempt left in the agent's store
            rank = int(os.environ["RANK"])
            master = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true" and rank == 0
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                  is_master=master)
            dist.init_process_group(backend, store=dist.PrefixStore(f"kdcache/attempt-{restart}", store),
                                    rank=rank, world_size=world)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def device_for(name: str = "auto") -> torch.device:
    """'auto': this rank's GPU (LOCAL_RANK under torchrun) when there is one, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: no CUDA GPU is visible here; use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    elif device.type != "cpu" and device.type != "mps":
        raise ConfigError(f"--device {name}: unsupported device type {device.type!r}; use auto, cpu or cuda")
    return device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast(obj, src: int = 0):
    """Send a picklable object from `src` to every rank (identity when single process)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank ([obj] when single process)."""
    if not dist.is_initialized():
        return [obj]
    box = [None] * dist.get_world_size()
    dist.all_gather_object(box, obj)
    return box


def rank() -> int:
    """This process's rank (0 when single process), also before the process group is joined (torchrun's RANK)."""
    if dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))
