"""Data-parallel training: the launch plan from the contract, the sharded sampler, and real runs
of 2 processes (torchrun, gloo) through the toolkit's `train` entry against 1 process."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from imgcls import artifact
from tests.conftest import Job
from train import contract, hyperparams, metrics
from train.data import EpochSampler
from train.job import write_failure
from train.launcher import MASTER_PORT, Plan, plan
from train.synthetic import make_dataset


def _job(hosts, current, gpus=0) -> contract.Job:
    return contract.Job(hyperparameters={}, channels={}, model_dir=Path("m"), output_dir=Path("o"),
                        output_data_dir=Path("o/data"), checkpoint_dir=Path("c"), debugger_config=None,
                        hosts=hosts, current_host=current, num_gpus=gpus)


def test_plan_from_the_contract():
    # One host, one device: no launcher.
    assert plan(_job(["algo-1"], "algo-1"), 0).world_size == 1
    # GPUs: one process per GPU; the node rank is the host's position; the first host is master.
    p = plan(_job(["algo-1", "algo-2", "algo-3"], "algo-3", gpus=8), 0)
    assert (p.nproc, p.node_rank, p.master_addr, p.world_size) == (8, 2, "algo-1", 24)
    args = p.torchrun()
    for flag in ("--nnodes=3", "--nproc-per-node=8", "--node-rank=2", "--master-addr=algo-1",
                 f"--master-port={MASTER_PORT}"):
        assert flag in args
    assert args[-2:] == ["-m", "train"]
    # CPU hosts: processes-per-host; a single host talks to itself over loopback.
    p = plan(_job(["algo-1"], "algo-1"), 2)
    assert (p.nproc, p.master_addr, p.world_size) == (2, "127.0.0.1", 2)
    assert plan(_job(["algo-1", "algo-2"], "algo-1"), 0) == Plan(("algo-1", "algo-2"), 0, 1, "algo-1")


def test_plan_refuses_what_cannot_run():
    with pytest.raises(contract.ContractError, match="algo-9.*is not in the job's host list"):
        plan(_job(["algo-1", "algo-2"], "algo-9"), 0)
    with pytest.raises(hyperparams.HyperparameterError, match="processes-per-host=4 is more than this host's 2 GPUs"):
        plan(_job(["algo-1"], "algo-1", gpus=2), 4)


def test_processes_per_host_hyperparameter():
    assert hyperparams.parse({}).processes_per_host == 0
    assert hyperparams.parse({"processes-per-host": "auto"}).processes_per_host == 0
    assert hyperparams.parse({"processes-per-host": "3"}).processes_per_host == 3
    with pytest.raises(hyperparams.HyperparameterError, match="'processes-per-host' = 'two' is not valid"):
        hyperparams.parse({"processes-per-host": "two"})


@pytest.mark.parametrize("size,world", [(24, 2), (25, 2), (10, 3), (2, 4)])
def test_sharded_order_is_the_single_process_order(size, world):
    """The k-th batches of all ranks together are the k-th global batch of one process; every rank
    runs the same number of steps; evaluation counts each image once."""
    single = [i for _, i in EpochSampler(size, seed=5, shuffle=True)]
    shards = [[i for _, i in EpochSampler(size, seed=5, shuffle=True, rank=r, world_size=world)] for r in range(world)]
    assert len({len(s) for s in shards}) == 1
    assert all(len(s) == len(EpochSampler(size, 5, True, r, world)) for r, s in enumerate(shards))
    interleaved = [shards[r][k] for k in range(len(shards[0])) for r in range(world)]
    assert interleaved[:size] == single and set(interleaved[size:]) <= set(single)
    evals = [[i for _, i in EpochSampler(size, 5, False, r, world)] for r in range(world)]
    assert sorted(i for s in evals for i in s) == list(range(size))


def test_the_first_failing_rank_names_itself_and_keeps_the_file(tmp_path):
    failure = tmp_path / "failure"
    write_failure(failure, contract.ContractError("the real cause"), "rank 1 of 2 (algo-2)")
    write_failure(failure, RuntimeError("Connection closed by peer"), "rank 0 of 2 (algo-1)")
    assert failure.read_text().startswith("rank 1 of 2 (algo-2): the real cause")


# --- real runs -----------------------------------------------------------------------------------


def _run(base: Path, **hps) -> tuple[Job, str]:
    job = Job(base)
    job.config.mkdir(parents=True)
    (job.config / "resourceconfig.json").write_text(json.dumps({"current_host": "algo-1", "hosts": ["algo-1"]}))
    make_dataset(job.data, per_class=10, size=32, classes=3, test_per_class=3, seed=1)
    job.hyperparameters(**hps)
    result = job.run(timeout=600, OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stdout[-4000:]
    return job, result.stdout


@pytest.mark.slow
def test_two_processes_train_the_same_model_as_one(tmp_path):
    """24 train images, global batch 8: 1 process x 8 against 2 processes x 4, gloo on CPU.
    Frozen backbone (BatchNorm statistics fixed) and fp32: the same sums in another order. The trunk
    as the job picks it: where it is int8, both calibrate it in int8.calibration_batch's batches,
    not their own (activation histograms depend on the split), so they train on the same trunk and
    write the same int8 models."""
    common = dict(freeze="backbone", augment="none", precision="fp32", epochs=3)
    one, log_one = _run(tmp_path / "one", batch_size=8, **common)
    two, log = _run(tmp_path / "two", batch_size=4, processes_per_host=2, **common)
    # the same trunk: its features' distance from fp32's as measured, and the trace it trained on
    trunk = re.compile(r"frozen-trunk: int8 calibrated .* features are ([\d.]+) from|run as one frozen (\w+) trace")
    assert trunk.findall(log) == trunk.findall(log_one) and trunk.findall(log)

    assert "data parallel: 1 hosts x 2 processes = 2 ranks" in log
    assert "batch size 4 per process x 2 processes = global batch 8, 3 steps per epoch" in log
    found = metrics.parse_log(log, metrics.metric_definitions())
    assert found["train:epoch"] == [1, 2, 3]  # one metric line per epoch, not one per rank
    assert len(found["test:accuracy"]) == 1

    m1, _ = artifact.load(one.model_dir)
    m2, _ = artifact.load(two.model_dir)
    for (name, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        if a.is_floating_point():
            assert torch.allclose(a, b, atol=1e-5), name
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for vnni in (False, True):
        q1, q2 = artifact.load_int8(one.model_dir, vnni), artifact.load_int8(two.model_dir, vnni)
        assert (q1 is None) == (q2 is None) and (vnni or q1 is not None)
        if q1 is not None:
            assert torch.allclose(q1(x), q2(x), atol=1e-5), f"int8 model (vnni={vnni})"
    h1 = json.loads((one.output_data / "metrics.json").read_text())
    h2 = json.loads((two.output_data / "metrics.json").read_text())
    for e1, e2 in zip(h1["history"], h2["history"], strict=True):  # global metrics, not rank 0's share
        for key in ("train_loss", "train_acc", "valid_loss", "valid_acc"):
            assert e2[key] == pytest.approx(e1[key], abs=1e-4), key
    assert h2["final"]["test_acc"] == pytest.approx(h1["final"]["test_acc"])


@pytest.mark.slow
def test_resume_with_another_world_size(tmp_path):
    """A checkpoint written by 2 processes resumes in 1 (a smaller instance count after a spot
    interruption): same epoch, learning-rate schedule rescaled to the new steps per epoch."""
    base = tmp_path / "job"
    job, log = _run(base, batch_size=4, processes_per_host=2, epochs=1)
    assert (job.base / "checkpoints" / "checkpoint.pt").is_file()
    job.hyperparameters(batch_size=4, epochs=2)
    result = job.run(timeout=600, OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stdout[-4000:]
    assert "resumed from" in result.stdout and "after epoch 1" in result.stdout
    assert "resumed with 6 steps per epoch (the checkpoint had 3): learning-rate schedule rescaled" in result.stdout
    history = json.loads((job.output_data / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]


@pytest.mark.slow
def test_a_failing_rank_fails_the_job_with_its_message(tmp_path):
    """Rank 0 cannot write its checkpoint (the checkpoint path is a file); rank 1 is stopped by
    torchrun; the job fails promptly with rank 0's message."""
    job = Job(tmp_path / "job")
    job.config.mkdir(parents=True)
    (job.config / "resourceconfig.json").write_text(json.dumps({"current_host": "algo-1", "hosts": ["algo-1"]}))
    make_dataset(job.data, per_class=10, size=32, classes=3, test_per_class=3, seed=1)
    job.hyperparameters(batch_size=4, processes_per_host=2)
    (job.base / "checkpoints").write_text("not a folder")
    result = job.run(timeout=300, OMP_NUM_THREADS="1")
    assert result.returncode != 0
    text = job.failure.read_text()
    assert text.startswith("rank 0 of 2 (algo-1): The checkpoint cannot be written to"), text[:500]
    assert "it must be a writable folder" in text.splitlines()[0]


@pytest.mark.slow
def test_debugger_hook_writes_once_and_the_report_reads_it(tmp_path):
    """Rank 0 alone holds the hook; its run reads back as one worker's, every step complete."""
    from report.tensors import batch_losses, open_trial
    from tests.conftest import debugger_config

    job = Job(tmp_path / "job")
    job.config.mkdir(parents=True)
    (job.config / "resourceconfig.json").write_text(json.dumps({"current_host": "algo-1", "hosts": ["algo-1"]}))
    make_dataset(job.data, per_class=10, size=32, classes=3, test_per_class=3, seed=1)
    job.hyperparameters(batch_size=4, processes_per_host=2, epochs=2)
    tensors = debugger_config(job)
    result = job.run(timeout=600, OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stdout[-4000:]
    trial = open_trial(tensors)
    assert trial.workers() == ["worker_0"] and trial.num_workers == 1
    losses = batch_losses(trial)
    assert len(losses) == 2 * 3  # 2 epochs x 3 steps of the global batch, each saved once
    assert all(loss == loss for _, loss in losses)


def test_loader_workers_share_the_host_between_its_processes():
    from train.job import auto_workers

    assert auto_workers(16, 1, on_gpu=True) == 16
    assert auto_workers(16, 4, on_gpu=True) == 4     # 4 GPUs on the host: 4 workers each
    assert auto_workers(8, 2, on_gpu=False) == 2     # CPU host: half of each process's share
    assert auto_workers(2, 4, on_gpu=False) == 1
    # Images decoded once in memory: on few cores the training process crops them itself.
    assert auto_workers(2, 1, on_gpu=False, cached=True) == 0
    assert auto_workers(8, 1, on_gpu=False, cached=True) == 2
    assert auto_workers(16, 1, on_gpu=True, cached=True) == 16


def _pick_convs(rank: int, port: int, out: str) -> None:
    """One rank of test_rank_0_times_conv_gemm_and_every_rank_runs_its_picks."""
    import torch.distributed as dist

    from imgcls.models import create_model
    from train import conv_gemm, distributed
    from train.engine import choose_precision
    from train.job import gemm_convs

    if rank == 0:  # the multiply "wins" everywhere: picks that differ from any timing's
        conv_gemm._time = lambda *args: (2.0, 1.0)
    else:  # a rank that timed for itself would fail here
        def _time(*args):
            raise AssertionError("rank 1 timed its convolutions itself")
        conv_gemm._time = _time
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = create_model("resnet18", 3).to(memory_format=torch.channels_last)
        cfg = hyperparams.parse({"batch-size": "2", "image-size": "32"})
        device = torch.device("cpu")
        names = gemm_convs(cfg, model, device, choose_precision(cfg.precision, device), distributed.Rank(rank, 2))
        running = sorted(n for n, m in model.named_modules() if type(m) is conv_gemm.GemmConv2d)
        Path(out, f"rank{rank}.json").write_text(json.dumps({"returned": names, "running": running}))
    finally:
        dist.destroy_process_group()


def test_rank_0_times_conv_gemm_and_every_rank_runs_its_picks(tmp_path):
    """Ranks timing at once on shared CPUs pick differently where the two kernels tie (docs/benchmarks.md):
    rank 0 times them, and every rank runs rank 0's picks without timing. Two processes over gloo."""
    import torch.multiprocessing as mp

    from serve.process import free_port

    mp.spawn(_pick_convs, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    picks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert picks[0]["running"] and sorted(picks[0]["returned"]) == picks[0]["running"]
    assert picks[1] == picks[0]
