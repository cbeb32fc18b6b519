"""Unit tests for protocol/config.py: the run-config schema, YAML loading and overrides."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from protocol.config import RunConfig, dump_config, load_config
from protocol.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def config_error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value)


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def assert_subset(expected, actual, where=""):
    """Every key the YAML sets has that value in the loaded config (dumped as JSON types)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), where
        for key, value in expected.items():
            assert key in actual, f"{where}.{key}"
            assert_subset(value, actual[key], f"{where}.{key}".lstrip("."))
    else:
        assert actual == expected, where


# --------------------------------------------------------------------------- defaults and shipped configs


def test_defaults_validate():
    config = load_config(None)
    assert config == RunConfig()
    assert config.train.steps == 20
    assert config.sampling.group_size == 4
    assert config.broker.max_policy_lag == 2
    assert config.broker.credits_per_actor == 64
    assert config.endpoints.broker == "127.0.0.1:5555"
    assert config.run.dir == Path("runs/default")
    assert config.model.cache_dir is None


def test_configs_folder_is_not_empty():
    assert {p.name for p in CONFIGS} >= {"default.yaml", "tiny.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_with_its_values(path):
    config = load_config(path)
    assert isinstance(config, RunConfig)
    raw = yaml.safe_load(path.read_text())
    assert isinstance(raw, dict) and raw
    assert_subset(raw, config.model_dump(mode="json"))


def test_tiny_config_values():
    config = load_config(ROOT / "configs" / "tiny.yaml")
    assert config.task.name == "token_range"
    assert config.task.system_prompt is None
    assert config.sampling.group_size == 8
    assert config.train.steps == 32
    assert config.train.lr == 0.05
    assert config.run.dir == Path("runs/tiny")


def test_empty_yaml_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == RunConfig()
    assert load_config(write(tmp_path, "# only a comment\n", "c.yaml")) == RunConfig()


# --------------------------------------------------------------------------- overrides


def test_overrides_are_typed():
    config = load_config(ROOT / "configs" / "default.yaml", ["train.steps=5", "task.name=token_range"])
    assert config.train.steps == 5 and type(config.train.steps) is int
    assert config.task.name == "token_range"
    assert config.sampling.group_size == 8  # the rest of the file is kept


def test_overrides_of_other_types():
    config = load_config(
        None,
        [
            "train.lr=0.5",
            "loss.std_normalize=false",
            "task.system_prompt=null",
            "run.dir=/tmp/x",
            "run.log_level=DEBUG",
            "task.operation='*'",  # quoted: a bare * is a YAML alias
            "task.format_reward=1",
        ],
    )
    assert config.train.lr == 0.5
    assert config.loss.std_normalize is False
    assert config.task.system_prompt is None
    assert config.run.dir == Path("/tmp/x")
    assert config.run.log_level == "DEBUG"
    assert config.task.operation == "*"
    assert config.task.format_reward == 1.0


def test_later_override_wins_and_empty_value_is_empty_string():
    config = load_config(None, ["train.steps=5", "train.steps=7", "task.system_prompt="])
    assert config.train.steps == 7
    assert config.task.system_prompt == ""


def test_override_value_may_contain_equals_sign():
    config = load_config(None, ["task.system_prompt=a=b"])
    assert config.task.system_prompt == "a=b"


def test_overrides_do_not_touch_the_file(tmp_path):
    path = write(tmp_path, "train:\n  steps: 3\n")
    assert load_config(path, ["train.steps=9"]).train.steps == 9
    assert load_config(path).train.steps == 3


# --------------------------------------------------------------------------- unknown keys and wrong types


def test_unknown_nested_key_in_yaml(tmp_path):
    message = config_error(write(tmp_path, "train:\n  steps: 3\n  stepz: 3\n"))
    assert "train.stepz: unknown key" in message
    assert "train.steps" not in message


def test_unknown_section_in_yaml(tmp_path):
    message = config_error(write(tmp_path, "trian:\n  steps: 3\n"))
    assert "trian: unknown key" in message


def test_unknown_key_as_override():
    message = config_error(None, ["train.stepz=3"])
    assert "train.stepz" in message
    assert "unknown key" in message
    assert "train.stepz: unknown key" in message


def test_unknown_deep_override():
    assert "sampling.group.size: unknown key" not in config_error(None, ["sampling.group.size=3"])
    assert "sampling.group: unknown key" in config_error(None, ["sampling.group.size=3"])


def test_every_offending_key_is_named(tmp_path):
    message = config_error(write(tmp_path, "train:\n  stepz: 1\n  lr: fast\nbroker:\n  foo: 2\n"))
    assert "train.stepz: unknown key" in message
    assert "broker.foo: unknown key" in message
    assert re.search(r"^  train\.lr: ", message, re.M)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.steps=abc", "train.steps"),
        ("train.steps=1.5", "train.steps"),
        ("train.steps=[1]", "train.steps"),
        ("train.steps=0", "train.steps"),  # ge=1
        ("train.lr=-1", "train.lr"),
        ("loss.std_normalize=maybe", "loss.std_normalize"),
        ("task.name=chess", "task.name"),
        ("run.log_level=LOUD", "run.log_level"),
        ("sampling.group_size=1", "sampling.group_size"),
        ("train=5", "train"),
        # found by a helper's hunt: vLLM samples below 0.01 at 0.01, the learner divided by the configured value
        ("sampling.temperature=0.005", "sampling.temperature"),
        ("eval.temperature=0.001", "eval.temperature"),
        # found by a helper's hunt: `.inf` ("no limit") passed, then raised OverflowError in the config's own check
        # or in every reward call; a deadline past a day overflowed the pipe's poll
        ("broker.memory_budget_mb=.inf", "broker.memory_budget_mb"),
        ("task.reward.timeout_s=.inf", "task.reward.timeout_s"),
        ("task.reward.timeout_s=1e10", "task.reward.timeout_s"),
        ("train.lr=.nan", "train.lr"),
        # found by a review: the log writes a message as one record, and Linux's writev stops short at 2 GiB
        ("broker.max_message_bytes=2147483648", "broker.max_message_bytes"),
        # found by a helper's hunt: the actor's first problem raised KeyError, after its engine had loaded
        ("task.question=What is {x}?", "task.question"),
        ('task.question=What is {a} {op} {b}? Reply as JSON: {"answer": N}', "task.question"),
        ("task.question=What is {a} {op} {b} {", "task.question"),
        ("task.question=What is {a.real.x}?", "task.question"),
        ("task.question=What is {a[0]}?", "task.question"),
    ],
)
def test_wrong_type_names_the_key(override, key):
    message = config_error(None, [override])
    assert re.search(rf"^  {re.escape(key)}: ", message, re.M), message


def test_wrong_type_message_mentions_source(tmp_path):
    path = write(tmp_path, "train:\n  steps: abc\n")
    message = config_error(path)
    assert str(path) in message
    assert re.search(r"^  train\.steps: ", message, re.M)


# --------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize("override", ["nokeyvalue", "=5", "", "train.steps"])
def test_malformed_override(override):
    message = config_error(None, [override])
    assert "section.key=value" in message
    assert repr(override) in message


def test_override_through_a_scalar_is_rejected():
    message = config_error(ROOT / "configs" / "tiny.yaml", ["train.steps.x=1"])
    assert "steps is not a section" in message


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    message = config_error(path)
    assert "does not exist" in message and str(path) in message


@pytest.mark.parametrize("text", ["- a\n- b\n", "42\n", "just a string\n"], ids=["list", "int", "str"])
def test_non_mapping_yaml(tmp_path, text):
    assert "mapping" in config_error(write(tmp_path, text))


@pytest.mark.parametrize("text", ["train: [1, 2\n", "train:\n  steps: 1\n steps: 2\n", "a: b: c\n", "\tx: 1\n"])
def test_invalid_yaml(tmp_path, text):
    assert "not valid YAML" in config_error(write(tmp_path, text))


def test_override_with_invalid_yaml_value():
    assert "run.dir" in config_error(None, ["run.dir=[unclosed"])


def test_config_path_is_a_directory(tmp_path):
    config_error(tmp_path)


# --------------------------------------------------------------------------- endpoints


@pytest.mark.parametrize(
    "override, key",
    [
        ("endpoints.broker=nohost", "endpoints.broker"),
        ("endpoints.broker=127.0.0.1:70000", "endpoints.broker"),
        ("endpoints.broker=127.0.0.1:0", "endpoints.broker"),
        ("endpoints.broker=:5555", "endpoints.broker"),
        ("endpoints.broker='host:'", "endpoints.broker"),  # unquoted, YAML reads a mapping
        ("endpoints.broker=host:port", "endpoints.broker"),
        ("endpoints.weights=127.0.0.1:65536", "endpoints.weights"),
        ("endpoints.weights=127.0.0.1:-1", "endpoints.weights"),
    ],
)
def test_bad_endpoint_names_the_key(override, key):
    message = config_error(None, [override])
    assert re.search(rf"^  {re.escape(key)}: .*expected host:port", message, re.M), message


@pytest.mark.parametrize("value", ["localhost:1", "10.0.0.2:65535", "node-7.cluster:6000", "[::1]:5555"])
def test_good_endpoints(value):
    raw = f"'{value}'" if value.startswith("[") else value  # an unquoted [ starts a YAML list
    other = value.rpartition(":")[0] + ":7"
    config = load_config(None, [f"endpoints.broker={raw}", f"endpoints.weights={other if raw == value else repr(other)}"])
    assert config.endpoints.broker == value and config.endpoints.weights == other


@pytest.mark.parametrize("broker, weights", [("127.0.0.1:6000", "127.0.0.1:6000"), ("localhost:6000", "127.0.0.1:6000"),
                                             ("0.0.0.0:6000", "10.0.0.2:6000"), ("node-1:6000", "node-1:6000")])  # fmt: skip
def test_broker_and_weights_on_one_port_is_an_error(broker, weights):
    message = config_error(None, [f"endpoints.broker={broker}", f"endpoints.weights={weights}"])
    assert "name the same port" in message, message


def test_one_port_on_two_hosts_is_fine():
    config = load_config(None, ["endpoints.broker=node-1:6000", "endpoints.weights=node-2:6000"])
    assert config.endpoints.weights == "node-2:6000"


# --------------------------------------------------------------------------- cross-field checks


def test_credits_below_group_size():
    message = config_error(None, ["sampling.group_size=8", "broker.credits_per_actor=7", "train.groups_per_step=1"])
    assert "broker.credits_per_actor must be at least sampling.group_size" in message


def test_credits_cannot_hold_one_step_deadlock():
    overrides = ["sampling.group_size=8", "broker.credits_per_actor=8", "train.groups_per_step=2", "actor.count=1"]
    message = config_error(None, overrides)
    assert "deadlock" in message
    assert "broker.credits_per_actor x actor.count = 8" in message
    assert "16 samples" in message


def test_a_memory_budget_below_one_step_of_the_longest_samples_is_refused():
    # a sample of max_model_len 1024 + max_tokens 16 tokens holds up to 4160 bytes; 2 actors get 64 KiB each: 15 samples
    sizes = ["model.max_model_len=1024", "sampling.max_tokens=16", "sampling.group_size=8", "train.groups_per_step=4", "actor.count=2"]
    message = config_error(None, [*sizes, "broker.memory_budget_mb=0.125"])
    assert "broker.memory_budget_mb = 0.125 split over actor.count = 2 actors holds 15 samples of up to 4160 bytes" in message
    assert "one step of 32 samples" in message
    load_config(None, [*sizes, "broker.memory_budget_mb=0.127"])  # 66584 bytes each: 16 samples x 2 actors = one step


def test_credits_exactly_one_step_is_enough():
    overrides = ["sampling.group_size=8", "broker.credits_per_actor=8", "train.groups_per_step=2", "actor.count=2"]
    config = load_config(None, overrides)
    assert config.broker.credits_per_actor * config.actor.count == 16
    config = load_config(None, ["sampling.group_size=4", "broker.credits_per_actor=32", "train.groups_per_step=8"])
    assert config.broker.credits_per_actor == 32


def test_shipped_configs_credits_fit_one_step():
    for path in CONFIGS:
        config = load_config(path)
        step = config.train.groups_per_step * config.sampling.group_size
        assert config.broker.credits_per_actor * config.actor.count >= step, path.name


# --------------------------------------------------------------------------- dump / load


@pytest.mark.parametrize("path", [None, *CONFIGS], ids=["defaults", *[p.name for p in CONFIGS]])
def test_dump_then_load_round_trips(tmp_path, path):
    config = load_config(path, ["train.steps=3", "model.cache_dir=/tmp/cache", "task.system_prompt=null"])
    out = tmp_path / "dumped.yaml"
    dump_config(config, out)
    again = load_config(out)
    assert again == config
    assert again.model.cache_dir == Path("/tmp/cache")
    assert again.task.system_prompt is None
    dumped = yaml.safe_load(out.read_text())
    assert list(dumped) == list(RunConfig.model_fields)
    assert dumped["train"]["steps"] == 3


def test_dump_is_stable(tmp_path):
    config = load_config(ROOT / "configs" / "tiny.yaml")
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    dump_config(config, first)
    dump_config(load_config(first), second)
    assert first.read_text() == second.read_text()
