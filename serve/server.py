"""`serve`: start Multi Model Server with our handler, through sagemaker-inference.

This is what `docker run IMAGE serve` runs, and natively `.venv/bin/serve`. Before the model
server starts it checks what can be checked (settings, the artifact's metadata, the port) and
chooses workers and threads for the CPUs. Then it watches: MMS keeps answering /ping with HTTP
200 when the model failed to load, so a worker that cannot load the model stops the whole
server with the reason, instead of leaving an endpoint that looks healthy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

from imgcls.artifact import METADATA_FILE, WEIGHTS_FILE, read_card
from imgcls.errors import ArtifactError, ClassifierError

from .mms_log import log4j2_config
from .settings import LOAD_FAILURE_FILE_ENV, MIB, READY_FILE_ENV, Settings, available_cpus, plan_concurrency

HANDLER = "serve.handler_service:handle"
LOG_CONFIG_FILE = "log4j2.xml"  # in the run dir
MMS_NAMESPACE = "com.amazonaws.ml.mms.ModelServer"
# Inside a container the JVM must size itself from the container's memory, not the host's.
# TieredStopAtLevel=1: the front end only moves bytes, and C1 code does that well enough, while
# C2 kept compiling on the model's cores for over a thousand requests. Measured side by side on
# 2 cores (bench/jvm_flags.py): the JVM's CPU per request over requests 600-1,200 was 2.0 ms
# (median) against 3.9 ms, and C2 still took up to 9.8 ms in rounds after request 1,000.
# UseSerialGC: the front end keeps little alive between requests, and G1 (the JVM's choice from 2
# CPUs up) pays for its barriers and background threads on the same cores. Side by side on 2 cores
# in seven runs, either server started first: 0.1-0.3 ms less JVM CPU per request (of 1.0-1.3).
DEFAULT_VMARGS = ("-XX:+UseContainerSupport -XX:MaxRAMPercentage=25 -XX:+ExitOnOutOfMemoryError "
                  "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC")

log = logging.getLogger("serve")


def _model_dir(environ=os.environ) -> Path:
    return Path(environ.get("SAGEMAKER_BASE_DIR", "/opt/ml")).absolute() / "model"


def _port(environ) -> int:
    raw = environ.get("SAGEMAKER_BIND_TO_PORT", "8080")
    # Multi Model Server stores ports as a Java short and refuses 32767 and above.
    if not raw.strip().isdigit() or not 0 < int(raw) < 32767:
        raise ClassifierError(f"SAGEMAKER_BIND_TO_PORT={raw!r} is not a port the model server accepts: use 1 to 32766.")
    return int(raw)


def _check_port(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError as exc:
            raise ClassifierError(f"Port {port} is not free ({exc.strerror}): stop what uses it or set "
                                  "SAGEMAKER_BIND_TO_PORT to another port.") from None


def _gpu_count() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mms_processes(run_dir: Path) -> list[psutil.Process]:
    """This server's JVM and Python workers: their command lines name its run dir (the JVM's
    config file, the workers' socket), so other model servers on the machine are left alone."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if str(run_dir) in cmd and (MMS_NAMESPACE in cmd or "model_service_worker" in cmd):
            found.append(proc)
    return found


def _own_mms_finder(run_dir: Path):
    """Replaces the toolkit's lookup of the MMS process, which takes any MMS on the machine and
    fails while two run (a second endpoint, a test next to a demo); ours is the one with our config."""
    def find() -> psutil.Process:
        jvms = [p for p in _mms_processes(run_dir) if MMS_NAMESPACE in " ".join(p.cmdline())]
        if len(jvms) != 1:
            raise RuntimeError(f"expected this server's MMS process, found {len(jvms)}")
        return jvms[0]
    return find


def _stop(procs: list[psutil.Process]) -> None:
    # A process that exited (or was reaped) between listing and signalling needs nothing more.
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()


class Watchdog(threading.Thread):
    """Logs when the endpoint becomes healthy; stops everything if the model cannot load."""

    def __init__(self, port: int, run_dir: Path, workers: int, startup_timeout: float, started: float):
        super().__init__(name="serve-watchdog", daemon=True)
        self.port, self.workers, self.startup_timeout = port, workers, startup_timeout
        self.run_dir = run_dir
        self.failure_file, self.ready_file = run_dir / "load-failure", run_dir / "ready"
        self.failed: str | None = None
        self.ready = False
        self.started = started

    def _healthy(self) -> bool:
        # /ping says Healthy before any worker has loaded the model (and with no model at all),
        # so readiness is every worker's own report plus the server answering.
        if len(_report_lines(self.ready_file)) < self.workers:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=2) as resp:
                return json.loads(resp.read() or b"{}").get("status") == "Healthy"
        except (OSError, ValueError):
            return False

    def check(self) -> str | None:
        """One look at the workers' reports: why the server must stop, or None. Logs readiness once."""
        reasons = _report_lines(self.failure_file)
        if reasons:
            return f"the model could not be loaded: {reasons[0]}"
        if not self.ready and self._healthy():
            self.ready = True
            log.info("ready: http://127.0.0.1:%d/invocations (%d workers loaded, start-up %.1f s)", self.port,
                     self.workers, time.monotonic() - self.started)
        elif not self.ready and time.monotonic() - self.started > self.startup_timeout:
            return (f"the model server was not healthy after {self.startup_timeout:.0f} s "
                    "(SAGEMAKER_STARTUP_TIMEOUT); its log above says why.")
        return None

    def run(self) -> None:
        logged: set[str] = set()
        while not self.failed:
            time.sleep(0.25 if not self.ready else 1.0)
            try:
                reason = self.check()
            except Exception as exc:  # noqa: BLE001 - a dead watchdog leaves a server that neither starts nor stops
                if repr(exc) not in logged:
                    logged.add(repr(exc))
                    log.exception("watchdog: %r; still watching", exc)
                continue
            if reason:
                self.fail(reason)

    def fail(self, message: str) -> None:
        self.failed = message
        log.error("stopping: %s", message)
        _stop(_mms_processes(self.run_dir))
        shutil.rmtree(self.run_dir, ignore_errors=True)
        # The toolkit may still be waiting to find the server process; do not wait with it.
        print(f"error: {message}", file=sys.stderr, flush=True)
        os._exit(1)


def _report_lines(path: Path) -> list[str]:
    """A report file's non-blank lines. A worker creates the file before its line is in it, so an
    empty file is a report still being written, not a report."""
    try:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def _unpacked(model_dir: Path, run_dir: Path) -> Path:
    """The model dir, or, when it holds only the training job's model.tar.gz (downloaded from S3
    by hand), that archive unpacked. SageMaker itself always unpacks it into /opt/ml/model."""
    archive = model_dir / "model.tar.gz"
    if (model_dir / METADATA_FILE).exists() or not archive.is_file():
        return model_dir
    target = run_dir / "model"
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")  # no absolute paths, links out or devices
    except (tarfile.TarError, OSError) as exc:
        raise ArtifactError(f"{archive} cannot be unpacked ({exc}): download it again from the training job's "
                            "output path.") from None
    log.info("unpacked %s into %s", archive, target)
    return target


def prepare(environ=os.environ) -> dict:
    """Check everything that can be checked before MMS starts; return the environment it runs with."""
    # Short and under /tmp: MMS puts its worker sockets here, and a socket path has at most 107 bytes.
    run_dir = Path(tempfile.mkdtemp(prefix="imgcls-serve-", dir="/tmp" if os.path.isdir("/tmp") else None))
    try:
        return _prepare(environ, run_dir)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _prepare(environ, run_dir: Path) -> dict:
    settings = Settings.from_env(environ)
    model_dir = _unpacked(_model_dir(environ), run_dir)
    card = read_card(model_dir)
    if not (model_dir / WEIGHTS_FILE).is_file():
        raise ArtifactError(f"No {WEIGHTS_FILE} in {model_dir}: the artifact is incomplete; use the "
                            "model.tar.gz the training job wrote.")
    port = _port(environ)
    _check_port(port)
    cpus, gpus = available_cpus(), _gpu_count()
    workers, threads = plan_concurrency(cpus, gpus, environ.get("SAGEMAKER_MODEL_SERVER_WORKERS"),
                                        environ.get("OMP_NUM_THREADS"))
    env = {
        "SAGEMAKER_MODEL_SERVER_WORKERS": str(workers),
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "IMGCLS_THREADS": str(threads),
        # Our handler enforces the payload limit with a JSON 413; the server's own limit (an empty
        # 413) sits above it so that ours is the one clients see.
        "IMGCLS_MAX_BODY_BYTES": str(settings.max_body_bytes),
        "SAGEMAKER_MAX_PAYLOAD_IN_MB": str(math.ceil(2 * settings.max_body_bytes / MIB) + 1),
        LOAD_FAILURE_FILE_ENV: str(run_dir / "load-failure"),
        READY_FILE_ENV: str(run_dir / "ready"),
        "SAGEMAKER_MODEL_SERVER_VMARGS": environ.get("SAGEMAKER_MODEL_SERVER_VMARGS", DEFAULT_VMARGS),
        # multi-model-server is a script next to this Python (a venv is not always on PATH).
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{environ.get('PATH', '')}",
        "IMGCLS_RUN_DIR": str(run_dir),
        # MMS keeps its pid file (TMPDIR) and worker sockets (TEMP) there: one run dir per server
        # lets several run side by side.
        "TEMP": str(run_dir), "TMPDIR": str(run_dir),
        # MMS resolves the model path against its model store, "/": it must be absolute.
        "SAGEMAKER_BASE_DIR": str(model_dir.parent),
    }
    (run_dir / LOG_CONFIG_FILE).write_text(log4j2_config(settings.access_log))
    log.info("model %s: %s, %d classes; port %d; %d CPUs, %d GPUs -> %d workers x %d threads; "
             "payload limit %.1f MB; run dir %s", model_dir, card.arch, card.num_classes, port, cpus, gpus, workers,
             threads, settings.max_body_bytes / MIB, run_dir)
    return env


def main() -> int:
    started = time.monotonic()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s serve %(levelname)s %(message)s", stream=sys.stderr)
    try:
        env = prepare()
    except ClassifierError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    os.environ.update(env)
    run_dir = Path(env["IMGCLS_RUN_DIR"])

    from sagemaker_inference import model_server  # reads the environment at import

    # The toolkit writes its config to /etc by default; a user without root could not start it.
    model_server.MMS_CONFIG_FILE = str(run_dir / "mms.properties")
    model_server.DEFAULT_MMS_LOG_FILE = str(run_dir / LOG_CONFIG_FILE)
    model_server._retrieve_mms_server_process = _own_mms_finder(run_dir)
    watchdog = Watchdog(_port(os.environ), run_dir,
                        int(env["SAGEMAKER_MODEL_SERVER_WORKERS"]),
                        float(os.environ.get("SAGEMAKER_STARTUP_TIMEOUT", "600")), started)
    watchdog.start()
    signal.signal(signal.SIGINT, lambda *_: [p.terminate() for p in _mms_processes(run_dir)])
    try:
        # IMGCLS_HANDLER: another handler on the same server (the benchmark's naive baseline)
        model_server.start_model_server(handler_service=os.environ.get("IMGCLS_HANDLER", HANDLER))
    finally:
        # MMS's JVM exits on SIGTERM but leaves its Python workers running; stop them too.
        _stop(_mms_processes(run_dir))
        shutil.rmtree(run_dir, ignore_errors=True)
    if watchdog.failed:
        return 1
    if not watchdog.ready:
        print("error: the model server stopped before it was ready; its log above says why.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
