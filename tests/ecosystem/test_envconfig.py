"""The one configuration rule: every flag ↔ LLM_LOADTEST_<FLAG> (client/envconfig.py)."""

from __future__ import annotations

import argparse

import pytest

from client.cli import _parser, main
from client.envconfig import apply_env_defaults, env_var, iter_flags


def parse(argv: list[str], env: dict[str, str]) -> argparse.Namespace:
    parser, _ = _parser()
    apply_env_defaults(parser, env)
    return parser.parse_args(argv)


def test_naming_rule() -> None:
    assert env_var("--metrics-listen") == "LLM_LOADTEST_METRICS_LISTEN"
    assert env_var("--api-key") == "LLM_LOADTEST_API_KEY"
    assert env_var("--db") == "LLM_LOADTEST_DB"
    # The mock server's flags have their own namespace: its --model is not run's --model.
    assert env_var("--model", "mock-server") == "LLM_LOADTEST_MOCK_MODEL"
    assert env_var("--model", "run") == "LLM_LOADTEST_MODEL"


def test_one_variable_never_sets_flags_of_different_meaning() -> None:
    env = {"LLM_LOADTEST_OUTPUT_TOKENS": "16", "LLM_LOADTEST_MOCK_OUTPUT_TOKENS": "64"}
    assert parse(["mock-server"], env).output_tokens == 64
    assert parse(["run", "--target", "http://h/v1", "--model", "m"], env).output_tokens.fixed == 16


def test_the_image_database_variable_does_not_redirect_the_read_commands() -> None:
    assert parse(["runs", "list"], {"LLM_LOADTEST_DB": "/data/runs.db"}).db is None


def test_variables_set_defaults_and_the_command_line_wins() -> None:
    env = {"LLM_LOADTEST_METRICS_LISTEN": "0.0.0.0:9464", "LLM_LOADTEST_DB": "/data/runs.db"}
    args = parse(["controller"], env)
    assert args.metrics_listen == "0.0.0.0:9464"
    assert args.db == "/data/runs.db"
    args = parse(["controller", "--metrics-listen", "127.0.0.1:1"], env)
    assert args.metrics_listen == "127.0.0.1:1"
    assert parse(["controller"], {}).metrics_listen is None


def test_values_are_parsed_like_the_flag() -> None:
    args = parse(["mock-server"], {"LLM_LOADTEST_MOCK_PORT": "9000", "LLM_LOADTEST_MOCK_ITL_MS": "2.5"})
    assert args.port == 9000
    assert args.itl_ms == 2.5
    with pytest.raises(ValueError, match="LLM_LOADTEST_MOCK_PORT"):
        parse(["mock-server"], {"LLM_LOADTEST_MOCK_PORT": "eighty"})
    with pytest.raises(ValueError, match=r"LLM_LOADTEST_LOG_FORMAT.*invalid choice"):
        parse(["controller"], {"LLM_LOADTEST_LOG_FORMAT": "xml"})


def test_a_required_flag_can_come_from_the_environment() -> None:
    args = parse(["agent"], {"LLM_LOADTEST_CONTROLLER": "controller:50051"})
    assert args.controller == "controller:50051"
    with pytest.raises(SystemExit):
        parse(["agent"], {})


def test_repeatable_flags_take_a_comma_list() -> None:
    args = parse(["agent", "--controller", "c:1"], {"LLM_LOADTEST_LABEL": "zone=a, gpu=h100"})
    assert args.labels == [("zone", "a"), ("gpu", "h100")]
    args = parse(["agent", "--controller", "c:1", "--label", "rack=7"], {"LLM_LOADTEST_LABEL": "zone=a"})
    assert ("rack", "7") in args.labels


def test_switches() -> None:
    assert parse(["runs", "list"], {"LLM_LOADTEST_JSON": "yes"}).json is True
    assert parse(["runs", "list"], {"LLM_LOADTEST_JSON": "off"}).json is False
    with pytest.raises(ValueError, match="LLM_LOADTEST_JSON='maybe'"):
        parse(["runs", "list"], {"LLM_LOADTEST_JSON": "maybe"})


def test_every_flag_names_its_variable_in_help() -> None:
    parser, _ = _parser()
    apply_env_defaults(parser, {})
    flags = list(iter_flags(parser))
    assert {"controller", "agent", "mock-server", "run", "runs list"} <= {f.command for f in flags}
    for flag in flags:
        if flag.action.help is not argparse.SUPPRESS:
            assert f"[env: {flag.env}]" in (flag.action.help or ""), flag


def test_flags_added_by_any_command_are_picked_up() -> None:
    """The rule is generic: a flag a future subcommand adds needs no code here."""
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    new = sub.add_parser("brand-new")
    new.add_argument("--shiny-option", type=int, default=1)
    apply_env_defaults(parser, {"LLM_LOADTEST_SHINY_OPTION": "7"})
    assert parser.parse_args(["brand-new"]).shiny_option == 7


def test_an_invalid_variable_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LLM_LOADTEST_MOCK_PORT", "not-a-port")
    with pytest.raises(SystemExit) as exc:
        main(["mock-server", "--help"])
    assert exc.value.code == 2
    assert "LLM_LOADTEST_MOCK_PORT" in capsys.readouterr().err
