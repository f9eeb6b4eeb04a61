"""SageMaker Debugger (smdebug), when the job asks for it and only then.

A missing debugger config (local runs, tuning children) or a missing/broken smdebug turns
the hook off with one log line; training never depends on it.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("train")


def _hook_class(smd):
    import torch

    class Hook(smd.Hook):
        """smdebug's hook, able to save bf16 tensors (autocast activations), which numpy cannot hold."""

        @staticmethod
        def _make_numpy_array(tensor_value):
            if isinstance(tensor_value, torch.Tensor) and tensor_value.dtype == torch.bfloat16:
                tensor_value = tensor_value.float()
            return smd.Hook._make_numpy_array(tensor_value)

    return Hook


class Debugger:
    """Thin wrapper: every method is a no-op when there is no hook."""

    def __init__(self, hook=None, modes=None):
        self.hook, self.modes = hook, modes

    @classmethod
    def create(cls, config: Path | None, model, criterion, enabled: bool = True) -> Debugger:
        if not enabled:
            return cls()
        if config is None:
            log.info("debugger: no debughookconfig.json in the job, training without SageMaker Debugger")
            return cls()
        try:
            import smdebug.pytorch as smd
        except Exception as exc:  # ImportError, or smdebug's own import-time failures
            log.warning("debugger: smdebug cannot be imported (%s), training without SageMaker Debugger", exc)
            return cls()
        hook = _hook_class(smd).create_from_json_file(str(config))
        hook.register_module(model)
        hook.register_loss(criterion)
        log.info("debugger: smdebug hook writing to %s", hook.out_dir)
        return cls(hook, smd.modes)

    @property
    def active(self) -> bool:
        return self.hook is not None

    def train_mode(self) -> None:
        if self.hook:
            self.hook.set_mode(self.modes.TRAIN)

    def eval_mode(self) -> None:
        if self.hook:
            self.hook.set_mode(self.modes.EVAL)

    def save_scalars(self, values: dict[str, float]) -> None:
        """Epoch-level scalars (saved whatever the save interval)."""
        if self.hook:
            for name, value in values.items():
                self.hook.save_scalar(name, float(value), sm_metric=True)

    def close(self) -> None:
        if self.hook:
            self.hook.close()
