"""Serving benchmark: a real `serve` (MMS + our handler) against the same request in-process.

For each architecture: start-up to ready, latency p50/p95 at concurrency 1, throughput at
concurrency 4 and 8, all with 500x375 JPEGs (one image per request), and next to them the
in-process time of the same request (decode + preprocess + forward through serve.predictor),
so the server's own overhead (HTTP, the JVM front end, the worker protocol) is visible. The
forward alone is set against the device's multiply rate in the served precision (bench.roofline).
Writes bench/results/serve_latency.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from bench import machine, roofline
from bench.images import photo_like_jpegs
from imgcls import artifact, quantize
from imgcls.models import create_model, head_name
from imgcls.presets import ClassificationPresetEval
from serve.predictor import Predictor
from serve.process import ServeProcess
from serve.settings import available_cpus, plan_concurrency

ROOT = Path(__file__).resolve().parents[1]


def make_artifact(base: Path, arch: str, crop: int, classes: int = 10) -> Path:
    torch.manual_seed(0)
    card = artifact.ModelCard(arch=arch, class_names=[f"class_{i}" for i in range(classes)],
                              preprocess=ClassificationPresetEval(crop).to_dict())
    artifact.save(base / "model", create_model(arch, classes), card)
    return base / "model"


class InProcess:
    """The same request through serve.predictor in this process, with a worker's thread count, in
    the precision the server picks."""

    def __init__(self, model_dir: Path, jpegs: list[bytes], threads: int, precision: str = "auto"):
        self.jpegs, self.threads = jpegs, threads
        torch.set_num_threads(threads)
        self.predictor = Predictor.from_model_dir(model_dir, precision=precision)
        self.predictor.warm_up()
        self.times: list[float] = []

    def measure(self, image: int) -> None:
        torch.set_num_threads(self.threads)
        t = time.perf_counter()
        self.predictor.predict([self.jpegs[image % len(self.jpegs)]])
        self.times.append((time.perf_counter() - t) * 1000)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times)


def add_int8_and_agreement(model_dir: Path, jpegs: list[bytes], calibration: list[bytes]) -> dict[str, float]:
    """Add the artifact's int8 model as the trainer makes it, calibrated on other images than those
    measured (on a CPU with VNNI also the one with 8-bit activations), and record the top-1
    agreement of bf16 and int8 with fp32 on the benchmark's images in the artifact, as the trainer
    records it on its test images, so the server's precision=auto decides as for a real model. One
    fp32 predictor serves for all of it."""
    fp32 = Predictor.from_model_dir(model_dir, precision="fp32")
    batch = fp32.preset.normalize(fp32.preprocess(calibration))
    reference = fp32.predict(jpegs).argmax(1)
    others = {"bf16": Predictor(fp32.model, fp32.card, precision="bf16")}
    for graph in quantize.quantize_variants(fp32.model, [batch], head_name(fp32.model)):
        vnni = quantize.needs_vnni(graph)
        artifact.save_int8(model_dir, graph)
        others[artifact.int8_name(vnni)] = Predictor(fp32.model, fp32.card, precision="int8",
                                                            int8_model=artifact.load_int8(model_dir, vnni=vnni))
    agreement = {name: float((reference == p.predict(jpegs).argmax(1)).mean()) for name, p in others.items()}
    card_path = model_dir / artifact.METADATA_FILE
    card = json.loads(card_path.read_text())
    card.setdefault("metrics", {}).update({f"{name}_top1_agreement": a for name, a in agreement.items()})
    card_path.write_text(json.dumps(card))
    return agreement


def _eight_bit(row: dict) -> str:
    vnni = row.get("int8_vnni_top1_agreement")
    return "" if vnni is None else f" ({vnni:.1%} with 8-bit activations)"


def arithmetic(inproc: InProcess, arch: str, crop: int, workers: int, rounds: int, quick: bool) -> dict:
    """The served forward alone (one preprocessed image, a worker's threads) against the device's
    multiply rate in the served precision at those threads, taking turns (bench.roofline)."""
    predictor, cpu = inproc.predictor, torch.device("cpu")
    gflop = roofline.step_gflop(create_model(arch, len(predictor.class_names)).requires_grad_(False), crop)
    batch = predictor.preprocess([inproc.jpegs[0]])
    forward_ms, rates = [], []
    torch.set_num_threads(inproc.threads)
    for _ in range(rounds):
        for _ in range(10):
            t = time.perf_counter()
            predictor.forward(batch)
            forward_ms.append((time.perf_counter() - t) * 1000)
        rates.append(roofline.matmul_rate(cpu, predictor.precision, *roofline.sizes(cpu, quick)))
    forward, rate = statistics.median(forward_ms), statistics.median(rates)
    flops = gflop / forward * 1000
    return {"forward_ms": forward, "model_gflop_per_image": gflop, "model_gflop_s": flops,
            "matmul_gflop_s": rate, "matmul_rounds": rates, "of_matmul": flops / rate,
            "most_img_s_c4": workers * rate / gflop}


def cpu_seconds(proc) -> float:
    """User + system CPU time of a psutil.Process."""
    times = proc.cpu_times()
    return times.user + times.system


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def server_timing(header: str | None) -> dict[str, float]:
    """'handler;dur=9.8, predict;dur=8.9' -> {'handler': 9.8, 'predict': 8.9}."""
    durations = {}
    for part in (header or "").split(","):
        name, _, params = part.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if name and key == "dur":
                durations[name] = float(value)
    return durations


class KeepAliveClient:
    """POST /invocations over one persistent connection per calling thread, as SageMaker's front
    end and boto3 hold theirs: a new TCP connection per request costs about 1.3 ms more on
    loopback here (2 cores), on the same cores as the server, and no production client pays it."""

    def __init__(self, port: int):
        self.port = port
        self.local = threading.local()

    def invoke(self, body: bytes, content_type: str) -> tuple[int, bytes, dict[str, float]]:
        """(status, body, the Server-Timing durations in ms by name: empty unless the server sends them)."""
        for attempt in (0, 1):
            conn = getattr(self.local, "conn", None)
            if conn is None:
                conn = self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            try:
                conn.request("POST", "/invocations", body=body, headers={"Content-Type": content_type})
                resp = conn.getresponse()
                return resp.status, resp.read(), server_timing(resp.getheader("Server-Timing"))
            except (ConnectionError, http.client.HTTPException):
                conn.close()
                self.local.conn = None  # the server closed an idle connection: open another once
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def timed(self, jpeg: bytes) -> tuple[float, dict[str, float]]:
        """(the client's ms, the Server-Timing durations) of one JPEG request that must succeed."""
        t = time.perf_counter()
        code, body, timing = self.invoke(jpeg, "image/jpeg")
        ms = (time.perf_counter() - t) * 1000
        if code != 200:
            raise RuntimeError(f"request failed with {code}: {body[:200]!r}")
        return ms, timing


def run_load(client: KeepAliveClient, jpegs: list[bytes], concurrency: int, total: int) -> tuple[float, list[float]]:
    """(images per second, per-request latencies in ms) for `total` requests at `concurrency`."""
    latencies: list[float] = []

    def one(i: int) -> None:
        latencies.append(client.timed(jpegs[i % len(jpegs)])[0])

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(total)))
    return total / (time.perf_counter() - start), latencies


def bench_arch(arch: str, crop: int, jpegs: list[bytes], calibration: list[bytes], requests: int,
               work: Path, warmup: int, rounds: int, precision: str = "auto", quick: bool = False) -> dict:
    base = work / arch
    model_dir = make_artifact(base, arch, crop)
    agreement = add_int8_and_agreement(model_dir, jpegs, calibration)
    workers, threads = plan_concurrency(available_cpus(), 0)
    inproc = {"": InProcess(model_dir, jpegs, threads, precision),
              "one_worker_": InProcess(model_dir, jpegs, workers * threads, precision)}
    row = {"arch": arch, "crop": crop, "workers": workers, "threads": threads,
           "precision": inproc[""].predictor.precision,
           "bf16_top1_agreement": agreement["bf16"], "int8_top1_agreement": agreement["int8"],
           "int8_vnni_top1_agreement": agreement.get("int8_vnni")}
    # ours, the naive handler on the same server (same workers, same port range, same images), and
    # ours with one worker using every CPU: the plan that trades throughput for latency at rest.
    one_worker = {"SAGEMAKER_MODEL_SERVER_WORKERS": "1", "OMP_NUM_THREADS": str(workers * threads),
                  "IMGCLS_PRECISION": precision}
    # Ours sends a Server-Timing header, so that its overhead splits into the model server's and
    # the HTTP's share, our handler's outside the model, and the model's time in a worker against
    # the same predict in this process.
    configs = {"": {"IMGCLS_PRECISION": precision, "IMGCLS_SERVER_TIMING": "true"},
               "naive_": {"IMGCLS_HANDLER": "bench.naive_handler:handle", "PYTHONPATH": str(ROOT)},
               "one_worker_": one_worker}
    servers: dict[str, ServeProcess] = {}
    try:
        # All three stay up and take turns, a few requests each per round, so that each ratio is
        # measured side by side: on these machines a whole minute can run 20% slow.
        for label, env in configs.items():
            servers[label] = ServeProcess(base, **env).wait_ready(timeout=300)
            row[f"{label}startup_s"] = servers[label].ready_after
        clients = {label: KeepAliveClient(server.port) for label, server in servers.items()}
        for client in clients.values():
            # The JVM compiles its request path over the first few dozen requests (measured
            # here: a c1 p50 of 16.8 ms in the first 40 requests, 12.6-15.6 ms after).
            run_load(client, jpegs, 4, warmup)
        per_round = max(1, requests // rounds)
        # The JVM's CPU per request: it runs on the model's cores (and JIT-compiles there).
        jvms = {label: server.jvm() for label, server in servers.items()}
        jvm_cpu = {label: -cpu_seconds(jvm) for label, jvm in jvms.items()}
        latencies = {label: [] for label in clients}
        split = {"transport": [], "handler_outside_predict": [], "worker_predict": []}
        seconds4 = {label: 0.0 for label in clients}
        # At concurrency 1 the servers and the in-process runs take turns request by request, on
        # the same image, so that a slow spell of the machine falls on all of them alike.
        for i in range(per_round * rounds):
            for label, client in clients.items():
                if label in inproc:
                    inproc[label].measure(i)
                ms, timing = client.timed(jpegs[i % len(jpegs)])
                latencies[label].append(ms)
                if label == "":
                    split["transport"].append(ms - timing["handler"])
                    split["handler_outside_predict"].append(timing["handler"] - timing["predict"])
                    split["worker_predict"].append(timing["predict"])
        for _ in range(rounds):
            for label, client in clients.items():
                seconds4[label] += per_round / run_load(client, jpegs, 4, per_round)[0]
        for label, jvm in jvms.items():
            jvm_cpu[label] += cpu_seconds(jvm)
            row[f"{label}jvm_cpu_ms"] = jvm_cpu[label] * 1000 / (2 * per_round * rounds)
        # The same split with ours answering back to back: in the turns above each of its requests
        # comes after the others' (tens of ms), and the model server's part grew with the gap before
        # a request (resnet18 on 2 AMX cores: 2.5 ms back to back, 3.1 after 20 ms, 3.7 after 200 ms).
        split["transport_back_to_back"] = [ms - timing["handler"] for ms, timing in
                                           (clients[""].timed(jpegs[i % len(jpegs)]) for i in range(per_round * rounds))]
        row["img_s_c8"] = run_load(clients[""], jpegs, 8, per_round * rounds)[0]
    finally:
        for server in servers.values():
            server.stop()
    row.update(arithmetic(inproc[""], arch, crop, workers, rounds, quick))
    for label in clients:
        lat = latencies[label]
        row.update({f"{label}p50_ms": percentile(lat, 50), f"{label}p95_ms": percentile(lat, 95),
                    f"{label}img_s_c1": 1000 / percentile(lat, 50), f"{label}img_s_c4": per_round * rounds / seconds4[label]})
    row["in_process_ms"] = inproc[""].median_ms
    row["overhead_ms"] = row["p50_ms"] - row["in_process_ms"]
    row.update({f"{part}_ms": statistics.median(values) for part, values in split.items()})
    # What the overhead holds besides the server's own costs: the same predict running slower (or
    # faster) in a worker than in this process, each on its own heap and caches.
    row["worker_minus_in_process_ms"] = row["worker_predict_ms"] - row["in_process_ms"]
    row["c4_vs_naive"] = row["img_s_c4"] / row["naive_img_s_c4"]
    row["most_c4_vs_naive"] = row["most_img_s_c4"] / row["naive_img_s_c4"]
    row["one_worker_in_process_ms"] = inproc["one_worker_"].median_ms
    row["one_worker_overhead_ms"] = row["one_worker_p50_ms"] - row["one_worker_in_process_ms"]
    return row


def targets(rows: list[dict]) -> list[dict]:
    found = []
    for r in rows:
        found += [
            {"target": f"{r['arch']}: c4 throughput >= 3x the naive handler", "value": r["c4_vs_naive"],
             "met": r["c4_vs_naive"] >= 3},
            {"target": f"{r['arch']}: p50 at c1 minus in-process <= 5 ms", "value": r["overhead_ms"],
             "met": r["overhead_ms"] <= 5},
            {"target": f"{r['arch']}: start-up to healthy < 20 s", "value": r["startup_s"], "met": r["startup_s"] < 20},
        ]
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run that keeps the benchmark working")
    p.add_argument("--archs", default="resnet18,resnet50")
    p.add_argument("--requests", type=int, help="requests per measurement")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "int8"),
                   help="IMGCLS_PRECISION for our server and the in-process runs (the naive handler is always fp32)")
    p.add_argument("--out", type=Path, default=Path("bench/results/serve_latency.json"))
    args = p.parse_args()
    crop = 64 if args.quick else 224
    requests = args.requests or (8 if args.quick else 80)
    count = 8 if args.quick else 16
    jpegs = photo_like_jpegs(count)
    calibration = photo_like_jpegs(count, seed=1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        for arch in args.archs.split(","):
            rows.append(bench_arch(arch.strip(), crop, jpegs, calibration, requests, Path(tmp),
                                   warmup=4 if args.quick else 40, rounds=2 if args.quick else 4,
                                   precision=args.precision, quick=args.quick))
    header = (f"{'arch':<10} {'w x t':>6} {'prec':>5} {'start s':>8} {'in-proc ms':>10} {'p50 ms':>8} "
              f"{'p95 ms':>8} {'overhead':>9} {'c1 img/s':>9} {'c4 img/s':>9} {'c8 img/s':>9} {'naive c4':>9} "
              f"{'vs naive':>9}")
    host = machine.describe()
    print(f"on {machine.line(host)}: JPEG 500x375, crop {crop}, {requests} requests per level, "
          "one image per request, "
          "keep-alive connections, after a warm-up; at c1 the three servers and the in-process runs take turns "
          "request by request, at c4 in rounds")
    print(header)
    for r in rows:
        print(f"{r['arch']:<10} {str(r['workers']) + 'x' + str(r['threads']):>6} {r['precision']:>5} "
              f"{r['startup_s']:>8.1f} {r['in_process_ms']:>10.1f} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} "
              f"{r['overhead_ms']:>9.1f} {r['img_s_c1']:>9.1f} {r['img_s_c4']:>9.1f} {r['img_s_c8']:>9.1f} "
              f"{r['naive_img_s_c4']:>9.1f} {r['c4_vs_naive']:>9.2f}")
        print(f"{'':<10} top-1 agreement with fp32: bf16 {r['bf16_top1_agreement']:.1%}, "
              f"int8 {r['int8_top1_agreement']:.1%}{_eight_bit(r)}; the JVM's CPU per request: {r['jvm_cpu_ms']:.1f} ms "
              f"(naive {r['naive_jvm_cpu_ms']:.1f}, one worker {r['one_worker_jvm_cpu_ms']:.1f})")
        print(f"{'':<10} by its Server-Timing header, medians at c1: the model server and HTTP "
              f"{r['transport_ms']:.1f} ms ({r['transport_back_to_back_ms']:.1f} back to back), our handler outside the model {r['handler_outside_predict_ms']:.1f} ms, "
              f"the model in the worker {r['worker_predict_ms']:.1f} ms ({r['worker_minus_in_process_ms']:+.1f} ms "
              f"against in-process)")
        print(f"{'':<10} 1 worker x {r['workers'] * r['threads']} threads instead: p50 {r['one_worker_p50_ms']:.1f} ms "
              f"(in-proc {r['one_worker_in_process_ms']:.1f}, overhead {r['one_worker_overhead_ms']:.1f}), "
              f"c4 {r['one_worker_img_s_c4']:.1f} img/s; the default plan gives "
              f"{r['img_s_c4'] / r['one_worker_img_s_c4']:.2f}x its c4 throughput at {r['p50_ms'] - r['one_worker_p50_ms']:+.1f} ms p50")
        print(f"{'':<10} the forward alone: {r['forward_ms']:.1f} ms, {r['model_gflop_s']:.0f} GFLOP/s, "
              f"{r['of_matmul']:.2f} of the {r['precision']} multiply rate ({r['matmul_gflop_s']:.0f} GFLOP/s at "
              f"{r['threads']} thread(s)); at that rate and nothing else {r['workers']} workers would serve at most "
              f"{r['most_img_s_c4']:.0f} img/s, {r['most_c4_vs_naive']:.1f}x naive's c4")
    met = targets(rows)
    print("targets")
    for t in met:
        print(f"  {'met    ' if t['met'] else 'NOT met'}  {t['target']}: {t['value']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": host,
                                    "cpus": available_cpus(),
                                    "quick": args.quick, "rows": rows, "targets": met}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
