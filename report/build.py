"""One self-contained HTML report of a training run: what went wrong, what to change, and the charts.

    write(folder, out)  ->  (out, verdicts)

Rules: smdebug's built-in tensor rules (tensor_rules), the epoch and class rules (epoch_rules), and
the profiling rules (train.profile_rules). `params` overrides a rule's parameters by rule name,
as SageMaker's rule_parameters do.
"""

from __future__ import annotations

import html
import inspect
import math
import time
from pathlib import Path

from train import profile_rules
from train.profile_rules import Verdict

from . import charts, epoch_rules, rundir, tensor_rules
from . import tensors as T

EPOCH_RULES = {"Overfit": epoch_rules.overfit, "Overtraining": epoch_rules.overtraining,
               "ClassImbalance": epoch_rules.class_imbalance}


def rule_parameters() -> dict[str, list[str]]:
    """Each rule that takes parameters, and their names."""
    signatures = {name: inspect.signature(cls.__init__) for name, cls in tensor_rules.rule_classes().items()}
    signatures.update({name: inspect.signature(fn) for name, fn in EPOCH_RULES.items()})
    skip = {"self", "base_trial", "history", "train_counts", "per_class_accuracy"}
    return {name: [p for p in sig.parameters if p not in skip] for name, sig in signatures.items()}


def check_params(params: dict[str, dict[str, str]]) -> None:
    known = rule_parameters()
    for rule, values in params.items():
        if rule not in known:
            raise rundir.ReportError(f"no rule named {rule}; rules with parameters: {', '.join(sorted(known))}")
        for name in values:
            if name not in known[rule]:
                raise rundir.ReportError(f"{rule} has no parameter {name!r}; it takes {', '.join(known[rule])}")


def evaluate(run: rundir.Run, trial, params: dict[str, dict[str, str]]) -> list[Verdict]:
    check_params(params)
    try:
        verdicts = tensor_rules.evaluate(trial, params)
        verdicts += [epoch_rules.overfit(run.history, **params.get("Overfit", {})),
                     epoch_rules.overtraining(run.history, **params.get("Overtraining", {})),
                     epoch_rules.class_imbalance(run.train_counts, run.per_class_accuracy,
                                                 **params.get("ClassImbalance", {}))]
    except ValueError as exc:  # a parameter value that is not a number
        raise rundir.ReportError(f"a rule parameter is not a number ({exc}): see --rule-param") from None
    return verdicts + profile_rules.evaluate(run.profile)


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}">\n<h2>{_esc(title)}</h2>\n{body}\n</section>\n'


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{_esc(alt)}">'


def _missing(text: str) -> str:
    return f'<p class="missing">{_esc(text)}</p>'


def _table(header: list[str], rows: list[list[str]], raw: bool = False) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if raw else _esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _status(v: Verdict) -> str:
    if not v.evaluated:
        return '<span class="skip">no data</span>'
    return '<span class="fired">FIRED</span>' if v.fired else '<span class="ok">ok</span>'


def render(run: rundir.Run, verdicts: list[Verdict], trial) -> str:
    by_rule = {v.rule: v for v in verdicts}
    fired = [v for v in verdicts if v.fired]
    parts = []

    # summary: the verdicts a person acts on first
    final = run.final
    facts = [["run", run.name], ["architecture", run.hyperparameters.get("arch", "?")],
             ["epochs trained", str(len(run.history))], ["best epoch", str(run.best_epoch)]]
    for key in ("best_valid_loss", "best_valid_acc", "test_acc", "test_topk_acc"):
        if key in final:
            facts.append([key.replace("_", " "), _fmt(final[key])])
    body = ""
    if run.failure:
        body += f'<div class="failure"><b>The job failed:</b><pre>{_esc(run.failure[:4000])}</pre></div>'
    body += _table(["", ""], facts)
    if fired:
        body += "<h3>What to change</h3><ol>" + "".join(
            f"<li><b>{_esc(v.rule)}</b> ({_esc(v.where) or 'whole run'}): {_esc(v.message)}</li>" for v in fired) + "</ol>"
    else:
        body += '<p class="ok">No rule fired.</p>'
    if run.hyperparameters:
        body += "<details><summary>hyperparameters</summary>" + _table(
            ["name", "value"], [[k, v] for k, v in sorted(run.hyperparameters.items())]) + "</details>"
    parts.append(_section("summary", "Summary", body))

    rows = [[_esc(v.rule), _status(v), _esc(v.where), _esc(v.message)] for v in verdicts]
    parts.append(_section("rules", "Rules", _table(["rule", "verdict", "where", "finding"], rows, raw=True)))

    if run.history:
        body = _img(charts.learning_curves(run.history), "loss and accuracy per epoch")
        body += _table(["epoch", "train loss", "valid loss", "train acc", "valid acc", "lr", "images/s"],
                       [[str(h["epoch"]), _fmt(h["train_loss"]), _fmt(h["valid_loss"]), _fmt(h["train_acc"]),
                         _fmt(h["valid_acc"]), _fmt(h["lr"]), _fmt(h.get("images_per_sec", ""))]
                        for h in run.history])
    else:
        body = _missing("no epochs recorded in metrics.json")
    parts.append(_section("curves", "Loss and accuracy per epoch", body))

    steps = profile_rules.read_csv(run.profile / "steps.csv")
    steps_per_epoch = sum(1 for r in steps if r["epoch"] == steps[0]["epoch"]) if steps else None
    series = T.batch_losses(trial) if trial is not None else []
    body = (_img(charts.batch_loss(series, steps_per_epoch), "loss per batch") if series
            else _missing("no batch losses saved: train with the debugger's losses collection"))
    parts.append(_section("batch-loss", "Batch loss", body))

    body = (_img(charts.learning_rate(run.history), "learning rate per epoch") if run.history
            else _missing("no epochs recorded"))
    parts.append(_section("learning-rate", "Learning rate", body))

    groups = T.gradient_norms(trial) if trial is not None else {}
    body = (_img(charts.gradient_norms(groups), "gradient norms per layer group") if groups
            else _missing("no gradients saved: train with the debugger's gradients collection"))
    parts.append(_section("gradients", "Gradient norms per layer group", body))

    system = profile_rules.read_csv(run.profile / "system.csv")
    body = (_img(charts.utilization(system), "CPU, GPU and memory over time") if system
            else _missing("no system samples: profile-interval-ms was 0"))
    parts.append(_section("utilization", "Utilization timeline", body))

    wait = by_rule.get("DataLoaderWait")
    body = f'<p class="{"fired" if wait and wait.fired else "ok"}">{_esc(wait.message if wait else "")}</p>'
    body += (_img(charts.data_wait(steps), "data wait against compute per epoch") if steps
             else _missing("no step timings recorded"))
    parts.append(_section("data-wait", "Data loading", body))

    if run.confusion:
        names, matrix = run.confusion
        body = _img(charts.confusion(names, matrix, run.confusion_channel), "confusion matrix")
        if len(names) <= 15:
            body += _table(["true \\ predicted"] + names, [[n] + [str(v) for v in row]
                                                           for n, row in zip(names, matrix, strict=True)])
    else:
        body = _missing("no confusion_matrix.csv in the output data")
    parts.append(_section("confusion", "Confusion matrix", body))

    if run.per_class_accuracy:
        body = _img(charts.per_class_accuracy(run.per_class_accuracy, run.train_counts), "per-class accuracy")
        body += _table(["class", "accuracy", "train images"],
                       [[c, _fmt(a), str(run.train_counts.get(c, 0))]
                        for c, a in sorted(run.per_class_accuracy.items(), key=lambda kv: kv[1])])
    else:
        body = _missing("no per-class accuracy in metrics.json")
    parts.append(_section("per-class", "Per-class accuracy against training count", body))

    body = (_img(charts.class_distribution(run.class_counts), "images per class and channel") if run.class_counts
            else _missing("no class_counts.json in the output data"))
    parts.append(_section("classes", "Class distribution per channel", body))

    title = f"Training report: {run.name}"
    nav = " · ".join(f'<a href="#{a}">{_esc(t)}</a>' for a, t in (
        ("summary", "summary"), ("rules", "rules"), ("curves", "curves"), ("batch-loss", "batch loss"),
        ("gradients", "gradients"), ("utilization", "utilization"), ("data-wait", "data loading"),
        ("confusion", "confusion"), ("per-class", "per class"), ("classes", "classes")))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title>
<link rel="icon" href="data:,">
<style>
body {{ font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 1em 2em; color: #222; }}
h1 {{ font-size: 1.5em; }} h2 {{ border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.6em; }}
table {{ border-collapse: collapse; margin: .6em 0; font-size: .9em; }}
td, th {{ border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }}
img {{ max-width: 100%; }}
.fired {{ color: #b00020; font-weight: bold; }} .ok {{ color: #1b7f3b; }} .skip {{ color: #888; }}
.missing {{ color: #888; font-style: italic; }}
.failure {{ background: #fdecea; border: 1px solid #f5c2c0; padding: .5em 1em; }}
nav {{ font-size: .9em; }}
</style>
</head>
<body>
<h1>{_esc(title)}</h1>
<p>Written {_esc(time.strftime("%Y-%m-%d %H:%M"))} from {_esc(run.output_data)}{
    f" and the debugger tensors in {_esc(run.tensors)}" if run.tensors else " (no debugger tensors)"}.</p>
<nav>{nav}</nav>
{"".join(parts)}
</body>
</html>
"""


def write(folder: Path, out: Path | None = None, tensors: Path | None = None,
          params: dict[str, dict[str, str]] | None = None, name: str | None = None) -> tuple[Path, list[Verdict]]:
    run = rundir.load(Path(folder), tensors, name)
    trial = T.open_trial(run.tensors) if run.tensors else None
    verdicts = evaluate(run, trial, params or {})
    out = Path(out) if out else Path(folder) / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(run, verdicts, trial), encoding="utf-8")
    return out, verdicts
