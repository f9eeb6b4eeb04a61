"""Metric lines in the log, and the regexes that SageMaker (and our local tuner) read them with.

Each metric is defined once here, as (metric name, key in the log line); the formatter writes
`key=value` pairs and the definitions match exactly those keys, so they cannot drift apart.
`python -m train.metrics` prints the definitions as JSON for launch.py, the Estimator and the tuner.
"""

from __future__ import annotations

import json
import re

# Any float Python or the JVM would print: 1, -0.5, .5, 3., 1e-05, 2.5E+3, nan, inf.
FLOAT = r"([-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[-+]?(?:nan|inf))"

EPOCH_METRICS = [
    ("train:epoch", "epoch"),
    ("train:loss", "train_loss"),
    ("train:accuracy", "train_acc"),
    ("train:top_k_accuracy", "train_topk_acc"),
    ("valid:loss", "valid_loss"),
    ("valid:accuracy", "valid_acc"),
    ("valid:top_k_accuracy", "valid_topk_acc"),
    ("train:learning_rate", "lr"),
    ("train:images_per_second", "images_per_sec"),
    ("train:data_wait_fraction", "data_wait"),
]
TEST_METRICS = [
    ("test:loss", "test_loss"),
    ("test:accuracy", "test_acc"),
    ("test:top_k_accuracy", "test_topk_acc"),
]


MARKER = "[metrics]"


def metric_definitions() -> list[dict[str, str]]:
    # Anchored to the marker: other log lines (the hyperparameters, the toolkit's) also hold key=value pairs.
    return [{"Name": name, "Regex": rf"\[metrics\].*?\b{key}={FLOAT}"} for name, key in EPOCH_METRICS + TEST_METRICS]


def _fmt(value: float) -> str:
    return str(value) if isinstance(value, int) else format(value, ".6g")


def _line(pairs: list[tuple[str, str]], values: dict[str, float], prefix: str) -> str:
    missing = [key for _, key in pairs if key not in values]
    if missing:
        raise KeyError(f"metric line lacks {missing}")
    return prefix + " ".join(f"{key}={_fmt(values[key])}" for _, key in pairs)


def epoch_line(values: dict[str, float], epochs: int) -> str:
    """One line per epoch; `values` has every key of EPOCH_METRICS (epoch counted from 1)."""
    text = _line(EPOCH_METRICS, values, "")
    return f"{MARKER} {text} epochs={epochs}"


def test_line(values: dict[str, float]) -> str:
    return _line(TEST_METRICS, values, MARKER + " ")


def parse_log(text: str, definitions: list[dict[str, str]] | None = None) -> dict[str, list[float]]:
    """Every value each definition matches in `text`, in order, as SageMaker would read them."""
    found: dict[str, list[float]] = {}
    for d in definitions or metric_definitions():
        pattern = re.compile(d["Regex"])
        values = [float(m.group(1)) for m in pattern.finditer(text)]
        if values:
            found[d["Name"]] = values
    return found


if __name__ == "__main__":
    print(json.dumps(metric_definitions(), indent=2))
