"""Where the starting weights come from: ImageNet (local cache), the 'pretrained' channel, or none."""

from __future__ import annotations

import logging
import tarfile
import tempfile
from pathlib import Path

import torch

from imgcls.artifact import METADATA_FILE, WEIGHTS_FILE
from imgcls.errors import WeightsError
from imgcls.models import extract_state_dict

log = logging.getLogger("train")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def _find_file(directory: Path) -> Path:
    if (directory / METADATA_FILE).is_file() and (directory / WEIGHTS_FILE).is_file():
        return directory / WEIGHTS_FILE  # one of our own artifacts
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES)
    if len(files) == 1:
        return files[0]
    tarballs = sorted(directory.rglob("*.tar.gz"))
    if not files and len(tarballs) == 1:
        extracted = Path(tempfile.mkdtemp(prefix="pretrained-"))
        try:
            with tarfile.open(tarballs[0]) as tar:
                tar.extractall(extracted, filter="data")
        # Not a tar.gz (TarError), or one cut short in the copy (gzip's EOFError); OSError for the
        # rest of what gzip raises, a full disk included, which the message then names.
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise WeightsError(f"{tarballs[0]} in the 'pretrained' channel is not a readable tar.gz archive "
                               f"({type(exc).__name__}: {exc}): pass the model.tar.gz a training job wrote, or "
                               "a state dict file.") from None
        return _find_file(extracted)
    if not files:
        raise WeightsError(f"The 'pretrained' channel ({directory}) holds no weights file: put one state dict or "
                           f"checkpoint ({', '.join(WEIGHT_SUFFIXES)}) or a model.tar.gz from an earlier job in it.")
    raise WeightsError(f"The 'pretrained' channel ({directory}) holds {len(files)} weights files "
                       f"({', '.join(p.name for p in files[:5])}): leave exactly one in it.")


def load_pretrained_channel(directory: Path) -> tuple[dict, str]:
    path = _find_file(directory)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        # A full training checkpoint carries optimizer and RNG objects; it is the user's own file.
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise WeightsError(f"{path} in the 'pretrained' channel cannot be loaded by torch.load "
                               f"({type(exc).__name__}: {exc}): save weights with torch.save(model.state_dict(), "
                               "path).") from None
    return extract_state_dict(obj), str(path)


def resolve(choice: str, pretrained_dir: Path | None) -> tuple[str | None, dict | None, str]:
    """(create_model weights argument, state dict, description) for the `weights` hyperparameter."""
    if choice == "auto":
        choice = "pretrained" if pretrained_dir else "imagenet"
    if choice == "pretrained":
        if pretrained_dir is None:
            raise WeightsError("weights=pretrained needs a 'pretrained' channel: add "
                               "inputs={'pretrained': 's3://.../weights.pt'} to fit(), or set weights=imagenet.")
        state, path = load_pretrained_channel(pretrained_dir)
        return "state_dict", state, f"the 'pretrained' channel ({path})"
    if pretrained_dir is not None:
        log.warning("weights=%s: the 'pretrained' channel is ignored", choice)
    if choice == "imagenet":
        return "imagenet", None, "torchvision's ImageNet weights"
    return None, None, "random initialisation (weights=none)"
