"""SageMaker Debugger (smdebug), when the job asks for it and only then.

A missing debugger config (local runs, tuning children) or a missing/broken smdebug turns
the hook off with one log line; training never depends on it.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger("train")
SAGEMAKER_BASE = Path("/opt/ml")
# Debugger collections that read the loss, the parameters or their gradients, never a module's
# inputs or outputs: a traced trunk or a fused block runs modules without their hooks.
HOOK_SAFE_COLLECTIONS = frozenset({"losses", "weights", "biases", "gradients"})


def module_collections(names: set[str] | None) -> list[str]:
    """The collections among `names` that read modules' inputs or outputs (relu_input ...)."""
    return sorted((names or set()) - HOOK_SAFE_COLLECTIONS)


def relocate(config: Path, base_dir: Path) -> Path:
    """The config, with its LocalPath moved under base_dir when the job runs outside /opt/ml.

    SageMaker writes LocalPath=/opt/ml/output/tensors; a local run under SAGEMAKER_BASE_DIR (a
    laptop, local_test) keeps its tensors in its own folder rather than in /opt/ml.
    """
    if base_dir == SAGEMAKER_BASE:
        return config
    try:
        spec = json.loads(config.read_text())
    except (OSError, ValueError):
        return config  # smdebug reports a broken file itself
    local = Path(spec.get("LocalPath") or SAGEMAKER_BASE / "output" / "tensors")
    if not local.is_relative_to(SAGEMAKER_BASE):
        return config
    spec["LocalPath"] = str(base_dir / local.relative_to(SAGEMAKER_BASE))
    moved = Path(tempfile.mkdtemp(prefix="debughook-")) / config.name
    moved.write_text(json.dumps(spec))
    return moved


def collections(config: Path | None) -> set[str] | None:
    """The collections a debugger config saves (smdebug's own default, losses, where it names
    none); None without a config. An unreadable config counts as saving everything ("all")."""
    if config is None:
        return None
    try:
        spec = json.loads(config.read_text())
        named = {c["CollectionName"] for c in spec.get("CollectionConfigurations") or []}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {"all"}
    return named or {"losses"}


def _hook_class(smd):
    import torch

    class Hook(smd.Hook):
        """smdebug's hook, able to save bf16 tensors (autocast activations), which numpy cannot hold."""

        @staticmethod
        def _make_numpy_array(tensor_value):
            if isinstance(tensor_value, torch.Tensor):
                # smdebug writes the array's bytes in C order, which numpy gathers element by element
                # from a channels-last tensor: torch converts and reorders in one pass, 4-5x faster.
                dtype = torch.float32 if tensor_value.dtype == torch.bfloat16 else tensor_value.dtype
                tensor_value = tensor_value.detach().to(dtype, memory_format=torch.contiguous_format)
            return smd.Hook._make_numpy_array(tensor_value)

    return Hook


class Debugger:
    """Thin wrapper: every method is a no-op when there is no hook."""

    def __init__(self, hook=None, modes=None, modules=()):
        self.hook, self.modes, self.modules = hook, modes, modules

    @classmethod
    def create(cls, config: Path | None, model, criterion, enabled: bool = True,
               base_dir: Path = SAGEMAKER_BASE) -> Debugger:
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
        path = relocate(config, base_dir)
        try:
            hook = _hook_class(smd).create_from_json_file(str(path))
        finally:
            if path != config:  # smdebug has read the relocated copy; one temp folder per job would pile up
                shutil.rmtree(path.parent, ignore_errors=True)
        hook.register_module(model)
        hook.register_loss(criterion)
        log.info("debugger: smdebug hook writing to %s", hook.out_dir)
        return cls(hook, smd.modes, (model, criterion))

    @property
    def active(self) -> bool:
        return self.hook is not None

    def saves_module_tensors_next(self) -> bool:
        """Whether the hook's next step, in its mode, saves a collection that reads modules' inputs
        or outputs (module_collections): smdebug's own save configs decide, as its forward
        pre-hook will. True before the first step, when smdebug has not yet prepared them."""
        hook = self.hook
        if hook is None:
            return False
        if not hook.prepared_collections:
            return True
        step = hook.mode_steps.get(hook.mode, hook.init_step) + 1
        return any(c.name not in HOOK_SAFE_COLLECTIONS and c.save_config.should_save_step(hook.mode, step)
                   for c in hook._get_all_collections_to_save())

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
        """Flush smdebug and take its hooks off the model and the loss. smdebug keeps no handles
        and never removes them, and after training they broke the job: tracing the model for the
        bf16 check saw its forward hooks save on one call and not the next ("Graphs differed across
        invocations", with save_interval 5), and int8's deep copy of the model copied the hook
        object with it (AttributeError: 'Hook' object has no attribute 'parent_forward_event')."""
        if self.hook:
            self.hook.close()
            for module in self.modules:
                detach_hooks(module, self.hook)
            self.hook = None


def detach_hooks(root, owner) -> None:
    """Remove from every module under root the forward and forward-pre hooks that are methods of
    `owner`, and from every parameter the gradient hooks whose closure holds it."""
    def owned(fn) -> bool:
        if getattr(fn, "__self__", None) is owner:
            return True
        return any(getattr(cell, "cell_contents", None) is owner for cell in getattr(fn, "__closure__", None) or ())

    for module in root.modules():
        for hooks, extras in ((module._forward_hooks, ("_forward_hooks_with_kwargs", "_forward_hooks_always_called")),
                              (module._forward_pre_hooks, ("_forward_pre_hooks_with_kwargs",))):
            for key in [k for k, fn in hooks.items() if owned(fn)]:
                del hooks[key]
                for extra in extras:  # where torch keeps a hook's flags, by the same key
                    getattr(module, extra, {}).pop(key, None)
    for param in root.parameters():
        hooks = param._backward_hooks
        for key in [k for k, fn in (hooks or {}).items() if owned(fn)]:
            del hooks[key]
