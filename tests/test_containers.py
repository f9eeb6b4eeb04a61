"""Both images built with podman and run as SageMaker runs them, then pushed by build_and_push.sh
to a real registry on loopback with ECR and STS answered by moto_server.

Each stage's time goes to the end of the pytest report (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from imgcls.hardware import fast_bf16
from serve.predictor import Predictor
from serve.process import free_port
from serve.server import DEFAULT_VMARGS
from tests.conftest import ROOT, TINY, moto_server, stage_times, wait_http, write_debughookconfig
from train.synthetic import make_dataset

pytestmark = [pytest.mark.slow, pytest.mark.containers]

PREFIX, TAG = "imgcls-ci", "test"
CA = Path("/etc/ssl/certs/ca-certificates.crt")


def run(cmd, env, timeout, stage=None, check=True, **kw) -> subprocess.CompletedProcess:
    start = time.monotonic()
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw)
    if stage:
        stage_times.append((stage, time.monotonic() - start))
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {result.returncode}:\n{result.stdout[-4000:]}\n"
                    f"{result.stderr[-4000:]}")
    return result


def wait_for_line(proc: subprocess.Popen, text: str, stage: str, timeout: float = 300) -> None:
    """Read the process's output until a line holds `text`; record how long that took."""
    start, lines = time.monotonic(), []
    while not any(text in line for line in lines):
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            pytest.fail(f"{stage}: the process exited:\n" + "".join(lines[-60:]))
        lines.append(line)
        assert time.monotonic() - start < timeout, "".join(lines[-60:])
    stage_times.append((stage, time.monotonic() - start))


@pytest.fixture(scope="module")
def env():
    e = dict(os.environ, DOCKER="podman", CONTAINERS_CONF=str(ROOT / "local_test" / "podman" / "containers.conf"),
             PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return e


@pytest.fixture(scope="module")
def base_image(env) -> str:
    out = run([str(ROOT / "local_test" / "podman_setup.sh")], env, 900, stage="podman setup + base image")
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def build_args(base_image) -> list[str]:
    args = ["--build-arg", f"BASE_IMAGE={base_image}", "--build-arg", "TORCH_INDEX_URL=https://pypi.org/simple",
            # Weights cannot be downloaded here; the baked-in path is checked with a local file below.
            "--build-arg", "PRETRAINED_ARCHS="]
    if CA.is_file():  # builds go through an inspecting proxy here
        args += ["--build-arg", "PIP_CERT=/run/build-ca.crt", "-v", f"{CA}:/run/build-ca.crt:ro"]
    return args


def remove_containers_of(env, refs) -> None:
    """SageMaker local mode (docker compose) leaves its stopped containers behind, and they pin the
    image they ran: one set per CI run would fill the disk."""
    for ref in refs:
        listing = subprocess.run(["podman", "ps", "-a", "-q", "--filter", f"ancestor={ref}"], env=env,
                                 capture_output=True, text=True, timeout=120)
        if listing.stdout.split():
            subprocess.run(["podman", "rm", "-f", *listing.stdout.split()], env=env, capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def images(env, build_args):
    refs = {"train": f"localhost/{PREFIX}-train:{TAG}", "serve": f"localhost/{PREFIX}-serve:{TAG}"}
    remove_containers_of(env, refs.values())  # what an interrupted earlier run left
    out = run([str(ROOT / "build_and_push.sh"), "--no-push", "--prefix", PREFIX, "--tag", TAG, "--", *build_args],
              env, 3000, stage="build both images")
    names = out.stdout.strip().splitlines()[-2:]
    assert names == [f"{PREFIX}-train:{TAG}", f"{PREFIX}-serve:{TAG}"]
    sizes = run(["podman", "images", "--format", "{{.Repository}}:{{.Tag}} {{.Size}}"], env, 60).stdout
    stage_times.append(("image sizes: " + "; ".join(s for s in sizes.splitlines() if s.startswith(f"localhost/{PREFIX}-") and f":{TAG} " in s), 0.0))
    # The Dockerfiles share their first layers (base, Python, torch): built and pushed once.
    layers = {k: json.loads(run(["podman", "image", "inspect", v], env, 60).stdout)[0]["RootFS"]["Layers"]
              for k, v in refs.items()}
    assert layers["train"][:4] == layers["serve"][:4]
    yield refs
    remove_containers_of(env, refs.values())


@pytest.fixture(scope="module")
def trained_dir(images, env, tmp_path_factory) -> Path:
    """local_test/train_local.sh IMAGE on a tiny dataset, from 'ImageNet' weights baked in at TORCH_HOME."""
    base = tmp_path_factory.mktemp("container-job")
    config = base / "input" / "config"
    config.mkdir(parents=True)
    (config / "resourceconfig.json").write_text(json.dumps({"current_host": "algo-1", "hosts": ["algo-1"]}))
    spec = {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated", "RecordWrapperType": "None"}
    (config / "inputdataconfig.json").write_text(json.dumps({"train": spec, "test": spec}))
    (config / "hyperparameters.json").write_text(json.dumps({**TINY, "weights": "imagenet", "num-workers": "1"}))
    # SageMaker Debugger as SageMaker configures it (losses only: cheap, and fused-norm stays on).
    write_debughookconfig(config, "/opt/ml/output/tensors", 2, [{"CollectionName": "losses"}])
    make_dataset(base / "input" / "data", per_class=10, size=32, classes=3, test_per_class=3, seed=1)
    # Stand-in for the weights the image bakes in: a state dict under torchvision's file name.
    import torchvision
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    hub = base / "torch_hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), hub / os.path.basename(weights.url))
    run_env = dict(env, EXTRA_RUN_ARGS=f"-v {hub}:/opt/torch/hub/checkpoints:ro")
    out = run([str(ROOT / "local_test" / "train_local.sh"), images["train"], str(base)], run_env, 900,
              stage="train in the training image")
    log = out.stdout + out.stderr
    assert "model: resnet18 from torchvision's ImageNet weights" in log  # found at the image's TORCH_HOME
    assert "[metrics] epoch=2" in log and "[metrics] test_loss=" in log
    # the image keeps gcc: the job compiles its batch-norm and crop kernels for the CPU it runs on
    want = "fused-norm=auto: 20 batch norms train" if fast_bf16(torch.device("cpu")) else "fused-norm=auto: ATen's"
    assert want in log
    assert "random crop: a batch at a time, in one call of train/crop_resize.c" in log  # in the loader's worker
    # smdebug imports in the image (it needs pandas and requests, which it does not declare) and writes the losses
    assert "smdebug cannot be imported" not in log and "debugger: smdebug hook writing to /opt/ml/output/tensors" in log
    assert list((base / "output" / "tensors").glob("events/*/*.tfevents"))
    assert (base / "model" / "model.json").is_file() and (base / "model" / "model.pt").is_file()
    assert not (base / "output" / "failure").exists()
    return base


def test_training_image_runs_the_toolkit_and_writes_the_artifact(trained_dir):
    card = json.loads((trained_dir / "model" / "model.json").read_text())
    assert card["arch"] == "resnet18" and card["num_classes"] == 3
    assert json.loads((trained_dir / "output" / "data" / "metrics.json").read_text())["history"]


def _ddp_job(base: Path, host: str, hosts: list[str], **hps) -> Path:
    config = base / "input" / "config"
    config.mkdir(parents=True)
    (config / "resourceconfig.json").write_text(json.dumps({"current_host": host, "hosts": hosts,
                                                             "network_interface_name": "eth0"}))
    spec = {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated", "RecordWrapperType": "None"}
    (config / "inputdataconfig.json").write_text(json.dumps({"train": spec, "test": spec}))
    (config / "hyperparameters.json").write_text(json.dumps({**TINY, **hps}))
    make_dataset(base / "input" / "data", per_class=10, size=32, classes=3, test_per_class=3, seed=1)
    return base


def test_two_training_containers_train_one_model_over_gloo(images, env, tmp_path):
    """Two hosts as SageMaker runs them: two containers on one network, algo-1 and algo-2 by name,
    each with its own /opt/ml and resourceconfig.json. They train together over gloo (batch 4 each)
    and algo-1 alone writes the model, which equals one process training with batch 8."""
    common = {"freeze": "backbone", "augment": "none", "precision": "fp32", "epochs": "2"}
    hosts = ["algo-1", "algo-2"]
    net = f"imgcls-ddp-{os.getpid()}"
    run(["podman", "network", "create", net], env, 60)
    procs = {}
    try:
        started = time.monotonic()
        for host in hosts:
            base = _ddp_job(tmp_path / host, host, hosts, **common, **{"batch-size": "4"})
            run_env = dict(env, EXTRA_RUN_ARGS=f"--network {net} --name {net}-{host} --network-alias {host}")
            procs[host] = subprocess.Popen([str(ROOT / "local_test" / "train_local.sh"), images["train"], str(base)],
                                           env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        logs = {host: proc.communicate(timeout=900)[0] for host, proc in procs.items()}
        stage_times.append(("two training containers over gloo", time.monotonic() - started))
    finally:
        for host, proc in procs.items():
            if proc.poll() is None:
                proc.kill()
            subprocess.run(["podman", "rm", "-f", f"{net}-{host}"], env=env, capture_output=True, timeout=120)
        subprocess.run(["podman", "network", "rm", "-f", net], env=env, capture_output=True, timeout=120)
    for host, proc in procs.items():
        assert proc.returncode == 0, f"{host}:\n{logs[host][-4000:]}"
    assert "data parallel: 2 hosts x 1 processes = 2 ranks; this host is node 0; master algo-1:29500" in logs["algo-1"]
    assert "this host is node 1; master algo-1:29500" in logs["algo-2"]
    assert "batch size 4 per process x 2 processes = global batch 8" in logs["algo-1"]
    assert logs["algo-1"].count("[metrics] epoch=") == 2 and "[metrics]" not in logs["algo-2"]
    assert (tmp_path / "algo-1" / "model" / "model.pt").is_file()
    assert not any((tmp_path / "algo-2" / "model").iterdir())  # one model, from rank 0

    single = _ddp_job(tmp_path / "single", "algo-1", ["algo-1"], **common, **{"batch-size": "8"})
    run([str(ROOT / "local_test" / "train_local.sh"), "--native", str(single)], env, 600)
    ours = torch.load(tmp_path / "algo-1" / "model" / "model.pt", map_location="cpu", weights_only=True)
    alone = torch.load(single / "model" / "model.pt", map_location="cpu", weights_only=True)
    for name, value in alone.items():
        if value.is_floating_point():
            assert torch.allclose(ours[name], value, atol=1e-4), name


def test_training_image_reports_a_bad_hyperparameter(images, env, trained_dir, tmp_path):
    base = tmp_path / "bad"
    shutil.copytree(trained_dir / "input", base / "input")
    (base / "input" / "config" / "hyperparameters.json").write_text(json.dumps({**TINY, "lr": "fast"}))
    out = run([str(ROOT / "local_test" / "train_local.sh"), images["train"], str(base)], env, 600, check=False)
    assert out.returncode != 0
    failure = (base / "output" / "failure").read_text()
    assert "lr" in failure.splitlines()[0]


def test_serving_image_answers_like_the_model(images, env, trained_dir):
    port = free_port()
    name = f"imgcls-ci-serve-{port}"
    # fp32 on both sides: the comparison below is to float rounding (auto may pick bf16 on this CPU)
    serve_env = dict(env, SAGEMAKER_BIND_TO_PORT=str(port), CONTAINER_NAME=name,
                     EXTRA_RUN_ARGS=(env.get("EXTRA_RUN_ARGS", "") + " -e IMGCLS_PRECISION=fp32").strip())
    proc = subprocess.Popen([str(ROOT / "local_test" / "serve_local.sh"), images["serve"], str(trained_dir)],
                            env=serve_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_line(proc, "serve INFO ready", "serving container start-up to ready")
        image = sorted((trained_dir / "input" / "data" / "test").rglob("*.jpg"))[0]
        predict_env = dict(env, ENDPOINT=f"http://127.0.0.1:{port}", TOP_K="2")
        out = run([str(ROOT / "local_test" / "predict.sh"), str(image)], predict_env, 120, stage="predict.sh")
        (pred,) = json.loads(out.stdout)["predictions"]
        expected = Predictor.from_model_dir(trained_dir / "model", precision="fp32").predict([image.read_bytes()])[0]
        assert [t["index"] for t in pred["top_k"]] == list(expected.argsort()[::-1][:2])
        assert abs(pred["probability"] - float(expected.max())) < 1e-4
        bad = run([str(ROOT / "local_test" / "predict.sh"), str(ROOT / "README.md"), "image/png"], predict_env, 120,
                  check=False)
        assert bad.returncode != 0 and json.loads(bad.stdout)["code"] == 400
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=10) as resp:
            assert json.loads(resp.read())["status"] == "Healthy"
        # the image's JVM runs with serve's flags, not with an ENV that replaces them
        cmdlines = run(["podman", "exec", name, "sh", "-c",
                        "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done"],
                       env, 60, stage="the container's command lines").stdout
        jvms = [line.split() for line in cmdlines.split("\n") if "com.amazonaws.ml.mms.ModelServer" in line]
        assert jvms and all(flag in jvm for jvm in jvms for flag in DEFAULT_VMARGS.split()), cmdlines[-3000:]
    finally:
        subprocess.run(["podman", "stop", "-t", "10", name], env=env, capture_output=True, timeout=120)
        proc.wait(timeout=60)


def test_entrypoint_runs_other_commands(images, env):
    out = run(["podman", "run", "--rm", images["serve"], "python", "-c", "import serve, imgcls; print('ok')"], env, 120)
    assert out.stdout.strip() == "ok"
    info = run(["podman", "image", "inspect", images["serve"]], env, 60)
    meta = json.loads(info.stdout)[0]
    assert meta["Config"]["Labels"]["com.amazonaws.sagemaker.capabilities.accept-bind-to-port"] == "true"
    assert "8080/tcp" in meta["Config"]["ExposedPorts"]


@pytest.fixture
def registry(tmp_path):
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {tmp_path / 'blobs'}\n"
                      f"http:\n  addr: 127.0.0.1:{port}\n")
    proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/v2/")
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def moto():
    with moto_server() as url:
        yield url


def aws_cli(env) -> str:
    found = shutil.which("aws", path=env["PATH"])
    if found:
        return found
    venv = ROOT / ".venv-awscli"
    if not (venv / "bin" / "aws").exists():
        run([sys.executable, "-m", "venv", str(venv)], env, 120)
        run([str(venv / "bin" / "pip"), "install", "-q", "awscli"], env, 600)
    return str(venv / "bin" / "aws")


@pytest.fixture
def pushed_tags(env, registry):
    """Afterwards, untag what the push left in the local store (one set per run would fill the disk)."""
    yield
    listing = subprocess.run(["podman", "images", "--format", "{{.Repository}}:{{.Tag}}"], env=env,
                             capture_output=True, text=True)
    tags = [t for t in listing.stdout.split() if t.startswith(f"{registry}/")]
    if tags:
        subprocess.run(["podman", "rmi", *tags], env=env, capture_output=True)


def test_build_and_push_to_a_registry_with_ecr_on_moto(images, env, build_args, registry, moto, tmp_path,
                                                        pushed_tags):
    registries_conf = tmp_path / "registries.conf"
    registries_conf.write_text(f'[[registry]]\nlocation = "{registry}"\ninsecure = true\n')
    aws_dir = str(Path(aws_cli(env)).parent)
    push_env = dict(env, AWS_ENDPOINT_URL=moto, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                    AWS_REGION="eu-west-1", REGISTRY=registry, CONTAINERS_REGISTRIES_CONF=str(registries_conf),
                    PATH=f"{aws_dir}{os.pathsep}{env['PATH']}", REGISTRY_AUTH_FILE=str(tmp_path / "auth.json"))
    push_env.pop("AWS_PROFILE", None)
    out = run([str(ROOT / "build_and_push.sh"), "--prefix", PREFIX, "--tag", TAG, "--", *build_args], push_env,
              3000, stage="build_and_push.sh (cached build + push)")
    uris = out.stdout.strip().splitlines()[-2:]
    assert uris == [f"{registry}/{PREFIX}-train:{TAG}", f"{registry}/{PREFIX}-serve:{TAG}"]
    for image in ("train", "serve"):
        for tag in (TAG, "latest"):
            req = urllib.request.Request(f"http://{registry}/v2/{PREFIX}-{image}/manifests/{tag}", method="HEAD",
                                         headers={"Accept": "application/vnd.oci.image.manifest.v1+json, "
                                                            "application/vnd.docker.distribution.manifest.v2+json"})
            with urllib.request.urlopen(req, timeout=10) as resp:
                assert resp.status == 200
    import boto3
    ecr = boto3.client("ecr", endpoint_url=moto, region_name="eu-west-1", aws_access_key_id="testing",
                       aws_secret_access_key="testing")
    names = {r["repositoryName"] for r in ecr.describe_repositories()["repositories"]}
    assert {f"{PREFIX}-train", f"{PREFIX}-serve"} <= names


def test_build_and_push_says_what_is_missing(env, tmp_path):
    no_engine = run([str(ROOT / "build_and_push.sh"), "--no-push"], dict(env, DOCKER="no-such-engine"), 60,
                    check=False)
    assert no_engine.returncode == 1 and "container engine 'no-such-engine' not found" in no_engine.stderr
    assert len(no_engine.stderr.strip().splitlines()) == 1
    bad = run([str(ROOT / "build_and_push.sh"), "--only", "both"], env, 60, check=False)
    assert bad.returncode == 1 and "--only must be train or serve" in bad.stderr
    no_creds = dict(env, AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y",
                    AWS_REGION="eu-west-1", AWS_MAX_ATTEMPTS="1", AWS_CONFIG_FILE=str(tmp_path / "none"))
    no_creds["PATH"] = f"{Path(aws_cli(env)).parent}{os.pathsep}{env['PATH']}"
    out = run([str(ROOT / "build_and_push.sh")], no_creds, 120, check=False)
    assert out.returncode == 1 and "no usable AWS credentials" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    if shutil.which("aws", path="/usr/bin:/bin") is None:
        no_cli = run([str(ROOT / "build_and_push.sh")], dict(env, PATH="/usr/bin:/bin"), 60, check=False)
        assert no_cli.returncode == 1 and "the aws CLI is not installed" in no_cli.stderr


@pytest.fixture
def docker_api(env, tmp_path):
    """podman's Docker-compatible API on a socket: what SageMaker local mode (docker compose) talks to."""
    sock = tmp_path / "podman.sock"
    proc = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{sock}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert time.monotonic() < deadline, "podman system service did not start"
        time.sleep(0.2)
    config = tmp_path / "sdk.yaml"
    config.write_text("SchemaVersion: '1.0'\nSageMaker:\n  PythonSDK:\n    Modules:\n      TelemetryOptOut: true\n")
    yield dict(env, DOCKER_HOST=f"unix://{sock}", AWS_REGION="eu-west-1", AWS_ACCESS_KEY_ID="local",
               AWS_SECRET_ACCESS_KEY="local", SAGEMAKER_USER_CONFIG_OVERRIDE=str(config),
               SAGEMAKER_SUPPRESS_V2_WARNING="1", IMGCLS_LOCAL_ROOT=str(tmp_path / "local-root"))
    proc.terminate()
    proc.wait(timeout=30)


def test_sagemaker_local_mode_trains_and_serves(images, trained_dir, docker_api, tmp_path):
    """launch.py train/deploy --local: the SDK's local mode (docker compose) on podman's Docker API."""
    launch_py = [sys.executable, str(ROOT / "launch.py")]
    hps = [a for k, v in {**TINY, "epochs": "1"}.items() for a in ("--hp", f"{k}={v}")]
    run([*launch_py, "train", "--local", "--local-data", str(trained_dir / "input" / "data"), "--train-image",
         images["train"], "--output-dir", str(tmp_path / "out"), *hps], docker_api, 900,
        stage="launch.py train --local (SDK local mode)")
    archive = tmp_path / "out" / "model.tar.gz"
    import tarfile
    with tarfile.open(archive) as tar:
        assert {"model.json", "model.pt"} <= set(tar.getnames())
    proc = subprocess.Popen([*launch_py, "deploy", "--local", "--model-data", str(archive), "--serve-image",
                             images["serve"], "--endpoint-name", "ci-local"], env=docker_api, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_line(proc, "serving on http://localhost:8080", "launch.py deploy --local to serving")
        image = sorted((trained_dir / "input" / "data" / "test").rglob("*.jpg"))[0]
        out = run([*launch_py, "predict", str(image), "--url", "http://localhost:8080", "--top-k", "2"], docker_api,
                  120)
        assert out.stdout.startswith(f"{image}: ") and out.stdout.count(" 0.") + out.stdout.count(" 1.0") == 2
    finally:
        proc.send_signal(2)  # Ctrl-C: the endpoint is deleted and its container stopped
        rest, _ = proc.communicate(timeout=120)
    assert "endpoint ci-local stopped" in rest
    # The SDK's per-run folders (compose files, artifacts) went to IMGCLS_LOCAL_ROOT, not /tmp.
    assert list((tmp_path / "local-root").rglob("docker-compose.yaml"))


def test_tune_local_in_the_training_image(images, env, trained_dir, tmp_path):
    """tune --local --image: each Optuna trial is a run of the training image, its objective read from the log."""
    out = run([sys.executable, str(ROOT / "launch.py"), "tune", "--local", "--image", images["train"], "--local-data",
               str(trained_dir / "input" / "data"), "--work-dir", str(tmp_path / "trials"),
               "--max-jobs", "2", "--epochs", "1:1", "--batch-sizes", "8",
               "--hp", "arch=resnet18", "--hp", "weights=none", "--hp", "image-size=32", "--hp", "num-workers=0"],
              env, 900, stage="launch.py tune --local --image (2 trials)")
    trials = [line for line in out.stdout.splitlines() if line.startswith("trial ")]
    assert len(trials) == 2 and all("valid:loss=" in t for t in trials), out.stdout + out.stderr
    assert any(line.startswith("best trial") for line in out.stdout.splitlines())
