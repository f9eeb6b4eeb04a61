"""A run whose valid loss is never finite still finishes and leaves its artifact (fault injection)."""

import dataclasses
import json

import pytest

from imgcls import artifact
from train import contract, distributed, hyperparams
from train import job as job_module

pytestmark = pytest.mark.slow


def test_never_finite_valid_loss_keeps_the_last_epoch(tiny_data, monkeypatch, caplog):
    real_evaluate = job_module.evaluate

    def nan_evaluate(*args, **kwargs):
        return dataclasses.replace(real_evaluate(*args, **kwargs), loss=float("nan"))

    monkeypatch.setattr(job_module, "evaluate", nan_evaluate)
    j = tiny_data
    cfg = hyperparams.parse(json.loads((j.config / "hyperparameters.json").read_text()))
    spec = contract.Job(hyperparameters={}, channels={"train": j.data / "train"}, model_dir=j.model_dir,
                        output_dir=j.base / "output", output_data_dir=j.output_data,
                        checkpoint_dir=j.base / "checkpoints", debugger_config=None, num_cpus=2)
    caplog.set_level("INFO", logger="train")
    final = job_module.train(cfg, spec, distributed.Rank())
    assert "valid loss was never finite" in caplog.text
    assert final["best_epoch"] == cfg.epochs
    _, card = artifact.load(j.model_dir)
    assert card.metrics["best_epoch"] == cfg.epochs
