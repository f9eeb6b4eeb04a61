"""Request parsing, response encoding, settings and URL fetching, in-process."""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading
import time

import numpy as np
import pytest

from serve.errors import RequestError, status_of
from serve.payload import (
    NPY,
    choose_accept,
    encode,
    parse_body,
    parse_custom_attributes,
    top_k_from,
)
from serve.settings import MIB, Settings, SettingsError, UrlPolicy, plan_concurrency
from serve.urlfetch import check_address, fetch

S = Settings(max_body_bytes=1000)


def status(fn, *args, **kwargs) -> tuple[int, str]:
    with pytest.raises(RequestError) as err:
        fn(*args, **kwargs)
    return err.value.status, str(err.value)


def npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_raw_image_types_pass_bytes_through():
    for ctype in ("image/jpeg", "Image/PNG; charset=binary", "image/webp", "application/x-image"):
        assert parse_body(b"xyz", ctype, S) == [b"xyz"]


@pytest.mark.parametrize("ctype,body,code,words", [
    (None, b"x", 415, "no Content-Type"),
    ("text/csv", b"a,b", 415, "text/csv"),
    ("image/jpeg", b"", 400, "empty"),
    ("image/jpeg", b"x" * 1001, 413, "SAGEMAKER_MAX_PAYLOAD_IN_MB"),
    ("application/json", b"\xff\xfe{", 400, "not valid JSON"),
    ("application/json", b"[1, 2]", 400, "must be an object"),
    ("application/json", b'{"picture": "abc"}', 400, "'picture'"),
    ("application/json", b'{"image": "!!!not base64"}', 400, "not valid base64"),
    ("application/json", b'{"image": 5}', 400, "must be a base64 string"),
    ("application/json", b'{"instances": []}', 400, "non-empty list"),
    ("application/json", b'{"instances": [{"b64": "aGk="}, {"b64": "%%"}]}', 400, "instances[1].b64"),
    ("application/x-npy", b"not an npy file", 400, "numpy.save"),
])
def test_bad_bodies_get_a_status_and_a_message(ctype, body, code, words):
    got, message = status(parse_body, body, ctype, S)
    assert got == code
    assert words in message


@pytest.mark.parametrize("encode", [lambda s: b"\xef\xbb\xbf" + s.encode(), lambda s: s.encode("utf-16"),
                                    lambda s: s.encode("utf-32")], ids=["utf-8 BOM", "utf-16", "utf-32"])
def test_json_with_a_bom_or_in_utf16_or_utf32_is_read(encode):
    assert parse_body(encode('{"image": "aGk="}'), "application/json", S) == [b"hi"]


def test_json_nested_past_the_decoders_recursion_limit_is_a_bad_request():
    body = b"[" * 100_000 + b"]" * 100_000
    got, message = status(parse_body, body, "application/json", Settings(max_body_bytes=len(body)))
    assert got == 400
    assert "nested too deeply" in message


def test_json_single_batch_and_data_uri():
    png = b"\x89PNG fake"
    b64 = base64.b64encode(png).decode()
    assert parse_body(json.dumps({"image": b64}).encode(), "application/json", S) == [png]
    body = {"instances": [{"b64": b64}, b64, {"image": "data:image/png;base64," + b64}]}
    assert parse_body(json.dumps(body).encode(), "application/json", S) == [png, png, png]
    urlsafe = base64.urlsafe_b64encode(b"\xfb\xff\xfe").decode()
    assert parse_body(json.dumps({"image": urlsafe}).encode(), "application/json", S) == [b"\xfb\xff\xfe"]


def test_npy_single_and_batch():
    one = np.zeros((5, 6, 3), np.uint8)
    (got,) = parse_body(npy(one), NPY, Settings())
    assert got.shape == (5, 6, 3)
    batch = parse_body(npy(np.zeros((4, 5, 6, 3), np.uint8)), NPY, Settings())
    assert len(batch) == 4 and batch[0].shape == (5, 6, 3)


def test_accept_negotiation():
    assert choose_accept(None) == "application/json"
    assert choose_accept("*/*", default=NPY) == NPY
    assert choose_accept("application/x-npy") == NPY
    assert choose_accept("text/html, application/json;q=0.5") == "application/json"
    assert choose_accept("application/json;q=0.2, application/x-npy") == NPY
    code, message = status(choose_accept, "text/csv")
    assert code == 406 and "application/x-npy" in message


def test_custom_attributes_and_top_k():
    attrs = parse_custom_attributes("trace=abc, top_k=3")
    assert attrs == {"trace": "abc", "top_k": "3"}
    assert top_k_from(attrs, 5, 10) == 3
    assert top_k_from({}, 5, 3) == 3  # clipped to the class count
    assert top_k_from({"top_k": "50"}, 5, 4) == 4
    for bad in ("0", "-1", "three", "2.5"):
        code, message = status(top_k_from, {"top_k": bad}, 5, 4)
        assert code == 400 and "top_k" in message


def test_encode_json_and_npy():
    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], np.float32)
    body, ctype = encode(probs, ["a", "b", "c"], 2, "application/json")
    assert ctype == "application/json" and b"\n" not in body
    preds = json.loads(body)["predictions"]
    assert [p["label"] for p in preds] == ["b", "a"]
    assert [t["label"] for t in preds[0]["top_k"]] == ["b", "c"]
    assert preds[1]["top_k"][1] == {"label": "c", "index": 2, "probability": pytest.approx(0.3)}
    body, ctype = encode(probs, ["a", "b", "c"], 2, NPY)
    assert ctype == NPY
    np.testing.assert_array_equal(np.load(io.BytesIO(body)), probs)


def test_settings_from_env_and_errors():
    s = Settings.from_env({"SAGEMAKER_MAX_PAYLOAD_IN_MB": "2", "IMGCLS_URL_FETCH": "true", "IMGCLS_TOP_K": "3"})
    assert s.max_body_bytes == 2 * MIB and s.url.enabled and s.default_top_k == 3
    assert Settings.from_env({"IMGCLS_MAX_BODY_BYTES": "123", "SAGEMAKER_MAX_PAYLOAD_IN_MB": "50"}).max_body_bytes == 123
    assert not s.access_log and Settings.from_env({"IMGCLS_ACCESS_LOG": "true"}).access_log
    assert not s.server_timing and Settings.from_env({"IMGCLS_SERVER_TIMING": "on"}).server_timing
    for env, name in [({"SAGEMAKER_MAX_PAYLOAD_IN_MB": "lots"}, "SAGEMAKER_MAX_PAYLOAD_IN_MB"),
                      ({"IMGCLS_TOP_K": "0"}, "IMGCLS_TOP_K"), ({"IMGCLS_URL_FETCH": "maybe"}, "IMGCLS_URL_FETCH"),
                      ({"IMGCLS_ACCESS_LOG": "loud"}, "IMGCLS_ACCESS_LOG"),
                      ({"IMGCLS_SERVER_TIMING": "ms"}, "IMGCLS_SERVER_TIMING"),
                      ({"IMGCLS_PRECISION": "int4"}, "IMGCLS_PRECISION")]:
        with pytest.raises(SettingsError, match=name):
            Settings.from_env(env)


def test_server_timing_header_value():
    from serve.handler_service import server_timing
    assert server_timing(9.8123, 8.9) == "handler;dur=9.812, predict;dur=8.900"
    # a user's predict_fn (inference.py) is not timed: only the handler's total
    assert server_timing(1.0, None) == "handler;dur=1.000"


def test_concurrency_plan_never_oversubscribes():
    assert plan_concurrency(2, 0) == (2, 1)
    assert plan_concurrency(16, 0) == (8, 2)
    assert plan_concurrency(2, 0, workers="1") == (1, 2)
    assert plan_concurrency(8, 2) == (2, 4)
    assert plan_concurrency(8, 0, workers="4") == (4, 2)
    assert plan_concurrency(8, 0, workers="2", threads="1") == (2, 1)
    for cpus in range(1, 65):
        workers, threads = plan_concurrency(cpus, 0)
        assert workers * threads <= cpus
    with pytest.raises(SettingsError, match="SAGEMAKER_MODEL_SERVER_WORKERS"):
        plan_concurrency(4, 0, workers="many")


def test_a_containers_cgroup_cpu_quota_caps_the_cpus(tmp_path):
    """cgroup v2's cpu.max first, else v1's cfs quota over period (docker on older hosts); no limit,
    no files or files the kernel would not write: no cap, never an error at start-up."""
    import os

    from serve.settings import available_cpus, cgroup_cpu_quota

    def root(v2=None, v1=None):
        r = tmp_path / f"cg{len(list(tmp_path.iterdir()))}"
        (r / "cpu").mkdir(parents=True)
        if v2 is not None:
            (r / "cpu.max").write_text(v2)
        if v1 is not None:
            (r / "cpu" / "cpu.cfs_quota_us").write_text(v1[0])
            (r / "cpu" / "cpu.cfs_period_us").write_text(v1[1])
        return r

    assert cgroup_cpu_quota(root(v2="150000 100000\n")) == 1.5
    assert cgroup_cpu_quota(root(v2="max 100000\n")) is None
    assert cgroup_cpu_quota(root(v1=("200000\n", "100000\n"))) == 2.0  # v1 alone
    assert cgroup_cpu_quota(root(v2="max 100000", v1=("50000", "100000"))) == 0.5  # v2 says no limit; v1 has one
    assert cgroup_cpu_quota(root(v1=("-1\n", "100000\n"))) is None  # v1's "no limit"
    for v2, v1 in (("", None), ("100000 0", None), ("lots 100000", None), (None, ("100000", "0")),
                   (None, ("x", "100000"))):
        assert cgroup_cpu_quota(root(v2=v2, v1=v1)) is None, (v2, v1)
    assert cgroup_cpu_quota(tmp_path / "absent") is None

    mask = len(os.sched_getaffinity(0))
    assert available_cpus(root(v2="50000 100000")) == 1  # half a CPU still gets one worker
    assert available_cpus(root(v2=f"{(mask + 4) * 100000} 100000")) == mask  # never above the affinity mask
    assert available_cpus(tmp_path / "absent") == mask


def test_status_mapping():
    from imgcls.errors import ImageDecodeError, ImageTooLargeError
    assert status_of(ImageDecodeError("x")) == 400
    assert status_of(ImageTooLargeError("x")) == 413
    assert status_of(ValueError("bug")) == 500


# --- URL fetching: a local server on loopback, never anything else --------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        if self.path == "/img":
            body = b"IMAGEBYTES"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/big":
            self.send_response(200)
            self.end_headers()  # no Content-Length: the limit must hold while streaming
            self.wfile.write(b"x" * 5000)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.end_headers()
        elif self.path == "/slow":
            time.sleep(1.5)
            self.send_response(200)
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def origin():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


ALLOW = UrlPolicy(enabled=True, allow_private=True, max_bytes=1000, timeout_s=0.5)


def test_url_fetch_is_off_unless_enabled(origin):
    code, message = status(fetch, f"{origin}/img", UrlPolicy())
    assert code == 403 and "IMGCLS_URL_FETCH" in message


def test_url_fetch_refuses_loopback_and_private_addresses(origin):
    code, message = status(fetch, f"{origin}/img", UrlPolicy(enabled=True))
    assert code == 403 and "loopback" in message
    for ip in ("169.254.169.254", "10.1.2.3", "192.168.0.1", "::1", "::ffff:127.0.0.1", "0.0.0.0"):
        code, _ = status(check_address, ip, UrlPolicy(enabled=True))
        assert code == 403, ip
    check_address("93.184.216.34", UrlPolicy(enabled=True))  # a public address passes (no traffic sent)


def test_url_fetch_when_allowed(origin):
    assert fetch(f"{origin}/img", ALLOW) == b"IMAGEBYTES"


@pytest.mark.parametrize("path,code,words", [
    ("/big", 413, "limit"), ("/redirect", 400, "redirects"), ("/slow", 400, "longer than"), ("/missing", 400, "404"),
])
def test_url_fetch_limits(origin, path, code, words):
    got, message = status(fetch, f"{origin}{path}", ALLOW)
    assert got == code and words in message


def test_url_fetch_only_http(origin):
    for url in ("file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://127.0.0.1"):
        code, message = status(fetch, url, ALLOW)
        assert code == 400 and "http" in message


def test_precision_auto_follows_the_hardware_and_the_artifacts_agreement():
    import torch

    from imgcls import artifact
    from imgcls.hardware import fast_bf16
    from serve.predictor import resolve_precision

    cpu = torch.device("cpu")
    card = lambda **metrics: artifact.ModelCard(arch="resnet18", class_names=["a", "b"], preprocess={},  # noqa: E731
                                                metrics=metrics)
    precision, why = resolve_precision("auto", card(bf16_top1_agreement=1.0), cpu)
    assert precision == ("bf16" if fast_bf16(cpu) else "fp32"), why
    assert resolve_precision("auto", card(bf16_top1_agreement=0.97), cpu)[0] == "fp32"
    if fast_bf16(cpu):
        assert "only 97.0% of the test images" in resolve_precision("auto", card(bf16_top1_agreement=0.97), cpu)[1]
    assert "no bf16 agreement measured" in resolve_precision("auto", card(), cpu)[1] or not fast_bf16(cpu)
    assert resolve_precision("bf16", card(), cpu) == ("bf16", "IMGCLS_PRECISION=bf16")
    assert Settings.from_env({}).precision == "auto"
    with pytest.raises(SettingsError, match="not one of auto, fp32, bf16, fp16, int8"):
        Settings.from_env({"IMGCLS_PRECISION": "int4"})
