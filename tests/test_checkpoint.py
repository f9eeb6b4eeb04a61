"""train.checkpoint.Writer: the epoch's state as it was when save() returned, written while
training goes on, and its failures raised in the training thread."""

from __future__ import annotations

import threading
import zipfile

import pytest
import torch
from torch import nn

from imgcls.artifact import atomic_write_bytes
from train import checkpoint


def _state(model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> dict:
    return {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "history": [{"epoch": epoch}], "rng": checkpoint.rng_state()}


def _step(model, optimizer):
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def _small():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 8, 8))
    optimizer = torch.optim.AdamW(model.parameters())
    _step(model, optimizer)
    return model, optimizer


def _held(monkeypatch):
    """torch.save that waits until the test lets it go: save() must have returned by then."""
    go, started = threading.Event(), threading.Event()
    real = torch.save

    def held(obj, f):
        started.set()
        if not go.wait(20):
            raise AssertionError("the write was held for 20 s: save() did not return before it")
        real(obj, f)

    monkeypatch.setattr(torch, "save", held)
    return go, started


def test_the_checkpoint_holds_the_state_of_its_save_call_while_training_goes_on(tmp_path, monkeypatch):
    model, optimizer = _small()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    want_moments = [s["exp_avg"].clone() for s in optimizer.state_dict()["state"].values()]
    go, started = _held(monkeypatch)
    writer = checkpoint.Writer(tmp_path)
    writer.save(_state(model, optimizer, 1))
    assert started.wait(20), "the writer thread never started"
    for _ in range(2):  # the next epoch changes the weights and the moments in place
        _step(model, optimizer)
    assert not torch.equal(model.state_dict()["0.weight"], want["0.weight"])
    assert not (tmp_path / checkpoint.FILENAME).exists(), "visible before its write ended"
    go.set()
    writer.close()
    saved = torch.load(tmp_path / checkpoint.FILENAME, weights_only=False)
    assert saved["epoch"] == 1 and saved["history"] == [{"epoch": 1}]
    for k, v in want.items():
        assert torch.equal(saved["model"][k], v), k
    for got, moment in zip(saved["optimizer"]["state"].values(), want_moments, strict=True):
        assert torch.equal(got["exp_avg"], moment)
    # a state dict keeps its module versions, which load_state_dict reads
    assert saved["model"]._metadata == model.state_dict()._metadata
    fresh, fresh_optimizer = _small()
    fresh.load_state_dict(saved["model"])
    fresh_optimizer.load_state_dict(saved["optimizer"])


def test_a_failed_write_is_raised_by_the_next_save_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    model, optimizer = _small()
    writer = checkpoint.Writer(tmp_path)
    writer.save(_state(model, optimizer, 1))
    writer.close()
    before = (tmp_path / checkpoint.FILENAME).read_bytes()

    def full(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    writer.save(_state(model, optimizer, 2))  # returns: the failure is in the thread
    with pytest.raises(checkpoint.CheckpointError, match=r"cannot be written to .*No space left on device"):
        writer.save(_state(model, optimizer, 3))
    assert (tmp_path / checkpoint.FILENAME).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.FILENAME], "a temporary file was left behind"
    writer.close()  # raised once, not again


def test_a_folder_that_cannot_take_the_checkpoint_fails_in_save_itself(tmp_path):
    model, optimizer = _small()
    (tmp_path / "checkpoints").write_text("not a folder")
    writer = checkpoint.Writer(tmp_path / "checkpoints")
    with pytest.raises(checkpoint.CheckpointError, match="it must be a writable folder"):
        writer.save(_state(model, optimizer, 1))
    writer.close()


def test_files_written_after_the_checkpoint_keep_their_crc32s(tmp_path):
    """Checkpoints skip the zip CRC-32s (torch.load ignores them); the artifact's files, which
    imgcls.artifact reads with zipfile, must not."""
    model, optimizer = _small()
    checkpoint.save(tmp_path, _state(model, optimizer, 1))
    assert torch.serialization.get_crc32_options()
    atomic_write_bytes(tmp_path / "model.pt", lambda fh: torch.save(model.state_dict(), fh))
    with zipfile.ZipFile(tmp_path / "model.pt") as archive:
        assert archive.testzip() is None
    with zipfile.ZipFile(tmp_path / checkpoint.FILENAME) as archive:  # the checkpoint's are zero
        assert archive.testzip() is not None


def test_unfinished_writes_left_by_a_kill_are_removed_and_nothing_else(tmp_path):
    model, optimizer = _small()
    checkpoint.save(tmp_path, _state(model, optimizer, 1))
    left = [tmp_path / ".checkpoint.pt.k2x9_q1a", tmp_path / ".checkpoint.pt.0b7zzp3c"]
    for path in left:
        path.write_bytes(b"\0" * 4096)  # as a kill mid-write leaves it
    kept = [tmp_path / ".model.pt.k2x9_q1a", tmp_path / "checkpoint.pt.notes", tmp_path / "checkpoint.pt"]
    for path in kept[:2]:
        path.write_text("not ours")
    (tmp_path / ".checkpoint.pt.folder").mkdir()

    assert sorted(checkpoint.remove_partial_writes(tmp_path)) == sorted(left)
    assert not any(p.exists() for p in left)
    assert all(p.exists() for p in kept) and (tmp_path / ".checkpoint.pt.folder").is_dir()
    assert checkpoint.load(tmp_path, {})["epoch"] == 1
    assert checkpoint.remove_partial_writes(tmp_path / "absent") == []
