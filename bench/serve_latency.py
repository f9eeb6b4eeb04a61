"""Serving benchmark: a real `serve` (MMS + our handler) against the same request in-process.

For each architecture: start-up to ready, latency p50/p95 at concurrency 1, throughput at
concurrency 4 and 8, all with 500x375 JPEGs (one image per request), and next to them the
in-process time of the same request (decode + preprocess + forward through serve.predictor),
so the server's own overhead (HTTP, the JVM front end, the worker protocol) is visible.
Writes bench/results/serve_latency.json.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from imgcls import artifact
from imgcls.models import create_model
from imgcls.presets import ClassificationPresetEval
from serve.predictor import Predictor
from serve.process import ServeProcess
from serve.settings import available_cpus, plan_concurrency


def photo_like_jpegs(count: int, size=(500, 375), seed=0) -> list[bytes]:
    """JPEGs with edges, gradients and noise, so decode cost is like a photo's, not a flat colour's."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        base = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize(size, Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            x, y = rng.integers(0, size[0]), rng.integers(0, size[1])
            r = int(rng.integers(10, 80))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        img = img.filter(ImageFilter.GaussianBlur(0.6))
        noise = rng.normal(0, 6, (size[1], size[0], 3))
        img = Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def make_artifact(base: Path, arch: str, crop: int, classes: int = 10) -> Path:
    torch.manual_seed(0)
    card = artifact.ModelCard(arch=arch, class_names=[f"class_{i}" for i in range(classes)],
                              preprocess=ClassificationPresetEval(crop).to_dict())
    artifact.save(base / "model", create_model(arch, classes), card)
    return base / "model"


def in_process_ms(model_dir: Path, jpegs: list[bytes], repeats: int, threads: int) -> float:
    torch.set_num_threads(threads)
    predictor = Predictor.from_model_dir(model_dir)
    predictor.warm_up()
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        predictor.predict([jpegs[i % len(jpegs)]])
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def run_load(server: ServeProcess, jpegs: list[bytes], concurrency: int, total: int) -> tuple[float, list[float]]:
    """(images per second, per-request latencies in ms) for `total` requests at `concurrency`."""
    latencies: list[float] = []

    def one(i: int) -> None:
        t = time.perf_counter()
        code, _, body = server.invoke(jpegs[i % len(jpegs)], "image/jpeg")
        latencies.append((time.perf_counter() - t) * 1000)
        if code != 200:
            raise RuntimeError(f"request failed with {code}: {body[:200]!r}")

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(total)))
    return total / (time.perf_counter() - start), latencies


def bench_arch(arch: str, crop: int, jpegs: list[bytes], requests: int, work: Path) -> dict:
    base = work / arch
    model_dir = make_artifact(base, arch, crop)
    workers, threads = plan_concurrency(available_cpus(), 0)
    inproc = in_process_ms(model_dir, jpegs, requests, threads)
    server = ServeProcess(base, work / f"{arch}-mms")
    try:
        server.wait_ready(timeout=300)
        run_load(server, jpegs, 1, 5)  # warm the HTTP path
        _, lat1 = run_load(server, jpegs, 1, requests)
        thr4, _ = run_load(server, jpegs, 4, requests)
        thr8, _ = run_load(server, jpegs, 8, requests)
    finally:
        server.stop()
    p50 = percentile(lat1, 50)
    return {"arch": arch, "crop": crop, "workers": workers, "threads": threads, "startup_s": server.ready_after,
            "in_process_ms": inproc, "p50_ms": p50, "p95_ms": percentile(lat1, 95),
            "overhead_ms": p50 - inproc, "img_s_c1": 1000 / p50, "img_s_c4": thr4, "img_s_c8": thr8}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run that keeps the benchmark working")
    p.add_argument("--archs", default="resnet18,resnet50")
    p.add_argument("--requests", type=int, help="requests per measurement")
    p.add_argument("--out", type=Path, default=Path("bench/results/serve_latency.json"))
    args = p.parse_args()
    crop = 64 if args.quick else 224
    requests = args.requests or (8 if args.quick else 60)
    jpegs = photo_like_jpegs(8 if args.quick else 16)
    rows = []
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        for arch in args.archs.split(","):
            rows.append(bench_arch(arch.strip(), crop, jpegs, requests, Path(tmp)))
    header = (f"{'arch':<10} {'workers x threads':>17} {'start s':>8} {'in-proc ms':>10} {'p50 ms':>8} "
              f"{'p95 ms':>8} {'overhead':>9} {'c1 img/s':>9} {'c4 img/s':>9} {'c8 img/s':>9}")
    print(f"JPEG 500x375, crop {crop}, {requests} requests per level, one image per request")
    print(header)
    for r in rows:
        print(f"{r['arch']:<10} {str(r['workers']) + ' x ' + str(r['threads']):>17} {r['startup_s']:>8.1f} "
              f"{r['in_process_ms']:>10.1f} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} {r['overhead_ms']:>9.1f} "
              f"{r['img_s_c1']:>9.1f} {r['img_s_c4']:>9.1f} {r['img_s_c8']:>9.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpus": available_cpus(),
                                    "quick": args.quick, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
