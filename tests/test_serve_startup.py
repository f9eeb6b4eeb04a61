"""`serve` refuses to start, visibly, when it cannot serve the model it was given."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import psutil
import pytest

from imgcls import artifact
from imgcls.models import create_model
from imgcls.presets import ClassificationPresetEval
from serve.process import ServeProcess as Server
from serve.process import free_port

pytestmark = pytest.mark.slow


def make_artifact(base, num_classes=3):
    model = create_model("resnet18", num_classes)
    card = artifact.ModelCard(arch="resnet18", class_names=[f"c{i}" for i in range(num_classes)],
                              preprocess=ClassificationPresetEval(32).to_dict())
    artifact.save(base / "model", model, card)
    return base / "model"


def leftovers(run_dir: str) -> list[str]:
    """Model server processes still running from a server's run dir (the JVM and its workers name it)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if run_dir in cmd:
            found.append(cmd[:200])
    return found


def test_damaged_weights_stop_the_server_with_the_reason(tmp_path):
    model_dir = make_artifact(tmp_path / "ml")
    weights = model_dir / "model.pt"
    weights.write_bytes(weights.read_bytes()[:5000])
    started = time.monotonic()
    server = Server(tmp_path / "ml")
    code = server.wait_exit(timeout=120)
    out = server.output
    assert code == 1, out[-3000:]
    assert "the model could not be loaded" in out and "model.pt cannot be read" in out
    assert "serve INFO ready" not in out
    assert time.monotonic() - started < 60
    time.sleep(1)
    assert server.run_dir and leftovers(server.run_dir) == []
    assert not Path(server.run_dir).exists()


def test_weights_for_another_class_count_are_refused(tmp_path):
    model_dir = make_artifact(tmp_path / "ml", num_classes=3)
    meta = json.loads((model_dir / "model.json").read_text())
    meta["class_names"] = ["a", "b", "c", "d"]
    (model_dir / "model.json").write_text(json.dumps(meta))
    server = Server(tmp_path / "ml")
    assert server.wait_exit(timeout=120) == 1
    assert "does not match model.json" in server.output


@pytest.mark.parametrize("setup,env,words", [
    ("missing", {}, "No model.json"),
    ("ok", {"SAGEMAKER_MAX_PAYLOAD_IN_MB": "six"}, "SAGEMAKER_MAX_PAYLOAD_IN_MB='six' is not a number"),
    ("ok", {"SAGEMAKER_MODEL_SERVER_WORKERS": "0"}, "SAGEMAKER_MODEL_SERVER_WORKERS='0' must be at least 1"),
    ("ok", {"SAGEMAKER_BIND_TO_PORT": "40000"}, "1 to 32766"),
    ("no-weights", {}, "No model.pt"),
])
def test_checks_before_the_model_server_starts(tmp_path, setup, env, words):
    if setup != "missing":
        model_dir = make_artifact(tmp_path / "ml")
        if setup == "no-weights":
            (model_dir / "model.pt").unlink()
    server = Server(tmp_path / "ml", **env)
    assert server.wait_exit(timeout=60) == 1
    assert words in server.output
    assert "multi-model-server" not in server.output  # stopped before starting it


def test_port_in_use_is_named(tmp_path):
    make_artifact(tmp_path / "ml")
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", port))
        busy.listen()
        server = Server(tmp_path / "ml", SAGEMAKER_BIND_TO_PORT=str(port))
        assert server.wait_exit(timeout=60) == 1
    assert f"Port {port} is not free" in server.output


def test_serves_a_model_tar_gz_as_downloaded(tmp_path):
    """A model dir holding only the training job's model.tar.gz is unpacked and served."""
    import tarfile
    model_dir = make_artifact(tmp_path / "job")
    served = tmp_path / "ml" / "model"
    served.mkdir(parents=True)
    with tarfile.open(served / "model.tar.gz", "w:gz") as tar:
        for name in ("model.json", "model.pt"):
            tar.add(model_dir / name, arcname=name)
    server = Server(tmp_path / "ml")
    try:
        server.wait_ready()
        code, _, body = server.invoke(_jpeg(), "image/jpeg")
        assert code == 200 and json.loads(body)["predictions"][0]["label"] in ("c0", "c1", "c2")
        assert "unpacked" in server.output
    finally:
        server.stop()


def _jpeg() -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (50, 40), (200, 30, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def test_local_test_scripts(tmp_path):
    """serve_local.sh --native serves a /opt/ml-shaped folder; predict.sh prints the endpoint's JSON."""
    import subprocess

    from tests.conftest import ROOT
    make_artifact(tmp_path / "ml")
    (tmp_path / "cat.jpg").write_bytes(_jpeg())
    server = Server(tmp_path / "ml",
                    command=[str(ROOT / "local_test" / "serve_local.sh"), "--native", str(tmp_path / "ml")])
    try:
        server.wait_ready()
        env = {"ENDPOINT": server.url, "TOP_K": "2", "PATH": "/usr/bin:/bin"}
        out = subprocess.run([str(ROOT / "local_test" / "predict.sh"), str(tmp_path / "cat.jpg")], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert len(json.loads(out.stdout)["predictions"][0]["top_k"]) == 2
        bad = subprocess.run([str(ROOT / "local_test" / "predict.sh"), str(tmp_path / "cat.jpg"), "text/plain"],
                             env=env, capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0 and json.loads(bad.stdout)["code"] == 415
    finally:
        server.stop()
    no_model = subprocess.run([str(ROOT / "local_test" / "serve_local.sh"), "--native", str(tmp_path / "empty")],
                              capture_output=True, text=True, timeout=60)
    assert no_model.returncode == 2 and "train one first" in no_model.stderr
