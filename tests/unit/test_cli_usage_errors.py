"""Usage errors the CLI reports before doing any work."""

from __future__ import annotations

import argparse

import pytest

from client.cli import _parser, main
from client.commands import controller_address
from client.envconfig import iter_subparsers


@pytest.mark.parametrize("command", [["runs", "list"], ["agent"], ["health"]])
def test_a_client_certificate_without_its_key_is_a_usage_error(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--controller", "127.0.0.1:1", "--tls", "--tls-client-cert", "client.pem"])
    assert exit_info.value.code == 2
    assert "a client certificate needs its key" in capsys.readouterr().err


def _numeric_flags() -> list[tuple[str, str]]:
    """(command, flag) for every flag of every subcommand that takes a number, a list of
    numbers or a duration, read from the parsers themselves: a flag added later is covered
    without touching this test. A flag is numeric when its type accepts `1` and refuses `1x!`."""
    parser, _ = _parser()
    flags = []
    for command, sub in iter_subparsers(parser):
        for action in sub._actions:
            if not callable(action.type) or not action.option_strings:
                continue
            try:
                action.type("1")
            except (ValueError, TypeError, argparse.ArgumentTypeError):
                continue
            try:
                action.type("1x!")
            except (ValueError, TypeError, argparse.ArgumentTypeError):
                flags.append((command, action.option_strings[-1]))
    return flags


NUMERIC_FLAGS = _numeric_flags()


def test_the_enumeration_finds_the_flags_of_every_kind_of_command() -> None:
    found = set(NUMERIC_FLAGS)
    for expected in [
        ("run", "--concurrency"),
        ("run", "--duration"),
        ("run", "--rate"),
        ("run", "--warmup"),
        ("runs list", "--limit"),
        ("runs compare", "--tolerance"),
        ("mock-server", "--ttft-ms"),
        ("controller", "--grace"),
        ("quickstart", "--duration"),
        ("audit", "--limit"),
        ("run", "--goodput-target"),
        ("run", "--search-min"),
        ("run", "--search-max"),
        ("run", "--search-tolerance"),
        ("run", "--probe-duration"),
        ("run", "--probe-warmup"),
        ("run", "--min-requests"),
        ("run", "--max-probes"),
        ("run", "--cost-per-hour"),
    ]:
        assert expected in found


@pytest.mark.parametrize("value", ["-1", "99999999999", "1x!"], ids=["negative", "huge", "malformed"])
@pytest.mark.parametrize(("command", "flag"), NUMERIC_FLAGS, ids=[f"{c}:{f}" for c, f in NUMERIC_FLAGS])
def test_a_bad_number_is_a_one_line_usage_error(
    command: str, flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command.split(), f"{flag}={value}"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1 and f"llm-loadtest {command}: error: argument {flag}" in lines[0], captured.err


@pytest.mark.parametrize(
    ("given", "dialled"),
    [
        ("127.0.0.1", "127.0.0.1:50051"),
        ("ctl.internal", "ctl.internal:50051"),
        ("127.0.0.1:7000", "127.0.0.1:7000"),
        ("::1", "[::1]:50051"),
        ("[::1]", "[::1]:50051"),
        ("[::1]:7000", "[::1]:7000"),
        ("dns:///ctl:7000", "dns:///ctl:7000"),
    ],
)
def test_the_controller_port_defaults_to_50051(given: str, dialled: str) -> None:
    assert controller_address(given) == dialled
