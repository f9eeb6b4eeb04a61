#!/usr/bin/env python3
"""launch.py: from images in S3 to a tuned model behind an endpoint, on the SageMaker Python SDK v2.

Uses the two images that build_and_push.sh prints. Typical session:

  launch.py upload-data ./dogImages.zip --format dogimages      # class folders to s3://BUCKET/PREFIX/data
  launch.py train --hp arch=resnet50 --hp epochs=10 --spot      # one training job
  launch.py tune --max-jobs 12 --max-parallel-jobs 3            # lr, batch size, epochs
  launch.py best TUNING_JOB                                     # the best job and a table of all
  launch.py deploy --model-data s3://.../model.tar.gz           # a real-time or serverless endpoint
  launch.py predict ENDPOINT photo.jpg                          # top-k for a file or a folder
  launch.py transform --model-data ... --input s3://.../images/ # batch transform over a prefix
  launch.py cleanup ENDPOINT                                    # endpoint, its config and models
  launch.py metric-definitions                                  # the regexes the trainer's log matches
  launch.py report JOB_OR_FOLDER                                # rules and charts of a run, in one HTML file

Settings come from flags, then the environment, then a JSON file (--config, default ./launch.json):
  region       --region        AWS_REGION, AWS_DEFAULT_REGION       "region"
  role         --role          IMGCLS_ROLE, SAGEMAKER_ROLE          "role"         (an IAM role ARN)
  bucket       --bucket        IMGCLS_BUCKET                        "bucket"
  prefix       --prefix        IMGCLS_PREFIX (default imgcls)       "prefix"
  train image  --train-image   IMGCLS_TRAIN_IMAGE                   "train_image"
  serve image  --serve-image   IMGCLS_SERVE_IMAGE                   "serve_image"
  local root                   IMGCLS_LOCAL_ROOT                    "local_root"   (--local's work folders;
                                                                                    default: the system's temp)

--dry-run (train, tune, deploy, transform) prints the API request the SDK would send and stops
before sending it. Errors are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
# The SDK announces each config file it does not find, on stdout; output here is for the user.
logging.getLogger("sagemaker.config").setLevel(logging.WARNING)

from train.metrics import metric_definitions  # noqa: E402 - one definition, shared with the trainer

DEFAULT_PREFIX = "imgcls"
CHANNELS = ("train", "valid", "test", "pretrained")
WRITE_OPERATIONS = {"CreateTrainingJob", "CreateHyperParameterTuningJob", "CreateModel", "CreateEndpointConfig",
                    "CreateEndpoint", "CreateTransformJob"}
ECR_IMAGE = re.compile(r"^\d{12}\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com(\.cn)?/[a-z0-9]+(?:[._/-][a-z0-9]+)*"
                       r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}|@sha256:[0-9a-f]{64})$")
ROLE_ARN = re.compile(r"^arn:aws(-cn|-us-gov)?:iam::\d{12}:role/[\w+=,.@/-]+$")
DEBUGGER_COLLECTIONS = ("losses", "weights", "gradients", "biases")


class LaunchError(Exception):
    """A problem the user fixes: printed as one line."""


class DryRun(Exception):
    def __init__(self, operation: str, params: dict):
        super().__init__(operation)
        self.operation, self.params = operation, params


# ---------------------------------------------------------------------------------------------
# Settings and AWS sessions

SETTINGS = {
    "region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
    "role": ("IMGCLS_ROLE", "SAGEMAKER_ROLE"),
    "bucket": ("IMGCLS_BUCKET",),
    "prefix": ("IMGCLS_PREFIX",),
    "train_image": ("IMGCLS_TRAIN_IMAGE",),
    "serve_image": ("IMGCLS_SERVE_IMAGE",),
    "local_root": ("IMGCLS_LOCAL_ROOT",),
}


def resolve_settings(args) -> dict:
    path = Path(args.config) if args.config else Path("launch.json")
    values: dict = {}
    if path.is_file():
        try:
            values = json.loads(path.read_text())
        except ValueError as exc:
            raise LaunchError(f"{path} is not valid JSON ({exc}).") from None
        unknown = sorted(set(values) - set(SETTINGS))
        if unknown:
            raise LaunchError(f"{path} has unknown keys {unknown}; known: {sorted(SETTINGS)}.")
    elif args.config:
        raise LaunchError(f"config file {path} not found.")
    for key, names in SETTINGS.items():
        for name in names:
            if os.environ.get(name):
                values[key] = os.environ[name]
                break
        flag = getattr(args, key, None)
        if flag:
            values[key] = flag
    values.setdefault("prefix", DEFAULT_PREFIX)
    values["prefix"] = values["prefix"].strip("/")
    return values


def need(settings: dict, key: str, hint: str) -> str:
    value = settings.get(key)
    if not value:
        raise LaunchError(f"no {key.replace('_', ' ')}: {hint}")
    if key == "role" and not ROLE_ARN.match(value):
        raise LaunchError(f"role {value!r} is not an IAM role ARN (arn:aws:iam::123456789012:role/NAME).")
    if key.endswith("_image") and not ECR_IMAGE.match(value):
        raise LaunchError(f"{key.replace('_', ' ')} {value!r} is not an ECR image URI "
                          "(ACCOUNT.dkr.ecr.REGION.amazonaws.com/NAME:TAG, as build_and_push.sh prints it).")
    return value


@dataclass
class Aws:
    boto: object        # boto3.Session
    sagemaker: object   # sagemaker.Session
    bucket: str


def _not_the_troubleshooting_line(record: logging.LogRecord) -> bool:
    """The SDK logs an ERROR pointing at its troubleshooting guide when a create call raises; a dry run
    raises on purpose."""
    return "troubleshooting guide" not in record.getMessage()


def connect(settings: dict, on_request=None, dry_run: bool = False, check_bucket: bool = True) -> Aws:
    """Sessions for boto3 and the SageMaker SDK; every request passes `on_request(operation, params)`."""
    import boto3
    import botocore.exceptions

    region = need(settings, "region", "pass --region or set AWS_REGION.")
    bucket = (need(settings, "bucket", "pass --bucket, set IMGCLS_BUCKET or add \"bucket\" to launch.json.")
              if check_bucket else settings.get("bucket") or "")
    session = boto3.Session(region_name=region)
    if session.get_credentials() is None:
        raise LaunchError("no AWS credentials: run `aws configure`, set AWS_PROFILE, or AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY.")

    def before_call(model, params, **_):
        if on_request is not None:
            on_request(model.name, params)
        if dry_run and model.name in WRITE_OPERATIONS:
            raise DryRun(model.name, params)

    # Parameters as the API takes them, after the SDK built them and before botocore serializes them.
    session.events.register("before-parameter-build.*.*", before_call)
    if dry_run:
        logging.getLogger("sagemaker").addFilter(_not_the_troubleshooting_line)
    if check_bucket:
        try:
            require_bucket(session.client("s3"), bucket, region, "--bucket")
        except botocore.exceptions.NoCredentialsError:
            raise LaunchError("no AWS credentials: run `aws configure` or set AWS_PROFILE.") from None
        except botocore.exceptions.EndpointConnectionError as exc:
            raise LaunchError(f"cannot reach AWS ({exc}).") from None
    import sagemaker
    return Aws(session, sagemaker.Session(boto_session=session, default_bucket=bucket or None), bucket)


def bucket_error(exc, bucket: str, region: str, flag: str) -> LaunchError:
    """A ClientError from S3 on `bucket`, as what the user does about it."""
    code = exc.response.get("Error", {}).get("Code")
    if code in ("404", "NoSuchBucket", "NotFound"):
        return LaunchError(f"bucket {bucket!r} does not exist in this account: create it "
                           f"(aws s3 mb s3://{bucket} --region {region}) or pass another {flag}.")
    return LaunchError(f"bucket {bucket!r} cannot be used ({code}): check the bucket name and your permissions.")


def require_bucket(s3, bucket: str, region: str, flag: str) -> None:
    import botocore.exceptions
    try:
        s3.head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as exc:
        raise bucket_error(exc, bucket, region, flag) from None


def s3_uri(aws: Aws, settings: dict, *parts: str) -> str:
    return "s3://" + "/".join([aws.bucket, settings["prefix"], *[p.strip("/") for p in parts]])


# ---------------------------------------------------------------------------------------------
# SageMaker local mode: the same images on this machine, through Docker (or podman's Docker API
# with DOCKER_HOST) and docker compose; channels and artifacts are local files.

def local_session(settings: dict):
    import boto3
    from sagemaker.local import LocalSession

    session = LocalSession(boto_session=boto3.Session(region_name=settings.get("region") or "us-east-1"))
    session.config = {"local": {"local_code": True}}
    if settings.get("local_root"):
        # The SDK leaves each run's compose file and artifacts in a folder under this root, and
        # never deletes them: a root the user can clear (or a test's own folder) keeps /tmp clean.
        root = Path(settings["local_root"]).resolve()
        root.mkdir(parents=True, exist_ok=True)
        session.config["local"]["container_root"] = str(root)
    return session


def local_instance_type() -> str:
    import shutil
    import subprocess
    if shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0:
        return "local_gpu"
    return "local"


def local_image(settings: dict, key: str) -> str:
    image = settings.get(key)
    if not image or not re.match(r"^[\w.-]+(:\d+)?(/[\w.-]+)+(:[\w][\w.-]*|@sha256:[0-9a-f]{64})?$|^[\w.-]+:[\w.-]+$", image):
        raise LaunchError(f"--local needs --{key.replace('_', '-')} naming a built image (e.g. imgcls-train:latest), "
                          f"got {image!r}.")
    return image


def file_uri(path: str) -> str:
    return path if path.startswith(("file://", "s3://")) else "file://" + str(Path(path).resolve())


def engine_error(exc: BaseException) -> LaunchError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return LaunchError(f"local mode could not run the container ({first[:300]}): it needs Docker, or podman's "
                       "Docker API (podman system service, DOCKER_HOST=unix://...), and docker compose.")


# ---------------------------------------------------------------------------------------------
# upload-data

def convert_dogimages(archive: Path, out: Path) -> Path:
    """dogImages.zip (dogImages/{train,valid,test}/NNN.Breed/*.jpg) to out/{train,valid,test}/NNN.Breed/."""
    import zipfile
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise LaunchError(f"{archive} is not a zip archive ({exc}): --format dogimages takes dogImages.zip.") from None
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        for m in members:
            parts = Path(m.filename).parts
            split_at = next((i for i, p in enumerate(parts) if p in ("train", "valid", "test")), None)
            if split_at is None or len(parts) - split_at != 3 or parts[-1].startswith("."):
                continue  # __MACOSX entries, stray files
            target = out.joinpath(*parts[split_at:])
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as src, open(target, "wb") as dst:
                dst.write(src.read())
    if not (out / "train").is_dir():
        raise LaunchError(f"{archive} has no dogImages/train/<breed>/ folders: is it the dog-breed archive?")
    return out


def convert_cifar100(archive: Path, out: Path) -> Path:
    """cifar-100-python.tar.gz (pickled train/test/meta) to out/{train,test}/<fine label>/NNNNN.png."""
    import pickle
    import tarfile

    import numpy as np
    from PIL import Image

    def load(tf, name):
        member = next((m for m in tf.getmembers() if Path(m.name).name == name), None)
        if member is None:
            raise LaunchError(f"{archive} has no '{name}' file: is it the CIFAR-100 python archive?")
        return pickle.load(tf.extractfile(member), encoding="bytes")

    try:
        tf = tarfile.open(archive)
    except tarfile.TarError:  # its message spans lines, one per compression it tried
        raise LaunchError(f"{archive} is not a tar archive (plain, gzip, bz2 or xz): --format cifar100 takes "
                          "cifar-100-python.tar.gz.") from None
    with tf:
        names = [n.decode() for n in load(tf, "meta")[b"fine_label_names"]]
        for split in ("train", "test"):
            batch = load(tf, split)
            images = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            for i, (pixels, label) in enumerate(zip(images, batch[b"fine_labels"], strict=True)):
                folder = out / split / names[label]
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(folder / f"{i:05d}.png")
    return out


def cmd_upload_data(args, settings, on_request=None) -> int:
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    import boto3.exceptions
    from tqdm import tqdm

    src = Path(args.source)
    if not src.exists():
        raise LaunchError(f"{src} does not exist.")
    with tempfile.TemporaryDirectory(prefix="imgcls-data-") as tmp:
        if args.format == "dogimages":
            src = convert_dogimages(src, Path(tmp))
        elif args.format == "cifar100":
            src = convert_cifar100(src, Path(tmp))
        splits = [s for s in ("train", "valid", "test") if (src / s).is_dir()]
        if "train" not in splits:
            raise LaunchError(f"{src} has no train/ folder: expected train/<class>/*.jpg (and valid/, test/).")
        files = [p for s in splits for p in sorted((src / s).rglob("*")) if p.is_file() and not p.name.startswith(".")]
        aws = connect(settings, on_request)
        dest = args.s3 or s3_uri(aws, settings, "data")
        bucket, _, key_prefix = dest.removeprefix("s3://").partition("/")
        s3 = aws.boto.client("s3")
        if bucket != aws.bucket:  # connect checked --bucket, not this one
            require_bucket(s3, bucket, aws.boto.region_name, "--s3")
        with tqdm(total=sum(p.stat().st_size for p in files), unit="B", unit_scale=True, desc="upload") as bar:
            def put(path: Path):
                key = f"{key_prefix.rstrip('/')}/{path.relative_to(src).as_posix()}".lstrip("/")
                s3.upload_file(str(path), bucket, key, Callback=bar.update)
            with ThreadPoolExecutor(max_workers=8) as pool:
                try:
                    list(pool.map(put, files))
                except boto3.exceptions.S3UploadFailedError as exc:
                    raise LaunchError(f"the upload to {dest} failed: {exc}") from None
        print(f"uploaded {len(files)} files ({', '.join(splits)}) to {dest}")
    return 0


# ---------------------------------------------------------------------------------------------
# train and tune

def parse_hyperparameters(pairs: list[str]) -> dict[str, str]:
    hps = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise LaunchError(f"--hp {pair!r} is not NAME=VALUE.")
        hps[name.strip().replace("_", "-")] = value.strip()
    try:  # the trainer's own validation, when torch is installed here
        from train.hyperparams import HyperparameterError, parse
    except ImportError:
        return hps
    try:
        parse(hps)
    except HyperparameterError as exc:
        raise LaunchError(str(exc).replace("\n", " ")) from None
    return hps


def channels(aws: Aws, settings: dict, args) -> dict[str, str]:
    """Channel name -> S3 URI: explicit data flags, else the upload-data layout's folders that exist;
    and --pretrained with either."""
    extra = {"pretrained": check_s3("--pretrained", args.pretrained)} if getattr(args, "pretrained", None) else {}
    explicit = {c: check_s3(f"--{c}", getattr(args, c)) for c in ("train", "valid", "test") if getattr(args, c, None)}
    if explicit:
        if "train" not in explicit:
            raise LaunchError("no train channel: pass --train s3://... (class folders).")
        return explicit | extra
    data = args.data or s3_uri(aws, settings, "data")
    bucket, _, prefix = data.removeprefix("s3://").partition("/")
    import botocore.exceptions

    s3 = aws.boto.client("s3")
    found = {}
    for channel in ("train", "valid", "test"):
        key = f"{prefix.rstrip('/')}/{channel}/".lstrip("/")
        try:
            if s3.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1).get("KeyCount", 0):
                found[channel] = f"s3://{bucket}/{key}"
        except botocore.exceptions.ClientError as exc:  # --data names a bucket that --bucket's check did not see
            raise bucket_error(exc, bucket, aws.boto.region_name, "--data") from None
    if "train" not in found:
        raise LaunchError(f"no train channel: nothing under {data.rstrip('/')}/train/; run upload-data first "
                          "or pass --train s3://...")
    return found | extra


def make_estimator(args, settings, aws: Aws, hyperparameters: dict):
    from sagemaker.debugger import (
        CollectionConfig,
        DebuggerHookConfig,
        ProfilerConfig,
        ProfilerRule,
        Rule,
        rule_configs,
    )
    from sagemaker.estimator import Estimator

    image = need(settings, "train_image", "pass --train-image (the first URI build_and_push.sh printed).")
    role = need(settings, "role", "pass --role, set IMGCLS_ROLE or add \"role\" to launch.json.")
    if args.instance_count > 1:
        # The image needs nothing more: SageMaker's resourceconfig.json names the hosts, every host
        # gets all the data (FullyReplicated, the SDK's default) and the trainer shards it per rank.
        print(f"data parallel: {args.instance_count} instances, one process per GPU on each (processes-per-host "
              "on CPU instances, default 1); batch-size is per process, so the global batch grows with them.",
              file=sys.stderr)
        if args.spot:
            print("warning: with --spot, an interruption of any instance stops them all; the job restarts on "
                  "all of them and resumes from the last epoch's checkpoint.", file=sys.stderr)
    name = args.job_name or f"{settings['prefix']}-{time.strftime('%Y%m%d-%H%M%S')}"
    kwargs = {}
    if args.spot:
        kwargs.update(use_spot_instances=True, max_wait=args.max_wait or 2 * args.max_run)
        if kwargs["max_wait"] < args.max_run:
            raise LaunchError(f"--max-wait {kwargs['max_wait']} must be at least --max-run {args.max_run}.")
    rules = []
    if not args.no_debugger:
        interval = str(args.save_interval)
        ours = {c: CollectionConfig(name=c, parameters={"save_interval": interval}) for c in args.collections}
        kwargs["debugger_hook_config"] = DebuggerHookConfig(
            s3_output_path=s3_uri(aws, settings, "debugger"), collection_configs=list(ours.values()))
        if not args.no_debugger_rules:
            for config in (rule_configs.loss_not_decreasing(), rule_configs.vanishing_gradient(),
                           rule_configs.overfit(), rule_configs.overtraining(),
                           rule_configs.poor_weight_initialization()):
                rule = Rule.sagemaker(config)
                # A rule brings its collections at save_interval 500, which the SDK would send next
                # to ours as a second entry of the same name; the user's interval wins.
                rule.collection_configs = [ours.get(c.name, c) for c in rule.collection_configs]
                rules.append(rule)
    else:
        kwargs["debugger_hook_config"] = False
    if not args.no_profiler:
        kwargs["profiler_config"] = ProfilerConfig(s3_output_path=s3_uri(aws, settings, "profiler"),
                                                   system_monitor_interval_millis=500)
        if not args.no_profiler_rules:
            rules += [ProfilerRule.sagemaker(rule_configs.ProfilerReport()),
                      ProfilerRule.sagemaker(rule_configs.LowGPUUtilization())]
    else:
        kwargs["disable_profiler"] = True
    return Estimator(
        image_uri=image, role=role, instance_count=args.instance_count, instance_type=args.instance_type,
        output_path=s3_uri(aws, settings, "output"), max_run=args.max_run, volume_size=args.volume_size,
        # The trainer resumes from /opt/ml/checkpoints; SageMaker syncs it with this prefix.
        checkpoint_s3_uri=s3_uri(aws, settings, "checkpoints", name), checkpoint_local_path="/opt/ml/checkpoints",
        hyperparameters=hyperparameters, metric_definitions=metric_definitions(), rules=rules or None,
        sagemaker_session=aws.sagemaker, base_job_name=settings["prefix"], **kwargs), name


def cmd_train(args, settings, on_request=None) -> int:
    hps = parse_hyperparameters(args.hp)
    if args.local:
        return train_local_mode(args, settings, hps)
    aws = connect(settings, on_request, dry_run=args.dry_run)
    inputs = channels(aws, settings, args)
    estimator, name = make_estimator(args, settings, aws, hps)
    estimator.fit(inputs, job_name=name, wait=args.wait, logs="All" if args.wait else "None")
    print(f"training job {name} started: {', '.join(f'{k}={v}' for k, v in inputs.items())}")
    return 0


def train_local_mode(args, settings, hps) -> int:
    from sagemaker.estimator import Estimator

    image = local_image(settings, "train_image")
    explicit = {c: file_uri(getattr(args, c)) for c in CHANNELS if getattr(args, c, None)}
    if not explicit and args.local_data:
        data = Path(args.local_data).resolve()
        explicit = {c: file_uri(str(data / c)) for c in ("train", "valid", "test") if (data / c).is_dir()}
    if "train" not in explicit:
        raise LaunchError("train --local needs --local-data DIR (with train/) or --train PATH.")
    if args.instance_count > 1 and local_instance_type() == "local_gpu":
        raise LaunchError("--local with --instance-count > 1 on a GPU machine: the SageMaker SDK's local mode runs "
                          "a single GPU instance; use --instance-count 1 (one process per GPU), or train in the cloud.")
    if args.instance_count > 1:
        print(f"warning: local mode starts {args.instance_count} training containers on this machine, each with "
              "all the data and its share of the CPUs.", file=sys.stderr)
    output = Path(args.output_dir).resolve()
    output.mkdir(parents=True, exist_ok=True)
    estimator = Estimator(
        image_uri=image, role=settings.get("role") or "arn:aws:iam::000000000000:role/local",
        instance_count=args.instance_count, instance_type=local_instance_type(), output_path=file_uri(str(output)),
        hyperparameters=hps, metric_definitions=metric_definitions(), sagemaker_session=local_session(settings),
        # Debugger rules and the profiler run as SageMaker-side jobs: there are none in local mode.
        debugger_hook_config=False, disable_profiler=True, base_job_name=settings["prefix"])
    try:
        estimator.fit(explicit, job_name=args.job_name)
    except Exception as exc:  # the SDK raises bare errors for engine and compose failures
        raise engine_error(exc) from None
    print(f"model: {estimator.model_data}")
    return 0


def _range(text: str, flag: str, allow_point: bool = False) -> tuple[float, float]:
    lo, sep, hi = (text or "").partition(":")
    try:
        low, high = float(lo), float(hi)
    except ValueError:
        raise LaunchError(f"{flag} {text!r} is not LOW:HIGH.") from None
    if not sep or not (low < high or (allow_point and low == high)):
        raise LaunchError(f"{flag} {text!r} is an empty range: LOW must be below HIGH.")
    return low, high


def _choices(text: str, flag: str) -> list[str]:
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    if not items:
        raise LaunchError(f"{flag} is empty: give at least one value.")
    return items


def _whole(flag: str):
    """An argparse type: a whole number >= 1, or a one-line error naming the flag (SageMaker would
    refuse the request later, with a longer message, or not at all for a dry run)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise LaunchError(f"{flag} {text!r} is not a whole number.") from None
        if value < 1:
            raise LaunchError(f"{flag} {value} must be at least 1.")
        return value
    return parse


S3_URI = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$")
JOB_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")  # SageMaker's, for jobs, models and endpoints
SERVERLESS_MEMORY_MB = (1024, 2048, 3072, 4096, 5120, 6144)
INSTANCE_TYPE = re.compile(r"^ml\.[a-z0-9]+\.[a-z0-9]+$")


def check_s3(flag: str, text: str) -> str:
    """An s3://BUCKET/... URI, or a one-line error: the SDK would raise a ValueError with a traceback."""
    if not S3_URI.match(text):
        raise LaunchError(f"{flag} {text!r} is not an S3 URI: expected s3://BUCKET/PREFIX/ (the bucket's name in "
                          "lower case, 3-63 characters).")
    return text


def _s3(flag: str):
    """An argparse type for a flag that only ever names S3 (the channel flags name paths with --local)."""
    return lambda text: check_s3(flag, text)


def _name(flag: str):
    def parse(text: str) -> str:
        if not JOB_NAME.match(text):
            raise LaunchError(f"{flag} {text!r} is not a SageMaker name: up to 63 letters, digits and hyphens, "
                              "starting and ending with a letter or digit.")
        return text
    return parse


def _whole_at_most(flag: str, most: int):
    def parse(text: str) -> int:
        value = _whole(flag)(text)
        if value > most:
            raise LaunchError(f"{flag} {value} is more than SageMaker allows ({most}).")
        return value
    return parse


def _serverless_memory(text: str) -> int:
    value = _whole("--memory-mb")(text)
    if value not in SERVERLESS_MEMORY_MB:
        raise LaunchError(f"--memory-mb {value}: serverless endpoints take one of "
                          f"{', '.join(map(str, SERVERLESS_MEMORY_MB))}.")
    return value


def _instance_type(text: str) -> str:
    if not INSTANCE_TYPE.match(text):
        raise LaunchError(f"--instance-type {text!r} is not a SageMaker instance type: expected ml.FAMILY.SIZE, "
                          "e.g. ml.g5.xlarge or ml.m5.large.")
    return text


def tuning_ranges(args, epochs: tuple[float, float]) -> dict:
    from sagemaker.tuner import CategoricalParameter, ContinuousParameter, IntegerParameter

    lo, hi = _range(args.lr, "--lr")
    if lo <= 0:
        raise LaunchError("--lr must be above 0 (it is searched on a log scale).")
    ranges = {"lr": ContinuousParameter(lo, hi, scaling_type="Logarithmic"),
              "batch-size": CategoricalParameter(_choices(args.batch_sizes, "--batch-sizes"))}
    elo, ehi = epochs
    # Hyperband stops jobs by epoch itself; a single value (3:3) fixes epochs instead of tuning it.
    if args.strategy != "Hyperband" and elo < ehi:
        ranges["epochs"] = IntegerParameter(int(elo), int(ehi))
    if args.optimizers:
        ranges["optimizer"] = CategoricalParameter(_choices(args.optimizers, "--optimizers"))
    if args.momentum:
        ranges["momentum"] = ContinuousParameter(*_range(args.momentum, "--momentum"))
    if args.weight_decay:
        wlo, whi = _range(args.weight_decay, "--weight-decay")
        ranges["weight-decay"] = ContinuousParameter(wlo, whi, scaling_type="Logarithmic" if wlo > 0 else "Auto")
    return ranges


OBJECTIVES = {"valid-loss": ("valid:loss", "Minimize"), "valid-accuracy": ("valid:accuracy", "Maximize")}


def cmd_tune(args, settings, on_request=None) -> int:
    if args.local:
        return tune_local(args, settings)
    from sagemaker.tuner import (
        HyperbandStrategyConfig,
        HyperparameterTuner,
        StrategyConfig,
        WarmStartConfig,
        WarmStartTypes,
    )
    elo, ehi = _range(args.epochs, "--epochs", allow_point=True)
    ranges = tuning_ranges(args, (elo, ehi))
    hps = parse_hyperparameters(args.hp)
    for name in ranges:
        hps.pop(name, None)
    if elo == ehi and args.strategy != "Hyperband":
        hps["epochs"] = str(int(ehi))
    aws = connect(settings, on_request, dry_run=args.dry_run)
    inputs = channels(aws, settings, args)
    estimator, name = make_estimator(args, settings, aws, hps)
    metric, direction = OBJECTIVES[args.objective]
    kwargs = {}
    if args.strategy == "Hyperband":
        estimator.set_hyperparameters(**{**hps, "epochs": str(int(ehi))})
        kwargs["strategy_config"] = StrategyConfig(HyperbandStrategyConfig(min_resource=1, max_resource=int(ehi)))
    if args.warm_start:
        kwargs["warm_start_config"] = WarmStartConfig(WarmStartTypes.IDENTICAL_DATA_AND_ALGORITHM,
                                                      parents=set(args.warm_start))
    tuner = HyperparameterTuner(
        estimator, objective_metric_name=metric, objective_type=direction, hyperparameter_ranges=ranges,
        # The SDK sends only the tuner's metric definitions, not the estimator's.
        metric_definitions=metric_definitions(), strategy=args.strategy, max_jobs=args.max_jobs,
        max_parallel_jobs=args.max_parallel_jobs,
        early_stopping_type="Off" if args.strategy == "Hyperband" or not args.early_stopping else "Auto",
        base_tuning_job_name=settings["prefix"], **kwargs)
    tuning_name = args.job_name or f"{settings['prefix']}-tune-{time.strftime('%m%d-%H%M%S')}"
    if len(tuning_name) > 32:
        raise LaunchError(f"tuning job name {tuning_name!r} is {len(tuning_name)} characters; SageMaker allows 32: "
                          "pass a shorter --job-name (or --prefix).")
    tuner.fit(inputs, job_name=tuning_name, wait=False)
    print(f"tuning job {tuning_name} started: {args.max_jobs} jobs, {args.max_parallel_jobs} at a time, "
          f"{direction.lower()} {metric}")
    return 0


def cmd_best(args, settings, on_request=None) -> int:
    aws = connect(settings, on_request, check_bucket=False)
    import botocore.exceptions
    sm = aws.boto.client("sagemaker")
    try:
        desc = sm.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=args.tuning_job)
    except botocore.exceptions.ClientError as exc:
        raise LaunchError(f"tuning job {args.tuning_job!r}: {exc.response['Error'].get('Message', exc)}") from None
    best = desc.get("BestTrainingJob")
    objective = desc["HyperParameterTuningJobConfig"]["HyperParameterTuningJobObjective"]
    if not best:
        print(f"{args.tuning_job}: no completed training job yet (status {desc.get('HyperParameterTuningJobStatus')}).")
        return 1
    metric = best.get("FinalHyperParameterTuningJobObjectiveMetric", {})
    print(f"best job {best['TrainingJobName']}: {objective['MetricName']} = {metric.get('Value')}")
    print("hyperparameters: " + " ".join(f"{k}={v}" for k, v in sorted(best.get("TunedHyperParameters", {}).items())))
    jobs, token = [], None
    try:
        while True:
            page = sm.list_training_jobs_for_hyper_parameter_tuning_job(
                HyperParameterTuningJobName=args.tuning_job, **({"NextToken": token} if token else {}))
            jobs += page["TrainingJobSummaries"]
            token = page.get("NextToken")
            if not token:
                break
    except botocore.exceptions.ClientError as exc:
        print(f"(no table of all jobs: {str(exc).splitlines()[0][:200]})")
        return 0
    reverse = objective["Type"] == "Maximize"
    jobs.sort(key=lambda j: j.get("FinalHyperParameterTuningJobObjectiveMetric", {}).get(
        "Value", float("-inf") if reverse else float("inf")), reverse=reverse)
    print(f"\n{'job':<40} {'status':<10} {objective['MetricName']:>14}  hyperparameters")
    for j in jobs:
        value = j.get("FinalHyperParameterTuningJobObjectiveMetric", {}).get("Value")
        shown = f"{value:.5g}" if value is not None else "-"
        hps = " ".join(f"{k}={v}" for k, v in sorted(j.get("TunedHyperParameters", {}).items()))
        print(f"{j['TrainingJobName']:<40} {j['TrainingJobStatus']:<10} {shown:>14}  {hps}")
    return 0


def tune_local(args, settings) -> int:
    """Optuna over the same ranges; each trial runs the training program and its log is parsed
    with the same metric definitions a SageMaker tuner uses."""
    import subprocess
    import tempfile

    import optuna

    from train.metrics import parse_log

    if not args.local_data:
        raise LaunchError("tune --local needs --local-data DIR (class folders: train/, optionally valid/, test/).")
    data = Path(args.local_data).resolve()
    if not (data / "train").is_dir():
        raise LaunchError(f"{data} has no train/ folder.")
    lo, hi = _range(args.lr, "--lr")
    batch_sizes = [int(b) for b in _choices(args.batch_sizes, "--batch-sizes")]
    elo, ehi = (int(v) for v in _range(args.epochs, "--epochs", allow_point=True))
    base_hps = parse_hyperparameters(args.hp)
    metric, direction = OBJECTIVES[args.objective]
    definitions = metric_definitions()
    root = Path(__file__).resolve().parent
    if args.work_dir:
        work = Path(args.work_dir).resolve()
        if work.exists() and any(work.iterdir()):
            raise LaunchError(f"--work-dir {work} is not empty; name a new or empty folder (trials are written there).")
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="tune-local-"))

    def objective(trial: optuna.Trial) -> float:
        hps = {**base_hps, "lr": str(trial.suggest_float("lr", lo, hi, log=True)),
               "batch-size": str(trial.suggest_categorical("batch-size", batch_sizes)),
               "epochs": str(trial.suggest_int("epochs", elo, ehi))}
        base = work / f"trial-{trial.number}"
        config = base / "input" / "config"
        config.mkdir(parents=True)
        (base / "input" / "data").mkdir()
        for split in ("train", "valid", "test"):
            if (data / split).is_dir():
                (base / "input" / "data" / split).symlink_to(data / split)
        (config / "hyperparameters.json").write_text(json.dumps(hps))
        (config / "resourceconfig.json").write_text(json.dumps({"current_host": "algo-1", "hosts": ["algo-1"]}))
        spec = {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated", "RecordWrapperType": "None"}
        (config / "inputdataconfig.json").write_text(json.dumps(
            {s: spec for s in ("train", "valid", "test") if (data / s).is_dir()}))
        mode = args.image or "--native"
        # The channels are symlinks to the data; in a container the data is mounted at the same path.
        env = dict(os.environ, EXTRA_RUN_ARGS=f"{os.environ.get('EXTRA_RUN_ARGS', '')} -v {data}:{data}:ro".strip())
        out = subprocess.run([str(root / "local_test" / "train_local.sh"), mode, str(base)], capture_output=True,
                             text=True, env=env)
        values = [v for v in parse_log(out.stdout + out.stderr, definitions).get(metric, []) if math.isfinite(v)]
        shown = " ".join(f"{k}={v}" for k, v in hps.items() if k in ("lr", "batch-size", "epochs"))
        if out.returncode != 0 or not values:
            print(f"trial {trial.number}: failed ({shown}); log in {base}", file=sys.stderr)
            (base / "trial.log").write_text(out.stdout + out.stderr)
            raise optuna.TrialPruned()
        best_epoch_value = min(values) if direction == "Minimize" else max(values)
        print(f"trial {trial.number}: {metric}={best_epoch_value:.5g}  {shown}")
        return best_epoch_value

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=direction.lower(), sampler=optuna.samplers.TPESampler(seed=args.seed))
    study.optimize(objective, n_trials=args.max_jobs)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise LaunchError(f"no trial completed; their logs are in {work}.")
    best = study.best_trial
    _keep_only_best(work, best.number, [t.number for t in study.trials])
    print(f"best trial {best.number}: {metric}={best.value:.5g} " +
          " ".join(f"{k}={v}" for k, v in best.params.items()))
    print(f"best trial's model: {work / f'trial-{best.number}' / 'model'}")
    return 0


def _keep_only_best(work: Path, best: int, numbers: list[int]) -> None:
    """Every trial leaves a model and checkpoints (hundreds of MB for resnet50): keep the best trial
    whole, and of the others only a failed trial's log."""
    import shutil

    for number in numbers:
        folder = work / f"trial-{number}"
        if number == best or not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.name != "trial.log":
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        if not any(folder.iterdir()):
            folder.rmdir()


# ---------------------------------------------------------------------------------------------
# deploy, predict, transform, cleanup

def make_model(args, settings, aws: Aws):
    from sagemaker.model import Model

    image = need(settings, "serve_image", "pass --serve-image (the second URI build_and_push.sh printed).")
    role = need(settings, "role", "pass --role, set IMGCLS_ROLE or add \"role\" to launch.json.")
    if not (args.model_data or "").startswith("s3://") or not args.model_data.endswith(".tar.gz"):
        raise LaunchError(f"--model-data {args.model_data!r} must be the s3://.../model.tar.gz a training job wrote.")
    env = {"IMGCLS_TOP_K": str(args.top_k)}
    return Model(image_uri=image, model_data=args.model_data, role=role, env=env, sagemaker_session=aws.sagemaker,
                 name=args.model_name)


def deploy_local_mode(args, settings) -> int:
    import signal

    from sagemaker.model import Model

    image = local_image(settings, "serve_image")
    session = local_session(settings)
    name = args.endpoint_name or f"{settings['prefix']}-local"
    model = Model(image_uri=image, model_data=file_uri(args.model_data), env={"IMGCLS_TOP_K": str(args.top_k)},
                  role=settings.get("role") or "arn:aws:iam::000000000000:role/local", sagemaker_session=session)
    try:
        model.deploy(initial_instance_count=1, instance_type=local_instance_type(), endpoint_name=name)
    except Exception as exc:
        raise engine_error(exc) from None
    print(f"endpoint {name} serving on http://localhost:8080/invocations (local mode); Ctrl-C stops it", flush=True)
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(0.5)
    finally:
        session.delete_endpoint(name)
        print(f"endpoint {name} stopped", flush=True)
    return 0


def cmd_deploy(args, settings, on_request=None) -> int:
    if args.local:
        return deploy_local_mode(args, settings)
    aws = connect(settings, on_request, dry_run=args.dry_run)
    model = make_model(args, settings, aws)
    name = args.endpoint_name or f"{settings['prefix']}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.serverless:
        from sagemaker.serverless import ServerlessInferenceConfig
        model.deploy(serverless_inference_config=ServerlessInferenceConfig(
            memory_size_in_mb=args.memory_mb, max_concurrency=args.max_concurrency), endpoint_name=name,
            wait=args.wait)
    else:
        model.deploy(initial_instance_count=args.instance_count, instance_type=args.instance_type,
                     endpoint_name=name, container_startup_health_check_timeout=args.startup_timeout,
                     wait=args.wait)
    print(f"endpoint {name} {'in service' if args.wait else 'creating'}")
    return 0


def _image_files(path: Path) -> list[Path]:
    from imgcls.images import is_image_name
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and is_image_name(p.name))
        if not files:
            raise LaunchError(f"{path} holds no image files.")
        return files
    if not path.is_file():
        raise LaunchError(f"{path} does not exist.")
    return [path]


CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
                 ".bmp": "image/bmp"}


def cmd_predict(args, settings, on_request=None) -> int:
    files = _image_files(Path(args.path))
    headers_extra = {"X-Amzn-SageMaker-Custom-Attributes": f"top_k={args.top_k}"}
    if args.url:  # a running `serve` (local_test/serve_local.sh)
        import urllib.error
        import urllib.request

        def invoke(body: bytes, ctype: str) -> tuple[int, bytes]:
            req = urllib.request.Request(args.url.rstrip("/") + "/invocations", data=body, method="POST",
                                         headers={"Content-Type": ctype, "Accept": "application/json", **headers_extra})
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    return resp.status, resp.read()
            except urllib.error.HTTPError as err:
                return err.code, err.read()
            except OSError as exc:
                raise LaunchError(f"cannot reach {args.url}: {exc}") from None
    else:
        if not args.endpoint:
            raise LaunchError("name the endpoint (launch.py predict ENDPOINT FILE) or pass --url.")
        aws = connect(settings, on_request, check_bucket=False)
        runtime = aws.boto.client("sagemaker-runtime")

        def invoke(body: bytes, ctype: str) -> tuple[int, bytes]:
            import botocore.exceptions
            try:
                resp = runtime.invoke_endpoint(EndpointName=args.endpoint, Body=body, ContentType=ctype,
                                               Accept="application/json", CustomAttributes=f"top_k={args.top_k}")
                return 200, resp["Body"].read()
            except botocore.exceptions.ClientError as exc:
                error = exc.response.get("Error", {})
                if error.get("Code") != "ModelError":  # the endpoint (missing, not in service, no access), not the image
                    raise LaunchError(f"endpoint {args.endpoint!r} did not answer: {error.get('Code')}: "
                                      f"{' '.join(str(error.get('Message')).split())[:300]}") from None
                return exc.response.get("OriginalStatusCode", 400), json.dumps({"message": str(exc)}).encode()
    failures = 0
    for path in files:
        if args.json:
            import base64
            payload = json.dumps({"image": base64.b64encode(path.read_bytes()).decode()}).encode()
            status, body = invoke(payload, "application/json")
        else:
            status, body = invoke(path.read_bytes(), CONTENT_TYPES.get(path.suffix.lower(), "application/x-image"))
        if status != 200:
            failures += 1
            try:
                message = json.loads(body).get("message", body[:200])
            except ValueError:
                message = body[:200]
            print(f"{path}: error {status}: {message}")
            continue
        try:
            top = json.loads(body)["predictions"][0]["top_k"]
        except (ValueError, KeyError, IndexError, TypeError):
            failures += 1
            print(f"{path}: unexpected answer (is the endpoint running the imgcls serving image?): {body[:200]!r}")
            continue
        print(f"{path}: " + "  ".join(f"{t['label']} {t['probability']:.3f}" for t in top))
    return 1 if failures else 0


def cmd_transform(args, settings, on_request=None) -> int:
    aws = connect(settings, on_request, dry_run=args.dry_run)
    model = make_model(args, settings, aws)
    output = args.output or s3_uri(aws, settings, "transform", time.strftime("%Y%m%d-%H%M%S"))
    transformer = model.transformer(
        instance_count=args.instance_count, instance_type=args.instance_type, strategy="SingleRecord",
        assemble_with="Line", output_path=output, accept="application/json", max_payload=args.max_payload_mb,
        env={"SAGEMAKER_MAX_PAYLOAD_IN_MB": str(args.max_payload_mb), "IMGCLS_TOP_K": str(args.top_k)})
    transformer.transform(args.input, content_type=args.content_type, split_type=None, wait=args.wait,
                          job_name=args.job_name)
    print(f"batch transform {transformer.latest_transform_job.job_name} writing to {output}")
    return 0


def cmd_cleanup(args, settings, on_request=None) -> int:
    import botocore.exceptions
    aws = connect(settings, on_request, check_bucket=False)
    sm = aws.boto.client("sagemaker")
    try:
        config_name = sm.describe_endpoint(EndpointName=args.endpoint)["EndpointConfigName"]
    except botocore.exceptions.ClientError:
        raise LaunchError(f"endpoint {args.endpoint!r} not found in {settings['region']}.") from None
    models = [v["ModelName"] for v in sm.describe_endpoint_config(EndpointConfigName=config_name)["ProductionVariants"]]
    sm.delete_endpoint(EndpointName=args.endpoint)
    sm.delete_endpoint_config(EndpointConfigName=config_name)
    for model in models:
        sm.delete_model(ModelName=model)
    print(f"deleted endpoint {args.endpoint}, endpoint config {config_name}, models {', '.join(models)}")
    return 0


def _s3_split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def download_job(aws: Aws, job: str, dest: Path) -> None:
    """A training job's output data (output.tar.gz), debugger tensors and hyperparameters, into `dest`
    in the layout report.rundir reads: output/data/, debug-output/, hyperparameters.json, failure."""
    import tarfile
    import tempfile

    import botocore.exceptions
    sm, s3 = aws.boto.client("sagemaker"), aws.boto.client("s3")
    try:
        desc = sm.describe_training_job(TrainingJobName=job)
    except botocore.exceptions.ClientError as exc:
        raise LaunchError(f"training job {job!r}: {exc.response['Error'].get('Message', exc)} (a local run? pass "
                          "its folder)") from None
    status = desc.get("TrainingJobStatus")
    model = (desc.get("ModelArtifacts") or {}).get("S3ModelArtifacts")
    base = model.rsplit("/", 1)[0] if model else f"{desc['OutputDataConfig']['S3OutputPath'].rstrip('/')}/{job}/output"
    bucket, key = _s3_split(f"{base}/output.tar.gz")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "output.tar.gz"
        try:
            s3.download_file(bucket, key, str(archive))
        except botocore.exceptions.ClientError:
            raise LaunchError(f"training job {job} ({status}) has no s3://{bucket}/{key}: the trainer writes it when "
                              "the job ends; wait for the job, or report on a local run's folder") from None
        data = dest / "output" / "data"
        data.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(data, filter="data")
    tensors = 0
    hook = (desc.get("DebugHookConfig") or {}).get("S3OutputPath")
    if hook:
        bucket, prefix = _s3_split(f"{hook.rstrip('/')}/{job}/debug-output/")
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                target = dest / "debug-output" / obj["Key"][len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, obj["Key"], str(target))
                tensors += 1
    (dest / "hyperparameters.json").write_text(json.dumps(desc.get("HyperParameters", {}), indent=2))
    if desc.get("FailureReason"):
        (dest / "failure").write_text(desc["FailureReason"])
    print(f"downloaded {job} ({status}): output data, {tensors} debugger files -> {dest}")


def _rule_params(pairs: list[str] | None) -> dict[str, dict[str, str]]:
    params: dict[str, dict[str, str]] = {}
    for pair in pairs or []:
        rule, dot, rest = pair.partition(".")
        name, eq, value = rest.partition("=")
        if not (dot and eq and rule and name):
            raise LaunchError(f"--rule-param {pair!r}: write RULE.PARAMETER=VALUE, e.g. LossNotDecreasing.num_steps=20")
        params.setdefault(rule, {})[name] = value
    return params


def cmd_report(args, settings, on_request=None) -> int:
    from report import build
    from report.rundir import ReportError

    params = _rule_params(args.rule_param)
    folder, name = Path(args.run), None
    if not folder.exists():
        if not JOB_NAME.match(args.run):
            raise LaunchError(f"{args.run!r} is neither a folder nor a SageMaker training job name")
        aws = connect(settings, on_request, check_bucket=False)
        folder, name = Path(args.download_dir or f"report-{args.run}"), args.run
        download_job(aws, args.run, folder)
    try:
        out, verdicts = build.write(folder, Path(args.out) if args.out else None,
                                    Path(args.tensors) if args.tensors else None, params, name)
    except ReportError as exc:
        raise LaunchError(str(exc)) from None
    for v in verdicts:
        if v.fired:
            print(f"FIRED {v.rule}{f' ({v.where})' if v.where else ''}: {v.message}")
    quiet = sum(1 for v in verdicts if v.evaluated and not v.fired)
    skipped = [v.rule for v in verdicts if not v.evaluated]
    print(f"{sum(v.fired for v in verdicts)} rules fired, {quiet} quiet"
          + (f", {len(skipped)} without data ({', '.join(skipped)})" if skipped else ""))
    print(f"report: {out}")
    return 0


def cmd_metric_definitions(args, settings, on_request=None) -> int:
    print(json.dumps(metric_definitions(), indent=2))
    return 0


# ---------------------------------------------------------------------------------------------
# command line

def _training_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("job")
    g.add_argument("--hp", action="append", metavar="NAME=VALUE", help="a hyperparameter (repeat); see README")
    g.add_argument("--instance-type", type=_instance_type, default="ml.g4dn.xlarge")
    g.add_argument("--instance-count", type=_whole("--instance-count"), default=1)
    g.add_argument("--volume-size", type=_whole("--volume-size"), default=50, help="GB of EBS for the job")
    g.add_argument("--max-run", type=_whole("--max-run"), default=24 * 3600,
                   help="seconds before SageMaker stops the job")
    g.add_argument("--spot", action="store_true", help="managed spot training; resumes from checkpoints")
    g.add_argument("--max-wait", type=_whole("--max-wait"),
                   help="seconds to wait for spot capacity plus run (default 2 x max-run)")
    g.add_argument("--job-name", type=_name("--job-name"))
    g.add_argument("--wait", action="store_true", help="wait and stream the job's log")
    g = p.add_argument_group("data (default: the upload-data layout under s3://BUCKET/PREFIX/data/)")
    g.add_argument("--data", type=_s3("--data"), help="s3:// prefix holding train/, valid/, test/")
    for channel in CHANNELS:
        g.add_argument(f"--{channel}", metavar="S3_URI", help=f"the {channel} channel")
    g = p.add_argument_group("debugger and profiler")
    g.add_argument("--no-debugger", action="store_true", help="no DebuggerHookConfig and no debugger rules")
    g.add_argument("--no-debugger-rules", action="store_true")
    g.add_argument("--collections", type=lambda s: _choices(s, "--collections"), default=list(DEBUGGER_COLLECTIONS),
                   help="debugger collections, comma-separated (default: losses,weights,gradients,biases)")
    g.add_argument("--save-interval", type=_whole("--save-interval"), default=100, help="steps between debugger saves")
    g.add_argument("--no-profiler", action="store_true", help="no ProfilerConfig and no profiler rules")
    g.add_argument("--no-profiler-rules", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("settings")
    g.add_argument("--config", help="JSON settings file (default ./launch.json if present)")
    for key in SETTINGS:
        g.add_argument(f"--{key.replace('_', '-')}", dest=key)
    g.add_argument("--dry-run", action="store_true", help="print the request instead of sending it")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("upload-data", parents=[common], help="class folders (or dogImages.zip, CIFAR-100) to S3")
    p.add_argument("source", help="a folder with train/ (valid/, test/), or an archive with --format")
    p.add_argument("--format", choices=("folders", "dogimages", "cifar100"), default="folders")
    p.add_argument("--s3", type=_s3("--s3"), help="destination prefix (default s3://BUCKET/PREFIX/data)")
    p.set_defaults(func=cmd_upload_data)

    p = sub.add_parser("train", parents=[common], help="start a training job")
    _training_flags(p)
    g = p.add_argument_group("train --local: SageMaker local mode, the training image on this machine")
    g.add_argument("--local", action="store_true")
    g.add_argument("--local-data", help="class folders on disk (train/, valid/, test/)")
    g.add_argument("--output-dir", default="local-output", help="where model.tar.gz lands (default ./local-output)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", parents=[common], help="start a hyperparameter tuning job (or tune --local)")
    _training_flags(p)
    g = p.add_argument_group("search")
    g.add_argument("--lr", default="0.001:0.1", help="LOW:HIGH, log scale (default 0.001:0.1)")
    g.add_argument("--batch-sizes", default="32,64,128,256,512")
    g.add_argument("--epochs", default="2:4", help="LOW:HIGH (default 2:4; with Hyperband, HIGH is the budget)")
    g.add_argument("--optimizers", help="e.g. sgd,adamw")
    g.add_argument("--momentum", help="LOW:HIGH")
    g.add_argument("--weight-decay", help="LOW:HIGH, log scale")
    g.add_argument("--objective", choices=sorted(OBJECTIVES), default="valid-loss")
    g.add_argument("--strategy", choices=("Bayesian", "Random", "Hyperband"), default="Bayesian")
    g.add_argument("--no-early-stopping", dest="early_stopping", action="store_false")
    g.add_argument("--warm-start", action="append", metavar="TUNING_JOB", help="a parent tuning job (repeat)")
    g.add_argument("--max-jobs", type=_whole("--max-jobs"), default=12)
    g.add_argument("--max-parallel-jobs", type=_whole("--max-parallel-jobs"), default=3)
    g = p.add_argument_group("tune --local: Optuna on this machine, each trial a run of the training program")
    g.add_argument("--local", action="store_true")
    g.add_argument("--local-data", help="class folders on disk")
    g.add_argument("--image", help="run trials in this training image (default: natively, in .venv)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--work-dir", help="empty folder for the trials (default: a new temporary folder); the best "
                                      "trial is kept whole, other trials only as the log of a failure")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("best", parents=[common], help="the best job of a tuning job, and a table of all")
    p.add_argument("tuning_job")
    p.set_defaults(func=cmd_best)

    def model_flags(p):
        p.add_argument("--model-data", required=True, help="s3://.../model.tar.gz from a training job")
        p.add_argument("--model-name", type=_name("--model-name"))
        p.add_argument("--top-k", type=_whole("--top-k"), default=5)
        p.add_argument("--wait", action="store_true")

    p = sub.add_parser("deploy", parents=[common], help="a real-time or serverless endpoint")
    model_flags(p)
    p.add_argument("--endpoint-name", type=_name("--endpoint-name"))
    p.add_argument("--instance-type", type=_instance_type, default="ml.m5.large")
    p.add_argument("--instance-count", type=_whole("--instance-count"), default=1)
    p.add_argument("--startup-timeout", type=_whole("--startup-timeout"), default=600,
                   help="seconds for the container to become healthy")
    p.add_argument("--serverless", action="store_true")
    p.add_argument("--local", action="store_true", help="SageMaker local mode: serve on localhost:8080 until Ctrl-C")
    p.add_argument("--memory-mb", type=_serverless_memory, default=4096, help="serverless memory")
    p.add_argument("--max-concurrency", type=_whole_at_most("--max-concurrency", 200), default=5,
                   help="serverless concurrency")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("predict", parents=[common], help="send an image file or folder, print the top-k")
    p.add_argument("endpoint", nargs="?", help="endpoint name (or --url)")
    p.add_argument("path")
    p.add_argument("--url", help="a running server instead of an endpoint, e.g. http://127.0.0.1:8080")
    p.add_argument("--top-k", type=_whole("--top-k"), default=3)
    p.add_argument("--json", action="store_true", help='send {"image": base64} as application/json instead of raw bytes')
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("transform", parents=[common], help="batch transform over an S3 prefix of images")
    model_flags(p)
    p.add_argument("--input", type=_s3("--input"), required=True, help="s3:// prefix of images, one image per object")
    p.add_argument("--output", type=_s3("--output"),
                   help="s3:// prefix for the results (default s3://BUCKET/PREFIX/transform/...)")
    p.add_argument("--content-type", default="application/x-image")
    p.add_argument("--instance-type", type=_instance_type, default="ml.m5.xlarge")
    p.add_argument("--instance-count", type=_whole("--instance-count"), default=1)
    p.add_argument("--max-payload-mb", type=_whole_at_most("--max-payload-mb", 100), default=6)
    p.add_argument("--job-name", type=_name("--job-name"))
    p.set_defaults(func=cmd_transform)

    p = sub.add_parser("cleanup", parents=[common], help="delete an endpoint, its config and its models")
    p.add_argument("endpoint")
    p.set_defaults(func=cmd_cleanup)

    p = sub.add_parser("report", parents=[common], help="debugger and profiler rules and charts, as one HTML file")
    p.add_argument("run", help="a local run's folder (or its output/data), or a SageMaker training job name")
    p.add_argument("--out", help="the HTML file (default: report.html in the run's folder)")
    p.add_argument("--tensors", help="the smdebug output folder, when it is not in the run's folder")
    p.add_argument("--download-dir", help="where a job's output is downloaded (default ./report-JOB)")
    p.add_argument("--rule-param", action="append", metavar="RULE.NAME=VALUE",
                   help="a rule parameter, as SageMaker's rule_parameters (repeat), e.g. Overtraining.patience_validation=3")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("metric-definitions", parents=[common], help="the trainer's metric regexes, as JSON")
    p.set_defaults(func=cmd_metric_definitions)
    return parser


def main(argv: list[str] | None = None, on_request=None) -> int:
    """on_request(operation, params) sees every AWS request before it is sent (tests, auditing)."""
    try:
        args = build_parser().parse_args(argv)  # the argument types raise LaunchError too
        settings = resolve_settings(args)
        return args.func(args, settings, on_request)
    except DryRun as dry:
        print(json.dumps({"operation": dry.operation, "request": dry.params}, indent=2, default=str))
        return 0
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
