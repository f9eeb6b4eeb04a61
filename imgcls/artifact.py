"""The model artifact: what training writes to the model dir and serving reads back.

    model.json   metadata (format version, architecture, classes, eval preprocessing, metrics,
                 hyperparameters, library versions); docs/artifact.md describes every field
    model.pt     the state dict, fp32, loadable with torch.load(weights_only=True)
    model_int8.pt  optional: the same model quantized to int8 (imgcls.quantize), TorchScript
    model_int8_vnni.pt  optional, beside model_int8.pt: the same with 8-bit activations, for CPUs
                 with VNNI (imgcls.quantize.quantize_variants)

Nothing else is needed to rebuild the model and its preprocessing; model_int8.pt is a faster
form of model.pt for CPU servers.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import nn

from . import __version__, quantize
from .errors import ArtifactError, ClassifierError
from .models import create_model
from .presets import ClassificationPresetEval

FORMAT_VERSION = 1
METADATA_FILE = "model.json"
WEIGHTS_FILE = "model.pt"
INT8_FILE = "model_int8.pt"
INT8_VNNI_FILE = "model_int8_vnni.pt"
INT8_ENGINE_ENTRY = "quantized_engine"   # an extra file inside an int8 file's TorchScript archive


@dataclass
class ModelCard:
    arch: str
    class_names: list[str]
    preprocess: dict
    metrics: dict = field(default_factory=dict)
    hyperparameters: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def eval_preset(self) -> ClassificationPresetEval:
        return ClassificationPresetEval.from_dict(self.preprocess)


def library_versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "imgcls": __version__}


class AtomicFile:
    """A file written through a temporary one in the same folder, then renamed: readers never see
    half a file. The temporary file is made at once, so a folder that cannot take it fails there;
    write() may come later, from another thread (train.checkpoint.Writer)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self._prefix(self.path))

    @staticmethod
    def _prefix(path: Path) -> str:
        return f".{path.name}."

    @classmethod
    def leftovers(cls, path: Path) -> list[Path]:
        """The temporary files that writes of `path` cut short by a kill left in its folder."""
        path = Path(path)
        return sorted(p for p in path.parent.glob(f"{cls._prefix(path)}*") if p.is_file())

    def write(self, write) -> None:
        try:
            with os.fdopen(self._fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(self._tmp, 0o644)  # mkstemp makes 0600; a server running as another user must read it
            os.replace(self._tmp, self.path)
        except BaseException:
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)
            raise


def atomic_write_bytes(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename (AtomicFile)."""
    AtomicFile(path).write(write)


def save(model_dir: Path, model: nn.Module, card: ModelCard) -> None:
    model_dir = Path(model_dir)
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    atomic_write_bytes(model_dir / WEIGHTS_FILE, lambda fh: torch.save(state, fh))
    # The int8 model is derived from these weights: one left by an earlier save would not match.
    for name in (INT8_FILE, INT8_VNNI_FILE):
        (model_dir / name).unlink(missing_ok=True)
    meta = dict(card.__dict__)
    meta["num_classes"] = card.num_classes
    text = json.dumps(meta, indent=2, sort_keys=True).encode()
    atomic_write_bytes(model_dir / METADATA_FILE, lambda fh: fh.write(text))


def read_card(model_dir: Path) -> ModelCard:
    path = Path(model_dir) / METADATA_FILE
    if not path.is_file():
        raise ArtifactError(f"No {METADATA_FILE} in {model_dir}: point the server at the contents of a "
                            "training job's model.tar.gz (model.json and model.pt).")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}): the artifact is damaged; "
                            "use the model.tar.gz the training job wrote.") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path} has format_version {version!r}, this code reads {FORMAT_VERSION}: "
                            "serve it with the image version that trained it.")
    try:
        card = ModelCard(arch=meta["arch"], class_names=list(meta["class_names"]),
                         preprocess=dict(meta["preprocess"]), metrics=meta.get("metrics", {}),
                         hyperparameters=meta.get("hyperparameters", {}), versions=meta.get("versions", {}))
        card.eval_preset()
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{path} lacks a required field or has a wrong one ({exc!r}): "
                            "the artifact is damaged; use the model.tar.gz the training job wrote.") from None
    return card


def load(model_dir: Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    """Rebuild the trained model (eval mode) and its card from a model dir."""
    card = read_card(model_dir)
    weights = Path(model_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise ArtifactError(f"No {WEIGHTS_FILE} in {model_dir}: the artifact is incomplete; "
                            "use the model.tar.gz the training job wrote.")
    try:
        state = torch.load(weights, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged zip/pickle
        raise ArtifactError(f"{weights} cannot be read ({type(exc).__name__}: {exc}): the file is damaged; "
                            "use the model.tar.gz the training job wrote.") from None
    try:
        model = create_model(card.arch, card.num_classes)
        # Strict: an artifact's own weights fit exactly. A head of another size must not be
        # swapped for a random one (create_model's pretrained path does that on purpose).
        model.load_state_dict(state, strict=True)
    except (ClassifierError, RuntimeError) as exc:
        detail = str(exc).strip().splitlines()
        raise ArtifactError(f"{weights} does not match {METADATA_FILE} ({card.arch}, {card.num_classes} classes): "
                            f"{' '.join(detail[:3])[:400]}. Keep the two files of one training job together.") from None
    return model.eval(), card


def int8_file(vnni: bool) -> str:
    """The file of an int8 model that needs VNNI (imgcls.quantize.needs_vnni) or not."""
    return INT8_VNNI_FILE if vnni else INT8_FILE


def int8_name(vnni: bool) -> str:
    """Its name in model.json's metrics: `<name>_top1_agreement` holds its agreement with fp32."""
    return "int8_vnni" if vnni else "int8"


def save_int8(model_dir: Path, graph: torch.jit.ScriptModule) -> None:
    """The int8 model, in int8_file(needs_vnni), with the quantized engine it runs on
    (imgcls.quantize.engine_of) beside it in the archive."""
    extra = {INT8_ENGINE_ENTRY: quantize.engine_of(graph)}
    path = Path(model_dir) / int8_file(quantize.needs_vnni(graph))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation; see imgcls.quantize
        atomic_write_bytes(path, lambda fh: torch.jit.save(graph, fh, _extra_files=extra))


def int8_engine(path: Path) -> str:
    """The engine an int8 file of save_int8 runs on: quantize.ENGINE where it records none (older
    artifacts). Read before the model, because loading packs its weights for the engine set then."""
    with zipfile.ZipFile(path) as archive:
        entry = next((n for n in archive.namelist() if n.endswith(f"/extra/{INT8_ENGINE_ENTRY}")), None)
        return archive.read(entry).decode() if entry else quantize.ENGINE


def load_int8(model_dir: Path, vnni: bool = False) -> torch.jit.ScriptModule | None:
    """The int8 model (with vnni, the one with 8-bit activations), or None when the artifact has
    none (trained without it, on a CPU without VNNI, or before it existed)."""
    path = Path(model_dir) / int8_file(vnni)
    if not path.is_file():
        return None
    try:
        engine = int8_engine(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise _damaged_int8(path, exc) from None
    if not quantize.available(engine):
        raise ArtifactError(f"{path} runs on torch's {engine!r} quantized engine, which this torch lacks (it has "
                            f"{', '.join(torch.backends.quantized.supported_engines)}): serve with "
                            "IMGCLS_PRECISION=bf16 or fp32, or on an x86 CPU.")
    try:
        quantize.use_engine(engine)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation; see imgcls.quantize
            graph = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:  # TorchScript raises RuntimeError and others for a damaged archive
        raise _damaged_int8(path, exc) from None
    return quantize.mark(graph, engine, vnni)


def _damaged_int8(path: Path, exc: Exception) -> ArtifactError:
    return ArtifactError(f"{path} cannot be read ({type(exc).__name__}: {str(exc).strip()[:200]}): the file is "
                         "damaged; use the model.tar.gz the training job wrote, or delete this file to serve "
                         "model.pt in fp32.")
