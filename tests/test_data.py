import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from train import data
from train.synthetic import make_dataset


def bad_files(class_dir: Path) -> dict[str, str]:
    """One of each kind of unusable file; returns name -> expected reason fragment."""
    good = class_dir / next(p.name for p in class_dir.iterdir())
    raw = good.read_bytes()
    (class_dir / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage " * 20)
    (class_dir / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    (class_dir / "empty.png").write_bytes(b"")
    (class_dir / "notes.txt").write_text("not an image")
    return {"corrupt.jpg": "not an image Pillow can read", "truncated.jpg": "truncated", "empty.png": "empty", "notes.txt": "not an image"}


def test_scan_skips_and_names_bad_files(tmp_path, caplog):
    make_dataset(tmp_path, per_class=4, size=32, classes=2)
    expected = bad_files(tmp_path / "train" / "circle")
    Image.new("L", (16, 16)).save(tmp_path / "train" / "square" / "GRAY.PNG")  # any case, any mode
    (tmp_path / "train" / "stray.jpg").write_bytes(b"x")
    caplog.set_level("WARNING", logger="train")
    ch = data.scan_channel("train", tmp_path / "train", workers=2)
    assert len(ch.samples) == 9
    reasons = {p.name: why for p, why in ch.skipped}
    assert set(reasons) == set(expected) | {"stray.jpg"}
    for name, fragment in expected.items():
        assert fragment in reasons[name], (name, reasons[name])
        assert name in caplog.text
    assert "not inside a class folder" in reasons["stray.jpg"]


def test_channel_without_usable_image_names_the_folder(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "a.jpg").write_bytes(b"")
    with pytest.raises(data.DataError, match=r"'train' channel .*train\) has no usable image"):
        data.scan_channel("train", tmp_path / "train")


def test_class_sets_must_match_and_the_message_names_folders(tmp_path):
    make_dataset(tmp_path / "a", per_class=2, size=16, classes=3)
    make_dataset(tmp_path / "b", per_class=2, size=16, classes=2)
    train = data.scan_channel("train", tmp_path / "a" / "train")
    valid = data.scan_channel("valid", tmp_path / "b" / "train")
    with pytest.raises(data.DataError) as err:
        data.check_class_sets(train, [valid])
    msg = str(err.value)
    assert str(tmp_path / "a" / "train") in msg and str(tmp_path / "b" / "train") in msg
    assert "only in train: ['triangle']" in msg


def test_empty_train_class_folder_is_an_error(tmp_path):
    make_dataset(tmp_path, per_class=2, size=16, classes=2)
    (tmp_path / "train" / "ghost").mkdir()
    train = data.scan_channel("train", tmp_path / "train")
    with pytest.raises(data.DataError, match="ghost"):
        data.check_class_sets(train, [])


def test_one_class_is_an_error(tmp_path):
    make_dataset(tmp_path, per_class=2, size=16, classes=1)
    train = data.scan_channel("train", tmp_path / "train")
    with pytest.raises(data.DataError, match=r"has one class folder \('circle'\): a classifier needs at least two"):
        data.check_class_sets(train, [])


def test_split_is_stratified_seeded_and_disjoint(tmp_path):
    make_dataset(tmp_path, per_class=10, size=16, classes=3)
    ch = data.scan_channel("train", tmp_path / "train")
    t1, v1 = data.split_train_valid(ch, 0.2, seed=5)
    t2, v2 = data.split_train_valid(ch, 0.2, seed=5)
    _, v3 = data.split_train_valid(ch, 0.2, seed=6)
    assert v1.samples == v2.samples and v1.samples != v3.samples
    assert not set(t1.samples) & set(v1.samples)
    assert v1.class_counts(ch.classes) == {"circle": 2, "square": 2, "triangle": 2}


def test_sampler_depends_only_on_seed_and_epoch():
    s = data.EpochSampler(10, seed=1, shuffle=True)
    s.set_epoch(2)
    first = list(s)
    s.set_epoch(3)
    assert list(s) != first
    s.set_epoch(2)
    assert list(s) == first and all(e == 2 for e, _ in first)
    halves = [list(data.EpochSampler(10, 1, True, rank=r, world_size=2)) for r in (0, 1)]
    assert sorted(i for h in halves for _, i in h) == list(range(10))


def test_augmentation_is_reproducible_per_sample(tmp_path):
    from imgcls.presets import ClassificationPresetTrain

    make_dataset(tmp_path, per_class=2, size=48, classes=1)
    ch = data.scan_channel("train", tmp_path / "train")
    ds = data.ImageDataset(ch.samples, ClassificationPresetTrain(32, "heavy"), seed=0)
    a, _ = ds[(1, 0)]
    torch.manual_seed(123)  # global state must not matter
    b, _ = ds[(1, 0)]
    c, _ = ds[(2, 0)]
    assert a.dtype == torch.uint8 and a.shape == (3, 32, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_synthetic_dataset_is_the_same_for_the_same_seed(tmp_path):
    """Twice in one process (as tests that compare two runs do): the same files, byte for byte."""
    for name in ("a", "b"):
        make_dataset(tmp_path / name, per_class=2, size=24, classes=2, test_per_class=1, seed=4)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.jpg"))
    assert len(files) == 6
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def test_seed_sample_seeds_the_cpu_stream_as_torch_manual_seed_does():
    data.seed_sample(3, 2, 7)
    a = torch.rand(4)
    torch.manual_seed(data.sample_seed(3, 2, 7))
    assert torch.equal(a, torch.rand(4))


class KeyLog(torch.utils.data.Dataset):
    """Each item is its (epoch, index) key; every key read is appended to a file (read from workers too)."""

    def __init__(self, size: int, log: Path):
        self.size, self.log = size, log

    def __len__(self):
        return self.size

    def __getitem__(self, key):
        with self.log.open("a") as f:
            f.write(f"{key[0]} {key[1]}\n")
        return torch.tensor(key)


def test_run_ahead_gives_each_epoch_the_batches_a_per_epoch_loader_gives(tmp_path):
    for drop_last in (True, False):
        sampler = data.EpochSampler(10, seed=3, shuffle=True)
        plain = data.loader(KeyLog(10, tmp_path / "a"), sampler, 4, workers=0, drop_last=drop_last)
        ahead = data.loader(KeyLog(10, tmp_path / "b"), data.EpochSampler(10, 3, True), 4, workers=1,
                            drop_last=drop_last, run_ahead=True)
        assert len(ahead) == len(plain) == (2 if drop_last else 3)
        for epoch in (0, 1, 2, 5, 6):  # 5: a jump, as a resumed run's first epoch
            expected = [b.tolist() for b in data.epoch_batches(plain, epoch)]
            assert [b.tolist() for b in data.epoch_batches(ahead, epoch)] == expected
            assert {k[0] for b in expected for k in b} == {epoch}
        ahead.close()


def test_run_ahead_workers_start_the_next_epoch_before_it_is_asked_for(tmp_path):
    log = tmp_path / "keys"
    ahead = data.loader(KeyLog(6, log), data.EpochSampler(6, 0, True), 2, workers=1, run_ahead=True)
    first = list(ahead.epoch(0))
    deadline = time.monotonic() + 30
    while not any(line.startswith("1 ") for line in log.read_text().splitlines()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(line.startswith("1 ") for line in log.read_text().splitlines()), "no key of epoch 1 was read ahead"
    iterator = ahead._batches
    assert [b.tolist() for b in ahead.epoch(1)] and ahead._batches is iterator  # the same workers went on
    list(ahead.epoch(1))  # not the next epoch: a new iterator
    assert ahead._batches is not iterator
    unfinished = ahead.epoch(2)
    next(unfinished)  # an epoch left unfinished is not continued from its middle
    iterator = ahead._batches
    assert [b[:, 0].tolist() for b in ahead.epoch(3)] == [[3, 3]] * 3 and ahead._batches is not iterator
    assert len(first) == 3
    ahead.close()


def test_an_epoch_without_a_batch_yields_nothing_and_does_not_hang():
    ahead = data.loader(KeyLog(3, Path("/dev/null")), data.EpochSampler(3, 0, True), 4, workers=0, drop_last=True,
                        run_ahead=True)
    assert len(ahead) == 0 and list(ahead.epoch(0)) == [] and list(ahead.epoch(1)) == []


def test_pinning_modes_and_their_errors():
    assert data.pinning("thread", True) == (True, False)
    assert data.pinning("main", True) == (False, True)
    assert data.pinning("off", True) == (False, False)
    assert all(data.pinning(mode, False) == (False, False) for mode in data.PINNINGS)  # nothing pins off a GPU
    with pytest.raises(ValueError, match="thread, main, off"):
        data.pinning("both", True)
