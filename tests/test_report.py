"""The training report: rules on engineered bad runs and a good one, and the HTML page in a real browser.

Each run is a real `train` job (the toolkit entry, smdebug hook from a DebuggerHookConfig) on a tiny
dataset; the rules then read what the hook and the profiler wrote.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from report import build, epoch_rules, rundir
from tests.conftest import ROOT, Job, train_run
from train import profile_rules

pytestmark = pytest.mark.slow

# A calm run: batches of 16, a modest lr with warm-up, label smoothing; 40 images per class.
GOOD = {"epochs": 5, "batch_size": 16, "label_smoothing": 0.1, "lr": 0.001, "optimizer": "adamw"}
DIVERGING = {"epochs": 3, "batch_size": 8, "lr": 8, "optimizer": "sgd", "warmup_epochs": 0}
ZERO_INIT = {"epochs": 1, "batch_size": 8, "lr": 0.002, "optimizer": "adamw", "weights": "pretrained"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Job]:
    base = tmp_path_factory.mktemp("runs")
    return {"good": train_run(base / "good", GOOD, per_class=40), "diverging": train_run(base / "diverging", DIVERGING),
            "zero": train_run(base / "zero", ZERO_INIT, zero_weights=True)}


def _fired(verdicts) -> dict[str, profile_rules.Verdict]:
    return {v.rule: v for v in verdicts if v.fired}


def test_a_good_run_is_quiet(runs, tmp_path):
    out, verdicts = build.write(runs["good"].base, tmp_path / "good.html")
    assert not _fired(verdicts), [v for v in verdicts if v.fired]
    evaluated = {v.rule for v in verdicts if v.evaluated}
    # every rule had something to look at, except the GPU's on a CPU run
    assert evaluated == {v.rule for v in verdicts} - {"LowGPUUtilization"}
    assert "No rule fired." in out.read_text()


def test_a_diverging_learning_rate_fires_the_loss_and_nan_rules(runs, tmp_path):
    _, verdicts = build.write(runs["diverging"].base, tmp_path / "diverging.html")
    fired = _fired(verdicts)
    loss = fired["LossNotDecreasing"]
    # windows of 10 saved steps (7 steps per epoch): the loss rises, or is NaN by the second window
    assert ("the training loss is rising" in loss.message and loss.step == 20) or (
        "the training loss is not finite" in loss.message and loss.step in (10, 20)), loss
    assert "NaN or infinite" in fired["ExplodingTensor"].message and fired["ExplodingTensor"].epoch == 1
    assert "lower lr" in fired["ExplodingTensor"].message
    assert "VanishingGradient" not in fired and "PoorWeightInitialization" not in fired


def test_zero_initial_weights_fire_the_gradient_and_initialization_rules(runs, tmp_path):
    _, verdicts = build.write(runs["zero"].base, tmp_path / "zero.html")
    fired = _fired(verdicts)
    assert fired["VanishingGradient"].step == 1 and "conv1.weight" in fired["VanishingGradient"].message
    assert fired["PoorWeightInitialization"].step == 1
    assert "zero variance" in fired["PoorWeightInitialization"].message
    assert "ExplodingTensor" not in fired


def test_a_slow_loader_puts_its_recommendation_in_the_report(runs, tmp_path):
    run = tmp_path / "slow"
    shutil.copytree(runs["good"].output_data, run / "output" / "data")
    # 0.2 s of loading for 0.01 s of compute per step, with no workers on 4 CPUs
    rows = ["epoch,step,data_wait_s,compute_s,images"] + [f"1,{s},0.2,0.01,16" for s in range(6)]
    (run / "output" / "data" / "profile" / "steps.csv").write_text("\n".join(rows) + "\n")
    info = json.loads((run / "output" / "data" / "profile" / "run.json").read_text())
    (run / "output" / "data" / "profile" / "run.json").write_text(json.dumps({**info, "workers": 0, "cpus": 4}))
    out, verdicts = build.write(run, run / "report.html")
    wait = _fired(verdicts)["DataLoaderWait"]
    assert wait.message == "data loading takes 95% of each step: raise num-workers to 1 (4 CPUs available)"
    assert wait.step == 1
    page = out.read_text()
    section = page[page.index('<section id="data-wait">'):]
    assert "data loading takes 95% of each step: raise num-workers to 1" in section[:section.index("</section>")]


def test_rule_parameters_are_passed_and_checked(runs, tmp_path):
    _, verdicts = build.write(runs["good"].base, tmp_path / "r.html",
                              params={"LossNotDecreasing": {"num_steps": "100"}})
    assert "not enough saved losses for two windows of 100" in {v.rule: v for v in verdicts}["LossNotDecreasing"].message
    with pytest.raises(rundir.ReportError, match="Overfit has no parameter 'bogus'; it takes start_step"):
        build.write(runs["good"].base, tmp_path / "r.html", params={"Overfit": {"bogus": "1"}})
    with pytest.raises(rundir.ReportError, match="no rule named Nope"):
        build.write(runs["good"].base, tmp_path / "r.html", params={"Nope": {"x": "1"}})


def test_the_report_reads_the_output_data_folder_alone(runs, tmp_path):
    # output/data of a run finds the tensors beside it, in output/tensors
    _, verdicts = build.write(runs["good"].output_data, tmp_path / "beside.html")
    assert {v.rule: v for v in verdicts}["VanishingGradient"].evaluated
    alone = shutil.copytree(runs["good"].output_data, tmp_path / "data")
    out, verdicts = build.write(alone, tmp_path / "alone.html")
    by_rule = {v.rule: v for v in verdicts}
    assert not by_rule["VanishingGradient"].evaluated
    assert by_rule["DataLoaderWait"].evaluated
    assert "no batch losses saved" in out.read_text()
    (tmp_path / "empty").mkdir()
    with pytest.raises(rundir.ReportError, match="no metrics.json in"):
        build.write(tmp_path / "empty", tmp_path / "x.html")


def test_nothing_is_written_when_the_hook_is_off(tmp_path):
    job = train_run(tmp_path / "off", {"epochs": 1}, hook=False)
    smdebug_files = [p for p in job.base.rglob("*") if p.name in ("collections", "events", "index")
                     or p.name.endswith(("collections.json", ".tfevents", "training_job_end.ts"))]
    assert smdebug_files == []
    assert not Path("/opt/ml/output/tensors").exists()
    _, verdicts = build.write(job.base, tmp_path / "off.html")
    by_rule = {v.rule: v for v in verdicts}
    assert not by_rule["LossNotDecreasing"].evaluated
    assert "no debugger tensors in this run" in by_rule["LossNotDecreasing"].message
    assert by_rule["Overfit"].evaluated  # the epoch rules read metrics.json


# --- rules on constructed inputs: the cases a tiny real run cannot reach in seconds ---

def _hooked_trial(out_dir: Path, steps: list[str]):
    """A real smdebug hook on a two-layer net, saving losses and gradients every step; each step is
    'learn' (a random batch), 'fitted' (a batch predicted with certainty: a loss of exactly 0),
    'exploded' (the same, with labels it gets wrong: a loss of about 1e6), 'dead' (the output layer
    zeroed: nothing flows back to the first) or 'nan' (a NaN input)."""
    import smdebug.pytorch as smd
    import torch
    from torch import nn

    from report import tensors

    torch.manual_seed(0)
    model, criterion = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), nn.CrossEntropyLoss()
    hook = smd.Hook(out_dir=str(out_dir), save_config=smd.SaveConfig(save_interval=1),
                    include_collections=["losses", "gradients"])
    hook.register_module(model)
    hook.register_loss(criterion)
    hook.set_mode(smd.modes.TRAIN)
    for kind in steps:
        x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
        if kind == "nan":
            x[0, 0] = float("nan")
        if kind == "dead":
            with torch.no_grad():
                model[2].weight.zero_()
        logits = model(x)  # one forward a step: the hook counts steps by them
        if kind == "fitted":  # softmax exactly one-hot on the predicted class
            logits, y = logits * 1e6, logits.detach().argmax(1)
        if kind == "exploded":  # one-hot on a class that is not the label's
            logits, y = logits * 1e6, (logits.detach().argmax(1) + 1) % 3
        loss = criterion(logits, y)
        model.zero_grad()
        loss.backward()
    hook.close()
    return tensors.open_trial(out_dir)


def _vanishing(trial):
    from report import tensor_rules

    return {v.rule: v for v in tensor_rules.evaluate(trial)}["VanishingGradient"]


def test_vanishing_gradient_fires_on_layers_the_loss_does_not_reach(tmp_path):
    verdict = _vanishing(_hooked_trial(tmp_path / "dead", ["learn", "learn", "dead", "learn"]))
    assert verdict.fired and verdict.step == 3, verdict
    assert "0.weight" in verdict.message and "2.bias" not in verdict.message


def test_vanishing_gradient_ignores_fitted_batches_and_what_follows_a_nan(tmp_path):
    fitted = _vanishing(_hooked_trial(tmp_path / "fitted", ["learn", "fitted", "learn"]))
    assert not fitted.fired and fitted.evaluated, fitted
    # the same dead layer after a NaN step: the run had diverged, which ExplodingTensor reports
    diverged = _vanishing(_hooked_trial(tmp_path / "nan", ["learn", "nan", "dead", "learn"]))
    assert not diverged.fired and "until step 2, when the run diverged" in diverged.message, diverged
    # and after a loss that blew up without a NaN (a diverging lr's saturated logits)
    exploded = _vanishing(_hooked_trial(tmp_path / "exploded", ["learn", "exploded", "dead", "learn"]))
    assert not exploded.fired and "until step 2, when the run diverged" in exploded.message, exploded


def _history(train, valid):
    return [{"epoch": i + 1, "train_loss": t, "valid_loss": v} for i, (t, v) in enumerate(zip(train, valid, strict=True))]


def test_overfit_needs_a_gap_and_a_valid_loss_that_stopped_improving():
    overfitting = _history([1.0, 0.6, 0.3, 0.1], [1.0, 0.7, 0.75, 0.9])
    verdict = epoch_rules.overfit(overfitting)
    assert verdict.fired and verdict.epoch == 3
    # a from-scratch first epoch: a large gap that closes as BatchNorm statistics settle
    assert not epoch_rules.overfit(_history([1.2, 1.0, 0.6], [5.1, 3.1, 0.5])).fired
    assert epoch_rules.overfit(overfitting, patience=2).epoch == 4


def test_overtraining_counts_epochs_without_improvement():
    flat_valid = _history([1.0, 0.8, 0.6, 0.5, 0.4, 0.3], [0.9, 0.7, 0.68, 0.69, 0.7, 0.7])
    assert not epoch_rules.overtraining(flat_valid).fired  # default patience_validation is 10 epochs
    verdict = epoch_rules.overtraining(flat_valid, patience_validation=3)
    assert verdict.fired and verdict.epoch == 5 and "set epochs=2" in verdict.message


def test_class_imbalance():
    assert epoch_rules.class_imbalance({"a": 200, "b": 10}, {"a": 0.9, "b": 0.5}).fired
    wrong = epoch_rules.class_imbalance({"a": 20, "b": 20}, {"a": 0.9, "b": 0.2})
    assert wrong.fired and "'b' (20% right, 20 train images)" in wrong.message
    assert not epoch_rules.class_imbalance({"a": 20, "b": 15}, {"a": 0.9, "b": 0.6}).fired


def test_batch_size_against_memory_headroom():
    idle_gpu = {"batch_size": 32, "memory_kind": "gpu", "memory_total_gb": 16.0, "memory_peak_gb": 2.0}
    verdict = profile_rules.batch_size_headroom(idle_gpu)
    assert verdict.fired and "raise batch-size to 128" in verdict.message
    full = {**idle_gpu, "memory_peak_gb": 15.5}
    assert "lower batch-size to 16" in profile_rules.batch_size_headroom(full).message
    assert not profile_rules.batch_size_headroom({**idle_gpu, "memory_peak_gb": 10.0}).fired
    host = {"batch_size": 32, "memory_kind": "host", "memory_total_gb": 24.0, "memory_peak_gb": 1.0}
    assert not profile_rules.batch_size_headroom(host).fired
    assert not profile_rules.batch_size_headroom({}).evaluated


# --- the page in a real browser: Debian's chromium, driven over the DevTools protocol ---

def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        setup = subprocess.run([str(ROOT / "local_test" / "browser_setup.sh")], capture_output=True, text=True)
        path = shutil.which("chromium")
        if path is None:
            pytest.fail(f"chromium is missing and local_test/browser_setup.sh could not install it:\n{setup.stderr}")
    return path


class Browser:
    """One headless chromium page; collects console errors and uncaught exceptions while a page loads."""

    def __init__(self, profile: Path):
        import websocket

        self.proc = subprocess.Popen([_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu",
                                      "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                pytest.fail("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=10).read())
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id = 0
        for method in ("Runtime.enable", "Log.enable", "Page.enable"):
            self.call(method)

    def call(self, method: str, events: list | None = None, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                return msg.get("result", {})
            if events is not None and "method" in msg:
                events.append(msg)

    def open(self, path: Path) -> tuple[list[str], dict]:
        """(console errors and exceptions, what the page shows)"""
        events: list[dict] = []
        self.call("Page.navigate", events, url=path.resolve().as_uri())
        while not any(e["method"] == "Page.loadEventFired" for e in events):
            events.append(json.loads(self.ws.recv()))
        time.sleep(0.5)  # late console messages
        self.ws.settimeout(0.5)
        try:
            while True:
                events.append(json.loads(self.ws.recv()))
        except Exception:  # the timeout: nothing more arrived
            pass
        self.ws.settimeout(60)
        errors = []
        for e in events:
            p = e.get("params", {})
            if e["method"] == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif e["method"] == "Runtime.exceptionThrown":
                errors.append("exception: " + p["exceptionDetails"].get("text", ""))
            elif e["method"] == "Log.entryAdded" and p["entry"]["level"] == "error":
                errors.append("log: " + p["entry"]["text"])
        shown = self.call("Runtime.evaluate", returnByValue=True, expression="""JSON.stringify({
            sections: [...document.querySelectorAll('section')].map(s => [s.id, s.querySelector('h2').textContent]),
            images: [...document.images].map(i => i.complete && i.naturalWidth > 100),
            fired: [...document.querySelectorAll('#rules .fired')].length,
            text: document.body.innerText})""")
        return errors, json.loads(shown["result"]["value"])

    def close(self):
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Browser(tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


def test_the_browser_check_sees_console_errors(browser, tmp_path):
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
                    '<script>console.error("drawn wrong"); undefinedFunction();</script></body></html>')
    errors, _ = browser.open(page)
    assert any("drawn wrong" in e for e in errors) and any("exception" in e for e in errors), errors


def test_the_report_opens_in_chromium_without_errors_and_shows_its_sections(runs, browser, tmp_path):
    out, verdicts = build.write(runs["diverging"].base, tmp_path / "report.html")
    errors, shown = browser.open(out)
    assert errors == []
    assert [s[0] for s in shown["sections"]] == ["summary", "rules", "curves", "batch-loss", "learning-rate",
                                                 "gradients", "utilization", "data-wait", "confusion", "per-class",
                                                 "classes"]
    assert len(shown["images"]) == 9 and all(shown["images"])  # every chart decoded to a real picture
    assert shown["fired"] == sum(v.fired for v in verdicts) >= 2
    assert "What to change" in shown["text"] and "lower lr" in shown["text"]

