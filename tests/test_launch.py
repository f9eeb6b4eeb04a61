"""launch.py against moto_server over HTTP: what the driver sends, checked through botocore's
before-call hook (moto stores some fields loosely), and what lands in S3."""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import pickle
import tarfile
import urllib.request
import zipfile

import boto3
import numpy as np
import pytest
from PIL import Image

import launch
from tests.conftest import moto_server, train_run
from train.metrics import metric_definitions
from train.synthetic import make_dataset

pytestmark = pytest.mark.slow

REGION = "eu-west-1"
ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
TRAIN_IMAGE = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/imgcls-train:abc1234"
SERVE_IMAGE = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/imgcls-serve:abc1234"


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    with moto_server() as url:
        yield from _aws_env(url, tmp_path_factory)


def _aws_env(url, tmp_path_factory):
    config = tmp_path_factory.mktemp("sdk") / "config.yaml"
    config.write_text("SchemaVersion: '1.0'\nSageMaker:\n  PythonSDK:\n    Modules:\n      TelemetryOptOut: true\n")
    saved = dict(os.environ)
    for key in list(os.environ):
        if key.startswith(("AWS_", "IMGCLS_", "SAGEMAKER_ROLE")):
            del os.environ[key]
    os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_REGION=REGION, AWS_CONFIG_FILE=str(config.parent / "none"),
                      AWS_SHARED_CREDENTIALS_FILE=str(config.parent / "none"),
                      SAGEMAKER_USER_CONFIG_OVERRIDE=str(config), IMGCLS_BUCKET="imgcls-test", IMGCLS_ROLE=ROLE,
                      IMGCLS_TRAIN_IMAGE=TRAIN_IMAGE, IMGCLS_SERVE_IMAGE=SERVE_IMAGE)
    boto3.client("s3", region_name=REGION).create_bucket(
        Bucket="imgcls-test", CreateBucketConfiguration={"LocationConstraint": REGION})
    yield url
    os.environ.clear()
    os.environ.update(saved)


class Recorder:
    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, operation, params):
        try:
            snapshot = copy.deepcopy(params)
        except TypeError:  # uploads carry open files
            snapshot = dict(params)
        self.calls.append((operation, snapshot))

    def one(self, operation) -> dict:
        found = [p for op, p in self.calls if op == operation]
        assert len(found) == 1, (operation, [op for op, _ in self.calls])
        return found[0]

    def ops(self) -> list[str]:
        return [op for op, _ in self.calls]


def run(argv, capsys) -> tuple[int, Recorder, str, str]:
    rec = Recorder()
    code = launch.main(argv, on_request=rec)
    out = capsys.readouterr()
    return code, rec, out.out, out.err


def keys(prefix: str) -> list[str]:
    s3 = boto3.client("s3", region_name=REGION)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="imgcls-test", Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.fixture(scope="module")
def uploaded(moto, tmp_path_factory):
    data = tmp_path_factory.mktemp("folders")
    make_dataset(data, per_class=3, size=24, classes=2, test_per_class=1, seed=0)
    (data / "valid").mkdir()
    for cls in ("circle", "square"):
        (data / "valid" / cls).mkdir()
        img = next((data / "train" / cls).iterdir())
        (data / "valid" / cls / img.name).write_bytes(img.read_bytes())
    assert launch.main(["upload-data", str(data)]) == 0
    return data


def test_upload_data_folders(uploaded):
    local = sorted(p.relative_to(uploaded).as_posix() for p in uploaded.rglob("*") if p.is_file())
    assert keys("imgcls/data/") == [f"imgcls/data/{k}" for k in local]


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 16), color).save(buf, format="JPEG")
    return buf.getvalue()


def test_upload_data_converts_dogimages(moto, tmp_path, capsys):
    archive = tmp_path / "dogImages.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for split in ("train", "valid", "test"):
            for breed in ("001.Affenpinscher", "002.Afghan_hound"):
                zf.writestr(f"dogImages/{split}/{breed}/{breed[4:]}_0000{len(split)}.jpg", _jpeg((9, 9, 9)))
        zf.writestr("__MACOSX/dogImages/._junk", b"x")
    code, _, out, err = run(["upload-data", str(archive), "--format", "dogimages", "--s3", "s3://imgcls-test/dogs"],
                            capsys)
    assert code == 0, err
    got = keys("dogs/")
    assert len(got) == 6 and "dogs/train/001.Affenpinscher/Affenpinscher_00005.jpg" in got
    assert "uploaded 6 files (train, valid, test)" in out


def test_upload_data_converts_cifar100(moto, tmp_path, capsys):
    rng = np.random.default_rng(0)

    def batch(n):
        return {b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), b"fine_labels": [i % 3 for i in range(n)]}

    archive = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for name, obj in (("meta", {b"fine_label_names": [b"apple", b"bee", b"cloud"]}), ("train", batch(6)),
                          ("test", batch(3))):
            blob = pickle.dumps(obj)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    code, _, _, err = run(["upload-data", str(archive), "--format", "cifar100", "--s3", "s3://imgcls-test/cifar"],
                          capsys)
    assert code == 0, err
    got = keys("cifar/")
    assert len(got) == 9 and "cifar/train/bee/00001.png" in got and "cifar/test/cloud/00002.png" in got
    body = boto3.client("s3", region_name=REGION).get_object(Bucket="imgcls-test", Key="cifar/train/bee/00001.png")
    assert Image.open(io.BytesIO(body["Body"].read())).size == (32, 32)


def test_train_sends_the_whole_job(uploaded, capsys):
    code, rec, out, err = run(["train", "--hp", "arch=resnet18", "--hp", "lr=0.05", "--spot", "--max-run", "3600",
                               "--save-interval", "25", "--job-name", "job-one"], capsys)
    assert code == 0, err
    req = rec.one("CreateTrainingJob")
    assert req["AlgorithmSpecification"]["TrainingImage"] == TRAIN_IMAGE
    assert req["AlgorithmSpecification"]["MetricDefinitions"] == metric_definitions()
    assert req["HyperParameters"]["lr"].strip('"') == "0.05" and req["HyperParameters"]["arch"].strip('"') == "resnet18"
    assert req["RoleArn"] == ROLE
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in req["InputDataConfig"]}
    assert channels == {c: f"s3://imgcls-test/imgcls/data/{c}/" for c in ("train", "valid", "test")}
    assert req["EnableManagedSpotTraining"] is True
    assert req["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200}
    assert req["CheckpointConfig"] == {"S3Uri": "s3://imgcls-test/imgcls/checkpoints/job-one",
                                       "LocalPath": "/opt/ml/checkpoints"}
    hook = req["DebugHookConfig"]
    ours = {c["CollectionName"]: c for c in hook["CollectionConfigurations"]
            if c["CollectionName"] in ("losses", "weights", "gradients", "biases")}
    assert len(ours) == 4  # the rules add what else they need (relu_input)
    names = [c["CollectionName"] for c in hook["CollectionConfigurations"]]
    assert len(names) == len(set(names)), names  # no second "losses" at the rules' own interval
    assert all(c["CollectionParameters"]["save_interval"] == "25" for c in ours.values())
    rules = {r["RuleConfigurationName"] for r in req["DebugRuleConfigurations"]}
    assert {"LossNotDecreasing", "VanishingGradient", "Overfit", "Overtraining", "PoorWeightInitialization"} <= rules
    assert {r["RuleConfigurationName"] for r in req["ProfilerRuleConfigurations"]} >= {"ProfilerReport",
                                                                                         "LowGPUUtilization"}
    assert req["ProfilerConfig"]["ProfilingIntervalInMilliseconds"] == 500
    assert "training job job-one started" in out
    desc = boto3.client("sagemaker", region_name=REGION).describe_training_job(TrainingJobName="job-one")
    assert desc["AlgorithmSpecification"]["TrainingImage"] == TRAIN_IMAGE


def test_train_without_debugger_and_profiler(uploaded, capsys):
    code, rec, _, err = run(["train", "--no-debugger", "--no-profiler", "--job-name", "job-two"], capsys)
    assert code == 0, err
    req = rec.one("CreateTrainingJob")
    assert "DebugHookConfig" not in req and "DebugRuleConfigurations" not in req
    assert "ProfilerRuleConfigurations" not in req
    assert req["ProfilerConfig"].get("DisableProfiler") is True
    assert "EnableManagedSpotTraining" not in req or req["EnableManagedSpotTraining"] is False


def test_tune_sends_ranges_objective_and_metric_definitions(uploaded, capsys):
    code, rec, out, err = run(["tune", "--hp", "arch=resnet18", "--hp", "lr=0.5", "--optimizers", "sgd,adamw",
                               "--weight-decay", "1e-5:1e-2", "--max-jobs", "6", "--max-parallel-jobs", "2",
                               "--objective", "valid-accuracy", "--warm-start", "older-tuning", "--job-name", "tune-1"],
                              capsys)
    assert code == 0, err
    req = rec.one("CreateHyperParameterTuningJob")
    cfg = req["HyperParameterTuningJobConfig"]
    assert cfg["HyperParameterTuningJobObjective"] == {"Type": "Maximize", "MetricName": "valid:accuracy"}
    assert cfg["Strategy"] == "Bayesian" and cfg["TrainingJobEarlyStoppingType"] == "Auto"
    assert cfg["ResourceLimits"]["MaxNumberOfTrainingJobs"] == 6
    assert cfg["ResourceLimits"]["MaxParallelTrainingJobs"] == 2
    ranges = cfg["ParameterRanges"]
    assert ranges["ContinuousParameterRanges"][0] == {"Name": "lr", "MinValue": "0.001", "MaxValue": "0.1",
                                                      "ScalingType": "Logarithmic"}
    assert {r["Name"]: r for r in ranges["ContinuousParameterRanges"]}["weight-decay"]["ScalingType"] == "Logarithmic"
    cats = {r["Name"]: r["Values"] for r in ranges["CategoricalParameterRanges"]}
    assert cats["batch-size"] == ["32", "64", "128", "256", "512"] and cats["optimizer"] == ["sgd", "adamw"]
    assert ranges["IntegerParameterRanges"] == [{"Name": "epochs", "MinValue": "2", "MaxValue": "4",
                                                 "ScalingType": "Auto"}]
    job = req["TrainingJobDefinition"]
    assert job["AlgorithmSpecification"]["MetricDefinitions"] == metric_definitions()
    assert job["AlgorithmSpecification"]["TrainingImage"] == TRAIN_IMAGE
    assert "lr" not in job["StaticHyperParameters"] and "arch" in job["StaticHyperParameters"]
    assert req["WarmStartConfig"]["ParentHyperParameterTuningJobs"] == [{"HyperParameterTuningJobName": "older-tuning"}]
    assert "tuning job tune-1 started" in out


def test_tune_with_fixed_epochs(uploaded, capsys):
    code, rec, _, err = run(["tune", "--epochs", "3:3", "--job-name", "tune-3"], capsys)
    assert code == 0, err
    req = rec.one("CreateHyperParameterTuningJob")
    assert not req["HyperParameterTuningJobConfig"]["ParameterRanges"].get("IntegerParameterRanges")
    assert req["TrainingJobDefinition"]["StaticHyperParameters"]["epochs"].strip('"') == "3"


def test_tune_hyperband(uploaded, capsys):
    code, rec, _, err = run(["tune", "--strategy", "Hyperband", "--epochs", "1:8", "--job-name", "tune-2"], capsys)
    assert code == 0, err
    req = rec.one("CreateHyperParameterTuningJob")
    cfg = req["HyperParameterTuningJobConfig"]
    assert cfg["Strategy"] == "Hyperband" and cfg["TrainingJobEarlyStoppingType"] == "Off"
    assert cfg["StrategyConfig"]["HyperbandStrategyConfig"] == {"MinResource": 1, "MaxResource": 8}
    assert "IntegerParameterRanges" not in cfg["ParameterRanges"] or not cfg["ParameterRanges"]["IntegerParameterRanges"]
    assert req["TrainingJobDefinition"]["StaticHyperParameters"]["epochs"].strip('"') == "8"


def test_best_reads_the_tuning_job(uploaded, capsys):
    assert run(["tune", "--job-name", "tune-best", "--max-jobs", "2"], capsys)[0] == 0
    code, rec, out, err = run(["best", "tune-best"], capsys)
    # moto answers with a placeholder best job and does not implement the per-job listing.
    assert code == 0, err
    assert out.startswith("best job FakeTrainingJobName: valid:loss = 1.0")
    assert rec.ops() == ["DescribeHyperParameterTuningJob", "ListTrainingJobsForHyperParameterTuningJob"]
    code, _, out, err = run(["best", "no-such-tuning"], capsys)
    assert code == 2 and err.startswith("error: tuning job 'no-such-tuning'") and len(err.splitlines()) == 1


def test_deploy_transform_and_cleanup(moto, capsys):
    data = "s3://imgcls-test/imgcls/output/job-one/output/model.tar.gz"
    code, rec, out, err = run(["deploy", "--model-data", data, "--endpoint-name", "ep-1", "--instance-type",
                               "ml.c5.xlarge", "--startup-timeout", "300", "--model-name", "m-1"], capsys)
    assert code == 0, err
    model = rec.one("CreateModel")
    assert model["PrimaryContainer"]["Image"] == SERVE_IMAGE and model["PrimaryContainer"]["ModelDataUrl"] == data
    variant = rec.one("CreateEndpointConfig")["ProductionVariants"][0]
    assert variant["InstanceType"] == "ml.c5.xlarge" and variant["InitialInstanceCount"] == 1
    assert variant["ContainerStartupHealthCheckTimeoutInSeconds"] == 300
    assert rec.one("CreateEndpoint")["EndpointName"] == "ep-1"

    code, rec, _, err = run(["deploy", "--model-data", data, "--endpoint-name", "ep-2", "--serverless",
                             "--memory-mb", "3072", "--max-concurrency", "4", "--model-name", "m-2"], capsys)
    assert code == 0, err
    assert rec.one("CreateEndpointConfig")["ProductionVariants"][0]["ServerlessConfig"] == {
        "MemorySizeInMB": 3072, "MaxConcurrency": 4}

    code, rec, out, err = run(["transform", "--model-data", data, "--input", "s3://imgcls-test/imgcls/data/test/",
                               "--max-payload-mb", "20", "--job-name", "bt-1", "--model-name", "m-3"], capsys)
    assert code == 0, err
    job = rec.one("CreateTransformJob")
    assert job["TransformInput"]["ContentType"] == "application/x-image"
    assert job["TransformInput"].get("SplitType", "None") == "None"
    assert job["BatchStrategy"] == "SingleRecord" and job["MaxPayloadInMB"] == 20
    assert job["TransformOutput"]["AssembleWith"] == "Line" and job["TransformOutput"]["Accept"] == "application/json"
    assert job["Environment"]["SAGEMAKER_MAX_PAYLOAD_IN_MB"] == "20"

    code, rec, out, err = run(["cleanup", "ep-1"], capsys)
    assert code == 0, err
    assert rec.ops()[-3:] == ["DeleteEndpoint", "DeleteEndpointConfig", "DeleteModel"]
    assert rec.one("DeleteModel")["ModelName"] == "m-1"
    names = [e["EndpointName"] for e in boto3.client("sagemaker", region_name=REGION).list_endpoints()["Endpoints"]]
    assert "ep-1" not in names and "ep-2" in names


def test_dry_run_prints_the_request_and_sends_nothing(uploaded, capsys, caplog):
    code, rec, out, err = run(["train", "--dry-run", "--job-name", "never-sent"], capsys)
    assert code == 0, err
    printed = json.loads(out)
    assert printed["operation"] == "CreateTrainingJob"
    assert printed["request"]["TrainingJobName"] == "never-sent"
    # The SDK logs an ERROR for a create call that stopped; a dry run stops it on purpose.
    assert not [r for r in caplog.records if "troubleshooting" in r.getMessage()]
    sm = boto3.client("sagemaker", region_name=REGION)
    assert "never-sent" not in [j["TrainingJobName"] for j in sm.list_training_jobs()["TrainingJobSummaries"]]


@pytest.mark.parametrize("argv,env,words", [
    (["train"], {"IMGCLS_ROLE": ""}, "no role"),
    (["train"], {"IMGCLS_ROLE": "SageMakerRole"}, "not an IAM role ARN"),
    (["train"], {"IMGCLS_BUCKET": "no-such-bucket-here"}, "bucket 'no-such-bucket-here' does not exist"),
    (["train"], {"IMGCLS_TRAIN_IMAGE": "imgcls-train:latest"}, "not an ECR image URI"),
    (["tune", "--lr", "0.1:0.001"], {}, "empty range"),
    (["tune", "--batch-sizes", ","], {}, "--batch-sizes is empty"),
    (["tune", "--epochs", "4:2"], {}, "empty range"),
    (["train", "--hp", "lr=fast"], {}, "lr"),
    (["train", "--hp", "learning-rate=0.1"], {}, "learning-rate"),
    (["deploy", "--model-data", "model.tar.gz"], {}, "must be the s3://"),
    (["train", "--data", "s3://imgcls-test/nothing-here"], {}, "no train channel"),
    (["train", "--data", "s3://no-such-bucket-here/data"], {}, "bucket 'no-such-bucket-here' does not exist"),
    (["train", "--train", "s3:/imgcls-test/train"], {}, "--train 's3:/imgcls-test/train' is not an S3 URI"),
    (["train", "--data", "imgcls-test/data"], {}, "--data 'imgcls-test/data' is not an S3 URI"),
    (["train", "--collections", ","], {}, "--collections is empty"),
    (["train", "--max-run", "0"], {}, "--max-run 0 must be at least 1"),
    (["train", "--volume-size", "fifty"], {}, "--volume-size 'fifty' is not a whole number"),
    (["train", "--instance-type", "ml.banana"], {}, "'ml.banana' is not a SageMaker instance type"),
    (["tune", "--max-jobs", "0"], {}, "--max-jobs 0 must be at least 1"),
    (["transform", "--model-data", "s3://imgcls-test/m.tar.gz", "--input", "s3:/imgcls-test/x"], {},
     "--input 's3:/imgcls-test/x' is not an S3 URI"),
    (["transform", "--model-data", "s3://imgcls-test/m.tar.gz", "--input", "s3://imgcls-test/x/",
      "--max-payload-mb", "500"], {}, "--max-payload-mb 500 is more than SageMaker allows (100)"),
    (["deploy", "--model-data", "s3://imgcls-test/m.tar.gz", "--serverless", "--memory-mb", "1000"], {},
     "--memory-mb 1000: serverless endpoints take one of 1024, 2048"),
    (["deploy", "--model-data", "s3://imgcls-test/m.tar.gz", "--endpoint-name", "my_endpoint"], {},
     "--endpoint-name 'my_endpoint' is not a SageMaker name"),
    (["tune", "--job-name", "a-tuning-job-name-longer-than-32-chars"], {}, "SageMaker allows 32"),
    (["train"], {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}, "no AWS credentials"),
])
def test_errors_are_one_line(uploaded, capsys, monkeypatch, argv, env, words):
    for key, value in env.items():
        if value:
            monkeypatch.setenv(key, value)
        else:
            monkeypatch.delenv(key, raising=False)
    code, rec, out, err = run(argv, capsys)
    assert code == 2
    assert err.startswith("error: ") and words in err and len(err.strip().splitlines()) == 1
    assert "CreateTrainingJob" not in rec.ops() and "CreateHyperParameterTuningJob" not in rec.ops()


def test_upload_data_errors_are_one_line(uploaded, tmp_path, capsys):
    junk = tmp_path / "dogImages.zip"
    junk.write_bytes(b"not an archive")
    for argv, words in [(["--format", "dogimages"], "is not a zip archive"),
                        (["--format", "cifar100"], "is not a tar archive"),
                        (["--s3", "s3://no-such-bucket-here/data"], "bucket 'no-such-bucket-here' does not exist")]:
        source = str(uploaded) if argv[0] == "--s3" else str(junk)
        code, rec, out, err = run(["upload-data", source, *argv], capsys)
        assert code == 2 and err.startswith("error: ") and words in err and len(err.strip().splitlines()) == 1, err
        assert "PutObject" not in rec.ops()


def test_a_pretrained_channel_joins_the_uploaded_data(uploaded, capsys):
    code, rec, out, err = run(["train", "--pretrained", "s3://imgcls-test/weights/resnet50.pth", "--job-name",
                               "job-pretrained"], capsys)
    assert code == 0, err
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"]
                for c in rec.one("CreateTrainingJob")["InputDataConfig"]}
    assert channels == {**{c: f"s3://imgcls-test/imgcls/data/{c}/" for c in ("train", "valid", "test")},
                        "pretrained": "s3://imgcls-test/weights/resnet50.pth"}


def test_predict_against_an_endpoint(moto, tmp_path, capsys):
    """The request to InvokeEndpoint; moto answers with a result queued through its own API. (moto fails
    with a 500 on a binary body, so this sends the JSON form; raw bytes differ only in body and type.)"""
    answer = {"predictions": [{"label": "dog", "index": 1, "probability": 0.9,
                               "top_k": [{"label": "dog", "index": 1, "probability": 0.9},
                                         {"label": "cat", "index": 0, "probability": 0.1}]}]}
    queued = {"account_id": "123456789012", "region": REGION,
              "results": [{"Body": json.dumps(answer), "ContentType": "application/json"},
                          {"Body": "<xml/>", "ContentType": "text/xml"}]}
    req = urllib.request.Request(f"{moto}/moto-api/static/sagemaker/endpoint-results", method="POST",
                                 data=json.dumps(queued).encode(), headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).close()
    (tmp_path / "a.jpg").write_bytes(_jpeg((1, 2, 3)))
    (tmp_path / "b.jpg").write_bytes(_jpeg((4, 5, 6)))
    code, rec, out, err = run(["predict", "ep-x", str(tmp_path), "--top-k", "2", "--json"], capsys)
    calls = [p for op, p in rec.calls if op == "InvokeEndpoint"]
    assert [c["ContentType"] for c in calls] == ["application/json", "application/json"]
    assert json.loads(calls[0]["Body"])["image"] == base64.b64encode((tmp_path / "a.jpg").read_bytes()).decode()
    assert all(c["EndpointName"] == "ep-x" and c["CustomAttributes"] == "top_k=2" for c in calls)
    lines = [line for line in out.splitlines() if line.startswith(str(tmp_path))]
    assert lines[0] == f"{tmp_path / 'a.jpg'}: dog 0.900  cat 0.100"
    assert "unexpected answer" in lines[1] and code == 1


def test_predict_stops_at_an_error_of_the_endpoint_not_of_an_image(moto, tmp_path, capsys):
    """Any error but ModelError (the container's answer to one image) is the endpoint's: a missing one
    is a ValidationError on SageMaker; moto answers a binary body with a 500."""
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / name).write_bytes(_jpeg((1, 2, 3)))
    code, rec, out, err = run(["predict", "no-such-endpoint", str(tmp_path)], capsys)
    assert code == 2 and err.startswith("error: endpoint 'no-such-endpoint' did not answer: ")
    assert len(err.strip().splitlines()) == 1
    assert [op for op in rec.ops() if op == "InvokeEndpoint"] == ["InvokeEndpoint"]  # not once per file


def test_predict_against_a_local_server(tmp_path, capsys):
    from imgcls import artifact
    from imgcls.models import create_model
    from imgcls.presets import ClassificationPresetEval
    from serve.process import ServeProcess

    card = artifact.ModelCard("resnet18", ["cat", "dog"], ClassificationPresetEval(32).to_dict())
    artifact.save(tmp_path / "ml" / "model", create_model("resnet18", 2), card)
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(_jpeg((200, 10, 10)))
    (images / "b.png").write_bytes(b"not a png")
    server = ServeProcess(tmp_path / "ml").wait_ready()
    try:
        code = launch.main(["predict", str(images), "--url", server.url, "--top-k", "2"])
        out = capsys.readouterr().out.splitlines()
    finally:
        server.stop()
    assert code == 1  # one of the two files is broken
    assert out[0].startswith(f"{images / 'a.jpg'}: ") and out[0].count(" 0.") == 2
    assert out[1].startswith(f"{images / 'b.png'}: error 400") and "not an image" in out[1]


def test_tune_local_runs_trials_and_reports_the_best(tmp_path, capsys):
    data = tmp_path / "data"
    make_dataset(data, per_class=6, size=32, classes=2, test_per_class=2, seed=4)
    work = tmp_path / "trials"
    code = launch.main(["tune", "--local", "--local-data", str(data), "--max-jobs", "3", "--epochs", "1:2",
                        "--batch-sizes", "4,8", "--hp", "arch=resnet18", "--hp", "weights=none", "--hp", "image-size=32",
                        "--hp", "num-workers=0", "--work-dir", str(work)])
    out = capsys.readouterr().out
    assert code == 0, out
    trials = [line for line in out.splitlines() if line.startswith("trial ")]
    assert len(trials) == 3 and all("valid:loss=" in t for t in trials)
    best = [line for line in out.splitlines() if line.startswith("best trial ")]
    values = [float(t.split("valid:loss=")[1].split()[0]) for t in trials]
    assert best and f"valid:loss={min(values):.5g}" in best[0]
    # Only the best trial stays on disk, whole; its model is named; the data the trials linked to is untouched.
    number = best[0].split()[2].rstrip(":")
    assert [p.name for p in work.iterdir()] == [f"trial-{number}"]
    assert f"best trial's model: {work / f'trial-{number}' / 'model'}" in out
    assert (work / f"trial-{number}" / "model" / "model.pt").is_file()
    assert len(list((data / "train").rglob("*.jpg"))) == 12
    assert launch.main(["tune", "--local", "--local-data", str(data), "--work-dir", str(work)]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_report_downloads_a_jobs_output_and_tensors(uploaded, capsys, tmp_path):
    code, _, _, err = run(["train", "--job-name", "job-report", "--save-interval", "1"], capsys)
    assert code == 0, err
    # What the job leaves in S3, from a real run that diverged (SageMaker's layout, the SDK's paths)
    done = train_run(tmp_path / "run", {"epochs": 3, "batch_size": 8, "lr": 8, "optimizer": "sgd", "warmup_epochs": 0})
    s3 = boto3.client("s3", region_name=REGION)
    desc = boto3.client("sagemaker", region_name=REGION).describe_training_job(TrainingJobName="job-report")
    output = desc["ModelArtifacts"]["S3ModelArtifacts"].rsplit("/", 1)[0].removeprefix("s3://imgcls-test/")
    archive = tmp_path / "output.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(done.output_data, arcname=".")
    s3.upload_file(str(archive), "imgcls-test", f"{output}/output.tar.gz")
    tensors = done.base / "output" / "tensors"
    debug = f"{desc['DebugHookConfig']['S3OutputPath'].removeprefix('s3://imgcls-test/').rstrip('/')}/job-report/debug-output"
    files = [p for p in tensors.rglob("*") if p.is_file()]
    for f in files:
        s3.upload_file(str(f), "imgcls-test", f"{debug}/{f.relative_to(tensors).as_posix()}")

    code, rec, out, err = run(["report", "job-report", "--download-dir", str(tmp_path / "dl")], capsys)
    assert code == 0, err
    assert f"downloaded job-report (Completed): output data, {len(files)} debugger files" in out
    assert "FIRED LossNotDecreasing" in out and "FIRED ExplodingTensor (epoch 1)" in out
    assert f"report: {tmp_path / 'dl' / 'report.html'}" in out
    page = (tmp_path / "dl" / "report.html").read_text()
    assert "Training report: job-report" in page and "debug-output" in page
    assert not set(rec.ops()) & launch.WRITE_OPERATIONS

    code, _, _, err = run(["report", "no-such-job"], capsys)
    assert code == 2 and "training job 'no-such-job'" in err and "pass its folder" in err
    assert run(["train", "--job-name", "job-no-output"], capsys)[0] == 0
    code, _, _, err = run(["report", "job-no-output"], capsys)
    assert code == 2 and "has no s3://imgcls-test/imgcls/output/job-no-output/output/output.tar.gz" in err


def test_train_on_several_instances(uploaded, capsys):
    code, rec, out, err = run(["train", "--instance-count", "2", "--instance-type", "ml.g5.12xlarge", "--spot",
                               "--hp", "processes-per-host=auto", "--job-name", "job-ddp"], capsys)
    assert code == 0, err
    req = rec.one("CreateTrainingJob")
    assert req["ResourceConfig"]["InstanceCount"] == 2 and req["ResourceConfig"]["InstanceType"] == "ml.g5.12xlarge"
    # Every host gets all the data; the trainer shards it per rank.
    assert {c["DataSource"]["S3DataSource"]["S3DataDistributionType"] for c in req["InputDataConfig"]} == \
        {"FullyReplicated"}
    assert req["HyperParameters"]["processes-per-host"].strip('"') == "auto"
    assert "data parallel: 2 instances" in err and "with --spot, an interruption of any instance" in err
    code, rec, _, err = run(["train", "--instance-count", "0", "--job-name", "job-none"], capsys)
    assert code == 2 and "--instance-count 0 must be at least 1" in err and "CreateTrainingJob" not in rec.ops()
