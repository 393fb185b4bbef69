"""Several training processes: PyTorch's launcher (torchrun) and process group, DDP's arithmetic.

Who does what
-------------
`fer train` with --nproc-per-node N > 1 (or --nnodes M > 1) is the *launcher*: on machine 0 it
creates the run folder once, then becomes this machine's torchrun agent in-process
(`torch.distributed.run.main`), which starts N workers running `python -m fer_core train
--run-dir RUN`. `torchrun --nproc-per-node N -m fer_core train ...` does the same by hand. A
worker learns its rank from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and joins the
process group: NCCL on CUDA, gloo on the CPU. Rank 0 alone writes the run folder.

Stopping
--------
Each step the ranks agree whether to stop (one all_reduce of a flag): rank 0 reads the cancel
file, any rank may have received SIGTERM (torchrun forwards it to every worker) or lost its
agent. So every rank leaves the loop at the same step and none waits in a collective for a rank
that has gone. A rank that dies breaks its connections: the others' next collective fails at
once, and PROCESS_GROUP_TIMEOUT bounds the wait for a rank that hangs instead.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Iterator, Sequence

from .errors import FerError

if TYPE_CHECKING:
    import torch

    from .config import TrainConfig

# Long enough for rank 0's per-epoch validation and checkpoint while the others wait in the
# next collective (minutes at 224 px on a CPU), short enough that a hung rank ends the run the
# same hour. A rank that dies is noticed at once (its sockets close), not after this.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=10)
TORCHRUN_ENV = ("WORLD_SIZE", "LOCAL_RANK")

# Set by the SIGTERM handler of a worker: the step's agreement turns it into a cancel on every rank.
TERMINATION_REQUESTED = threading.Event()


@dataclass(frozen=True)
class Processes:
    """This process's place among the run's training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    agent_pid: int | None = None  # torchrun's agent that started this worker

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run folder; the others only train."""
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world_size > 1

    def agent_gone(self) -> bool:
        """The agent died (SIGKILL): its workers were handed to another parent and must stop."""
        return self.agent_pid is not None and os.getppid() != self.agent_pid


ONE_PROCESS = Processes()


# ---- the launcher ----------------------------------------------------------------------

def under_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_ENV)


def wants_several_processes(config: "TrainConfig") -> bool:
    return config.nproc_per_node > 1 or config.nnodes > 1


def needs_launcher(config: "TrainConfig") -> bool:
    """A config asking for several processes, in a process torchrun did not start."""
    return wants_several_processes(config) and not under_torchrun()


def torchrun_arguments(config: "TrainConfig", worker_argv: Sequence[str]) -> list[str]:
    """torchrun's command line (after `torchrun`) that runs `python -m fer_core <worker_argv>`."""
    placement = ["--nproc-per-node", str(config.nproc_per_node), "--nnodes", str(config.nnodes)]
    if config.nnodes == 1 and not config.rdzv_endpoint:
        placement.append("--standalone")  # a rendezvous on this machine at a free port
    else:
        # the static rendezvous honours --node-rank, so machine 0 holds global rank 0: the writer
        placement += ["--node-rank", str(config.node_rank), "--rdzv-backend", "static",
                      "--rdzv-endpoint", config.rdzv_endpoint]
    # no restarts: a failed rank fails the run, which says why; resume continues it
    return [*placement, "--max-restarts", "0", "-m", "fer_core", *worker_argv]


def shown_command(config: "TrainConfig", worker_argv: Sequence[str]) -> str:
    """The torchrun command line, as a person would type it."""
    import shlex
    return shlex.join(["torchrun", *torchrun_arguments(config, worker_argv)])


def other_machine_commands(config: "TrainConfig") -> list[str]:
    """The command to start on each other machine (node rank 1, 2, ...) of a run machine 0
    launched: the same settings, so every rank trains the same model on the same data. The run
    folder is machine 0's; the others write nothing, so their folders are left out."""
    import shlex

    from .config import command_line_flags
    flags = command_line_flags(config, leave_out=("runs_dir", "checkpoints_dir", "node_rank"))
    return [shlex.join(["fer", "train", *flags, "--node-rank", str(rank)]) for rank in range(1, config.nnodes)]


def run_torchrun(config: "TrainConfig", worker_argv: Sequence[str]) -> str | None:
    """Be this machine's torchrun agent until its workers end; None if they all succeeded,
    else why not in words. SIGTERM here is forwarded by torchrun to every worker."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main
    try:
        torchrun_main(torchrun_arguments(config, worker_argv))
    except ChildFailedError as exc:
        ranks = ", ".join(f"rank {rank} ({_how_it_ended(failure.exitcode)})"
                          for rank, failure in sorted(exc.failures.items()))
        return f"a training process failed: {ranks}"
    except SignalException as exc:
        return f"the launcher was stopped by {exc.sigval.name}"
    except Exception as exc:  # e.g. the other machines never joined the rendezvous: say so, do not crash
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        return f"torchrun could not run the training processes: {type(exc).__name__}: {first_line}"
    return None


def _how_it_ended(exitcode: int) -> str:
    import signal
    if exitcode < 0:  # killed by a signal
        return signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else f"signal {-exitcode}"
    return f"exit code {exitcode}"


# ---- a worker's process group -----------------------------------------------------------

def join() -> Processes:
    """In a torchrun worker, join the process group; anywhere else, the one process."""
    if not under_torchrun():
        return ONE_PROCESS
    import torch
    import torch.distributed as dist
    processes = Processes(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ["WORLD_SIZE"]),
                          local_rank=int(os.environ["LOCAL_RANK"]),
                          local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)), agent_pid=os.getppid())
    if torch.cuda.is_available():
        torch.cuda.set_device(processes.local_rank)
        dist.init_process_group("nccl", timeout=PROCESS_GROUP_TIMEOUT,
                                device_id=torch.device("cuda", processes.local_rank))
    else:
        dist.init_process_group("gloo", timeout=PROCESS_GROUP_TIMEOUT)
    return processes


def leave(processes: Processes) -> None:
    import torch.distributed as dist
    if processes is not ONE_PROCESS and dist.is_initialized():
        dist.destroy_process_group()


def device_of(processes: Processes) -> "torch.device":
    import torch
    return torch.device("cuda", processes.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def threads_per_process(num_threads: int | None, processes: Processes) -> int | None:
    """The CPU threads of one process: the config's (or all cores) shared among this machine's
    processes, so N processes do not oversubscribe the cores N times. None: torch's default."""
    if processes.local_world_size == 1:
        return num_threads or None
    return max(1, (num_threads or os.cpu_count() or 1) // processes.local_world_size)


def note_termination(signum: int, frame: object) -> None:
    """A worker's SIGTERM handler: raising here could leave the other ranks waiting in a
    collective; the next step's agreement stops every rank together instead."""
    TERMINATION_REQUESTED.set()


# ---- the arithmetic of a global batch ------------------------------------------------------

def steps_per_epoch(num_images: int, global_batch: int, world_size: int) -> int:
    """Optimisation steps per epoch: a last batch with fewer images than processes is dropped
    (each process needs at least one image); with one process that is ceil(n / batch)."""
    full, rest = divmod(num_images, global_batch)
    return full + (1 if rest >= world_size else 0)


def global_batches(order: "torch.Tensor", global_batch: int, world_size: int) -> Iterator["torch.Tensor"]:
    """The epoch's permutation cut into global batches, as one process trains on them."""
    for start in range(0, len(order), global_batch):
        batch = order[start:start + global_batch]
        if len(batch) >= world_size:
            yield batch


def rank_share(batch: "torch.Tensor", processes: Processes) -> "torch.Tensor":
    """This rank's contiguous part of a global batch: sizes differ by at most one, the first
    ranks taking the remainder."""
    import torch
    return torch.tensor_split(batch, processes.world_size)[processes.rank]


def share_weight(share: int, batch: int, processes: Processes) -> float:
    """What this rank's mean loss is multiplied by so that DDP's average of the ranks' gradients
    is the gradient of the global batch's mean loss even when the shares differ by one."""
    return share * processes.world_size / batch


# ---- agreement between the ranks -------------------------------------------------------------

def any_process_stops(processes: Processes, stop_here: bool) -> bool:
    """True on every rank if any rank wants to stop (one all_reduce of a flag)."""
    if not processes.several:
        return stop_here
    return _all_reduce_sum(processes, [float(stop_here)])[0] > 0


def global_sums(processes: Processes, values: list[float]) -> list[float]:
    """Each value summed over the ranks (the values themselves with one process)."""
    return values if not processes.several else _all_reduce_sum(processes, values)


def _all_reduce_sum(processes: Processes, values: list[float]) -> list[float]:
    import torch
    import torch.distributed as dist
    tensor = torch.tensor(values, dtype=torch.float64, device=device_of(processes))
    try:
        dist.all_reduce(tensor)
    except RuntimeError as exc:  # DistBackendError and gloo's errors: a rank died or hung
        raise FerError(peer_lost_message(processes, exc)) from exc
    return tensor.tolist()


def peer_lost_message(processes: Processes, exc: BaseException) -> str:
    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return (f"another training process stopped or stopped answering (seen by rank {processes.rank} of "
            f"{processes.world_size}): {first_line}")


# DDP's gradient all_reduce in backward raises gloo's and NCCL's transport errors as a plain
# RuntimeError; these words in it say that a peer, not this rank, went wrong
PEER_FAILURE_WORDS = ("gloo", "nccl", "c10d", "connection closed", "connection reset", "timed out")


def is_peer_failure(exc: BaseException) -> bool:
    """An error raised by a collective because another rank died or timed out."""
    import torch.distributed as dist
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(word in text for word in PEER_FAILURE_WORDS)

