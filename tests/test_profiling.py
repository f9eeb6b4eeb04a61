"""The training job's own profile: per-step timing, system utilization, a torch.profiler window."""

from __future__ import annotations

import csv
import json
import time

import pytest
import torch

from imgcls.models import create_model
from imgcls.presets import ClassificationPresetEval
from train import profile_rules
from train.engine import Batcher, choose_precision, train_one_epoch
from train.profiling import Profiler, ProfileSettings, parse_steps


def test_parse_steps():
    assert parse_steps("5:3") == (5, 3)
    assert parse_steps("7") == (7, 1)
    assert parse_steps("") == (0, 0) and parse_steps("none") == (0, 0)
    for bad in ("0:2", "3:0", "x", "-1:2"):
        with pytest.raises(ValueError):
            parse_steps(bad)


def test_profiler_config_overrides_the_hyperparameters(tmp_path):
    cfg = tmp_path / "profilerconfig.json"
    cfg.write_text(json.dumps({"ProfilingIntervalInMilliseconds": 200, "ProfilingParameters": {
        "DetailedProfilingConfig": json.dumps({"StartStep": 2, "NumSteps": 4})}}))
    assert ProfileSettings.resolve(500, "", cfg) == ProfileSettings(interval_ms=200, trace_start=3, trace_steps=4)
    assert ProfileSettings.resolve(500, "2:1", None) == ProfileSettings(interval_ms=500, trace_start=2, trace_steps=1)
    cfg.write_text("{not json")
    assert ProfileSettings.resolve(300, "", cfg) == ProfileSettings(interval_ms=300)


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_a_job_writes_its_profile_and_a_trace_window(tiny_data):
    tiny_data.hyperparameters(profile_steps="2:2", profile_interval_ms=50, epochs=2, batch_size=8)
    result = tiny_data.run()
    assert result.returncode == 0, result.stdout[-3000:]
    profile = tiny_data.output_data / "profile"
    steps = _rows(profile / "steps.csv")
    # 30 train images minus the 20% held out for validation = 24 per epoch, batches of 8
    assert [(int(r["epoch"]), int(r["step"])) for r in steps] == [(e, s) for e in (1, 2) for s in range(3)]
    assert sum(int(r["images"]) for r in steps if r["epoch"] == "1") == 24
    assert all(float(r["data_wait_s"]) >= 0 and float(r["compute_s"]) > 0 for r in steps)
    system = _rows(profile / "system.csv")
    assert system and all(0 <= float(r["cpu_percent"]) <= 100 and float(r["process_rss_gb"]) > 0.05 for r in system)
    traces = list((profile / "trace").glob("*.pt.trace.json"))
    assert len(traces) == 1
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert any("ProfilerStep#" in e.get("name", "") for e in events)
    assert "tracing steps 2-3" in result.stdout


@pytest.mark.slow
def test_no_trace_unless_asked_and_a_profiler_config_asks(tiny_data):
    tiny_data.hyperparameters(epochs=1, profile_interval_ms=0)
    result = tiny_data.run()
    assert result.returncode == 0, result.stdout[-3000:]
    profile = tiny_data.output_data / "profile"
    assert (profile / "steps.csv").is_file()
    assert not (profile / "system.csv").exists() and not (profile / "trace").exists()

    (tiny_data.config / "profilerconfig.json").write_text(json.dumps({"ProfilingIntervalInMilliseconds": 100,
        "ProfilingParameters": {"DetailedProfilingConfig": '{"StartStep": 0, "NumSteps": 1}'}}))
    result = tiny_data.run()
    assert result.returncode == 0, result.stdout[-3000:]
    assert len(list((profile / "trace").glob("*.pt.trace.json"))) == 1
    assert (profile / "system.csv").is_file()


# --- rules over the profile: a loader slowed on purpose fires the data-wait rule, a fast one does not ---

class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int, delay: float):
        self.n, self.delay = n, delay

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        time.sleep(self.delay)
        return torch.full((3, 32, 32), i % 255, dtype=torch.uint8), i % 2


def _profile_one_epoch(tmp_path, delay: float):
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = create_model("resnet18", 2)
    loader = torch.utils.data.DataLoader(_Images(24, delay), batch_size=4, num_workers=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    batcher = Batcher(device, ClassificationPresetEval(32).normalize, False)
    profiler = Profiler(tmp_path / "profile", ProfileSettings(interval_ms=0), device)
    train_one_epoch(model, loader, batcher, torch.nn.CrossEntropyLoss(), optimizer, scheduler,
                    choose_precision("fp32", device), None, 1, model.train,
                    on_step=lambda step, wait, compute, n: profiler.step(1, step, wait, compute, n))
    profiler.close()
    return {v.rule: v for v in profile_rules.evaluate(tmp_path / "profile", workers=0, cpus=2)}


def test_data_wait_rule_fires_on_a_slow_loader_and_says_what_to_change(tmp_path):
    verdicts = _profile_one_epoch(tmp_path, delay=0.05)  # 0.2 s to load each batch of 4
    wait = verdicts["DataLoaderWait"]
    assert wait.fired and wait.step is not None
    assert "of each step: raise num-workers to 1 (2 CPUs available)" in wait.message


def test_rules_stay_quiet_on_a_good_run(tmp_path):
    verdicts = _profile_one_epoch(tmp_path, delay=0.0)
    assert not any(v.fired for v in verdicts.values()), verdicts


def test_gpu_and_worker_rules():
    busy = [{"gpu_percent": "95"}, {"gpu_percent": "90"}]
    idle = [{"gpu_percent": "20"}, {"gpu_percent": "35"}, {"gpu_percent": "90"}]
    assert not profile_rules.gpu_utilization(busy).fired
    low = profile_rules.gpu_utilization(idle)
    assert low.fired and "35%" in low.message
    assert not profile_rules.gpu_utilization([{"gpu_percent": ""}]).fired
    assert profile_rules.workers_vs_cpus(8, 4).fired and not profile_rules.workers_vs_cpus(3, 4).fired
