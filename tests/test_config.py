"""Configuration: one frozen object from defaults, TOML, environment and flags."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from netra.config import Config, describe


def test_precedence_defaults_file_env_overrides(tmp_path):
    path = tmp_path / "netra.toml"
    path.write_text('[netra]\nport = 9000\nmax_runs = 7\nallowed_origins = ["https://a.example"]\n')
    config = Config.load(
        environ={"NETRA_MAX_RUNS": "9", "NETRA_CHAOS_TOOLS": "yes", "NETRA_JWT_AUDIENCE": ""},
        file=path,
        overrides={"host": "0.0.0.0", "port": None},
    )
    assert (config.host, config.port, config.max_runs) == ("0.0.0.0", 9000, 9)
    assert config.allowed_origins == ("https://a.example",)
    assert config.chaos_tools is True and config.jwt_audience is None
    assert attrs.has(Config) and Config.__attrs_attrs__  # frozen attrs value
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.port = 1


def test_bad_values_are_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="max_runs"):
        Config.load(environ={"NETRA_MAX_RUNS": "many"})
    with pytest.raises(ValueError, match="chaos_tools"):
        Config.load(environ={"NETRA_CHAOS_TOOLS": "maybe"})
    path = tmp_path / "x.toml"
    path.write_text("no_such_setting = 1\n")
    with pytest.raises(ValueError, match="no_such_setting"):
        Config.load(environ={}, file=path)
    with pytest.raises(ValueError):
        Config.load(environ={"NETRA_DEFAULT_MULTITASK": "sometimes"})


def test_secrets_stay_out_of_repr():
    config = Config(jwt_secret="s3cret", openai_api_key="sk-abc", metrics_token="m-tok",
                    database_url="postgresql://u:pw@h/db")
    for secret in ("s3cret", "sk-abc", "m-tok", "pw@h"):
        assert secret not in repr(config)


def test_readme_lists_every_setting_with_its_default():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for env, default, doc in describe():
        row = f"| `{env}` | `{default}` | {doc} |"
        assert row in readme, f"README's configuration table is out of date for {env}"


def test_an_earlier_name_of_a_setting_still_works_and_the_new_one_wins():
    assert Config.load(environ={"NETRA_SLOW_CONSUMER_TIMEOUT_S": "2"}).write_timeout_s == 2.0
    both = {"NETRA_SLOW_CONSUMER_TIMEOUT_S": "2", "NETRA_WRITE_TIMEOUT_S": "3"}
    assert Config.load(environ=both).write_timeout_s == 3.0


def test_misspelt_variables_are_named():
    from netra.config import unknown_variables

    environ = {"NETRA_WRITE_TIMEOUT": "2", "NETRA_PORT": "1", "NETRA_TOKEN": "t", "PATH": "/bin"}
    assert unknown_variables(environ) == ["NETRA_WRITE_TIMEOUT"]
    # the tests' and benchmarks' own variables (CI sets them) are not misspelt settings
    environ = {"NETRA_TEST_REDIS_URL": "redis://", "NETRA_TEST_DATABASE_URL": "x", "NETRA_BENCH_REDIS_URL": "y"}
    assert unknown_variables(environ) == []
