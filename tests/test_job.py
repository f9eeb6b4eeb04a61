"""The training program end to end, through the sagemaker-training toolkit's `train` entry."""

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from imgcls import artifact, quantize
from imgcls.hardware import fast_bf16
from imgcls.presets import ClassificationPresetEval
from tests.test_data import bad_files
from train import batch_crop, fused_norm, metrics

pytestmark = pytest.mark.slow


def test_end_to_end_run_artifacts_and_metric_regexes(tiny_data):
    job = tiny_data
    result = job.run()
    log = result.stdout
    assert result.returncode == 0, log[-3000:]
    assert "Reporting training SUCCESS" in log
    assert "training without SageMaker Debugger" in log
    assert "conv-gemm=true: 20 of 20 convolutions run as one matrix multiply" in log  # the fixture's setting
    if fast_bf16(torch.device("cpu")) and fused_norm.library() is not None:
        assert "fused-norm=auto: 20 batch norms train with the ReLU and residual add after them in one kernel" in log
    else:
        assert "fused-norm=auto: ATen's batch norm (" in log
    if batch_crop.KERNELS.library() is not None:
        assert "random crop: a batch at a time, in one call of train/crop_resize.c" in log
    assert not job.failure.exists()

    # The exported definitions, applied to the real log, find one value per epoch and the test line.
    found = metrics.parse_log(log, json.loads(json.dumps(metrics.metric_definitions())))
    history = json.loads((job.output_data / "metrics.json").read_text())["history"]
    assert len(history) == 2
    for name, key in metrics.EPOCH_METRICS:
        assert found[name] == pytest.approx([h[key] for h in history], rel=1e-5), name
    for name, _ in metrics.TEST_METRICS:
        assert len(found[name]) == 1, name
    assert found["train:epoch"] == [1, 2]
    assert 0 <= found["train:data_wait_fraction"][0] <= 1 and found["train:images_per_second"][0] > 0

    # The loss is the mean per sample: recompute the test loss from the artifact.
    model, card = artifact.load(job.model_dir)
    assert card.class_names == ["circle", "square", "triangle"] and card.arch == "resnet18"
    assert card.hyperparameters["image-size"] == 32 and card.versions["torch"] == torch.__version__
    assert card.preprocess == ClassificationPresetEval(32).to_dict()
    preset = card.eval_preset()
    from imgcls.images import open_image

    files = sorted((job.data / "test").rglob("*.jpg"))
    batch = torch.stack([preset(open_image(p)) for p in files])
    labels = torch.tensor([card.class_names.index(p.parent.name) for p in files])
    with torch.inference_mode():
        loss = torch.nn.functional.cross_entropy(model(preset.normalize(batch)).float(), labels).item()
    # The job evaluated in bf16 autocast; fp32 here. Same weights, same preprocessing: close.
    assert loss == pytest.approx(found["test:loss"][0], rel=0.05)

    for name in ("metrics.json", "confusion_matrix.csv", "per_class_accuracy.csv", "class_counts.json",
                 "learning_curves.png"):
        assert (job.output_data / name).stat().st_size > 0, name
    confusion = (job.output_data / "confusion_matrix.csv").read_text().splitlines()
    assert confusion[0].startswith("true \\ predicted (test),circle")
    assert sum(int(x) for row in confusion[1:] for x in row.split(",")[1:]) == 9


def test_bad_files_are_skipped_counted_and_named(tiny_data):
    job = tiny_data
    expected = bad_files(job.data / "train" / "square")
    result = job.run()
    assert result.returncode == 0, result.stdout[-3000:]
    assert "train: skipped 4 file(s)" in result.stdout
    for name in expected:
        assert f"skipped square/{name}" in result.stdout
    skipped = (job.output_data / "skipped_files.txt").read_text()
    assert all(name in skipped for name in expected)


def _assert_failed(job, result, first_line_fragment):
    assert result.returncode != 0
    text = job.failure.read_text()
    first = text.splitlines()[0]
    assert first_line_fragment in first, text[:2000]
    assert "Traceback" not in first
    assert first_line_fragment in result.stdout  # and the log says it too
    return text


@pytest.mark.parametrize("hps,fragment", [
    ({"learning_rate": "0.1"}, "unknown hyperparameter 'learning_rate' (did you mean 'lr'?)"),
    ({"batch-size": "big"}, "'batch-size' = 'big' is not valid: expected an integer"),
    ({"lr": "-1"}, "'lr' = '-1' is not valid: expected a number > 0"),
])
def test_bad_hyperparameters_fail_with_a_plain_sentence(tiny_data, hps, fragment):
    job = tiny_data
    job.set_raw_hyperparameters({"weights": "none", **hps})
    text = _assert_failed(job, job.run(), fragment)
    assert text.startswith("Bad hyperparameters:")


def test_missing_train_channel(job):
    _assert_failed(job, job.run(), "The job has no 'train' channel")


def test_channel_without_usable_image(job):
    (job.data / "train" / "cat").mkdir(parents=True)
    (job.data / "train" / "cat" / "broken.jpg").write_bytes(b"nope")
    _assert_failed(job, job.run(), f"The 'train' channel ({job.data / 'train'}) has no usable image")


def test_class_sets_differ(tiny_data):
    job = tiny_data
    (job.data / "test" / "hexagon").mkdir()
    _assert_failed(job, job.run(), "The 'test' channel")
    assert "only in test: ['hexagon']" in job.failure.read_text()


def test_missing_imagenet_weights_say_how_to_get_them(tiny_data):
    job = tiny_data
    job.hyperparameters(weights="imagenet")
    _assert_failed(job, job.run(), "ImageNet weights for resnet18 are not on this machine")
    assert "PRETRAINED_ARCHS" in job.failure.read_text()


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_resume_after_kill_9_finishes_as_the_uninterrupted_run(tiny_data, tmp_path):
    job = tiny_data
    job.hyperparameters(epochs=4)
    reference = job.run()
    assert reference.returncode == 0, reference.stdout[-3000:]
    ref_history = json.loads((job.output_data / "metrics.json").read_text())["history"]
    ref_weights = _state(job.model_dir / "model.pt")

    for folder in ("model", "output", "checkpoints"):
        os.system(f"rm -rf {job.base / folder}")
    ckpt = job.base / "checkpoints" / "checkpoint.pt"
    proc = job.start()
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert ckpt.exists(), "no checkpoint after the first epoch"
    time.sleep(0.1)  # into the second epoch
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    interrupted = torch.load(ckpt, map_location="cpu", weights_only=False)["epoch"]
    assert 1 <= interrupted < 4
    # A kill during a write leaves its temporary file (AtomicFile); the restart must not keep it.
    (ckpt.parent / ".checkpoint.pt.cutoff1").write_bytes(ckpt.read_bytes()[:100_000])
    unfinished = sorted(p.name for p in ckpt.parent.glob(".checkpoint.pt.*"))

    resumed = job.run()
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"resumed from {ckpt} after epoch {interrupted}" in resumed.stdout
    assert f"removed {len(unfinished)} unfinished checkpoint write(s)" in resumed.stdout
    assert not list(ckpt.parent.glob(".checkpoint.pt.*"))
    history = json.loads((job.output_data / "metrics.json").read_text())["history"]
    for got, want in zip(history, ref_history, strict=True):
        for key in ("train_loss", "train_acc", "valid_loss", "valid_acc", "lr"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (got["epoch"], key)
    weights = _state(job.model_dir / "model.pt")
    for k, v in ref_weights.items():
        torch.testing.assert_close(weights[k], v, rtol=1e-4, atol=1e-5)


def test_checkpoint_of_other_hyperparameters_is_refused(tiny_data):
    job = tiny_data
    job.hyperparameters(epochs=1)
    assert job.run().returncode == 0
    job.hyperparameters(epochs=1, lr=0.5)
    _assert_failed(job, job.run(), "was written with other hyperparameters (lr: 0.01 -> 0.5)")


def test_weights_from_the_pretrained_channel(tiny_data):
    """A frozen backbone must come out exactly as the pretrained file put it in."""
    job = tiny_data
    import torchvision

    torch.manual_seed(11)
    donor = torchvision.models.resnet18(num_classes=1000)
    (job.data / "pretrained").mkdir()
    torch.save({"model": donor.state_dict(), "epoch": 7}, job.data / "pretrained" / "donor-checkpoint.pth")
    job.hyperparameters(freeze="backbone")  # weights=none in TINY; set auto below
    hps = json.loads((job.config / "hyperparameters.json").read_text())
    hps["weights"] = "pretrained"
    job.set_raw_hyperparameters(hps)
    result = job.run()
    assert result.returncode == 0, result.stdout[-3000:]
    assert "from the 'pretrained' channel" in result.stdout
    out = _state(job.model_dir / "model.pt")
    donor_state = donor.state_dict()
    for k, v in out.items():
        if k.startswith("fc."):
            assert v.shape[0] == 3
        else:
            torch.testing.assert_close(v, donor_state[k], msg=k)


def test_imagenet_weights_from_the_local_cache(tiny_data):
    job = tiny_data
    import torchvision

    from imgcls.models import imagenet_weights_path

    os.environ_backup = dict(os.environ)
    torch_home = job.base / "torch_home"
    os.environ["TORCH_HOME"] = str(torch_home)
    try:
        path = imagenet_weights_path("resnet18")
    finally:
        os.environ.clear()
        os.environ.update(os.environ_backup)
    path.parent.mkdir(parents=True)
    torch.manual_seed(5)
    cached = torchvision.models.resnet18().state_dict()
    torch.save(cached, path)
    job.hyperparameters(weights="imagenet", freeze="layer4", epochs=1)
    result = job.run()
    assert result.returncode == 0, result.stdout[-3000:]
    assert "from torchvision's ImageNet weights" in result.stdout
    out = _state(job.model_dir / "model.pt")
    torch.testing.assert_close(out["layer4.1.conv2.weight"], cached["layer4.1.conv2.weight"])


def test_debugger_with_frozen_layers_read_back_with_smdebug(tiny_data):
    from smdebug.trials import create_trial

    job = tiny_data
    tensors = job.base / "tensors"
    (job.config / "debughookconfig.json").write_text(json.dumps({
        "LocalPath": str(tensors), "HookParameters": {"save_interval": "50"},
        "CollectionConfigurations": [{"CollectionName": "losses"}, {"CollectionName": "gradients"},
                                     {"CollectionName": "weights"}]}))
    job.hyperparameters(freeze="backbone", frozen_trunk="int8")
    result = job.run()
    assert result.returncode == 0, result.stdout[-3000:]
    assert "smdebug hook writing to" in result.stdout
    trial = create_trial(str(tensors))
    names = trial.tensor_names()
    grads = [n for n in names if n.startswith("gradient/")]
    assert grads and all("fc." in n for n in grads)  # frozen layers get no gradients, and do not break the hook
    # No collection here needs the backbone's modules to run: it runs as one int8 trace, calibrated on the
    # training images, and the hook still saves the frozen weights (it reads them from the model, not from
    # the modules' calls).
    assert "frozen-trunk: the frozen conv1/bn1/relu/maxpool/layer1/layer2/layer3/layer4/avgpool run as one " \
           "frozen int8 trace" in result.stdout
    assert "frozen-trunk: int8 calibrated on the training images in" in result.stdout
    assert {"ResNet_conv1.weight", "ResNet_layer4.1.conv2.weight", "ResNet_fc.weight"} <= set(names)
    loss = trial.tensor(trial.tensor_names(collection="losses")[0])
    assert loss.steps() == [0]  # 8 steps in all, saved every 50th
    history = json.loads((job.output_data / "metrics.json").read_text())["history"]
    valid_loss = trial.tensor("scalar/valid_loss")
    # Epoch scalars are saved every epoch, whatever the save interval.
    assert [float(valid_loss.value(s)[0]) for s in valid_loss.steps()] == pytest.approx(
        [h["valid_loss"] for h in history], rel=1e-5)


def test_a_job_with_the_debugger_on_ends_with_its_bf16_check_and_int8_model(tiny_data):
    """smdebug never removes the hooks it puts on the model: left on after training, they broke the
    bf16 check's trace (saving on one call and not on the next, with save_interval 5: "Graphs
    differed across invocations", the job failed) and int8's copy of the model. Closing the debugger
    now takes them off; what it saved stays readable."""
    from smdebug.trials import create_trial

    from tests.conftest import debugger_config

    tensors = debugger_config(tiny_data, save_interval=5)  # losses, gradients and relu_input
    result = tiny_data.run()
    assert result.returncode == 0, result.stdout[-3000:]
    assert "bf16 gives the same top-1 class as fp32" in result.stdout
    assert "int8: quantizing" not in result.stdout and (tiny_data.model_dir / "model_int8.pt").is_file()
    names = create_trial(str(tensors)).tensor_names()
    assert any(n.endswith("relu_input_0") for n in names) and any(n.startswith("gradient/") for n in names)


def test_closing_the_debugger_takes_its_hooks_off_the_model_and_the_loss(tmp_path):
    import torchvision

    from tests.conftest import Job, debugger_config
    from train.debugger import Debugger

    job = Job(tmp_path)
    job.config.mkdir(parents=True)
    debugger_config(job, save_interval=5)
    config = job.config / "debughookconfig.json"
    model, loss = torchvision.models.resnet18(num_classes=3), torch.nn.CrossEntropyLoss()
    mine = model.layer1.register_forward_hook(lambda *_: None)  # someone else's hook stays

    def hooks():
        return (sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in (*model.modules(), loss)),
                sum(len(p._backward_hooks or {}) for p in model.parameters()))

    debugger = Debugger.create(config, model, loss, base_dir=tmp_path)
    assert debugger.active and hooks()[0] > 60 and hooks()[1] == len(list(model.parameters()))
    debugger.close()
    assert hooks() == (1, 0) and not debugger.active
    debugger.close()  # a second close is harmless
    mine.remove()


def test_a_debugger_that_saves_activations_keeps_the_frozen_backbone_eager(tiny_data):
    from smdebug.trials import create_trial

    from tests.conftest import debugger_config

    tensors = debugger_config(tiny_data)  # losses, gradients and relu_input
    tiny_data.hyperparameters(freeze="backbone", epochs=1)
    result = tiny_data.run()
    assert result.returncode == 0, result.stdout[-3000:]
    assert "frozen-trunk: the frozen conv1/bn1/relu/maxpool/layer1/layer2/layer3/layer4/avgpool run eagerly " \
           "(the debugger saves the collections relu_input" in result.stdout
    assert "int8: calibrated and compared in" in result.stdout  # no int8 trunk to make it from
    if fast_bf16(torch.device("cpu")):  # else fused-norm is off for fp32 first
        assert "; ATen's modules at the steps where the debugger saves relu_input (each ReLU module must run) and " \
               "in evaluation" in result.stdout
    names = create_trial(str(tensors)).tensor_names()
    assert any(n.startswith("layer3.") and n.endswith("relu_input_0") for n in names), names[:20]


def test_a_frozen_backbone_job_makes_its_int8_model_from_the_int8_trunk_it_trained_on(tiny_data):
    """No second calibration at the end (about 40 s for resnet50 at 224 px on 2 cores): the trunk
    was calibrated on the same images before the first epoch and never changed."""
    from serve.predictor import Predictor

    tiny_data.hyperparameters(freeze="backbone", frozen_trunk="int8", epochs=1)
    result = tiny_data.run()
    assert result.returncode == 0, result.stdout[-3000:]
    assert "frozen-trunk: int8 calibrated on the training images in" in result.stdout
    assert "int8: the int8 trunk the head trained on, with the trained head in fp32" in result.stdout
    assert re.search(r"int8: compared in \d+\.\d s", result.stdout) and "calibrated and compared" not in result.stdout
    # The trunk was built for this CPU's engine, and the artifact's file says which, as the log does.
    engine = quantize.build_engine()
    assert f"for torch's {engine} quantized engine" in result.stdout
    assert artifact.int8_engine(tiny_data.model_dir / artifact.INT8_FILE) == engine
    _, card = artifact.load(tiny_data.model_dir)
    assert 0 <= card.metrics["int8_top1_agreement"] <= 1
    # Where the CPU has VNNI the trunk came in both variants, the head trained on the 8-bit one, and
    # each is a model of the artifact, from the one calibration before the first epoch.
    vnni = quantize.vnni_ready()
    assert ("int8_vnni_top1_agreement" in card.metrics) == vnni == (tiny_data.model_dir / artifact.INT8_VNNI_FILE).exists()
    assert ("(two models: 7-bit and 8-bit activations)" in result.stdout) == vnni
    served = Predictor.from_model_dir(tiny_data.model_dir, precision="int8")
    pictures = sorted((tiny_data.data / "test").glob("*/*.jpg"))
    probabilities = served.predict([p.read_bytes() for p in pictures])
    assert served.precision == "int8" and probabilities.shape == (len(pictures), 3)
    assert abs(probabilities.sum(1) - 1).max() < 1e-5


def test_a_sagemaker_local_path_moves_under_a_local_runs_folder(tmp_path, monkeypatch):
    import tempfile

    from train.debugger import relocate

    # The relocated copies' folders (Debugger.create removes them) land in tmp_path, not in /tmp.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    config = tmp_path / "debughookconfig.json"
    config.write_text(json.dumps({"LocalPath": "/opt/ml/output/tensors", "HookParameters": {"save_interval": "5"}}))
    moved = json.loads(relocate(config, tmp_path / "run").read_text())
    assert moved == {"LocalPath": str(tmp_path / "run" / "output" / "tensors"), "HookParameters": {"save_interval": "5"}}
    assert relocate(config, Path("/opt/ml")) == config  # in SageMaker nothing changes
    config.write_text(json.dumps({"HookParameters": {}}))  # smdebug's default is /opt/ml/output/tensors too
    assert json.loads(relocate(config, tmp_path / "run").read_text())["LocalPath"] == str(tmp_path / "run/output/tensors")
    config.write_text(json.dumps({"LocalPath": str(tmp_path / "mine")}))
    assert relocate(config, tmp_path / "run") == config
    assert len(list(tmp_path.glob("debughook-*"))) == 2  # the two copies above, nowhere else


def test_decode_once_changes_nothing_but_the_decoding(tiny_data):
    """With augment=none the cached and uncached runs see the same pixels: the same history, to the bit."""
    histories, cards, int8_files, outputs = {}, {}, {}, {}
    for choice in ("true", "false"):
        # int8 rides along: on in the first run, off in the second, which must remove the first's file.
        tiny_data.hyperparameters(augment="none", cache_images=choice, int8=choice)
        result = tiny_data.run()
        assert result.returncode == 0, result.stdout[-3000:]
        assert ("decode once: 24 train + 6 valid + 9 test images kept in memory" in result.stdout) == (choice == "true")
        assert ("random crop: image by image (augment=none: no random crop)" in result.stdout) == (choice == "true")
        histories[choice] = json.loads((tiny_data.output_data / "metrics.json").read_text())["history"]
        _, cards[choice] = artifact.load(tiny_data.model_dir)  # what serving's precision=auto reads
        int8_files[choice] = tuple((tiny_data.model_dir / artifact.int8_file(vnni)).is_file() for vnni in (False, True))
        assert ("int8 gives the same top-1 class as fp32 on" in result.stdout) == (choice == "true")
        outputs[choice] = result.stdout
    strip = lambda h: [{k: v for k, v in e.items() if k not in ("images_per_sec", "data_wait")} for e in h]  # noqa: E731
    assert strip(histories["true"]) == strip(histories["false"])
    assert 0 <= cards["false"].metrics["bf16_top1_agreement"] <= 1
    assert "bf16 gives the same top-1 class as fp32 on" in result.stdout
    # Where this CPU has VNNI, a second int8 model with 8-bit activations beside the first (imgcls.quantize).
    assert int8_files == {"true": (True, quantize.vnni_ready()), "false": (False, False)}
    assert 0 <= cards["true"].metrics["int8_top1_agreement"] <= 1 and "int8_top1_agreement" not in cards["false"].metrics
    assert ("int8_vnni_top1_agreement" in cards["true"].metrics) == quantize.vnni_ready()
    assert "int8_vnni_top1_agreement" not in cards["false"].metrics
    assert ("int8 with 8-bit activations (CPUs with VNNI) gives the same top-1 class" in outputs["true"]) == quantize.vnni_ready()


def test_compile_trains_the_same_model_and_steps_aside_for_the_debugger(tiny_data):
    """compile=true runs the loop through torch.compile; the artifact is the plain model's."""
    tiny_data.hyperparameters(compile="true", augment="none")
    result = tiny_data.run(timeout=900)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "compile=true: torch.compile (inductor)" in result.stdout
    assert "conv-gemm=true: off with compile=true" in result.stdout
    history = json.loads((tiny_data.output_data / "metrics.json").read_text())["history"]
    assert len(history) == 2 and all(h["train_loss"] == h["train_loss"] for h in history)  # finite, not NaN
    model, card = artifact.load(tiny_data.model_dir)  # keys without torch.compile's "_orig_mod." prefix
    assert not any(k.startswith("_orig_mod") for k in model.state_dict())
    assert card.metrics["test_acc"] >= 0

    from tests.conftest import debugger_config
    debugger_config(tiny_data)
    result = tiny_data.run(timeout=900)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "compile=true is ignored: the debugger hook needs the eager model" in result.stdout
    assert "compile=true: torch.compile" not in result.stdout


def test_the_debugger_saves_channels_last_bf16_activations_as_their_float_values(tmp_path):
    """Autocast activations are bf16 and channels-last: smdebug gets them as C-ordered float32
    arrays (numpy would otherwise gather them element by element), read back exactly."""
    from collections import OrderedDict

    import numpy as np
    import smdebug.pytorch as smd
    from smdebug.trials import create_trial

    from tests.conftest import Job, debugger_config
    from train.debugger import Debugger, _hook_class

    job = Job(tmp_path)
    job.config.mkdir(parents=True)
    tensors = debugger_config(job, save_interval=1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(OrderedDict(  # named as in a ResNet, which relu_input's regex matches
        conv=torch.nn.Conv2d(3, 8, 3), relu=torch.nn.ReLU(), flat=torch.nn.Flatten(),
        fc=torch.nn.Linear(8 * 8 * 8, 2))).to(memory_format=torch.channels_last)
    loss = torch.nn.CrossEntropyLoss()
    seen = []
    model.relu.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].detach().clone()))
    debugger = Debugger.create(config=job.config / "debughookconfig.json", model=model, criterion=loss,
                               base_dir=tmp_path)
    debugger.train_mode()
    x = torch.randn(4, 3, 10, 10).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    loss(out.float(), torch.tensor([0, 1, 0, 1])).backward()
    debugger.close()

    relu_in = seen[0]
    assert relu_in.dtype == torch.bfloat16 and not relu_in.is_contiguous()
    assert relu_in.is_contiguous(memory_format=torch.channels_last)
    array = _hook_class(smd)._make_numpy_array(relu_in)
    assert array.flags.c_contiguous and array.dtype == np.float32
    trial = create_trial(str(tensors))
    name = next(n for n in trial.tensor_names() if n.endswith("relu_input_0"))
    saved = trial.tensor(name).value(0)
    assert saved.shape == tuple(relu_in.shape)
    np.testing.assert_array_equal(saved, relu_in.float().numpy())
