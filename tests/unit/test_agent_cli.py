"""`llm-loadtest agent` argument parsing."""

from __future__ import annotations

import argparse

import pytest

from agent.cli import add_arguments, parse_label
from common.grpc_options import API_KEY_ENV

pytestmark = pytest.mark.timeout(60)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm-loadtest agent")
    add_arguments(p)
    return p


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    args = parser().parse_args(["--controller", "ctl:50051"])
    assert args.controller == "ctl:50051"
    assert args.name is None
    assert args.labels == []
    assert args.api_key is None
    assert (args.log_format, args.log_level) == ("json", "info")


def test_labels_name_and_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    args = parser().parse_args(["--controller", "c:1", "--name", "n1", "--label", "zone=a", "--label", "gpu=h100=x"])
    assert dict(args.labels) == {"zone": "a", "gpu": "h100=x"}
    assert args.name == "n1"
    assert args.api_key == "from-env"
    assert parser().parse_args(["--controller", "c:1", "--api-key", "k"]).api_key == "k"


def test_controller_is_required() -> None:
    with pytest.raises(SystemExit):
        parser().parse_args([])


@pytest.mark.parametrize("text", ["zone", "=a", ""])
def test_bad_labels(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_label(text)
