"""SageMaker Debugger's built-in tensor rules, run locally over a run's smdebug output.

AWS runs its built-in rules in its own rule containers; their code is not in the smdebug
package. These are the same rules, by name, with the parameters and defaults AWS documents,
written on smdebug's Rule API and run by smdebug's `invoke_rule`, so that a laptop run and a
cloud run get the same verdicts. Where the documented rule is noisy on per-batch values we say
how ours differs:

- LossNotDecreasing compares the mean loss of each window of `num_steps` saved training steps
  with the window before (the documented rule compares two single batches, which fires on
  noise), and fires when it is not lower and either no lower than 90% of the first window
  (stuck) or 10% above the best window so far (rising): a plateau far below the start is a
  converged run, not a stuck one.
- VanishingGradient fires where some layers' gradients vanish while others' do not, up to the
  first step with a NaN or infinite gradient or a batch loss DIVERGED_LOSS times the first saved
  one. A step whose every gradient is zero had a fitted batch (no loss to send back), and from
  such a step the run has diverged (LossNotDecreasing's and ExplodingTensor's finding): neither
  says that a layer cannot learn. A diverging run's output layer can get an exactly zero gradient
  when every logit saturates (seen at a loss of 5e18, bf16 on AMX).
- PoorWeightInitialization looks at the first `steps` training steps: activation-input variance
  across layers (zero in a layer, or max/min above `threshold`), the 5th-95th percentile range of
  all gradients (below `distribution_range`), and a loss that does not move at all.

Each rule leaves a sentence in `finding` when it fires; `evaluate` turns that into a Verdict.
"""

from __future__ import annotations

import re

import numpy as np

from train.profile_rules import Verdict

from . import tensors as T


def _smdebug():
    from smdebug.exceptions import RuleEvaluationConditionMet
    from smdebug.rules import Rule
    from smdebug.rules.rule_invoker import invoke_rule

    return Rule, invoke_rule, RuleEvaluationConditionMet


# A batch loss this many times the first saved one: the run is diverging, not learning slowly.
DIVERGED_LOSS = 1000.0


def _rule_base():
    Rule, _, _ = _smdebug()

    class TensorRule(Rule):
        needs = ""           # what the run must save for the rule to say anything

        def __init__(self, base_trial):
            super().__init__(base_trial, action_str="")
            self.finding = ""

        def available(self) -> bool:
            return True

        def enough(self) -> bool:
            return True

        def train_step(self, step: int) -> int | None:
            return T.train_step(self.base_trial, step)

    return TensorRule


def rule_classes() -> dict[str, type]:
    """Built lazily: smdebug is imported only when a report runs the rules."""
    TensorRule = _rule_base()

    class LossNotDecreasing(TensorRule):
        needs = "the losses collection"

        def __init__(self, base_trial, num_steps=10, diff_percent=0.0):
            super().__init__(base_trial)
            self.num_steps, self.diff_percent = int(num_steps), float(diff_percent)
            self.names = T.loss_names(base_trial)
            self.window: list[float] = []
            self.means: list[float] = []

        def available(self):
            return bool(self.names)

        def enough(self):
            return len(self.means) >= 2

        def quiet(self):
            if not self.enough():
                return (f"not enough saved losses for two windows of {self.num_steps}: save losses more often "
                        "(save-interval) or lower this rule's num_steps")
            return (f"the training loss fell (or held after falling) over {len(self.means)} windows of "
                    f"{self.num_steps} saved steps")

        def invoke_at_step(self, step):
            t = self.train_step(step)
            if t is None or not T.saved(self.base_trial, self.names[0], step):
                return False
            self.window.append(T.stats(self.base_trial, self.names[0], step).mean)
            if len(self.window) < self.num_steps:
                return False
            mean = float(np.mean(self.window))
            self.window = []
            self.means.append(mean)
            if not np.isfinite(mean):
                self.finding = (f"the training loss is not finite (mean {mean}) by step {t}: lower lr "
                                "(try a tenth) or raise warmup-epochs")
                return True
            if len(self.means) < 2 or mean < self.means[-2] * (1 - self.diff_percent / 100):
                return False
            first, best = self.means[0], min(self.means[:-1])
            if mean > 1.1 * best:
                self.finding = (f"the training loss is rising: {mean:.4g} in the {self.num_steps} saved steps up to "
                                f"step {t}, against {best:.4g} earlier; lower lr or raise warmup-epochs")
                return True
            if mean >= 0.9 * first:
                self.finding = (f"the training loss is stuck: the mean of the {self.num_steps} saved steps up to "
                                f"step {t} is {mean:.4g}, against {first:.4g} in the first window; raise lr, "
                                "unfreeze more layers (freeze), or check the labels")
                return True
            return False  # a plateau well below the start: converging, not stuck

    class VanishingGradient(TensorRule):
        needs = "the gradients collection"

        def quiet(self):
            tail = f" (until step {self.diverged_at}, when the run diverged)" if self.diverged_at else ""
            return f"every gradient's mean magnitude stayed above {self.threshold:g}{tail}"

        def __init__(self, base_trial, threshold=1e-7):
            super().__init__(base_trial)
            self.threshold = float(threshold)
            self.names = T.gradient_names(base_trial)
            self.losses = T.loss_names(base_trial)
            self.first_loss: float | None = None
            self.diverged_at: int | None = None

        def available(self):
            return bool(self.names)

        def diverged(self, step) -> bool:
            """A NaN or infinite gradient, or a loss that blew up: from here the weights are wrecked."""
            if self.losses and T.saved(self.base_trial, self.losses[0], step):
                loss = T.stats(self.base_trial, self.losses[0], step).mean
                if self.first_loss is None:
                    self.first_loss = loss
                if not np.isfinite(loss) or loss > DIVERGED_LOSS * max(self.first_loss, 1e-3):
                    return True
            return not all(T.stats(self.base_trial, n, step).finite for n in self.names
                           if T.saved(self.base_trial, n, step))

        def invoke_at_step(self, step):
            t = self.train_step(step)
            if t is None or self.diverged_at is not None:
                return False
            if self.diverged(step):
                # What the gradients do from here is the loss's and ExplodingTensor's finding.
                self.diverged_at = t
                return False
            saved = {n: T.stats(self.base_trial, n, step) for n in self.names if T.saved(self.base_trial, n, step)}
            vanished = [n for n, s in saved.items() if s.mean_abs < self.threshold]
            # Gradients vanish on their way back from the loss. Where none reached even the output
            # layer, the batch's loss gave no gradient at all (every image fitted with certainty):
            # a fitted batch, not a layer that cannot learn.
            if not vanished or len(vanished) == len(saved):
                return False
            layers = ", ".join(n.removeprefix(T.GRADIENT_PREFIX) for n in vanished[:4])
            more = f" and {len(vanished) - 4} more" if len(vanished) > 4 else ""
            self.finding = (f"at step {t} the mean absolute gradient of {layers}{more} is below {self.threshold:g}: "
                            "those layers do not learn; check the initial weights (weights=imagenet), and that "
                            "the loss is not saturated")
            return True

    class ExplodingTensor(TensorRule):
        needs = "the losses or gradients collection"

        def quiet(self):
            return f"no NaN or infinite value in the {len(self.names)} saved loss, gradient and epoch tensors"

        def __init__(self, base_trial, collection_names="losses,gradients", only_nan=False):
            super().__init__(base_trial)
            self.only_nan = str(only_nan).lower() == "true"
            wanted = [c.strip() for c in str(collection_names).split(",") if c.strip()]
            present = base_trial.collections()
            names = {n for c in wanted if c in present for n in base_trial.tensor_names(collection=c)}
            # our epoch scalars (train/valid loss...) too: an evaluation can be the first to see a NaN
            self.names = sorted(names | {n for n in base_trial.tensor_names() if n.startswith("scalar/")})

        def available(self):
            return bool(self.names)

        def invoke_at_step(self, step):
            for name in self.names:
                if not T.saved(self.base_trial, name, step):
                    continue
                v = T.stats(self.base_trial, name, step)
                bad = v.has_nan if self.only_nan else not v.finite
                if bad:
                    t = self.train_step(step)
                    at = f"training step {t}" if t else f"the evaluation after epoch {T.epoch_of(self.base_trial, step)}"
                    self.finding = (f"{name} holds NaN or infinite values at {at}: the run diverged; lower lr "
                                    "(try a tenth), raise warmup-epochs, or use precision=fp32 to rule out overflow")
                    return True
            return False

    class PoorWeightInitialization(TensorRule):
        needs = "the gradients collection (and relu_input for activations)"

        def quiet(self):
            return (f"activations and gradients looked healthy at the first step, and the loss moved in the "
                    f"first {self.steps}")

        def __init__(self, base_trial, activation_inputs_regex=".*relu_input", threshold=10.0,
                     distribution_range=0.001, patience=5, steps=10):
            super().__init__(base_trial)
            self.threshold, self.range = float(threshold), float(distribution_range)
            self.patience, self.steps = int(patience), int(steps)
            pattern = re.compile(activation_inputs_regex)
            names = base_trial.tensor_names()
            self.activations = sorted(n for n in names if pattern.match(n))
            self.gradients = T.gradient_names(base_trial)
            self.losses = T.loss_names(base_trial)
            self.seen_losses: list[float] = []
            self.first: int | None = None

        def available(self):
            return bool(self.gradients or self.activations)

        def invoke_at_step(self, step):
            t = self.train_step(step)
            if t is None or t > self.steps:
                return False
            self.first = self.first or t
            if t == self.first:  # weights as initialized: later steps show the optimizer's doing, too
                return self.initial_state(step, t)
            return self.loss_flat(step)

        def initial_state(self, step, t):
            trial = self.base_trial
            variances = {n: T.stats(trial, n, step).variance for n in self.activations
                         if T.saved(trial, n, step)}
            if variances:
                dead = [n for n, v in variances.items() if v < 1e-12]
                if dead:
                    self.finding = (f"at step {t}, {len(dead)} of {len(variances)} activation inputs have zero "
                                    f"variance ({dead[0]}, ...): the weights start at or near zero; use weights=imagenet "
                                    "or the architecture's default initialization")
                    return True
                ratio = max(variances.values()) / min(variances.values())
                if ratio > self.threshold:
                    self.finding = (f"at step {t} activation-input variance differs {ratio:.0f}x across layers "
                                    f"(threshold {self.threshold:g}): the initialization does not keep activations "
                                    "at one scale")
                    return True
            grads = [T.value(trial, n, step).ravel() for n in self.gradients if T.saved(trial, n, step)]
            if grads:
                values = np.concatenate(grads)
                # a strided sample of a million values gives the percentiles to well within the threshold
                low, high = np.percentile(values[::max(1, values.size // 1_000_000)], [5, 95])
                if high - low < self.range:
                    self.finding = (f"at step {t} 90% of all gradient values lie within {high - low:.2g} "
                                    f"(below {self.range:g}): the network barely receives a signal; the "
                                    "initial weights are too small or zero")
                    return True
            return self.loss_flat(step)

        def loss_flat(self, step):
            trial = self.base_trial
            if self.losses and T.saved(trial, self.losses[0], step):
                self.seen_losses.append(T.stats(trial, self.losses[0], step).mean)
                first = self.seen_losses[0]
                if len(self.seen_losses) > self.patience and np.ptp(self.seen_losses) <= 1e-4 * max(abs(first), 1e-8):
                    self.finding = (f"the loss has not moved in the first {len(self.seen_losses)} steps ({first:.4g}): "
                                    "the initial weights give the network no signal")
                    return True
            return False

    return {c.__name__: c for c in (LossNotDecreasing, VanishingGradient, ExplodingTensor, PoorWeightInitialization)}


RULES = ("LossNotDecreasing", "VanishingGradient", "ExplodingTensor", "PoorWeightInitialization")


def evaluate(trial, params: dict[str, dict[str, str]] | None = None) -> list[Verdict]:
    """Each rule over every saved step; the first step where it held is the verdict's step."""
    params = params or {}
    classes = rule_classes()
    if trial is None:
        return [Verdict(name, False, "no debugger tensors in this run: train with a DebuggerHookConfig "
                                     "(launch.py train does this by default)", evaluated=False) for name in RULES]
    _, invoke_rule, condition_met = _smdebug()
    steps = trial.steps()
    verdicts = []
    for name in RULES:
        rule = classes[name](trial, **params.get(name, {}))
        if not rule.available() or not steps:
            verdicts.append(Verdict(name, False, f"not evaluated: the run saved no tensors from {rule.needs}",
                                    evaluated=False))
            continue
        try:
            invoke_rule(rule, start_step=steps[0], end_step=steps[-1] + 1, raise_eval_cond=True)
        except condition_met as met:
            step = T.train_step(trial, met.step)
            verdicts.append(Verdict(name, True, rule.finding, step=step,
                                    epoch=None if step else T.epoch_of(trial, met.step)))
            continue
        verdicts.append(Verdict(name, False, rule.quiet(), evaluated=rule.enough()))
    return verdicts

