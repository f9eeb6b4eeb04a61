"""int8 for CPU servers (imgcls.quantize): close to fp32, stored in the artifact, chosen
by the server only where the trainer measured its agreement."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from imgcls import artifact, quantize
from imgcls.errors import ArtifactError
from imgcls.models import create_model
from imgcls.presets import ClassificationPresetEval
from serve.predictor import Predictor, resolve_precision
from serve.settings import Settings

pytestmark = pytest.mark.skipif(not quantize.available(), reason="this torch has no x86 quantization engine")

CLASSES = ["a", "b", "c", "d"]


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Smooth images (upsampled noise), so activations have the spread of pictures, not of white noise.
    return torch.nn.functional.interpolate(torch.randn(n, 3, 12, 12, generator=g), size=48, mode="bilinear")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    net = create_model("resnet18", num_classes=len(CLASSES)).eval()
    for mod in net.modules():  # non-trivial BatchNorm statistics, as a trained model has
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    return net


@pytest.fixture(scope="module")
def graph(model):
    return quantize.quantize(model, [_images(16, 1), _images(16, 2)], head="fc")


def test_int8_logits_follow_fp32_and_the_model_is_left_alone(model, graph):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _images(32, 3)  # not the calibration images
    with torch.no_grad():
        reference = model(x)
    served = quantize.Int8Model(graph)
    out = served(x.contiguous(memory_format=torch.channels_last))
    assert out.dtype == torch.float32 and out.shape == reference.shape
    similarity = torch.nn.functional.cosine_similarity(out, reference, dim=1)
    assert similarity.min() > 0.95, similarity
    assert not torch.equal(out, reference)  # it really is another computation
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert any(p.dtype == torch.qint8 for p in graph.state_dict().values() if isinstance(p, torch.Tensor)) or \
        "quantized::" in str(graph.graph)


def test_calibration_needs_images(model):
    with pytest.raises(ValueError, match="at least one batch"):
        quantize.quantize(model, [], head="fc")


def _artifact(tmp_path, model, graph, **metrics):
    card = artifact.ModelCard(arch="resnet18", class_names=CLASSES, preprocess=ClassificationPresetEval(48).to_dict(),
                              metrics=metrics)
    artifact.save(tmp_path, model, card)
    if graph is not None:
        artifact.save_int8(tmp_path, graph)
    return tmp_path


def test_the_server_answers_in_int8_from_the_artifact(tmp_path, model, graph):
    model_dir = _artifact(tmp_path, model, graph, int8_top1_agreement=1.0, bf16_top1_agreement=0.5)
    picture = Image.new("RGB", (80, 60), (200, 90, 40))
    fp32 = Predictor.from_model_dir(model_dir, precision="fp32")
    int8 = Predictor.from_model_dir(model_dir, precision="int8")
    assert int8.precision == "int8" and int8.runner.mode == "int8 trace"
    a, b = fp32.predict([picture, picture]), int8.predict([picture, picture])
    assert b.shape == (2, len(CLASSES)) and abs(b.sum(1) - 1).max() < 1e-5
    assert abs(a - b).max() < 0.1
    auto = Predictor.from_model_dir(model_dir)  # bf16 fails its gate here, so auto falls to int8 on any CPU
    assert auto.precision == "int8", auto.precision_reason
    assert "int8 on " in auto.precision_reason and "100.0% top-1 agreement" in auto.precision_reason


def test_auto_needs_the_file_and_the_agreement(tmp_path, model, graph):
    cpu = torch.device("cpu")
    card = lambda **m: artifact.ModelCard(arch="resnet18", class_names=CLASSES, preprocess={}, metrics=m)  # noqa: E731
    precision, why = resolve_precision("auto", card(int8_top1_agreement=0.97), cpu, has_int8=True)
    assert precision == "fp32" and "int8 agreed with fp32 on only 97.0%" in why
    precision, why = resolve_precision("auto", card(int8_top1_agreement=1.0), cpu, has_int8=False)
    assert precision == "fp32" and artifact.INT8_FILE in why
    precision, why = resolve_precision("auto", card(int8_top1_agreement=1.0, bf16_top1_agreement=1.0), cpu,
                                       has_int8=True)
    assert precision == "int8", why
    # int8 kernels are CPU kernels: another device never gets it from auto.
    assert resolve_precision("auto", card(int8_top1_agreement=1.0), torch.device("mps"), has_int8=True)[0] != "int8"
    assert Settings.from_env({"IMGCLS_PRECISION": "INT8"}).precision == "int8"


@pytest.mark.parametrize("kind, has_bf16, order", [
    ("CPU with AMX or AVX512-BF16", True, ("int8", "bf16")),
    ("AVX2 CPU", False, ("int8", "fp32")),
])
def test_auto_tries_the_fastest_precision_of_the_cpu_first(monkeypatch, kind, has_bf16, order):
    # Stands in for the CPU kind this machine is not: int8 was measured fastest on both kinds.
    import serve.predictor as predictor
    monkeypatch.setattr(predictor, "fast_bf16", lambda device: has_bf16)
    cpu = torch.device("cpu")
    card = lambda **m: artifact.ModelCard(arch="resnet18", class_names=CLASSES, preprocess={}, metrics=m)  # noqa: E731
    both = card(int8_top1_agreement=1.0, bf16_top1_agreement=1.0)
    precision, why = resolve_precision("auto", both, cpu, has_int8=True)
    assert precision == order[0] and "int8 on cpu, 100.0% top-1 agreement" in why, (kind, why)
    # The first one failing its gate (or missing) leaves the second.
    first_fails = card(**{f"{order[0]}_top1_agreement": 0.9, f"{order[1]}_top1_agreement": 1.0})
    precision, why = resolve_precision("auto", first_fails, cpu, has_int8=True)
    assert precision == order[1] and f"{order[0]} agreed with fp32 on only 90.0%" in why, (kind, why)
    assert resolve_precision("auto", both, cpu, has_int8=False)[0] == ("bf16" if has_bf16 else "fp32"), kind


def test_int8_missing_damaged_or_stale_is_said_plainly(tmp_path, model, graph):
    model_dir = _artifact(tmp_path, model, None, int8_top1_agreement=1.0)
    with pytest.raises(ArtifactError, match="has no model_int8.pt: train with the hyperparameter int8=true"):
        Predictor.from_model_dir(model_dir, precision="int8")
    assert Predictor.from_model_dir(model_dir).precision != "int8"
    (model_dir / artifact.INT8_FILE).write_bytes(b"not a TorchScript archive")
    with pytest.raises(ArtifactError, match="model_int8.pt cannot be read.*delete this file"):
        Predictor.from_model_dir(model_dir)
    assert Predictor.from_model_dir(model_dir, precision="fp32").precision == "fp32"  # fp32 does not read it
    # Nor does auto where int8 fails its gate: the file is read only where it will run, and the
    # reason given is the gate, not a missing file.
    _artifact(tmp_path, model, None, int8_top1_agreement=0.5)
    (model_dir / artifact.INT8_FILE).write_bytes(b"not a TorchScript archive")
    gated = Predictor.from_model_dir(model_dir)
    assert gated.precision != "int8" and "int8 agreed with fp32 on only 50.0%" in gated.precision_reason
    # Saving new weights removes an int8 model made from the old ones.
    _artifact(tmp_path, model, None)
    assert not (model_dir / artifact.INT8_FILE).exists()


@pytest.mark.skipif(not quantize.available(quantize.FUSED_ENGINE), reason="this torch has no onednn engine")
def test_the_fused_build_adds_inside_the_convolutions_and_keeps_the_x86_builds_numbers(tmp_path, model):
    batches = [_images(16, 1), _images(16, 2)]
    fused = quantize.quantize(model, batches, head="fc", engine=quantize.FUSED_ENGINE)
    plain = quantize.quantize(model, batches, head="fc", engine=quantize.ENGINE)
    fused_ops, plain_ops = str(fused.graph), str(plain.graph)
    # resnet18's eight residual adds: in the convolution for onednn, separate ops for x86
    assert fused_ops.count("quantized::conv2d_add_relu") == 8 and "quantized::add_relu" not in fused_ops
    assert plain_ops.count("quantized::add_relu") == 8 and "conv2d_add" not in plain_ops
    assert (quantize.engine_of(fused), quantize.engine_of(plain)) == ("onednn", "x86")
    x = _images(32, 3)
    torch.backends.quantized.engine = quantize.ENGINE  # Int8Model sets the engine its model needs
    a, b = quantize.Int8Model(fused)(x), quantize.Int8Model(plain)(x)
    assert torch.backends.quantized.engine == quantize.ENGINE
    # Same 7-bit activations and weights: the same model up to where each rounds the sum.
    assert torch.nn.functional.cosine_similarity(a, b, dim=1).min() > 0.99
    assert torch.equal(a.argmax(1), b.argmax(1))
    # The file records the engine, and loading sets it before the weights are packed.
    for graph, engine in ((fused, "onednn"), (plain, "x86")):
        artifact.save_int8(tmp_path, graph)
        assert artifact.int8_engine(tmp_path / artifact.INT8_FILE) == engine
        torch.backends.quantized.engine = "fbgemm"  # packs conv weights the onednn ops cannot take
        loaded = artifact.load_int8(tmp_path)
        assert quantize.engine_of(loaded) == engine and torch.backends.quantized.engine == engine
        assert torch.equal(quantize.Int8Model(loaded)(x), quantize.Int8Model(graph)(x))


def test_an_int8_file_without_its_engine_is_x86s_and_an_engine_torch_lacks_is_said_plainly(tmp_path, model, graph):
    path = tmp_path / artifact.INT8_FILE
    torch.jit.save(quantize.quantize(model, [_images(16, 1)], head="fc", engine=quantize.ENGINE), str(path))
    assert artifact.int8_engine(path) == "x86"  # as written before the engine was recorded
    assert quantize.engine_of(artifact.load_int8(tmp_path)) == "x86"
    torch.jit.save(graph, str(path), _extra_files={artifact.INT8_ENGINE_ENTRY: "vendor-npu"})
    with pytest.raises(ArtifactError, match="'vendor-npu' quantized engine, which this torch lacks.*"
                                            "IMGCLS_PRECISION=bf16 or fp32"):
        artifact.load_int8(tmp_path)


@pytest.mark.parametrize("flags, engine", [("fpu sse avx2 avx512f avx512_vnni amx_int8", quantize.FUSED_ENGINE),
                                           ("fpu sse avx2 avx512f", quantize.ENGINE)])
def test_the_build_engine_follows_the_cpus_vnni(monkeypatch, flags, engine):
    # Stands in for the CPU kind this machine may not be: torch's own CPU probe, as its x86 engine reads it.
    if not quantize.available(quantize.FUSED_ENGINE):
        pytest.skip("an x86 torch with the onednn engine")
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: "avx512_vnni" in flags.split(), raising=False)
    monkeypatch.setattr(quantize.sys, "platform", "linux")
    assert quantize.build_engine.__wrapped__() == engine


def _served_batches(monkeypatch) -> dict:
    """The sizes of the batches the model runs on as the endpoint runs it, call by call, per
    precision (None: fp32)."""
    from imgcls.inference import InferenceModel

    sizes = {None: [], torch.bfloat16: []}
    call = InferenceModel.__call__

    def counted(self, x):
        assert self.mode == "jit"  # on a CPU the server's frozen trace, not the eager model
        sizes[self.dtype].append(x.shape[0])
        return call(self, x)

    monkeypatch.setattr(InferenceModel, "__call__", counted)
    return sizes


def _fp32_batches(monkeypatch) -> list[int]:
    return _served_batches(monkeypatch)[None]


def _agreements(built) -> tuple[list[float], int]:
    """int8.build's agreements, one per model it made, and the images compared."""
    models, compared = built
    return [agreement for _, agreement in models], compared


def test_calibration_batches_have_a_size_of_their_own():
    """Not the job's batch size (tests/test_distributed.py: 1 process x 8 and 2 x 4 write the same
    int8 models); fewer images per batch only for images larger than 224 px, by their pixels."""
    from train import int8

    assert int8.calibration_batch(224) == int8.calibration_batch(32) == int8.CALIBRATION_BATCH == 128
    assert int8.calibration_batch(448) == 32 and int8.calibration_batch(300) == 71
    assert int8.calibration_batch(2048) == 1


def test_a_jobs_int8_comparison_reuses_the_bf16_checks_fp32_classes(model, monkeypatch):
    """train.job runs fp32 over the report images once, as the server runs it (the frozen trace on
    a CPU, not eager): top1_agreement keeps its top-1 classes and int8.build compares int8 against
    them, to the same agreement and count as when it runs fp32 itself, without running fp32 again."""
    from train import int8
    from train.engine import Batcher, top1_agreement

    batcher = Batcher(torch.device("cpu"), normalize=None, channels_last=False)
    loader = [(_images(8, seed), torch.zeros(8, dtype=torch.long)) for seed in (3, 4, 5)]  # floats: only moved
    calibration = loader[:1]
    fp32 = _fp32_batches(monkeypatch)
    references = []
    top1_agreement(model, loader, batcher, torch.bfloat16, references=references)
    assert fp32 == [8, 8, 8]
    with torch.no_grad():  # the trace's classes are eager fp32's on these images
        assert all(torch.equal(r, model(x).argmax(1)) for r, (x, _) in zip(references, loader, strict=True))
    fp32.clear()
    agreement, compared = _agreements(int8.build(model, calibration, loader, batcher, limit=20))
    assert fp32 == [8, 8, 4]  # the last batch cut to the limit
    fp32.clear()
    reused, reused_compared = _agreements(int8.build(model, calibration, loader, batcher, limit=20,
                                                     references=references))
    assert (reused, reused_compared) == (agreement, compared) and compared == 20
    assert fp32 == []
    flipped = [(r + 1) % len(CLASSES) for r in references]  # other classes: the comparison reads them
    against_flipped = _agreements(int8.build(model, calibration, loader, batcher, limit=20, references=flipped))[0]
    assert all(a < b for a, b in zip(against_flipped, agreement, strict=True))


def test_the_agreement_checks_stop_at_their_limit_and_int8_runs_fp32_where_bf16s_classes_end(model, monkeypatch):
    """A job's bf16 check compares at most AGREEMENT_IMAGES (on several ranks, each its share), and
    int8.build then runs fp32 itself for the images the bf16 check's classes do not cover."""
    from train import int8
    from train.engine import Batcher, top1_agreement

    batcher = Batcher(torch.device("cpu"), normalize=None, channels_last=False)
    loader = [(_images(8, seed), torch.zeros(8, dtype=torch.long)) for seed in (3, 4, 5)]
    taken = []

    def counted():
        for batch in loader:
            taken.append(1)
            yield batch

    references = []
    top1_agreement(model, counted(), batcher, torch.bfloat16, references=references, limit=12)
    assert [len(r) for r in references] == [8, 4] and len(taken) == 2  # the third batch never read
    full = []
    top1_agreement(model, loader, batcher, torch.bfloat16, references=full)
    assert torch.equal(references[1], full[1][:4])
    fp32 = _fp32_batches(monkeypatch)
    reused = _agreements(int8.build(model, loader[:1], loader, batcher, limit=20, references=references))
    assert fp32 == [8, 4]  # the second batch (4 of its 8 covered) and the third, cut to the limit
    assert reused == _agreements(int8.build(model, loader[:1], loader, batcher, limit=20))


def test_a_jobs_report_pass_runs_as_served_and_gives_the_bf16_check_its_classes(model, monkeypatch):
    """train.job's report pass (evaluate with top1) runs the model as the endpoint runs it in the
    training precision and keeps each batch's top-1 classes; where that precision is bf16 (or
    fp32), the bf16 check runs only fp32 (or bf16), to the same agreement as when it runs both."""
    from train.engine import Batcher, Precision, evaluate, top1_agreement

    batcher = Batcher(torch.device("cpu"), normalize=None, channels_last=False)
    loader = [(_images(8, seed), torch.tensor([seed % 4] * 8)) for seed in (3, 4, 5)]
    bf16 = Precision(torch.bfloat16, False, "bf16")
    eager = evaluate(model, loader, batcher, bf16, 2, len(CLASSES))
    calls = _served_batches(monkeypatch)
    top1 = []
    served = evaluate(model, loader, batcher, bf16, 2, len(CLASSES), top1=top1)
    assert calls == {None: [], torch.bfloat16: [8, 8, 8]} and [len(t) for t in top1] == [8, 8, 8]
    assert served.samples == eager.samples == 24
    assert served.confusion.sum(1).tolist() == eager.confusion.sum(1).tolist()
    assert torch.equal(served.confusion.sum(0), torch.bincount(torch.cat(top1), minlength=len(CLASSES)))
    assert abs(served.loss - eager.loss) < 0.05 * abs(eager.loss)  # one function, bf16 rounding apart
    calls[torch.bfloat16].clear()
    alone = top1_agreement(model, loader, batcher, torch.bfloat16, limit=20)
    assert calls == {None: [8, 8, 4], torch.bfloat16: [8, 8, 4]}
    calls[None].clear(), calls[torch.bfloat16].clear()
    assert top1_agreement(model, loader, batcher, torch.bfloat16, limit=20, computed=(torch.bfloat16, top1)) == alone
    assert calls == {None: [8, 8, 4], torch.bfloat16: []}
    flipped = [(t + 1) % len(CLASSES) for t in top1]  # other classes: the check reads them
    assert top1_agreement(model, loader, batcher, torch.bfloat16, limit=20,
                          computed=(torch.bfloat16, flipped)) < alone
    # A job that trained in fp32 (a CPU without fast bf16): its report pass is the check's fp32 side.
    calls[None].clear(), calls[torch.bfloat16].clear()
    fp32_top1 = []
    evaluate(model, loader, batcher, Precision(None, False, "fp32"), 2, len(CLASSES), top1=fp32_top1)
    assert calls == {None: [8, 8, 8], torch.bfloat16: []}
    calls[None].clear()
    references = []
    assert top1_agreement(model, loader, batcher, torch.bfloat16, limit=20, references=references,
                          computed=(None, fp32_top1)) == alone
    assert calls == {None: [], torch.bfloat16: [8, 8, 4]}
    assert [len(r) for r in references] == [8, 8, 4]  # int8's comparison still gets fp32's classes
    assert top1_agreement(model, loader, batcher, torch.bfloat16, limit=20,
                          computed=(None, [(t + 1) % len(CLASSES) for t in fp32_top1])) < alone


def test_the_8bit_model_shares_the_calibration_and_is_closer_to_fp32(tmp_path, model):
    """calibrate(vnni=True): the 7-bit model as calibrate alone makes it, from the 8-bit model's
    pass, and the 8-bit one nearer fp32; each saved to its own file and loaded back as such."""
    if not quantize.available(quantize.FUSED_ENGINE):
        pytest.skip("an x86 torch with the onednn engine")
    batches = [_images(16, 1), _images(16, 2)]
    (alone,), example = quantize.calibrate(model, batches, "fc", engine=quantize.FUSED_ENGINE)
    (seven, eight), _ = quantize.calibrate(model, batches, "fc", engine=quantize.FUSED_ENGINE, vnni=True)
    graphs = [quantize.freeze(m, example) for m in (alone, seven, eight)]
    assert [quantize.needs_vnni(g) for g in graphs] == [False, False, True]
    x = _images(32, 3)
    with torch.no_grad():
        reference = model(x)
    out = [quantize.Int8Model(g)(x) for g in graphs]
    assert torch.equal(out[0], out[1])  # the same scales from one pass as from its own
    error = [float(((o - reference).norm(dim=1) / reference.norm(dim=1)).mean()) for o in out[1:]]
    if quantize.vnni_ready():  # without VNNI oneDNN's kernels lose more than the bit gains (docs/benchmarks.md)
        assert error[1] < 0.9 * error[0], error
    for graph in graphs[1:]:
        artifact.save_int8(tmp_path, graph)
    assert {p.name for p in tmp_path.iterdir()} == {artifact.INT8_FILE, artifact.INT8_VNNI_FILE}
    for vnni, expected in ((False, out[1]), (True, out[2])):
        loaded = artifact.load_int8(tmp_path, vnni=vnni)
        assert quantize.needs_vnni(loaded) == vnni and quantize.engine_of(loaded) == quantize.FUSED_ENGINE
        assert torch.equal(quantize.Int8Model(loaded)(x), expected)
    # An engine without the fused build (x86) makes no 8-bit model: its kernels may lack VNNI.
    assert len(quantize.calibrate(model, batches[:1], "fc", engine=quantize.ENGINE, vnni=True)[0]) == 1
    assert len(quantize.quantize_variants(model, batches[:1], "fc")) == (2 if quantize.vnni_ready() else 1)


@pytest.mark.parametrize("vnni_here", [True, False])
def test_auto_serves_the_8bit_file_only_where_the_cpu_has_vnni_and_it_passed(monkeypatch, vnni_here):
    from serve.predictor import int8_choice

    monkeypatch.setattr(quantize, "vnni_ready", lambda: vnni_here)
    cpu = torch.device("cpu")
    card = lambda **m: artifact.ModelCard(arch="resnet18", class_names=CLASSES, preprocess={}, metrics=m)  # noqa: E731
    both = card(int8_top1_agreement=0.97, int8_vnni_top1_agreement=0.995, bf16_top1_agreement=0.5)
    precision, why = resolve_precision("auto", both, cpu, has_int8=True, has_int8_vnni=True)
    if vnni_here:
        assert precision == "int8" and artifact.INT8_VNNI_FILE in why and "99.5% top-1 agreement" in why, why
    else:  # the portable file's own agreement decides
        assert precision == "fp32" and "int8 agreed with fp32 on only 97.0%" in why, why
    portable_passes = card(int8_top1_agreement=0.995, int8_vnni_top1_agreement=0.98, bf16_top1_agreement=0.5)
    precision, why = resolve_precision("auto", portable_passes, cpu, has_int8=True, has_int8_vnni=True)
    assert precision == "int8" and artifact.INT8_VNNI_FILE not in why and "99.5% top-1 agreement" in why, why
    assert ("int8_vnni agreed with fp32 on only 98.0%" in why) == vnni_here, why
    # IMGCLS_PRECISION=int8: the file for this CPU, whatever the agreements
    assert int8_choice(both, True, True, gated=False) == (vnni_here, [])
    assert int8_choice(both, True, False, gated=False) == (False, [])
    assert int8_choice(card(), False, False) == (None, [f"the artifact has no {artifact.INT8_FILE}"])


@pytest.mark.parametrize("vnni_here", [True, False])
def test_the_server_loads_the_int8_file_for_its_cpu(tmp_path, model, monkeypatch, vnni_here):
    if not quantize.available(quantize.FUSED_ENGINE):
        pytest.skip("an x86 torch with the onednn engine")
    modules, example = quantize.calibrate(model, [_images(16, 1)], "fc", engine=quantize.FUSED_ENGINE, vnni=True)
    model_dir = _artifact(tmp_path, model, None, int8_top1_agreement=1.0, int8_vnni_top1_agreement=1.0,
                          bf16_top1_agreement=0.5)
    for m in modules:
        artifact.save_int8(model_dir, quantize.freeze(m, example))
    monkeypatch.setattr(quantize, "vnni_ready", lambda: vnni_here)
    for precision in ("auto", "int8"):
        served = Predictor.from_model_dir(model_dir, precision=precision)
        assert served.precision == "int8" and quantize.needs_vnni(served.runner.graph) == vnni_here, precision
    assert (artifact.INT8_VNNI_FILE in Predictor.from_model_dir(model_dir).precision_reason) == vnni_here
    artifact.save(model_dir, model, artifact.read_card(model_dir))  # new weights: both int8 files go
    assert not any(p.name.startswith("model_int8") for p in model_dir.iterdir())
