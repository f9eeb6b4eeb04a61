"""Fault injection on the valid loss: a run whose valid loss is never finite still finishes and
leaves its artifact; a run whose best epoch is not its last ships the best epoch's weights."""

import dataclasses
import json

import pytest
import torch

from imgcls import artifact
from train import contract, distributed, hyperparams
from train import job as job_module

pytestmark = pytest.mark.slow


def _spec(j):
    return contract.Job(hyperparameters={}, channels={"train": j.data / "train"}, model_dir=j.model_dir,
                        output_dir=j.base / "output", output_data_dir=j.output_data,
                        checkpoint_dir=j.base / "checkpoints", debugger_config=None, num_cpus=2)


def test_never_finite_valid_loss_keeps_the_last_epoch(tiny_data, monkeypatch, caplog):
    real_evaluate = job_module.evaluate

    def nan_evaluate(*args, **kwargs):
        return dataclasses.replace(real_evaluate(*args, **kwargs), loss=float("nan"))

    monkeypatch.setattr(job_module, "evaluate", nan_evaluate)
    j = tiny_data
    cfg = hyperparams.parse(json.loads((j.config / "hyperparameters.json").read_text()))
    caplog.set_level("INFO", logger="train")
    final = job_module.train(cfg, _spec(j), distributed.Rank())
    assert "valid loss was never finite" in caplog.text
    assert final["best_epoch"] == cfg.epochs
    _, card = artifact.load(j.model_dir)
    assert card.metrics["best_epoch"] == cfg.epochs


def test_the_artifact_holds_the_best_epochs_weights_not_the_last(tiny_data, monkeypatch):
    """The best epoch's weights are a copy that the epochs after it leave alone."""
    real_evaluate = job_module.evaluate
    calls = []

    def worse_each_epoch(*args, **kwargs):  # the valid pass of epoch n reports loss n: epoch 1 is best
        calls.append(1)
        return dataclasses.replace(real_evaluate(*args, **kwargs), loss=float(len(calls)))

    monkeypatch.setattr(job_module, "evaluate", worse_each_epoch)
    j = tiny_data
    j.hyperparameters(epochs=3)
    cfg = hyperparams.parse(json.loads((j.config / "hyperparameters.json").read_text()))
    final = job_module.train(cfg, _spec(j), distributed.Rank())
    assert final["best_epoch"] == 1

    last = torch.load(j.base / "checkpoints" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 3 and last["best"]["epoch"] == 1
    shipped = torch.load(j.model_dir / artifact.WEIGHTS_FILE, map_location="cpu", weights_only=True)
    moved = [k for k, v in last["model"].items() if v.is_floating_point() and not torch.equal(v, last["best"]["state"][k])]
    assert moved, "epochs 2 and 3 changed no weight"
    for k, v in last["best"]["state"].items():
        torch.testing.assert_close(shipped[k], v.to(shipped[k].dtype), rtol=0, atol=0)
