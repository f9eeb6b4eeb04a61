"""The model server's JVM flags, side by side: the JVM's CPU per request, and the latency and
throughput it leaves the model, over the server's first requests.

Two `serve` processes on the same artifact, one with serve's default SAGEMAKER_MODEL_SERVER_VMARGS
and one with another set (default: the same without -XX:TieredStopAtLevel=1, i.e. the JVM's own
tiered C1+C2 compilation), take turns: each round sends 40 requests at concurrency 4 and 20 at
concurrency 1 to each, the two going first in turn, and the second half's rounds are compared
pair by pair as well as by their medians. On a small instance the JVM shares the cores with the
model workers, so every millisecond of CPU it spends per request (its JIT compiler threads
included) is taken from the model. Writes bench/results/jvm_flags.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench import machine, stats
from bench.images import photo_like_jpegs
from bench.serve_latency import KeepAliveClient, add_int8_and_agreement, cpu_seconds, make_artifact, run_load
from serve.process import ServeProcess
from serve.server import DEFAULT_VMARGS

C1_ONLY = "-XX:TieredStopAtLevel=1"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run that keeps the benchmark working")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--rounds", type=int, help="rounds of 40 + 20 requests per server (default 20)")
    p.add_argument("--other", default=" ".join(f for f in DEFAULT_VMARGS.split() if f != C1_ONLY),
                   help="the JVM flags to compare with serve's default (default: serve's without "
                        "-XX:TieredStopAtLevel=1, so the JVM's own C1+C2 JIT)")
    p.add_argument("--other-first", action="store_true",
                   help="start the other server first (the default starts first): with the same flags on "
                        "both, the server started second answered up to 0.5 ms faster at c1 in some runs, "
                        "so a small difference wants a run each way")
    p.add_argument("--out", type=Path, default=Path("bench/results/jvm_flags.json"))
    args = p.parse_args()
    crop, rounds = (64, args.rounds or 2) if args.quick else (224, args.rounds or 20)
    c4_requests, c1_requests = (8, 4) if args.quick else (40, 20)
    jpegs = photo_like_jpegs(16)
    variants = {"default": DEFAULT_VMARGS, "other": args.other}
    if args.other_first:
        variants = {"other": args.other, "default": DEFAULT_VMARGS}
    rows = []
    with tempfile.TemporaryDirectory(prefix="jvm-flags-") as tmp:
        base = Path(tmp)
        model_dir = make_artifact(base, args.arch, crop)
        add_int8_and_agreement(model_dir, jpegs, photo_like_jpegs(16, seed=1))
        servers = {}
        try:
            for label, vmargs in variants.items():
                servers[label] = ServeProcess(base, SAGEMAKER_MODEL_SERVER_VMARGS=vmargs).wait_ready(timeout=300)
            jvms = {label: server.jvm() for label, server in servers.items()}
            clients = {label: KeepAliveClient(server.port) for label, server in servers.items()}
            for r in range(rounds):
                # The servers take turns going first in a round: in a run with the same flags on
                # both that kept one order, the server that went second answered 2 ms faster at c1.
                order = list(clients) if r % 2 == 0 else list(clients)[::-1]
                row = {"round": r, "requests_before": r * (c4_requests + c1_requests), "first": order[0]}
                for label in order:
                    client = clients[label]
                    before = cpu_seconds(jvms[label])
                    rate, _ = run_load(client, jpegs, 4, c4_requests)
                    _, latencies = run_load(client, jpegs, 1, c1_requests)
                    row[f"{label}_jvm_cpu_ms"] = (cpu_seconds(jvms[label]) - before) * 1000 / (c4_requests + c1_requests)
                    row[f"{label}_img_s_c4"] = rate
                    row[f"{label}_p50_ms"] = statistics.median(latencies)
                rows.append(row)
                print(f"round {r:>2} (after {row['requests_before']:>4} requests each): JVM CPU per request "
                      f"default {row['default_jvm_cpu_ms']:5.1f} ms, other {row['other_jvm_cpu_ms']:5.1f} ms | c4 "
                      f"{row['default_img_s_c4']:5.1f} / {row['other_img_s_c4']:5.1f} img/s | c1 p50 "
                      f"{row['default_p50_ms']:5.1f} / {row['other_p50_ms']:5.1f} ms", flush=True)
        finally:
            for server in servers.values():
                server.stop()
    half = rows[len(rows) // 2:]
    summary = {key: statistics.median(r[key] for r in half) for key in rows[0] if key.startswith(("default", "other"))}
    summary.update({f"{label}_startup_s": servers[label].ready_after for label in servers})
    # Round by round the two servers ran within a minute of each other, so differences paired by
    # round carry less of the host's drift than the two medians do.
    paired = {"jvm_cpu_ms": [r["other_jvm_cpu_ms"] - r["default_jvm_cpu_ms"] for r in half],
              "p50_ms": [r["other_p50_ms"] - r["default_p50_ms"] for r in half],
              "c4_ratio": [r["other_img_s_c4"] / r["default_img_s_c4"] for r in half]}
    for key, values in paired.items():
        summary[f"other_vs_default_{key}"] = statistics.fmean(values)
        summary[f"other_vs_default_{key}_se"] = stats.sd_se(values)[1]
    print(f"{args.arch}, crop {crop}; default: {DEFAULT_VMARGS}\nother: {args.other}")
    print(f"second half, median over rounds: JVM CPU per request {summary['default_jvm_cpu_ms']:.1f} against "
          f"{summary['other_jvm_cpu_ms']:.1f} ms; c4 {summary['default_img_s_c4']:.1f} against "
          f"{summary['other_img_s_c4']:.1f} img/s; c1 p50 {summary['default_p50_ms']:.1f} against "
          f"{summary['other_p50_ms']:.1f} ms")
    print("second half, other against default paired by round (mean, SE): JVM CPU per request "
          f"{_signed(summary, 'jvm_cpu_ms')} ms; c1 p50 {_signed(summary, 'p50_ms')} ms; c4 x"
          f"{summary['other_vs_default_c4_ratio']:.3f} ({_se(summary, 'c4_ratio', '.3f')})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": machine.describe(),
                                    "arch": args.arch, "crop": crop, "started_first": next(iter(variants)),
                                    "quick": args.quick, "variants": variants, "rounds": rows,
                                    "summary": summary}, indent=2))
    print(f"wrote {args.out}")


def _se(summary: dict, key: str, spec: str = ".2f") -> str:
    se = summary[f"other_vs_default_{key}_se"]
    return "SE -" if se is None else f"SE {se:{spec}}"


def _signed(summary: dict, key: str) -> str:
    return f"{summary[f'other_vs_default_{key}']:+.2f} ({_se(summary, key)})"


if __name__ == "__main__":
    main()
