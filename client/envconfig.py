"""Every command-line flag can also be set from the environment, by one naming rule.

`--metrics-listen` ↔ `LLM_LOADTEST_METRICS_LISTEN`: the prefix, then the flag's first long
name upper-cased with dashes as underscores; the mock server's flags have `MOCK_` after the
prefix (`--port` ↔ `LLM_LOADTEST_MOCK_PORT`), since several of them share a name with `run`'s
flags but not their meaning. The rule is applied once, generically, to the
whole `llm-loadtest` parser after every subcommand has added its flags, so a flag added
anywhere gets its variable without further code. A variable applies to every command that
has the flag (`LLM_LOADTEST_API_KEY` is the key the controller requires *and* the key the
agents and the CLI present). A flag given on the command line wins over the variable.

Values are read like the flag's own argument; switches (`--json`) take 1/true/yes/on or
0/false/no/off; repeatable flags (`--label`) and flags taking several values take a
comma-separated list. Each flag's `--help` text names its variable.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

ENV_PREFIX = "LLM_LOADTEST_"
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off", ""})


# Commands whose flags live in a namespace of their own: the mock server's `--model`,
# `--output-tokens` and `--seed` mean something else than `run`'s (the served model, the
# natural answer length, the jitter seed), so one variable must not set both.
COMMAND_PREFIXES = {"mock-server": "MOCK_"}


def env_var(option: str, command: str = "") -> str:
    """The environment variable of a long option: `--metrics-listen` -> LLM_LOADTEST_METRICS_LISTEN;
    of a mock-server flag, `--port` -> LLM_LOADTEST_MOCK_PORT."""
    return ENV_PREFIX + COMMAND_PREFIXES.get(command, "") + option.lstrip("-").upper().replace("-", "_")


def not_from_env(action: argparse.Action) -> argparse.Action:
    """Marks a flag that no variable sets (the read commands' `--db`: the image's
    LLM_LOADTEST_DB names the controller's file, and must not turn every `runs list` into a
    read of a file that may not be there)."""
    action.from_env = False  # type: ignore[attr-defined]
    return action


@dataclass(frozen=True)
class FlagInfo:
    """One optional flag of one command, with its environment variable."""

    command: str  # e.g. "controller", "runs list"
    option: str  # the first long option, e.g. "--metrics-listen"
    env: str
    action: argparse.Action


def _long_option(action: argparse.Action) -> str | None:
    return next((o for o in action.option_strings if o.startswith("--")), None)


def _configurable(action: argparse.Action) -> bool:
    return (
        not isinstance(action, argparse._HelpAction | argparse._VersionAction | argparse._SubParsersAction)
        and _long_option(action) is not None
        and getattr(action, "from_env", True)
    )


def iter_flags(parser: argparse.ArgumentParser, command: str = "") -> Iterator[FlagInfo]:
    """Every configurable flag of `parser` and its subcommands, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from iter_flags(sub, f"{command} {name}".strip())
        elif _configurable(action):
            option = _long_option(action)
            assert option is not None
            yield FlagInfo(command, option, env_var(option, command.split(" ", maxsplit=1)[0]), action)


def iter_subparsers(
    parser: argparse.ArgumentParser, command: str = ""
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """`(command, parser)` for the parser itself and every subcommand, depth first."""
    yield command, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from iter_subparsers(sub, f"{command} {name}".strip())


def _switch(value: str, env: str) -> bool:
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"{env}={value!r}: expected one of 1/true/yes/on or 0/false/no/off")


def _convert(parser: argparse.ArgumentParser, action: argparse.Action, text: str, env: str) -> object:
    """`text` as the flag's argument would be parsed, errors naming the variable."""
    try:
        value = parser._get_value(action, text)
    except argparse.ArgumentError as exc:
        raise ValueError(f"{env}: {exc.message}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(repr, action.choices))
        raise ValueError(f"{env}={text!r}: invalid choice (choose from {choices})")
    return value


def _env_default(parser: argparse.ArgumentParser, action: argparse.Action, raw: str, env: str) -> object:
    if action.nargs == 0:  # store_true / store_false / store_const / count
        on = _switch(raw, env)
        if isinstance(action, argparse._CountAction):
            return 1 if on else 0
        return action.const if on else action.default
    many = isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*") or isinstance(action.nargs, int)
    if many:
        items = [_convert(parser, action, part.strip(), env) for part in raw.split(",") if part.strip()]
        if isinstance(action, argparse._AppendAction) and action.nargs not in (None, "?"):
            return [items]
        return items
    return _convert(parser, action, raw, env)


def apply_env_defaults(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Make every flag default to its environment variable and name the variable in --help.

    Raises ValueError (naming the variable) when a set variable is not a valid value.
    """
    for command, sub in iter_subparsers(parser):
        for action in sub._actions:
            if not _configurable(action):
                continue
            option = _long_option(action)
            assert option is not None
            env = env_var(option, command.split(" ")[0])
            if action.help is not argparse.SUPPRESS and f"[env: {env}]" not in (action.help or ""):
                action.help = f"{action.help or ''} [env: {env}]".strip()
            raw = environ.get(env)
            if raw is None:
                continue
            action.default = _env_default(sub, action, raw, env)
            action.required = False
