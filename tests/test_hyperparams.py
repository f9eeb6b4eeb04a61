import pytest

from train.hyperparams import Config, HyperparameterError, parse


def test_defaults_and_platform_names_ignored():
    cfg = parse({"sagemaker_program": "train_job.py", "_tuning_objective_metric": "valid:loss"})
    assert cfg == Config()


def test_strings_are_typed_and_dashes_or_underscores_accepted():
    cfg = parse({"lr": "1e-3", "batch-size": "32", "weight_decay": "0.0", "epochs": "3.0", "channels-last": "False",
                 "freeze": "2", "optimizer": "AdamW", "arch": "resnet34", "augment": "heavy", "num-workers": "auto"})
    assert (cfg.lr, cfg.batch_size, cfg.weight_decay, cfg.epochs) == (1e-3, 32, 0.0, 3)
    assert cfg.channels_last is False and cfg.freeze == "layer2" and cfg.optimizer == "adamw"
    assert cfg.arch == "resnet34" and cfg.augment == "heavy" and cfg.num_workers == -1
    assert parse({"channels-last": "true"}).channels_last is True


@pytest.mark.parametrize("raw,fragment", [
    ({"learning-rate": "0.1"}, "unknown hyperparameter 'learning-rate' (did you mean 'lr'?)"),
    ({"lr": "fast"}, "'lr' = 'fast' is not valid: expected a number"),
    ({"batch-size": "12.5"}, "'batch-size' = '12.5' is not valid: expected an integer"),
    ({"lr": "0"}, "'lr' = '0' is not valid: expected a number > 0"),
    ({"momentum": "1"}, "'momentum' = '1' is not valid"),
    ({"optimizer": "lion"}, "one of sgd, adam, adamw, rmsprop"),
    ({"freeze": "layer9"}, "one of none, backbone, stem, layer1"),
    ({"channels-last": "maybe"}, "true or false"),
    ({"arch": "resnet5"}, "did you mean resnet50"),
    ({"lr": "nan"}, "a finite number"),
])
def test_bad_values_say_what_is_wrong(raw, fragment):
    with pytest.raises(HyperparameterError) as err:
        parse(raw)
    assert fragment in str(err.value)
    assert str(err.value).startswith("Bad hyperparameters:")


def test_all_problems_reported_at_once():
    with pytest.raises(HyperparameterError) as err:
        parse({"lr": "x", "epochs": "-1"})
    assert "'lr'" in str(err.value) and "'epochs'" in str(err.value)


def test_round_trip_through_hyperparameter_names():
    cfg = parse({"lr": "0.05", "freeze": "backbone"})
    assert parse({k: str(v) for k, v in cfg.as_hyperparameters().items()}) == cfg
