"""ServeConfig validates every field on construction and names the value and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from pruneserve.server.config import DEFAULT_LENGTH_BUCKETS, ServeConfig
from pruneserve.server.errors import ConfigError


def test_defaults() -> None:
    c = ServeConfig(artifacts=["a"])
    assert (c.grpc_port, c.metrics_port, c.max_batch_size, c.max_queue_size) == (8001, 8002, 32, 1024)
    assert c.providers == ["cpu"] and c.engine == "auto" and not c.truncate
    assert c.threads is not None and c.threads >= 1
    assert c.length_buckets == list(DEFAULT_LENGTH_BUCKETS)
    assert c.max_queue_delay_s == pytest.approx(0.002)


def test_provider_names_are_normalised() -> None:
    c = ServeConfig(providers="TensorrtExecutionProvider, cuda,CPU")  # type: ignore[arg-type]
    assert c.providers == ["tensorrt", "cuda", "cpu"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("grpc_port", 70000, r"grpc_port=70000 is invalid: expected an integer in \[0, 65535\]"),
        ("max_batch_size", 0, r"max_batch_size=0 is invalid"),
        ("max_queue_size", -1, r"max_queue_size=-1"),
        ("workers", 0, r"workers=0"),
        ("max_queue_delay_ms", -1.0, r"max_queue_delay_ms=-1.0 is invalid: expected a number"),
        ("shadow_rate", 1.5, r"shadow_rate=1.5"),
        ("providers", ["vulkan"], r"provider 'vulkan' is unknown; use names from \('tensorrt', 'cuda', 'cpu'\)"),
        ("providers", ["cpu", "cpu"], r"names a provider twice"),
        ("providers", [], r"providers is empty"),
        ("engine", "tvm", r"engine 'tvm' is not one of"),
        ("max_sequence_length", 1, r"max_sequence_length=1"),
        ("length_buckets", [0, 16], r"length_buckets \[0, 16\] must be a non-empty list of positive integers"),
        ("truncate", "yes", r"truncate must be true or false"),
        ("intra_op_spinning", "busy", r"intra_op_spinning 'busy' is not one of \('off', 'run', 'always'\)"),
        ("tls_cert", "/nonexistent/cert.pem", r"tls_cert and tls_key must be given together"),
    ],
)
def test_invalid_values_are_named(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServeConfig(**{field: value})  # type: ignore[arg-type]


def test_tls_files_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tls_cert '.*' is not a readable file"):
        ServeConfig(tls_cert=str(tmp_path / "c.pem"), tls_key=str(tmp_path / "k.pem"))
    with pytest.raises(ConfigError, match="needs tls_cert"):
        ServeConfig(tls_client_ca=str(tmp_path / "ca.pem"))


def test_yaml_round_trip(tmp_path: Path) -> None:
    p = tmp_path / "serve.yaml"
    p.write_text("artifacts: [a, b]\nmax-batch-size: 8\nproviders: [cuda, cpu]\nlength_buckets: [64, 16]\n")
    c = ServeConfig.from_yaml(p)
    assert c.artifacts == ["a", "b"] and c.max_batch_size == 8 and c.providers == ["cuda", "cpu"]
    assert c.length_buckets == [16, 64]
    assert ServeConfig.from_dict(c.to_dict()) == c


def test_yaml_errors(tmp_path: Path) -> None:
    p = tmp_path / "serve.yaml"
    p.write_text("max_batch: 8\n")
    with pytest.raises(ConfigError, match=r"unknown configuration keys \['max_batch'\]"):
        ServeConfig.from_yaml(p)
    p.write_text("artifacts: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        ServeConfig.from_yaml(p)
    with pytest.raises(ConfigError, match="cannot read config file"):
        ServeConfig.from_yaml(tmp_path / "missing.yaml")


def test_unknown_key_message_is_whole() -> None:
    import dataclasses

    with pytest.raises(ConfigError) as info:
        ServeConfig.from_dict({"max_batch": 8, "metrics_prot": 1})
    message = str(info.value)
    assert "characters cut" not in message
    assert all(f"'{f.name}'" in message for f in dataclasses.fields(ServeConfig)), message
    assert "did you mean 'max_batch_size'" in message and "'metrics_port'" in message, message


@pytest.mark.parametrize("field", ["metrics", "exit_on_error"])
def test_switches_are_booleans(field: str) -> None:
    assert getattr(ServeConfig(), field) is True
    with pytest.raises(ConfigError, match=f"{field} must be true or false"):
        ServeConfig(**{field: "no"})  # type: ignore[arg-type]


# -- model control ---------------------------------------------------------------------------
def test_model_control_defaults_and_yaml(tmp_path: Path) -> None:
    c = ServeConfig(artifacts=["a"])
    assert (c.model_repository, c.model_control_mode, c.load_models) == (None, "none", [])
    assert (c.repository_poll_secs, c.version_policy) == (15.0, "latest:1")
    p = tmp_path / "serve.yaml"
    p.write_text(
        f"model-repository: {tmp_path}\nmodel_control_mode: explicit\nload_models: [a, b]\n"
        "repository_poll_secs: 2.5\nversion_policy: 'specific:3,1'\n"
    )
    c = ServeConfig.from_yaml(p)
    assert (c.model_repository, c.model_control_mode, c.load_models) == (str(tmp_path), "explicit", ["a", "b"])
    assert c.repository_poll_secs == 2.5 and c.version_policy == "specific:1,3"
    assert c.policy.kind == "specific" and c.policy.versions == (1, 3)
    assert ServeConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    ("text", "normalised"), [("latest", "latest:1"), ("latest:3", "latest:3"), ("ALL", "all"), ("specific:2, 1", "specific:1,2")]
)
def test_version_policy_forms(tmp_path: Path, text: str, normalised: str) -> None:
    assert ServeConfig(model_repository=str(tmp_path), version_policy=text).version_policy == normalised


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model_control_mode": "auto"}, r"model_control_mode 'auto' is not one of \('none', 'explicit', 'poll'\)"),
        ({"model_control_mode": "explicit"}, r"model_control_mode 'explicit' needs model_repository \(--model-repository DIR\)"),
        ({"model_control_mode": "poll"}, r"needs model_repository"),
        ({"version_policy": "latest:0"}, r"version_policy 'latest:0' is invalid; use 'latest:N'"),
        ({"version_policy": "specific:"}, r"version_policy 'specific:' is invalid"),
        ({"version_policy": "specific:0,2"}, r"version_policy 'specific:0,2' is invalid"),
        ({"version_policy": "newest"}, r"version_policy 'newest' is invalid"),
        ({"repository_poll_secs": 0.0}, r"repository_poll_secs=0.0 is invalid: expected a number in \[0.1, 86400.0\]"),
        ({"load_models": ["a"]}, r"load_models \['a'\] applies only to model_control_mode 'explicit'"),
        ({"model_repository": "/nonexistent/models"}, r"model_repository '/nonexistent/models' is not a folder"),
    ],
)
def test_model_control_values_are_named(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServeConfig(**overrides)  # type: ignore[arg-type]


def test_model_control_flags_reach_the_config(tmp_path: Path) -> None:
    from pruneserve.cli import build_parser
    from pruneserve.server.cli import config_from_args

    args = build_parser().parse_args(
        ["serve", "--model-repository", str(tmp_path), "--model-control-mode", "explicit", "--load-model", "a",
         "--load-model", "*", "--version-policy", "all", "--repository-poll-secs", "3"]
    )  # fmt: skip
    c = config_from_args(args)
    assert (c.model_repository, c.model_control_mode, c.load_models) == (str(tmp_path), "explicit", ["a", "*"])
    assert (c.version_policy, c.repository_poll_secs, c.artifacts) == ("all", 3.0, [])
