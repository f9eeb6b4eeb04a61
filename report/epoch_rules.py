"""Built-in rules that look at epochs and classes rather than tensors: Overfit, Overtraining, ClassImbalance.

They read the run's history (metrics.json; the same values the hook saves as epoch scalars), so
they also work on runs trained without the debugger. Parameters and defaults are AWS's; patience
counts evaluations, which this trainer runs once per epoch.
"""

from __future__ import annotations

import math

from train.profile_rules import Verdict


def overfit(history: list[dict], start_step: int = 0, patience: int = 1, ratio_threshold: float = 0.1) -> Verdict:
    """(valid - train) / train loss above ratio_threshold for `patience` epochs in a row, in epochs where
    the valid loss is no better than earlier: a gap that opens while validation stops improving. (The
    gap alone also opens in a from-scratch run's first epochs, while BatchNorm statistics settle.)"""
    patience, ratio_threshold = int(patience), float(ratio_threshold)
    run, best_valid = 0, math.inf
    for h in history[int(start_step):]:
        train, valid = h["train_loss"], h["valid_loss"]
        if not (math.isfinite(train) and math.isfinite(valid)) or train <= 0:
            run = 0
            continue
        ratio = (valid - train) / train
        run = run + 1 if ratio > ratio_threshold and valid >= best_valid else 0
        best_valid = min(best_valid, valid)
        if run >= patience:
            return Verdict("Overfit", True,
                           f"valid loss {valid:.4g} is {ratio:.0%} above train loss {train:.4g} at epoch {h['epoch']} "
                           "and no longer improving: the model fits its training images better than new ones; use "
                           "augment=strong, more weight-decay or label-smoothing, freeze more layers, or add data",
                           epoch=h["epoch"])
    if not history:
        return Verdict("Overfit", False, "no epochs recorded", evaluated=False)
    return Verdict("Overfit", False, f"valid loss improved, or stayed within {ratio_threshold:.0%} of train loss, "
                                     "in every epoch")


def overtraining(history: list[dict], patience_train: int = 5, patience_validation: int = 10,
                 delta: float = 0.1) -> Verdict:
    """Training went on while the train or valid loss had stopped improving by `delta`."""
    patience = {"train": int(patience_train), "valid": int(patience_validation)}
    delta = float(delta)
    best = {"train": math.inf, "valid": math.inf}
    best_epoch = {"train": 0, "valid": 0}
    for h in history:
        for split in ("valid", "train"):
            loss = h[f"{split}_loss"]
            if math.isfinite(loss) and loss < best[split] - delta:
                best[split], best_epoch[split] = loss, h["epoch"]
            if best_epoch[split] and h["epoch"] - best_epoch[split] >= patience[split]:
                return Verdict("Overtraining", True,
                               f"{split} loss has not improved by {delta:g} for {patience[split]} epochs "
                               f"(best {best[split]:.4g} at epoch {best_epoch[split]}): the epochs after that were "
                               f"wasted; set epochs={best_epoch[split]} or patience={min(3, patience[split])} "
                               "(early stopping)", epoch=h["epoch"])
    if not history:
        return Verdict("Overtraining", False, "no epochs recorded", evaluated=False)
    return Verdict("Overtraining", False, f"train and valid loss kept improving (by {delta:g} within "
                                          f"{patience['train']} and {patience['valid']} epochs)")


def class_imbalance(train_counts: dict[str, int], per_class_accuracy: dict[str, float],
                    threshold_imbalance: float = 10, threshold_misprediction: float = 0.7) -> Verdict:
    """Largest/smallest class in the train channel, and classes the model mostly gets wrong."""
    threshold_imbalance, threshold_misprediction = float(threshold_imbalance), float(threshold_misprediction)
    counts = {c: n for c, n in train_counts.items() if n > 0}
    if not counts:
        return Verdict("ClassImbalance", False, "no class counts recorded", evaluated=False)
    big, small = max(counts, key=counts.get), min(counts, key=counts.get)
    ratio = counts[big] / counts[small]
    if ratio > threshold_imbalance:
        return Verdict("ClassImbalance", True,
                       f"the train channel has {counts[big]} '{big}' images but {counts[small]} '{small}' "
                       f"({ratio:.0f}x): collect more of the small classes or oversample them")
    wrong = sorted((c for c, a in per_class_accuracy.items() if math.isfinite(a) and 1 - a > threshold_misprediction),
                   key=lambda c: per_class_accuracy[c])
    if wrong:
        names = ", ".join(f"'{c}' ({per_class_accuracy[c]:.0%} right, {train_counts.get(c, 0)} train images)"
                          for c in wrong[:5])
        return Verdict("ClassImbalance", True,
                       f"{len(wrong)} classes are mostly mispredicted: {names}; look at their images and counts")
    return Verdict("ClassImbalance", False, f"classes within {ratio:.1f}x of each other in size, none mispredicted "
                                            f"more than {threshold_misprediction:.0%} of the time")
