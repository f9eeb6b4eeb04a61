"""The model behind the endpoint: artifact in, class probabilities out, for a list of images.

Built from the artifact with the shared factory and the eval preset stored in it, so the
server preprocesses exactly as training evaluated. Images are decoded one at a time into
uint8 crops, stacked, normalized on the device and run as one batch (in chunks of
`chunk_size`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imgcls import artifact, quantize
from imgcls.errors import ArtifactError, ClassifierError
from imgcls.hardware import fast_bf16
from imgcls.images import DEFAULT_MAX_PIXELS, decode, image_from_array
from imgcls.inference import InferenceModel

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": None}
MIN_AGREEMENT = 0.99   # top-1 agreement with fp32 on the model's own test images


def _agreement_gate(card: artifact.ModelCard, name: str) -> str | None:
    """None when the trainer measured that `name` picks fp32's top-1 class on >= 99% of its test
    images, else why not."""
    agreement = card.metrics.get(f"{name}_top1_agreement")
    if agreement is None:
        return f"the artifact has no {name} agreement measured"
    if agreement < MIN_AGREEMENT:
        return f"{name} agreed with fp32 on only {agreement:.1%} of the test images"
    return None


def auto_order(device: torch.device) -> tuple[str, ...]:
    """The precisions auto tries, fastest first. On every CPU measured, the int8 trace beat the bf16
    trace at batch 1, one thread: 2.7-2.9x with AMX (ResNet-18 6.2 against 16.9 ms), 2.3-2.6x with
    AVX512-BF16 alone (docs/benchmarks.md). int8 kernels are CPU kernels: other devices try bf16 only."""
    return ("int8", "bf16") if device.type == "cpu" else ("bf16",)


def int8_choice(card: artifact.ModelCard, has_int8: bool, has_int8_vnni: bool = False,
                gated: bool = True) -> tuple[bool | None, list[str]]:
    """(vnni, why not the others): the int8 file to serve on this CPU, the one with 8-bit
    activations (artifact.INT8_VNNI_FILE) where the CPU has VNNI (quantize.vnni_ready), else
    artifact.INT8_FILE, each only where the trainer measured its agreement with fp32 at >= 99%
    (gated); vnni None where neither."""
    if not quantize.available():
        return None, [f"this torch has no {quantize.ENGINE} quantization engine"]
    reasons = []
    for vnni, present in ((True, has_int8_vnni and quantize.vnni_ready()), (False, has_int8)):
        if not present:
            continue
        why_not = _agreement_gate(card, artifact.int8_name(vnni)) if gated else None
        if why_not is None:
            return vnni, reasons
        reasons.append(why_not)
    return None, reasons or [f"the artifact has no {artifact.INT8_FILE}"]


def resolve_precision(requested: str, card: artifact.ModelCard, device: torch.device,
                      has_int8: bool = False, has_int8_vnni: bool = False) -> tuple[str, str]:
    """(precision, why). auto: the fastest of bf16 (where the hardware is fast at it) and int8 (on
    a CPU, where the artifact holds an int8 model: int8_choice) whose top-1 class the trainer
    measured to be fp32's on at least 99% of its test images; else fp32."""
    if requested != "auto":
        return requested, f"IMGCLS_PRECISION={requested}"
    reasons = []
    for name in auto_order(device):
        metric = name
        if name == "bf16":
            why_not = (None if fast_bf16(device) else f"no fast bf16 on {device}") or _agreement_gate(card, name)
            fast = f"fast bf16 on {device}"
        else:
            vnni, not_chosen = int8_choice(card, has_int8, has_int8_vnni)
            if vnni is None:
                why_not = "; ".join(not_chosen)
            else:  # the 8-bit file's agreement failed, the portable one's passed: say so
                why_not, reasons = None, reasons + not_chosen
            metric = artifact.int8_name(bool(vnni))
            fast = f"int8 on {device}" + (f", which has VNNI: {artifact.INT8_VNNI_FILE}, 8-bit activations" if vnni else "")
        if why_not is None:
            agreement = card.metrics[f"{metric}_top1_agreement"]
            return name, "; ".join(reasons + [f"{fast}, {agreement:.1%} top-1 agreement with fp32 on the test images"])
        reasons.append(why_not)
    return "fp32", "; ".join(reasons)


class Predictor:
    def __init__(self, model: torch.nn.Module, card: artifact.ModelCard, device: torch.device | str = "cpu",
                 precision: str = "auto", chunk_size: int = 32, max_pixels: int = DEFAULT_MAX_PIXELS,
                 compile: str = "auto", int8_model: torch.jit.ScriptModule | None = None,
                 has_int8: bool | None = None, has_int8_vnni: bool = False):
        """has_int8, has_int8_vnni: whether the artifact holds each int8 file, when the caller loads
        one only if it is chosen (from_model_dir); by default, whether int8_model was given, and
        which it is (quantize.needs_vnni)."""
        self.device = torch.device(device)
        self.card = card
        self.class_names = card.class_names
        self.preset = card.eval_preset()
        self.chunk_size = chunk_size
        self.max_pixels = max_pixels
        if has_int8 is None:
            given_vnni = int8_model is not None and quantize.needs_vnni(int8_model)
            has_int8, has_int8_vnni = int8_model is not None and not given_vnni, given_vnni
        self.precision, self.precision_reason = resolve_precision(precision, card, self.device, has_int8, has_int8_vnni)
        self.autocast_dtype = _DTYPES[self.precision]
        # int8 kernels take NCHW and convert themselves; the float paths are fastest channels-last.
        self.channels_last = self.precision != "int8"
        self.model = model.to(self.device).to(memory_format=torch.channels_last).eval()
        if self.precision == "int8":
            if int8_model is None:
                raise ArtifactError(f"IMGCLS_PRECISION=int8, but the artifact has no {artifact.INT8_FILE}: train with "
                                    "the hyperparameter int8=true (the default), or serve with IMGCLS_PRECISION=auto.")
            if self.device.type != "cpu":
                raise ArtifactError(f"IMGCLS_PRECISION=int8 runs on the CPU only, not on {self.device}: "
                                    "use auto, bf16 or fp16 on a GPU.")
            self.runner = quantize.Int8Model(int8_model)
            return
        side = self.preset.crop_size
        example = self.preset.normalize(torch.zeros((1, 3, side, side), dtype=torch.uint8, device=self.device),
                                        channels_last=True)
        self.runner = InferenceModel(self.model, example, self.autocast_dtype, compile)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, device: torch.device | str = "cpu", **kwargs) -> Predictor:
        model_dir = Path(model_dir)
        model, card = artifact.load(model_dir, map_location="cpu")
        has = [(model_dir / artifact.int8_file(vnni)).is_file() for vnni in (False, True)]
        # Read the int8 model (12-25 MB of TorchScript) only where it will run: not where auto picks
        # bf16 (a GPU, or where int8 fails its gate) or fp32. IMGCLS_PRECISION=int8: the file for this CPU.
        requested = kwargs.get("precision", "auto")
        if resolve_precision(requested, card, torch.device(device), *has)[0] == "int8":
            vnni = int8_choice(card, *has, gated=requested == "auto")[0]
            kwargs["int8_model"] = artifact.load_int8(model_dir, vnni=bool(vnni))
        return cls(model, card, device, has_int8=has[0], has_int8_vnni=has[1], **kwargs)

    def decode(self, source) -> Image.Image | torch.Tensor:
        """An RGB image, or the uint8 tensor of an encoded one (imgcls.images.decode)."""
        if isinstance(source, Image.Image):
            return source
        if isinstance(source, np.ndarray):
            return image_from_array(source, self.max_pixels)
        return decode(bytes(source), max_pixels=self.max_pixels, draft_size=self.preset.decode_size)

    def preprocess(self, sources, first: int = 0, total: int | None = None) -> torch.Tensor:
        """uint8 NCHW batch of eval crops; an error names the image's position in the request, of
        which `sources` may be the chunk from index `first` on, of `total` images."""
        total = len(sources) if total is None else total
        crops = []
        for i, source in enumerate(sources, start=first):
            try:
                crops.append(self.preset(self.decode(source)))
            except ClassifierError as exc:
                if total > 1:
                    exc.args = (f"Image {i} of {total}: {exc}",)
                raise
        return torch.stack(crops)

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> np.ndarray:
        x = self.preset.normalize(batch.to(self.device, non_blocking=True), channels_last=self.channels_last)
        return torch.softmax(self.runner(x), dim=1).cpu().numpy()

    def predict(self, sources) -> np.ndarray:
        """Probabilities, float32 (len(sources), num_classes)."""
        out = [self.forward(self.preprocess(sources[start:start + self.chunk_size], start, len(sources)))
               for start in range(0, len(sources), self.chunk_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.class_names)), np.float32)

    def warm_up(self, rounds: int = 2) -> None:
        """Run the whole path once or twice so the first real request does not pay for lazy setup."""
        side = self.preset.resize_size
        image = Image.new("RGB", (side + side // 3, side), (128, 128, 128))
        for _ in range(rounds):
            self.predict([image])
