import json
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch

from bench import machine
from imgcls import quantize
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_training_benchmark_quick_run(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "bench.train_throughput", "--quick", "--archs", "resnet18",
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["machine"] == machine.describe()  # the host it ran on, to tell hosts of one kind apart
    assert machine.line(report["machine"]) in result.stdout
    rows = report["rows"]
    configs = ("naive", "fp32-nchw", "default", "compiled", "gpu-decode")  # gpu-decode's path, on the CPU here
    import torch

    from bench.train_throughput import setup_fuses
    from train import batch_crop

    fuses = setup_fuses(torch.device("cpu"))  # bf16 here, and a compiler: the default with fused-norm=false beside it
    configs += ("sample-crop",)  # on a CPU: the cached crops image by image beside the default's batches
    assert {(r["freeze"], r["config"]) for r in rows} == {(f, c) for f in ("frozen", "full") for c in configs} | {
        ("frozen", "int8-trunk")} | ({("full", "aten-norm")} if fuses else set())
    for r in rows:
        assert r["synthetic_img_s"] > 0 and r["end_to_end_img_s"] > 0 and 0 <= r["data_wait"] <= 1
        # the data path alone, in the same rounds; naive's is its PIL path, not timed
        if r["config"] == "naive":
            assert r["data_img_s"] is None and r["data_rounds"] == []
        else:
            assert len(r["data_rounds"]) == 2 and r["data_img_s"] == pytest.approx(statistics.median(r["data_rounds"]))
            assert r["data_img_s"] > 0
        # medians over the rounds the configurations took turns in
        assert len(r["end_to_end_rounds"]) == len(r["synthetic_rounds"]) == r["rounds"] == report["rounds"] == 2
        assert r["end_to_end_img_s"] == pytest.approx(statistics.median(r["end_to_end_rounds"]))
        assert r["e2e_over_synthetic"] == pytest.approx(r["end_to_end_img_s"] / statistics.median(r["synthetic_rounds"]))
        assert r["e2e_over_synthetic_by_round"] == pytest.approx(statistics.median(
            e / s for e, s in zip(r["end_to_end_rounds"], r["synthetic_rounds"], strict=True)))
        cached = ("default", "compiled", "int8-trunk", "aten-norm", "sample-crop")
        assert (r["decode_once_s"] > 0) == (r["config"] in cached)
        # a job's crop of a cached batch: one call, but in sample-crop
        assert r["batch_crop"] == (batch_crop.KERNELS.library() is not None and r["config"] in cached[:-1]), r
        # fused-norm as a job runs it: the fast configurations but compiled and aten-norm (20 norms in resnet18)
        assert r["fused_norms"] == (20 if fuses and r["config"] in ("default", "gpu-decode", "int8-trunk", "sample-crop")
                                    else 0), r
        if r["config"] in ("aten-norm", "sample-crop"):
            assert r["vs_default"] == pytest.approx(r["end_to_end_img_s"] / next(
                d["end_to_end_img_s"] for d in rows if d["config"] == "default" and d["freeze"] == r["freeze"]))
        # frozen-trunk as a job runs it: the default's frozen backbone traced, nothing else
        traced = r["config"] in ("default", "gpu-decode", "int8-trunk", "sample-crop") and r["freeze"] == "frozen"
        # int8 where a job's check passes, which random weights may or may not (the trunk with 8-bit
        # activations, on a CPU with VNNI, comes nearer fp32)
        if r["config"] not in ("default", "sample-crop", "gpu-decode"):
            assert r["int8_trunk"] == (r["config"] == "int8-trunk"), r
        assert r["frozen_trunk"] == (["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4",
                                      "avgpool"] if traced else []), r
        if r["config"] == "compiled":
            assert r["vs_default"] > 0 and r["compile_s"] == pytest.approx(r["first_epoch_s"] - next(
                d["first_epoch_s"] for d in rows if d["config"] == "default" and d["freeze"] == r["freeze"]))
        assert r["vs_naive"] == pytest.approx(r["end_to_end_img_s"] / next(
            n["end_to_end_img_s"] for n in rows if n["config"] == "naive" and n["freeze"] == r["freeze"]))
    acc = report["accuracy"]
    assert 0 <= acc["naive"]["valid_acc"] <= 1 and 0 <= acc["default"]["valid_acc"] <= 1
    for config in ("naive", "default"):  # the spread over seeds, from the runs the report lists
        accs = [r["valid_acc"] for r in acc[config]["runs"]]
        assert len(accs) == len(acc["seeds"]) == 2 and acc[config]["sd"] == pytest.approx(statistics.stdev(accs))
    # paired by seed: the spread of the per-seed differences, not of two independent means
    diffs = [d["valid_acc"] - n["valid_acc"]
             for d, n in zip(acc["default"]["runs"], acc["naive"]["runs"], strict=True)]
    assert acc["default_minus_naive"] == pytest.approx(statistics.fmean(diffs))
    assert acc["difference_se"] == pytest.approx(statistics.stdev(diffs) / 2 ** 0.5)
    assert "standard error" in result.stdout
    # end to end and vs naive for each default and the int8 trunk, then accuracy, full and frozen
    assert len(report["targets"]) == 8 and all(isinstance(t["met"], bool) for t in report["targets"])
    assert [t["target"].split(":")[0] for t in report["targets"]][-2:] == [
        "resnet18 full, 1 epochs, 2 seeds", "resnet18 frozen backbone, 1 epochs, 2 seeds"]
    assert all(f"{t['target']}: {t['shown']}" in result.stdout for t in report["targets"])
    # an accuracy target shows both means and the signed difference, not a rounded 0.00
    assert report["targets"][-2]["shown"].startswith(
        f"{acc['default']['valid_acc']:.3f} vs {acc['naive']['valid_acc']:.3f} ({acc['default_minus_naive']:+.4f}, "
        f"standard error {acc['difference_se']:.4f}, paired by seed)")
    # the table's precision column names the int8 trunk
    int8_rows = [line.split() for line in result.stdout.splitlines() if line.startswith("resnet18  frozen  int8-trunk ")]
    assert len(int8_rows) == 1 and int8_rows[0][3].startswith("int8/")
    frozen_acc = report["frozen_accuracy"]
    assert frozen_acc["freeze"] == "backbone" and 0 <= frozen_acc["default"]["valid_acc"] <= 1
    assert "frozen backbone (a backbone trained on four of the shapes)" in result.stdout
    assert "e2e/syn" in result.stdout and "targets" in result.stdout
    naive, fp32 = ([r for r in rows if r["config"] == c and r["freeze"] == "full"] for c in ("naive", "fp32-nchw"))
    assert naive[0]["synthetic_rounds"] == fp32[0]["synthetic_rounds"]  # one ceiling: same model and precision
    # the roofline: model FLOP/s against the multiply rate of the row's precision, timed in the same rounds
    for r in rows:
        assert r["model_gflop_s"] == pytest.approx(r["end_to_end_img_s"] * r["model_gflop_per_image"])
        if r["int8_trunk"]:
            assert r["of_matmul"] is r["most_vs_naive"] is r["matmul_gflop_s"] is None
            continue
        assert len(r["matmul_rounds"]) == 2 and r["matmul_gflop_s"] == pytest.approx(statistics.median(r["matmul_rounds"]))
        assert r["of_matmul"] == pytest.approx(r["model_gflop_s"] / r["matmul_gflop_s"])
        assert r["most_vs_naive"] == pytest.approx(r["matmul_gflop_s"] / r["model_gflop_per_image"] / next(
            n["end_to_end_img_s"] for n in rows if n["config"] == "naive" and n["freeze"] == r["freeze"]))
    frozen, full = (next(r["model_gflop_per_image"] for r in rows if r["freeze"] == f) for f in ("frozen", "full"))
    assert 2.5 * frozen < full < 3 * frozen  # backward through the backbone: about twice its forward
    assert "of mm" in result.stdout and "matrix multiply rate" in result.stdout
    assert all("multiply rate)" in t["shown"] for t in report["targets"] if t["target"].endswith("full: default >= 3 x naive"))


class _Slow(torch.utils.data.Dataset):
    def __len__(self):
        return 12

    def __getitem__(self, key):
        time.sleep(0.02)
        return torch.zeros(2), key[1]


def test_settle_waits_for_a_run_ahead_loaders_prefetch():
    """After an epoch a RunAhead's worker goes on into the next one; settle returns once every batch
    it was asked for is made, so that the next configuration's turn has the cores to itself."""
    from bench.train_throughput import settle
    from train import data

    loader = data.loader(_Slow(), data.EpochSampler(12, 0, True), 2, workers=1, run_ahead=True)
    try:
        assert len(list(loader.epoch(0))) == 6
        it = loader._batches
        waited = settle(loader)
        assert waited > 0 and it._tasks_outstanding > 0 and it._data_queue.qsize() >= it._tasks_outstanding
        assert [labels.tolist() for _, labels in loader.epoch(1)][0] == [k for _, k in data.EpochSampler(
            12, 0, True).keys(1)[:2]]  # the prefetched batches are the next epoch's
    finally:
        loader.close()
    assert settle(data.loader(_Slow(), data.EpochSampler(12, 0, True), 2, workers=0, run_ahead=True)) == 0.0


def test_a_ceiling_is_timed_around_its_own_configurations_epoch(tmp_path, monkeypatch, capsys):
    """Each round, the default's synthetic ceiling runs half its steps just before the default's
    end-to-end epoch and half just after it (A-B-A): a noisy host's spells then weigh on both sides of
    e2e/syn. A configuration that borrows the ceiling (sample-crop) is not run around it."""
    from argparse import Namespace

    from bench import train_throughput as bench

    events = []
    synthetic, epoch = bench.synthetic_epoch, bench.Setup.epoch

    def timed_synthetic(setup, model, frozen, opt, size, batch, steps, classes):
        result = synthetic(setup, model, frozen, opt, size, batch, steps, classes)
        events.append(("syn", setup.config, steps, result.samples / result.seconds))
        return result

    def timed_epoch(setup, model, frozen, opt, number, sched=None):
        result = epoch(setup, model, frozen, opt, number, sched)
        events.append(("e2e", setup.config, number, result.images_per_second))
        return result

    monkeypatch.setattr(bench, "synthetic_epoch", timed_synthetic)
    monkeypatch.setattr(bench.Setup, "epoch", timed_epoch)
    args = Namespace(size=32, batch=4, steps=3, rounds=2, quick=True)
    channel = bench.photo_channel(tmp_path / "photos", args.batch * args.steps, 3)
    workers = dict.fromkeys(bench.CONFIGS, 0)
    rows = {r["config"]: r for r in bench.measure(args, torch.device("cpu"), workers, channel, 3, "resnet18", "none",
                                                  ("fp32-nchw", "default", "sample-crop"))}
    rounds = [i for i, e in enumerate(events) if e[0] == "e2e" and e[2] > 0]
    assert [events[i][1:3] for i in rounds] == [(c, n) for n in (1, 3) for c in ("fp32-nchw", "default", "sample-crop")]
    ceilings = {"fp32-nchw": [], "default": []}
    for i in rounds:
        config = events[i][1]
        if config in ceilings:
            before, after = events[i - 1], events[i + 1]
            assert before[:3] == ("syn", config, 1) and after[:3] == ("syn", config, 2)
            ceilings[config].append(3 / (1 / before[3] + 2 / after[3]))  # images over both halves' seconds
    # nothing else synthetic in the rounds: sample-crop borrows the default's
    assert sum(e[0] == "syn" for e in events[rounds[0] - 1:]) == 2 * len(ceilings) * args.rounds
    for config, rates in ceilings.items():
        assert rows[config]["synthetic_rounds"] == pytest.approx(rates)
    assert rows["sample-crop"]["synthetic_rounds"] == rows["default"]["synthetic_rounds"]
    # each round printed as it ends, beside its own ceiling's rate of that round: a run stopped in a
    # later round keeps it
    printed = [line.strip() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("round ")]
    expected = []
    for n in (1, 2):
        for config, r in rows.items():
            e2e, syn = r["end_to_end_rounds"][n - 1], r["synthetic_rounds"][n - 1]
            expected.append(f"round {n}/2 resnet18 full {config}: {e2e:.1f} img/s end to end, synthetic {syn:.1f}, "
                            f"e2e/syn {e2e / syn:.2f}, data {r['data_rounds'][n - 1]:.1f} img/s, data wait ")
    assert len(printed) == len(expected) == 6
    for line, start in zip(printed, expected, strict=True):
        assert line.startswith(start) and line.endswith("%"), (line, start)


def test_a_failing_configuration_costs_its_own_rows_not_the_run(tmp_path, monkeypatch, capsys):
    """A variant that raises in a round (as a GPU-only path might on its one device lease) is printed
    with its error and where it was raised, left out of the later rounds and the table, and written
    to the results file; the others are measured to the end, and the exit status says it failed."""
    from bench import train_throughput as bench

    epoch = bench.Setup.epoch

    def failing_epoch(setup, model, frozen, opt, number, sched=None):
        if setup.config == "gpu-decode" and number == 3:  # round 2's end-to-end epoch
            raise RuntimeError("nvJPEG refused the batch\nsecond line of a long error")
        return epoch(setup, model, frozen, opt, number, sched)

    monkeypatch.setattr(bench.Setup, "epoch", failing_epoch)
    out = tmp_path / "results.json"
    monkeypatch.setattr(sys, "argv", ["bench.train_throughput", "--quick", "--parts", "throughput", "--archs",
                                      "resnet18", "--freeze", "full", "--configs", "default,gpu-decode", "--size",
                                      "32", "--batch", "4", "--steps", "3", "--out", str(out)])
    with pytest.raises(SystemExit) as stopped:
        bench.main()
    assert stopped.value.code == f"1 configuration(s) failed; their errors are above and in {out}"
    printed = capsys.readouterr()
    report = json.loads(out.read_text())
    assert [r["config"] for r in report["rows"]] == ["default"] and len(report["rows"][0]["end_to_end_rounds"]) == 2
    [failed] = report["failed"]
    assert failed == {"arch": "resnet18", "freeze": "full", "config": "gpu-decode", "stage": "round 2",
                      "error": "RuntimeError: nvJPEG refused the batch", "where": "test_bench.py:"
                      f"{failing_epoch.__code__.co_firstlineno + 2} in failing_epoch"}
    rounds = [line.strip().split(":")[0] for line in printed.out.splitlines() if line.strip().startswith("round ")]
    assert rounds == ["round 1/2 resnet18 full default", "round 1/2 resnet18 full gpu-decode",
                      "round 2/2 resnet18 full default"]
    assert ("FAILED resnet18 full gpu-decode (round 2): RuntimeError: nvJPEG refused the batch (at "
            f"{failed['where']}); left out of the later rounds and the table") in printed.out
    assert "FAILED   resnet18 full gpu-decode (round 2): RuntimeError: nvJPEG refused the batch" in printed.out
    assert "second line of a long error" in printed.err  # the whole traceback, on stderr
    table = printed.out.split("arch      mode")[1]
    assert "resnet18  full    default" in table and "gpu-decode" not in table.split("targets")[0]


def test_a_failing_ceiling_still_ends_the_run(tmp_path, monkeypatch):
    """The default is the other configurations' synthetic ceiling: without it no ratio is measured,
    so its error ends the run as before, failures list or not."""
    from argparse import Namespace

    from bench import train_throughput as bench

    def failing_epoch(setup, *args, **kwargs):
        raise RuntimeError(f"{setup.config} cannot train here")

    monkeypatch.setattr(bench.Setup, "epoch", failing_epoch)
    args = Namespace(size=32, batch=4, steps=3, rounds=2, quick=True)
    channel = bench.photo_channel(tmp_path / "photos", args.batch * args.steps, 3)
    workers = dict.fromkeys(bench.CONFIGS, 0)
    failures = []
    with pytest.raises(RuntimeError, match="default cannot train here"):
        bench.measure(args, torch.device("cpu"), workers, channel, 3, "resnet18", "none", ("default", "gpu-decode"),
                      failures)
    assert failures == []
    # without a failures list, a variant's error ends the run too (the old behaviour, for callers that want it)
    with pytest.raises(RuntimeError, match="gpu-decode cannot train here"):
        bench.measure(args, torch.device("cpu"), workers, channel, 3, "resnet18", "none", ("gpu-decode",))


def test_naive_accuracy_runs_see_the_defaults_draws(tmp_path):
    """In the accuracy parts a seed's naive run trains on the default's batches: the same samples in
    the same order, each with the same crop and flip, resampled by PIL instead of torch (within a
    level of rounding). Only then is the difference of their accuracies paired by seed."""
    from bench.images import photo_like_jpegs
    from bench.train_throughput import Setup
    from imgcls.presets import IMAGENET_MEAN, IMAGENET_STD
    from train import data

    samples = []
    for i, jpeg in enumerate(photo_like_jpegs(12, size=(60, 45), seed=3)):
        path = tmp_path / f"{i % 3}" / f"{i}.jpg"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(jpeg)
        samples.append((path, i % 3))
    channel = data.Channel("train", tmp_path, ["0", "1", "2"], samples)
    cpu = torch.device("cpu")
    naive = Setup("naive", channel, None, 32, 4, 0, cpu, seed=7, same_draws=True)
    default = Setup("default", channel, None, 32, 4, 0, cpu, seed=7)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    seen = []
    for epoch in (0, 1):
        for (x, y), (u, v) in zip(data.epoch_batches(naive.train, epoch), data.epoch_batches(default.train, epoch),
                                  strict=True):
            assert y.tolist() == v.tolist()
            levels = (x * std + mean) * 255  # naive's normalized batch back in uint8 levels
            ours = u * std * 255 + mean * 255 if u.is_floating_point() else u.float()
            assert (levels - ours).abs().max() <= 1.01
            seen.append(x)
    assert len(seen) == 6
    # the same sample gets another crop in another epoch, from the same dataset
    dataset = naive.train.dataset
    assert not torch.equal(dataset[(0, 0)][0], dataset[(1, 0)][0]) and torch.equal(dataset[(0, 0)][0],
                                                                                    dataset[(0, 0)][0])
    # without same_draws naive draws its own crops (the throughput part's course notebook)
    assert Setup("naive", channel, None, 32, 4, 0, cpu, seed=7).train.dataset.seed is None


def test_a_target_prints_what_decided_it():
    from bench.train_throughput import targets

    row = {"arch": "resnet18", "freeze": "full", "config": "default", "precision": "bf16",
           "e2e_over_synthetic": 0.8497, "vs_naive": 2.996, "most_vs_naive": 2.94}
    e2e, naive = targets([row], [])
    # two places would round both onto their thresholds, as if met
    assert (e2e["met"], e2e["shown"]) == (False, "0.8497") and (naive["met"], naive["shown"][:5]) == (False, "2.996")
    assert naive["shown"] == "2.996 (at most 2.94 at this device's bf16 multiply rate)"
    row.update(e2e_over_synthetic=0.912, vs_naive=3.004, most_vs_naive=None, config="int8-trunk")
    e2e, naive = targets([row], [])
    assert (e2e["met"], e2e["shown"], naive["met"], naive["shown"]) == (True, "0.91", True, "3.00")


def test_training_benchmark_runs_one_part(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "bench.train_throughput", "--quick", "--parts", "accuracy",
                             "--acc-seeds", "5,6,7", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["parts"] == ["accuracy"] and report["rows"] == [] and "e2e/syn" not in result.stdout
    assert report["accuracy"]["seeds"] == [5, 6, 7]
    assert [r["seed"] for r in report["accuracy"]["default"]["runs"]] == [5, 6, 7]
    (target,) = report["targets"]
    assert "valid accuracy >= naive" in target["target"] and target["met"] == (target["value"] >= 0)
    bad = subprocess.run([sys.executable, "-m", "bench.train_throughput", "--parts", "accuracy,speed"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and ("--parts takes some of throughput, accuracy, frozen-accuracy, got accuracy,speed"
                                    in bad.stderr)
    bad = subprocess.run([sys.executable, "-m", "bench.train_throughput", "--quick", "--batch", "1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--batch takes a positive integer of at least 2, got 1" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "bench.train_throughput", "--quick", "--freeze", "half"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--freeze takes frozen, full or both, got 'half'" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "bench.train_throughput", "--quick", "--configs", "default,fast"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--configs takes some of naive, fp32-nchw, default" in bad.stderr


def test_stack_dumps_come_from_a_python_thread_and_sigterm_still_ends_the_run():
    """bench.stacks: every other thread's stack at each interval, taken under the GIL (a C watchdog
    reading frames without it crashed quick runs), and on SIGTERM one last dump from faulthandler
    before the signal ends the process as it would have."""
    code = ("import sys, time\n"
            "from bench.stacks import dump_stacks_every\n"
            "dump_stacks_every(0.05)\n"
            "def waiting_here():\n"
            "    print('waiting', flush=True)\n"
            "    time.sleep(30)\n"
            "waiting_here()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline() == "waiting\n"
    time.sleep(1.0)  # 20 intervals: at least 3 dumps even on a loaded machine
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -15
    periodic, _, last = err.rpartition("Current thread")
    assert periodic.count("--- stacks at ") >= 3 and "in waiting_here" in periodic
    assert "Thread MainThread" in periodic and "stack-dumps" not in periodic  # not its own stack
    assert "in waiting_here" in last  # faulthandler's one dump at SIGTERM
    from bench.stacks import dump_stacks_every
    with pytest.raises(ValueError, match="must be positive"):
        dump_stacks_every(0)


def test_training_benchmark_sizes_can_be_set(tmp_path):
    """--size/--batch/--steps/--rounds override the sizes (a GPU run's 224 px, batch 128 by default);
    --freeze and --configs pick the rows."""
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "bench.train_throughput", "--quick", "--parts", "throughput",
                             "--archs", "resnet18", "--compile-archs", "", "--size", "40", "--batch", "3",
                             "--steps", "3", "--rounds", "1", "--freeze", "full", "--configs", "default,naive",
                             "--stacks", "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert (report["image_size"], report["batch_size"], report["steps"], report["rounds"]) == (40, 3, 3, 1)
    assert [(r["freeze"], r["config"]) for r in report["rows"]] == [("full", "naive"), ("full", "default")]
    for r in report["rows"]:
        assert len(r["end_to_end_rounds"]) == 1 and 0 <= r["first_batch_wait"] <= r["data_wait"] <= 1
        # each row in full as soon as it is measured: a run stopped before its table keeps it
        assert (f"measured resnet18 full {r['config']}: {r['end_to_end_img_s']:.1f} img/s end to end "
                f"({r['end_to_end_img_s']:.1f}), synthetic {r['synthetic_img_s']:.1f}") in result.stdout
    assert "cropped to 40px, batch 3, 3 steps, median of 1 rounds" in result.stdout
    assert "--- stacks at " in result.stderr and "in measure" in result.stderr  # --stacks: where it was


def test_server_timing_header_is_parsed():
    from bench.serve_latency import server_timing
    assert server_timing("handler;dur=9.812, predict;dur=8.903") == {"handler": 9.812, "predict": 8.903}
    assert server_timing('db;desc="x";dur=1.5, cache') == {"db": 1.5}
    assert server_timing(None) == {}


def test_serving_benchmark_quick_run(tmp_path):
    out = tmp_path / "serve.json"
    result = subprocess.run([sys.executable, "-m", "bench.serve_latency", "--quick", "--archs", "resnet18",
                             "--precision", "int8", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["machine"] == machine.describe() and machine.line(report["machine"]) in result.stdout
    (row,) = report["rows"]
    assert row["arch"] == "resnet18" and row["startup_s"] > 0
    assert 0 < row["in_process_ms"] and 0 < row["p50_ms"] <= row["p95_ms"]
    assert min(row["img_s_c1"], row["img_s_c4"], row["img_s_c8"], row["one_worker_img_s_c4"]) > 0
    assert row["one_worker_overhead_ms"] == pytest.approx(row["one_worker_p50_ms"] - row["one_worker_in_process_ms"])
    assert "in-proc ms" in result.stdout
    # The artifact it serves carries an int8 model and its measured agreement, as a trained one does.
    assert 0 <= row["int8_top1_agreement"] <= 1 and row["naive_img_s_c4"] > 0
    # and where this CPU has VNNI the one with 8-bit activations as well (imgcls.quantize)
    assert (row["int8_vnni_top1_agreement"] is not None) == quantize.vnni_ready()
    assert ("with 8-bit activations);" in result.stdout) == quantize.vnni_ready()
    assert row["precision"] == "int8"  # --precision: the server and the in-process runs
    # The front end's CPU per request is measured on each server's own JVM.
    assert min(row["jvm_cpu_ms"], row["naive_jvm_cpu_ms"], row["one_worker_jvm_cpu_ms"]) > 0
    assert "the JVM's CPU per request" in result.stdout
    # the overhead split by ours' Server-Timing header: each part measured, the model's time in a
    # worker set against the same predict in process
    assert min(row["transport_ms"], row["transport_back_to_back_ms"], row["handler_outside_predict_ms"],
               row["worker_predict_ms"]) > 0
    assert row["worker_minus_in_process_ms"] == pytest.approx(row["worker_predict_ms"] - row["in_process_ms"])
    assert "by its Server-Timing header" in result.stdout
    # the forward alone against the int8 multiply rate at a worker's threads (bench.roofline)
    assert 0 < row["forward_ms"] < row["in_process_ms"] and len(row["matmul_rounds"]) == 2
    assert row["model_gflop_s"] == pytest.approx(row["model_gflop_per_image"] / row["forward_ms"] * 1000)
    assert row["of_matmul"] == pytest.approx(row["model_gflop_s"] / row["matmul_gflop_s"])
    assert row["most_c4_vs_naive"] == pytest.approx(
        row["workers"] * row["matmul_gflop_s"] / row["model_gflop_per_image"] / row["naive_img_s_c4"])
    assert "of the int8 multiply rate" in result.stdout


def test_jvm_flags_benchmark_quick_run(tmp_path):
    out = tmp_path / "jvm.json"
    result = subprocess.run([sys.executable, "-m", "bench.jvm_flags", "--quick", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["machine"] == machine.describe()
    assert report["variants"]["default"] != report["variants"]["other"]
    assert "-XX:TieredStopAtLevel=1" not in report["variants"]["other"]
    assert len(report["rounds"]) == 2
    for row in report["rounds"]:
        for label in ("default", "other"):
            assert row[f"{label}_jvm_cpu_ms"] > 0 and row[f"{label}_img_s_c4"] > 0 and row[f"{label}_p50_ms"] > 0
    assert "JVM CPU per request" in result.stdout
    # the servers take turns going first, and the second half is compared round by round
    assert [row["first"] for row in report["rounds"]] == ["default", "other"] and report["started_first"] == "default"
    last, summary = report["rounds"][1], report["summary"]
    assert summary["other_vs_default_p50_ms"] == pytest.approx(last["other_p50_ms"] - last["default_p50_ms"])
    assert summary["other_vs_default_c4_ratio"] == pytest.approx(last["other_img_s_c4"] / last["default_img_s_c4"])
    assert summary["other_vs_default_jvm_cpu_ms_se"] is None  # one round in the second half
    assert "paired by round" in result.stdout


def test_photos_are_fixed_by_their_chunks(tmp_path, monkeypatch):
    """The bench's JPEGs come in chunks made in parallel, each from its own seed: the same files
    whatever the pool's size."""
    import bench.train_throughput as bench
    from bench.images import photo_like_jpegs

    monkeypatch.setattr(bench, "PHOTO_CHUNK", 4)
    channel = bench.photo_channel(tmp_path, 10, classes=3)
    files = sorted(channel.samples)
    assert len(files) == 10 and {label for _, label in files} == {0, 1, 2}
    by_index = {int(path.stem): path.read_bytes() for path, _ in files}
    expected = photo_like_jpegs(4, seed=0) + photo_like_jpegs(4, seed=1) + photo_like_jpegs(2, seed=2)
    assert [by_index[i] for i in range(10)] == expected
    assert expected[0] != expected[4]  # another seed, another image


def test_loader_probe_quick_run(tmp_path):
    out = tmp_path / "probe.json"
    result = subprocess.run([sys.executable, "-m", "bench.loader_probe", "--quick", "--workers", "2,1", "--out",
                             str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["machine"] == machine.describe() and machine.line(report["machine"]) in result.stdout
    rows = report["rows"]
    assert [(r["source"], r["workers"], r["pinning"]) for r in rows] == [
        (s, w, p) for s in ("cached", "uncached", "uncached-pillow") for w in (2, 1) for p in ("thread", "main", "off")]
    assert set(report["decode_once_s"]) == {"default", "pillow"} and min(report["decode_once_s"].values()) > 0
    assert "through Pillow" in result.stdout
    for r in rows:
        assert r["img_s"] > 0 and r["first_epoch_img_s"] > 0 and r["shutdown_s"] >= 0
        assert 0 < r["first_batch_s"] < len(r["rounds"]) * report["steps"] * report["batch_size"] / r["img_s"]
        assert len(r["rounds"]) == report["rounds"] == 2 and r["img_s"] == pytest.approx(statistics.median(r["rounds"]))
    assert "shutdown s" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "bench.loader_probe", "--quick", "--workers", "4,0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--workers takes positive integers separated by commas, got '4,0'" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "bench.loader_probe", "--quick", "--pinnings", "main,both"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--pinnings takes some of thread, main, off, comma-separated, got 'main,both'" \
        in bad.stderr


def test_loader_probe_tries_the_auto_worker_count_and_fewer():
    from bench.loader_probe import worker_counts

    assert worker_counts(16, on_gpu=True) == [16, 8, 4]
    assert worker_counts(64, on_gpu=True) == [16, 8, 4]  # auto stops at 16
    assert worker_counts(2, on_gpu=False) == [1]


def test_runs_one_after_another_leave_no_loader_workers_behind(tmp_path):
    """Each accuracy run's loader workers are shut down when the run ends, in this process: left to
    the garbage collector they live on, and the next run's workers, forked from this process,
    inherit them and try to shut them down as their own."""
    script = f"""
import multiprocessing
import types
from pathlib import Path
import torch
from bench.train_throughput import accuracy
args = types.SimpleNamespace(acc_size=32, acc_images=100, acc_valid=5, acc_epochs=2, acc_seeds=[3, 4])
out = accuracy(args, torch.device("cpu"), {{"naive": 0, "default": 1}}, Path({str(tmp_path)!r}))
print("runs", len(out["default"]["runs"]), "workers alive", len(multiprocessing.active_children()))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "runs 2 workers alive 0" in result.stdout, result.stdout
    assert "can only test a child process" not in result.stderr, result.stderr[-3000:]


def test_norm_probe_quick_run(tmp_path):
    out = tmp_path / "norm.json"
    result = subprocess.run([sys.executable, "-m", "bench.norm_probe", "--quick", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["machine"] == machine.describe() and machine.line(report["machine"]) in result.stdout
    from train import fused_norm

    fused = ["bf16 channels-last fused-norm"] if fused_norm.library() is not None else []
    assert report["variants"] == ["bf16 channels-last", "bf16 nchw", "fp32 nchw", *fused, "bf16 channels-last compiled"]
    assert [r["shape"] for r in report["rows"]] == [[4, 64, 8, 8], [4, 256, 8, 8], [4, 512, 4, 4], [4, 1024, 2, 2]]
    for r in report["rows"]:
        assert set(r["ms"]) == {*report["variants"], "copy"} and all(ms > 0 for ms in r["ms"].values())
        for name in report["variants"]:
            assert len(r["rounds_ms"][name]) == report["rounds"] == 2
            assert r["over_copy"][name] == pytest.approx(r["ms"][name] / r["ms"]["copy"])
    assert "over a copy of the same bf16 tensor" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "bench.norm_probe", "--quick", "--rounds", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--rounds takes a positive integer, got 0" in bad.stderr


def test_norm_probe_times_a_training_pass_of_batch_norm_and_relu():
    """Each timed call is a whole training pass: the forward and the gradients of input, weight
    and bias, with nothing left accumulating in .grad between calls."""
    import torch

    from bench.norm_probe import bn_relu, make_inputs, step_fn

    x, params, stats, grad = make_inputs((2, 8, 4, 4), torch.bfloat16, True, torch.device("cpu"))
    assert x.is_contiguous(memory_format=torch.channels_last) and grad.is_contiguous(memory_format=torch.channels_last)
    calls = []

    def spy(*args):
        y = bn_relu(*args)
        y.register_hook(lambda g: calls.append(g.shape))
        return y

    step_fn(spy, x, params, stats, grad)()
    assert calls == [x.shape] and x.grad is None and all(p.grad is None for p in params)
    assert stats[0].abs().sum() > 0  # training-mode batch norm updated its running mean


def test_optimizer_probe_quick_run(tmp_path):
    out = tmp_path / "optimizer.json"
    result = subprocess.run([sys.executable, "-m", "bench.optimizer_probe", "--quick", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["machine"] == machine.describe() and machine.line(report["machine"]) in result.stdout
    assert report["variants"] == ["as a job steps", "kernel on the weights", "contiguous weights"]
    assert [(r["optimizer"], r["arch"]) for r in report["rows"]] == [("sgd", "resnet18"), ("adamw", "resnet18")]
    for r in report["rows"]:
        assert r["views"] is True and r["parameters"] > 11_000_000
        for name in report["variants"]:
            assert len(r["rounds_ms"][name]) == report["rounds"] == 2 and r["ms"][name] > 0
        assert r["kernel_over_views"] == pytest.approx(r["ms"]["kernel on the weights"] / r["ms"]["as a job steps"])
    assert "GB/s of the update's bytes" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "bench.optimizer_probe", "--quick", "--rounds", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--rounds takes a positive integer, got 0" in bad.stderr


def test_the_gpu_check_keeps_its_rounds_apart_from_the_stack_dumps(tmp_path):
    """bench/gpu_check.sh, the device lease's one command, run here on the CPU with tiny sizes: the
    figures in train.log and on stdout, the stack dumps only in stacks.log, and a run its limit ends
    still prints what it measured and says why it stopped. Run by an interpreter without the packages
    the device image lacks (tests/device_image.py)."""
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "tests" / "device_image.py"}" "$@"\n')
    python.chmod(0o755)
    absent = subprocess.run([str(python), "-c", "import smdebug"], cwd=ROOT, capture_output=True, text=True)
    assert absent.returncode == 1 and "No module named 'smdebug' (not on the device image)" in absent.stderr
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": str(python),
           "GPU_CHECK_ARGS": "--quick --archs resnet18 --steps 3 --stacks 0.5", "GPU_CHECK_JOB_ARGS": "--quick"}
    result = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "out"
    assert f"torch {torch.__version__}" in (out / "env.txt").read_text()
    report = json.loads((out / "train_throughput.json").read_text())
    # of the four GPU configurations, the ones a CPU runs in --quick
    assert [(r["arch"], r["freeze"], r["config"]) for r in report["rows"]] == [
        ("resnet18", "full", "default"), ("resnet18", "full", "gpu-decode")]
    log = (out / "train.log").read_text()
    assert log in result.stdout and "--- stacks at " not in result.stdout
    assert sum(line.strip().startswith("round ") for line in log.splitlines()) == 4 and "e2e/syn" in log
    assert "--- stacks at " in (out / "stacks.log").read_text()
    # then the real jobs, on the same interpreter: their summary printed, logs and metrics kept
    checked = json.loads((out / "jobs.json").read_text())
    jobs = checked["jobs"]
    assert [(j["job"], j["status"], j["exit"]) for j in jobs] == [("default", "ok", 0), ("gpu-decode", "ok", 0)]
    for j in jobs:
        assert len(j["epochs"]) == 2 and all(e["images_per_sec"] > 0 for e in j["epochs"])
        assert {"model.pt", "model.json"} <= set(j["model_files"]) and "on cpu" in j["logged"][0]
        assert j["checkpoint_files"] and f"checkpoints: {j['checkpoint_files'][0]}" in result.stdout
        assert (out / f"job_{j['job']}.log").read_text().count("[metrics] epoch=") == 2
        assert f"job {j['job']} (" in result.stdout
    assert jobs[1]["hyperparameters"]["gpu-decode"] == "true" and "freeze=backbone" in jobs[1]["logged"][0]
    # the decoder it is named for ran: not turned off by images decoded once
    assert any(line.startswith("gpu-decode: training JPEGs decode a batch at a time on cpu")
               for line in jobs[1]["logged"])
    assert any(line.startswith("decode once:") for line in jobs[0]["logged"])
    assert "2 of 2 jobs finished" in result.stdout
    # the default job's artifact through the server's model (serve.predictor), fp32 first, on the CPU here
    serving = checked["serving"]
    assert serving["job"] == "default" and "error" not in serving
    assert [(r["device"], r["requested"]) for r in serving["rows"]] == [("cpu", "fp32"), ("cpu", "auto")]
    for r in serving["rows"]:
        assert r["images"] == 18 and 0 <= r["accuracy"] <= 1 and 0 <= r["agreement_with_fp32"] <= 1
        assert r["ms_1"] > 0 and r["ms_batch"] > 0 and r["batch"] == 18
        assert f"served on cpu, {r['requested']} -> {r['precision']}: accuracy {r['accuracy']:.3f}" in result.stdout
    assert serving["rows"][0]["agreement_with_fp32"] == 1.0 and serving["rows"][1]["why"]

    env["GPU_CHECK_LIMIT"], env["GPU_CHECK_JOB_LIMIT"], env["OUT"] = "1", "1", str(tmp_path / "cut")
    cut = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert cut.returncode == 124
    assert "its limit of 1 s ended it (exit 124)" in cut.stdout and "the last lines of" in cut.stdout
    assert "bench.job_check: its limit of 1 s ended it (exit 124)" in cut.stdout


def test_the_job_check_says_why_a_job_did_not_finish(tmp_path):
    """bench.job_check on a job that fails (its failure file's message) and on one its limit ends
    (where its main thread was, from faulthandler), each with exit status 1; bad arguments answer 2."""
    def check(*args):
        return subprocess.run([sys.executable, "-m", "bench.job_check", "--quick", "--out", str(tmp_path / "j.json"),
                               *args], cwd=ROOT, capture_output=True, text=True, timeout=300)

    failed = check("--jobs", "default", "--set", "lr=-1")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    job = json.loads((tmp_path / "j.json").read_text())["jobs"][0]
    assert (job["status"], job["exit"], job["hyperparameters"]["lr"]) == ("failed", 1, "-1")
    assert "hyperparameter 'lr' = '-1' is not valid" in job["failure"]
    assert "failure file: Bad hyperparameters: hyperparameter 'lr'" in failed.stdout
    assert "0 of 1 jobs finished; not finished: default" in failed.stdout

    cut = check("--jobs", "gpu-decode", "--limit", "4")
    assert cut.returncode == 1, cut.stdout + cut.stderr
    job = json.loads((tmp_path / "j.json").read_text())["jobs"][0]
    assert job["status"] == "timed out" and job["failure"] is None and job["model_files"] == []
    assert job["stack"] and all(line.startswith('File "') for line in job["stack"])
    assert "where its main thread was, innermost first:" in cut.stdout and job["stack"][0] in cut.stdout

    for args, message in ((["--set", "lr"], "--set takes NAME=VALUE, got 'lr'"),
                          (["--jobs", "nope"], "--jobs takes names among default, gpu-decode"),
                          (["--limit", "0"], "--limit takes a positive number of seconds")):
        bad = check(*args)
        assert bad.returncode == 2 and message in bad.stderr
    if not torch.cuda.is_available():  # a GPU's sizes on a CPU: refused, not left to time out
        bad = subprocess.run([sys.executable, "-m", "bench.job_check"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert bad.returncode == 2 and "without --quick the jobs are a GPU's" in bad.stderr


def test_the_job_checks_shapes_are_fixed_by_their_chunks(tmp_path, monkeypatch):
    """bench.job_check draws its images in chunks, each from its own seed: the same files in any
    folder and with any number of drawing processes."""
    import hashlib

    from bench import job_check

    def drawn(root, cpus):
        monkeypatch.setattr(os, "cpu_count", lambda: cpus)
        job_check.make_shapes(root, 24, job_check.CHUNK + 20, 2)
        files = sorted(root.glob("*/*/*.jpg"))
        return [p.relative_to(root) for p in files], hashlib.sha256(b"".join(p.read_bytes() for p in files)).digest()

    names, one = drawn(tmp_path / "a", 1)
    assert len(names) == 6 * (job_check.CHUNK + 20 + 2)
    assert drawn(tmp_path / "b", 2) == (names, one)


def test_the_job_check_reports_a_serving_failure(tmp_path, monkeypatch, capsys):
    """When the finished job's model cannot be served, bench.job_check says so and exits 1."""
    import signal

    from bench import job_check

    def broken(*_):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(job_check, "serve_check", broken)
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # main's SIGTERM handler is the script's, not pytest's
    assert job_check.main(["--quick", "--jobs", "default", "--out", str(tmp_path / "j.json")]) == 1
    out = capsys.readouterr().out
    assert "FAILED: RuntimeError: no kernel for this device" in out and "1 of 1 jobs finished; serving failed" in out
    assert json.loads((tmp_path / "j.json").read_text())["serving"] == {
        "job": "default", "error": "RuntimeError: no kernel for this device"}
