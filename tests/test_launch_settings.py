"""launch.py settings: flags over environment over launch.json; a bad file is one clear error."""

from __future__ import annotations

import json

import pytest

import launch


def settings(argv, monkeypatch, tmp_path, env=None, config=None):
    monkeypatch.chdir(tmp_path)
    for key in ("AWS_REGION", "AWS_DEFAULT_REGION", "IMGCLS_ROLE", "SAGEMAKER_ROLE", "IMGCLS_BUCKET", "IMGCLS_PREFIX",
                "IMGCLS_TRAIN_IMAGE", "IMGCLS_SERVE_IMAGE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    if config is not None:
        (tmp_path / "launch.json").write_text(config if isinstance(config, str) else json.dumps(config))
    args = launch.build_parser().parse_args(argv)
    return launch.resolve_settings(args)


def test_precedence_flags_env_file(monkeypatch, tmp_path):
    s = settings(["train", "--bucket", "from-flag"], monkeypatch, tmp_path,
                 env={"IMGCLS_BUCKET": "from-env", "IMGCLS_ROLE": "arn:aws:iam::1:role/env"},
                 config={"bucket": "from-file", "role": "arn:aws:iam::1:role/file", "region": "eu-west-1"})
    assert s["bucket"] == "from-flag" and s["role"] == "arn:aws:iam::1:role/env" and s["region"] == "eu-west-1"
    assert s["prefix"] == "imgcls"


@pytest.mark.parametrize("config,words", [("{", "not valid JSON"), ({"buckit": "x"}, "unknown keys ['buckit']")])
def test_bad_config_file(monkeypatch, tmp_path, config, words):
    with pytest.raises(launch.LaunchError, match=words.replace("[", r"\[").replace("]", r"\]")):
        settings(["train"], monkeypatch, tmp_path, config=config)


def test_image_uri_and_role_checks():
    good = "123456789012.dkr.ecr.us-east-1.amazonaws.com/imgcls-train:abc1234"
    assert launch.need({"train_image": good}, "train_image", "") == good
    assert launch.need({"train_image": "123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn/x:1"}, "train_image", "")
    for bad in ("imgcls-train:latest", "123.dkr.ecr.us-east-1.amazonaws.com/x:1", good + " "):
        with pytest.raises(launch.LaunchError, match="not an ECR image URI"):
            launch.need({"train_image": bad}, "train_image", "")
    with pytest.raises(launch.LaunchError, match="no role: hint"):
        launch.need({}, "role", "hint")


def test_ranges():
    assert launch._range("0.001:0.1", "--lr") == (0.001, 0.1)
    for bad in ("0.1:0.01", "0.1:0.1", "fast", "0.1"):
        with pytest.raises(launch.LaunchError):
            launch._range(bad, "--lr")
