import json
import re
import subprocess
import sys

import pytest

from train import metrics


@pytest.mark.parametrize("text,value", [("1", 1.0), ("-0.5", -0.5), (".5", 0.5), ("3.", 3.0), ("1e-05", 1e-05),
                                        ("2.5E+3", 2500.0), ("+7", 7.0), ("nan", float("nan")), ("-inf", float("-inf"))])
def test_regexes_match_any_float_form(text, value):
    found = metrics.parse_log(f"[metrics] epoch=1 valid_loss={text} lr=0.1")
    got = found["valid:loss"][0]
    assert got == value or (got != got and value != value)


def test_keys_do_not_shadow_each_other():
    values = {key: i + 0.25 for i, (_, key) in enumerate(metrics.EPOCH_METRICS)}
    line = metrics.epoch_line(values, epochs=9)
    found = metrics.parse_log(line)
    for name, key in metrics.EPOCH_METRICS:
        assert found[name] == [values[key]], name
    assert not any(n.startswith("test:") for n in found)


def test_only_metric_lines_count():
    found = metrics.parse_log("hyperparameters: lr=0.5 epochs=3\n[metrics] epoch=1 lr=0.25 valid_loss=1\n")
    assert found["train:learning_rate"] == [0.25] and found["train:epoch"] == [1.0]


def test_definitions_are_unique_and_compile():
    defs = metrics.metric_definitions()
    assert len({d["Name"] for d in defs}) == len(defs)
    for d in defs:
        assert re.compile(d["Regex"]).groups == 1


def test_module_prints_definitions_as_json():
    out = subprocess.run([sys.executable, "-m", "train.metrics"], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == metrics.metric_definitions()


def test_line_missing_a_metric_is_refused():
    with pytest.raises(KeyError):
        metrics.test_line({"test_loss": 1.0})
