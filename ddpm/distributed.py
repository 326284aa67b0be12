"""Several processes under torchrun: joining the process group, and waiting for each other.

    with process_group("auto") as process:  # rank, world and device; Process(0, 1, device) without torchrun
        process.say("...")                  # printed by rank 0 only
    # (setup_distributed, then close_distributed at the end, also after an error)

One process per GPU (NCCL), or per CPU slot (gloo). The scripts that can run under torchrun (train.py, distill.py,
sample.py, evaluate.py) call this first and leave the group when they end.
"""
import contextlib
import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

from utils import UserError, first_line, resolve_device


@dataclasses.dataclass(frozen=True)
class Process:
    """This process of a run: its rank among the `world` processes of torchrun (0 of 1 without it), its device."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    def say(self, *args, **kwargs) -> None:
        """print on rank 0; the other ranks stay silent, so that a message shows once."""
        if self.rank == 0:
            print(*args, **kwargs)


def torchrun_env() -> tuple[int, int, int]:
    """(WORLD_SIZE, RANK, LOCAL_RANK) as torchrun sets them; (1, 0, 0) without torchrun. Set by hand and
    inconsistent (WORLD_SIZE without RANK, a non-number, RANK outside 0..WORLD_SIZE-1): a one-line UserError."""
    names = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
    raw = {k: os.environ.get(k) for k in names}
    if raw["WORLD_SIZE"] in (None, "1") and raw["RANK"] in (None, "0"):
        return 1, 0, 0
    try:
        world, rank, local = (int(raw[k]) for k in names)
    except (TypeError, ValueError):
        given = ", ".join(f"{k}={raw[k]}" for k in names if raw[k] is not None)
        raise UserError(f"the torchrun variables are incomplete or not numbers ({given}); start several "
                        "processes with torchrun, or unset WORLD_SIZE, RANK and LOCAL_RANK") from None
    if not (world >= 1 and 0 <= rank < world and 0 <= local <= rank):
        raise UserError(f"inconsistent torchrun variables WORLD_SIZE={world}, RANK={rank}, LOCAL_RANK={local}; "
                        "start several processes with torchrun, or unset them")
    return world, rank, local


def setup_distributed(device_arg: str) -> Process:
    """This process: its rank, the number of processes and its device. Under torchrun (WORLD_SIZE > 1) join the
    group: NCCL on GPUs, gloo on CPUs."""
    device = resolve_device(device_arg)
    world, rank, local_rank = torchrun_env()
    if world == 1:
        return Process(0, 1, device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if restarts and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and os.environ.get("RANK") == "0":
        # seen with torch 2.14: restarted workers read the dead ones' addresses from the shared store (pytorch#135712)
        print("warning: with --max-restarts, set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun, or a "
              "restarted job may fail to reconnect (see the README)")
    # the timeout turns a stuck peer into an error instead of a hang; it must outlast a rank-0 checkpoint
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))
    except ValueError as e:  # e.g. MASTER_ADDR missing: the variables were set by hand, not by torchrun
        raise UserError(f"cannot join the process group ({first_line(e)}); start the processes with torchrun") from None
    return Process(dist.get_rank(), world, device)


def wait_for_all(world: int) -> None:
    """A barrier: every rank waits here until all have arrived (for rank 0's files, say, or before teardown)."""
    if world > 1:
        dist.barrier()


@contextlib.contextmanager
def process_group(device_arg: str):
    """The commands' `with process_group(args.device) as process:` setup_distributed on entry, and
    close_distributed on the way out, also after an error."""
    process = setup_distributed(device_arg)
    try:
        yield process
    finally:
        close_distributed(process.world)


def close_distributed(world: int) -> None:
    """Leave the process group (at the end of a script that called setup_distributed)."""
    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()
