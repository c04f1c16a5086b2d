"""Several processes: the launch, the process group, this process's rank, and the few sums the ranks agree on.

    NPROC_PER_NODE=2 lorakit train run.yaml          re-launched through torch.distributed.run (LLaMA-Factory's
    FORCE_TORCHRUN=1 lorakit train run.yaml          environment names: NNODES, NODE_RANK, MASTER_ADDR,
                                                     MASTER_PORT, NPROC_PER_NODE; RDZV_ID, MIN_NNODES,
                                                     MAX_NNODES, MAX_RESTARTS for elastic runs)
    torchrun --nproc_per_node 2 -m lorakit train run.yaml    the same run, detected from RANK and WORLD_SIZE

Each process is one rank: NCCL and one GPU per local rank on CUDA, gloo and cores / local ranks threads on a CPU.
`World` is an explicit value the trainer holds (no module-global process-group manager); `World.single()` is the
ordinary one-process case, for which every method here is the identity and no process group exists.

The ranks meet at a fixed number of points per optimizer step, the same on every rank: the label-token count of
the step (before the backward), the gradient reduction (DDP / FSDP2, sharding.py), and one `sum` of the step's
loss, tokens and stop flags (so a Ctrl-C on any rank stops every rank after the same step).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import re
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

LAUNCH_ENV = ("NPROC_PER_NODE", "FORCE_TORCHRUN")  # either one asks `lorakit train` to re-launch itself
TRUE_WORDS = ("1", "true", "yes")


class DistributedError(ConnectionError):
    """A rank that cannot join the others, or lost them; one line (an OSError: `lorakit train` exits 1)."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    backend: str | None = None  # "gloo" or "nccl"; None for one process

    @classmethod
    def single(cls) -> World:
        return cls()

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints progress and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    # --- what the ranks agree on ---------------------------------------------------------------------------------
    def sum(self, values: list[float], device: torch.device | None = None) -> list[float]:
        """Each value summed over the ranks (one all-reduce of a float64 vector)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device or self.reduce_device())  # (n,)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def gather(self, obj) -> list:
        """`obj` of every rank, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj`, on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def reduce_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def describe(self, per_device: int, accumulation: int) -> str:
        """The start-up line: world size, backend, global batch."""
        nodes = max(self.size // max(self.local_size, 1), 1)
        procs = f"{self.local_size} process{'es' if self.local_size > 1 else ''}"
        where = f"{nodes} node{'s' if nodes > 1 else ''} x {procs}"
        n = torch.get_num_threads()
        threads = f", {n} thread{'s' if n > 1 else ''} each" if self.backend == "gloo" else ""
        return (f"distributed: world size {self.size} ({where}{threads}), backend {self.backend}; global batch "
                f"{per_device * accumulation * self.size} = {per_device} per device x {accumulation} accumulation "
                f"x {self.size} ranks")


# ---------------------------------------------------------------- joining the process group


def launched_by_torchrun() -> bool:
    """True inside a process torchrun (or a launcher that sets the same variables) started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def join(device_name: str | None, backend: str | None, timeout_s: float) -> tuple[World, torch.device | None]:
    """(World, this rank's device or None to pick as usual): the process group of a torchrun launch, or the
    single world. NCCL and cuda:LOCAL_RANK where CUDA is present (unless device says cpu), else gloo with
    cores / local ranks threads."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return World.single(), None
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    cuda = torch.cuda.is_available() and not (device_name or "").startswith("cpu")
    backend = backend or ("nccl" if cuda else "gloo")
    if backend not in ("nccl", "gloo"):
        raise DistributedError(f"ddp_backend {backend!r}: lorakit runs nccl (CUDA) or gloo (CPU)")
    device = None
    if cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                    device_id=device if cuda else None)
        except (RuntimeError, ValueError) as exc:
            raise DistributedError(f"rank {rank} could not join the process group at "
                                   f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} "
                                   f"({str(exc).splitlines()[0]})") from None
    return World(rank, size, local_rank, local_size, backend), device


def leave(world: World) -> None:
    """Destroy the process group while the interpreter is fully alive: the run's FSDP2 / DDP objects (which hold
    gloo's async work) are collected first; left to interpreter shutdown, gloo can abort the process (SIGABRT)."""
    if world.distributed and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


@contextlib.contextmanager
def joined(device_name: str | None, backend: str | None, timeout_s: float):
    """`join` for the block, then `leave`: yields (World, device or None). A collective that fails because another
    rank died or timed out ends the block as one DistributedError line (`lorakit train` exits 1)."""
    world, device = join(device_name, backend, timeout_s)
    try:
        yield world, device
        world.barrier()  # every rank's collectives are done before any rank tears the group down
    except Exception as exc:
        if world.distributed and lost_contact(exc):
            raise DistributedError(f"rank {world.rank} lost the other ranks ({reason(exc)}); stopping, nothing more "
                                   f"is written") from None
        raise
    finally:
        leave(world)


def lost_contact(exc: BaseException) -> bool:
    """True for the errors a collective raises when another rank died or timed out."""
    return isinstance(exc, (dist.DistBackendError, dist.DistNetworkError)) or (
        isinstance(exc, RuntimeError) and any(w in str(exc) for w in ("Connection closed", "Timed out", "timeout",
                                                                      "Connection reset", "Broken pipe")))


def reason(exc: BaseException, limit: int = 120) -> str:
    """The first line of a collective's error, without gloo's source-file prefix."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    line = re.sub(r"^\[[^\]]*\]\s*", "", line)
    return line if len(line) <= limit else line[:limit - 3] + "..."


# ---------------------------------------------------------------- the launch


def wants_launch(environ: dict | None = None) -> bool:
    """`lorakit train` re-launches itself when NPROC_PER_NODE or FORCE_TORCHRUN is set and it is not already a
    torchrun worker."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return False
    return bool(env.get("NPROC_PER_NODE")) or env.get("FORCE_TORCHRUN", "").lower() in TRUE_WORDS


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch_command(argv: list[str], environ: dict | None = None) -> list[str]:
    """The torch.distributed.run command line for `lorakit train ARGV`, from LLaMA-Factory's variables."""
    env = os.environ if environ is None else environ
    nproc = env.get("NPROC_PER_NODE") or str(max(torch.cuda.device_count(), 1))
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    port = env.get("MASTER_PORT") or str(free_port())
    cmd = [sys.executable, "-m", "lorakit.torchrun", "--nproc_per_node", nproc]  # torchrun: run_torchrun
    if env.get("RDZV_ID"):  # elastic: a range of nodes meeting at a c10d rendezvous
        nnodes = f"{env.get('MIN_NNODES', '1')}:{env.get('MAX_NNODES', env.get('MIN_NNODES', '1'))}"
        cmd += ["--nnodes", nnodes, "--rdzv_id", env["RDZV_ID"], "--rdzv_backend", "c10d",
                "--rdzv_endpoint", f"{addr}:{port}", "--max_restarts", env.get("MAX_RESTARTS", "3")]
    else:
        cmd += ["--nnodes", env.get("NNODES", "1"), "--node_rank", env.get("NODE_RANK", "0"),
                "--master_addr", addr, "--master_port", port]
    return cmd + ["-m", "lorakit", "train", *argv]


def launch(argv: list[str]) -> int:
    """Run `lorakit train ARGV` under torch.distributed.run and return its exit status (130 after a Ctrl-C).

    Ctrl-C reaches torchrun, which passes one SIGINT to every worker (they run in sessions of their own): each
    rank stops after the same step, rank 0 writes one checkpoint, all exit 130. This process only waits."""
    cmd = launch_command(argv)
    print("lorakit train: launching torch.distributed.run " + " ".join(cmd[3:cmd.index("-m", 3)]), file=sys.stderr,
          flush=True)
    env = {**os.environ, "LORAKIT_LAUNCHED": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")  # threads are set per rank (cores / local ranks); quiets torchrun
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    try:
        proc = subprocess.Popen(cmd, env=env)  # torchrun gets the terminal's Ctrl-C itself; this one only notes it
        code = proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    return 130 if code != 0 and (interrupted or code in (130, -signal.SIGINT)) else code


def run_torchrun(args: list[str]) -> int:
    """torch.distributed.run's main on `args` (what `launch` runs): a Ctrl-C it passed on to the workers ends as
    exit 130, and a failed worker as one line naming its rank, instead of torchrun's tracebacks."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    try:
        main(args)
    except SignalException as exc:
        return 130 if exc.sigval == signal.SIGINT else 128 + int(exc.sigval)
    except ChildFailedError as exc:
        rank, failure = min(exc.failures.items())
        code = failure.exitcode
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        print(f"lorakit train: error: rank {rank} ended with {how}; torchrun stopped the other ranks of this node",
              file=sys.stderr)
        return 130 if code == 130 else 1
    return 0
