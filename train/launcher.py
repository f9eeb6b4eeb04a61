"""Start training: one process, or torchrun with one process per device on every host.

SageMaker starts the training image once per instance, with the same command and the same
hyperparameters everywhere; each instance learns its place from the contract (SM_HOSTS or
resourceconfig.json: all hosts and this one; SM_NUM_GPUS). torchrun then runs the trainer
`nproc` times on each of `nnodes` hosts: node rank from this host's position in the host list,
the first host as master, a fixed port. One host with one device runs the trainer in this
process: no launcher, the same code path.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass

from . import contract, hyperparams
from .contract import ContractError
from .distributed import Rank, setup_logging

MASTER_PORT = 29500  # torchrun's default, the same on every host
log = logging.getLogger("train")


@dataclass(frozen=True)
class Plan:
    hosts: tuple[str, ...]
    node_rank: int
    nproc: int
    master_addr: str

    @property
    def world_size(self) -> int:
        return len(self.hosts) * self.nproc

    def torchrun(self) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={len(self.hosts)}",
                f"--nproc-per-node={self.nproc}", f"--node-rank={self.node_rank}",
                f"--master-addr={self.master_addr}", f"--master-port={MASTER_PORT}", "-m", "train"]


def plan(job: contract.Job, processes_per_host: int) -> Plan:
    """processes_per_host 0 means auto: one per GPU, or one on a CPU host."""
    if job.current_host not in job.hosts:
        raise contract.ContractError(f"This host ({job.current_host}) is not in the job's host list {job.hosts}: "
                                     "resourceconfig.json (or SM_HOSTS and SM_CURRENT_HOST) must name it.")
    if processes_per_host and job.num_gpus and processes_per_host > job.num_gpus:
        raise hyperparams.HyperparameterError(
            f"processes-per-host={processes_per_host} is more than this host's {job.num_gpus} GPUs: "
            "use auto (one process per GPU) or at most the GPU count.")
    nproc = processes_per_host or job.num_gpus or 1
    # A single host talks to itself: its name need not resolve (a local run is not 'algo-1').
    master = job.hosts[0] if len(job.hosts) > 1 else "127.0.0.1"
    return Plan(tuple(job.hosts), job.hosts.index(job.current_host), nproc, master)


def launch_env(p: Plan, num_cpus: int, environ=os.environ) -> dict:
    env = dict(environ)
    # torchrun would set 1 thread per process; share the host's CPUs out instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, num_cpus // p.nproc)))
    return env


def main(environ=os.environ) -> int:
    from .job import main as train_main
    from .job import write_failure

    if "LOCAL_RANK" in environ:  # started by torchrun: this process is one rank
        return train_main(environ)
    setup_logging(Rank())
    failure = contract.base_dir(environ) / "output" / "failure"
    try:
        job = contract.read_job(environ)
        failure = job.failure_file
        cfg = hyperparams.parse(job.hyperparameters)
        p = plan(job, cfg.processes_per_host)
    except Exception as exc:  # noqa: BLE001 - the trainer would fail on the same thing: say it once, here
        write_failure(failure, exc)
        return 1
    if p.world_size == 1:
        return train_main(environ)
    log.info("data parallel: %d hosts x %d processes = %d ranks; this host is node %d; master %s:%d",
             len(p.hosts), p.nproc, p.world_size, p.node_rank, p.master_addr, MASTER_PORT)
    sys.stdout.flush()
    failure.unlink(missing_ok=True)  # a rank that fails creates it; an old one must not take its place
    code = subprocess.call(p.torchrun(), env=launch_env(p, job.num_cpus, environ))
    if code != 0 and not failure.exists():
        # No rank said why (killed by a signal, out of memory): the launcher's exit is all there is.
        write_failure(failure, ContractError(
            f"a training process on {job.current_host} stopped (torchrun exit code {code}) without a message; "
            "a process killed for memory is the usual cause: lower batch-size or processes-per-host"), "torchrun")
    return code
