"""serve's watchdog reads the workers' reports and stops the server on a failed load; it must never die itself."""

from __future__ import annotations

import http.server
import json
import logging
import threading
import time

from serve import server
from serve.handler_service import _report
from serve.settings import LOAD_FAILURE_FILE_ENV


def watchdog(run_dir, startup_timeout=600.0):
    return server.Watchdog(port=1, run_dir=run_dir, workers=2, startup_timeout=startup_timeout,
                           started=time.monotonic())


def test_a_report_still_being_written_is_not_a_failure(tmp_path):
    dog = watchdog(tmp_path)
    (tmp_path / "load-failure").touch()  # a worker has opened the file, its line is not in yet
    assert dog.check() is None
    (tmp_path / "load-failure").write_text("\nArtifactError: model.pt cannot be read\n")
    assert dog.check() == "the model could not be loaded: ArtifactError: model.pt cannot be read"


def test_no_report_and_no_server_is_not_ready_until_the_start_up_timeout(tmp_path):
    dog = watchdog(tmp_path)
    assert dog.check() is None and not dog.ready
    late = watchdog(tmp_path, startup_timeout=0.0)
    assert "not healthy after 0 s (SAGEMAKER_STARTUP_TIMEOUT)" in late.check()


def test_ready_is_every_worker_reported_and_the_server_healthy(tmp_path):
    class Ping(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            body = json.dumps({"status": "Healthy"}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    mms = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ping)
    threading.Thread(target=mms.serve_forever, daemon=True).start()
    try:
        dog = server.Watchdog(port=mms.server_address[1], run_dir=tmp_path, workers=2, startup_timeout=600.0,
                              started=time.monotonic())
        ready = tmp_path / "ready"
        ready.write_text("101\n\n")  # one worker, and a second one's report not written yet
        assert dog.check() is None and not dog.ready
        ready.write_text("101\n\n102\n")
        assert dog.check() is None and dog.ready
    finally:
        mms.shutdown()


def test_the_watchdog_survives_an_error_and_still_stops_the_server(tmp_path, monkeypatch, caplog):
    dog = watchdog(tmp_path)
    looks = iter([OSError("disk hiccup"), OSError("disk hiccup"), None, "the model could not be loaded: X"])

    def check():
        result = next(looks)
        if isinstance(result, Exception):
            raise result
        return result

    stopped = []
    monkeypatch.setattr(dog, "check", check)
    monkeypatch.setattr(dog, "fail", lambda message: (stopped.append(message), setattr(dog, "failed", message)))
    monkeypatch.setattr(server.time, "sleep", lambda _: None)
    with caplog.at_level(logging.ERROR, logger="serve"):
        dog.run()
    assert stopped == ["the model could not be loaded: X"]
    assert [r.getMessage() for r in caplog.records] == ["watchdog: OSError('disk hiccup'); still watching"]


def test_workers_append_whole_lines_to_the_report(tmp_path, monkeypatch):
    path = tmp_path / "load-failure"
    monkeypatch.setenv(LOAD_FAILURE_FILE_ENV, str(path))
    _report(LOAD_FAILURE_FILE_ENV, "ArtifactError: first")
    _report(LOAD_FAILURE_FILE_ENV, "ArtifactError: second")
    assert path.read_text() == "ArtifactError: first\nArtifactError: second\n"
    assert server._report_lines(path) == ["ArtifactError: first", "ArtifactError: second"]
    monkeypatch.delenv(LOAD_FAILURE_FILE_ENV)
    _report(LOAD_FAILURE_FILE_ENV, "nowhere to go")  # outside serve there is no report file, and no error


def test_a_server_that_does_not_exit_in_time_is_reported_with_its_output(tmp_path):
    from serve.process import ServeProcess
    hung = ServeProcess(tmp_path / "ml", command=["sh", "-c", "echo loading; exec sleep 60"])
    try:
        hung.wait_exit(timeout=1)
    except AssertionError as exc:
        assert "serve still running after 1 s" in str(exc) and "loading" in str(exc)
    else:
        raise AssertionError("wait_exit returned for a server still running")
    assert hung.proc.poll() is not None  # and it was stopped
