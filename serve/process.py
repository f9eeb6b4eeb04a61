"""Run `serve` as a child process on a free port and talk to it: for tests, benchmarks and scripts.

The child gets its own session, so stop() ends the JVM and its Python workers with it.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
READY_MARK = "serve INFO ready"


def free_port() -> int:
    """A free port below 32767 (Multi Model Server refuses higher ones)."""
    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


class ServeProcess:
    def __init__(self, base: Path, command: list[str] | None = None, **env):
        """base: a folder shaped like /opt/ml (base/model holds the artifact)."""
        self.port = free_port()
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGEMAKER_", "IMGCLS_", "SM_"))}
        full_env.update(SAGEMAKER_BASE_DIR=str(base), SAGEMAKER_BIND_TO_PORT=str(self.port))
        full_env.update({k: str(v) for k, v in env.items()})
        self.started = time.monotonic()
        self.ready_after: float | None = None
        self.proc = subprocess.Popen(command or [str(BIN / "serve")], env=full_env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self.last_headers: dict[str, str] = {}  # the last invoke()'s response headers, by lower-case name
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def run_dir(self) -> str | None:
        """The server's working folder (MMS config, sockets), from its first log line."""
        match = re.search(r"run dir (\S+)", self.output)
        return match.group(1) if match else None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120) -> ServeProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if READY_MARK in self.output:
                self.ready_after = time.monotonic() - self.started
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.output[-4000:]}")
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"serve not ready after {timeout} s:\n{self.output[-4000:]}")

    def wait_exit(self, timeout: float = 120) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            self.stop()
        self._reader.join(timeout=5)
        if code is None:  # the server's own output says why it neither started nor stopped
            raise AssertionError(f"serve still running after {timeout} s:\n{self.output[-6000:]}")
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            # a server that ignores SIGTERM for 30 s gets the SIGKILL below
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
        # whatever is left of the process group (MMS workers); an empty group is already done
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def jvm(self):
        """The server's JVM (MMS's front end) as a psutil.Process: its command line and CPU time."""
        from serve.server import _own_mms_finder  # serve's own lookup: the JVM whose config is in its run dir
        return _own_mms_finder(Path(self.run_dir))()

    def invoke(self, body: bytes, content_type: str | None, accept: str | None = None,
               headers: dict | None = None, timeout: float = 60) -> tuple[int, str, bytes]:
        """POST /invocations; (status, response content type, body). No header is added unasked."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            all_headers = {"Content-Length": str(len(body))}
            if content_type:
                all_headers["Content-Type"] = content_type
            if accept:
                all_headers["Accept"] = accept
            all_headers.update(headers or {})
            conn.request("POST", "/invocations", body=body, headers=all_headers)
            resp = conn.getresponse()
            self.last_headers = {name.lower(): value for name, value in resp.getheaders()}
            return resp.status, resp.getheader("Content-Type", ""), resp.read()
        finally:
            conn.close()

    def ping(self) -> tuple[int, bytes]:
        with urllib.request.urlopen(f"{self.url}/ping", timeout=10) as resp:
            return resp.status, resp.read()
