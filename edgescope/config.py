"""A command's options from a file and the environment, as well as its flags.

Every option of a command (``edgescope serve``) is also a key of a TOML or
YAML file (``--config FILE``) and an environment variable ``EDGESCOPE_<KEY>``.
The schema is derived from the command's argparse parser, so an option added
there is a key and a variable with no further work. Flags override the
environment, which overrides the file, which overrides the defaults.

Keys are the options' long names, with ``-`` or ``_`` (``max-message-mb`` or
``max_message_mb``); positional arguments are keys too (``bundles``). Values
have the option's type: a number for a number, true/false for a switch, a
list for a repeatable option. An unknown key or a value of the wrong type is
an error that names the key. In the environment every value is text: switches
take 1/0, true/false, yes/no, on/off, and lists are comma-separated.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgescope.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6)
    import tomli as tomllib

ENV_PREFIX = "EDGESCOPE_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True, slots=True)
class Option:
    """One option of a command, as a file key and an environment variable."""

    action: argparse.Action

    @property
    def key(self) -> str:
        return self.action.dest

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.action.dest.upper()

    @property
    def flag(self) -> str:
        long = [s for s in self.action.option_strings if s.startswith("--")]
        return long[0] if long else self.action.dest

    @property
    def is_switch(self) -> bool:
        return self.action.nargs == 0

    @property
    def is_list(self) -> bool:
        return isinstance(self.action, argparse._AppendAction) or self.action.nargs in ("*", "+")

    def from_file(self, value: object, where: str) -> Any:
        """A file value (already typed by TOML or YAML) as the parsed flag would hold it."""
        if self.is_switch:
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: {self.key!r} is a switch: use true or false, not {_shown(value)}")
            return self._switch(value)
        if self.is_list:
            items = value if isinstance(value, list) else [value]
            return [self._typed(item, where) for item in items]
        if isinstance(value, list):
            raise ConfigError(f"{where}: {self.key!r} takes one value, not a list ({_shown(value)})")
        return self._typed(value, where)

    def from_env(self, text: str) -> Any:
        """An environment value (always text) as the parsed flag would hold it."""
        where = f"environment variable {self.env}"
        if self.is_switch:
            word = text.strip().lower()
            if word not in _TRUE | _FALSE:
                raise ConfigError(f"{where} is a switch: set it to 1 or 0 (true/false, yes/no, on/off), not {text!r}")
            return self._switch(word in _TRUE)
        if self.is_list:
            return [self._converted(item.strip(), where) for item in text.split(",") if item.strip()]
        return self._converted(text, where)

    def _switch(self, on: bool) -> Any:
        # store_true/store_false hold their const when the flag is given; --x/--no-x hold the value itself.
        const = self.action.const
        if isinstance(const, bool):
            return const if on else not const
        return on

    def _typed(self, value: object, where: str) -> Any:
        kind = self.action.type
        if isinstance(value, (bool, dict, list)) or value is None:
            raise ConfigError(f"{where}: {self.key!r} {_expects(kind)}, not {_shown(value)}")
        if kind is int:
            if not isinstance(value, int):
                raise ConfigError(f"{where}: {self.key!r} must be an integer, not {_shown(value)}")
            return self._chosen(value, where)
        if kind is float:
            if not isinstance(value, (int, float)):
                raise ConfigError(f"{where}: {self.key!r} must be a number, not {_shown(value)}")
            return self._chosen(float(value), where)
        if (kind is None or kind is str or kind is Path) and not isinstance(value, str):
            raise ConfigError(f"{where}: {self.key!r} must be a string, not {_shown(value)}")
        # Other types parse the flag's text (e.g. "MODEL=MS"); a number stands for its text.
        return self._converted(str(value), where)

    def _converted(self, text: str, where: str) -> Any:
        kind: Callable[[str], Any] = self.action.type or str  # type: ignore[assignment]
        try:
            value = kind(text)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {self.key!r} {_expects(self.action.type)}: {text!r} ({exc})") from exc
        return self._chosen(value, where)

    def _chosen(self, value: Any, where: str) -> Any:
        choices = self.action.choices
        if choices is not None and value not in choices:
            listed = ", ".join(str(c) for c in choices)
            raise ConfigError(f"{where}: {self.key!r} must be one of {listed}, not {value!r}")
        return value


def _expects(kind: object) -> str:
    if kind is int:
        return "must be an integer"
    if kind is float:
        return "must be a number"
    if kind is None or kind is str or kind is Path:
        return "must be a string"
    return "could not be read"


def _shown(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def options_of(parser: argparse.ArgumentParser, *, skip: Sequence[str] = ()) -> dict[str, Option]:
    """The parser's options by dest: every one that holds a value (not --help, not the ones in ``skip``)."""
    return {
        action.dest: Option(action)
        for action in parser._actions
        if action.dest not in (argparse.SUPPRESS, *skip) and action.default != argparse.SUPPRESS
    }


def read_table(
    path: Path, what: str, contents: str, suffixes: Sequence[str] = (".toml", ".yaml", ".yml")
) -> dict[str, object]:
    """The top-level table of a TOML, JSON or YAML file (by its suffix, one of ``suffixes``); ``what`` names
    the file in errors ("config file", "study context"), ``contents`` what its table holds. Parse errors
    say where, never what was there."""
    suffix = path.suffix.lower()
    if suffix not in suffixes:
        named = " or ".join([", ".join(suffixes[:-1]), suffixes[-1]] if len(suffixes) > 1 else suffixes)
        raise ConfigError(f"{what} {path}: name it {named} so its format is known")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    try:
        if suffix == ".toml":
            data: object = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{what} {path} is not valid {suffix[1:].upper()}: {exc}") from exc
    except Exception as exc:  # yaml.YAMLError, imported only where YAML is read
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a table of {contents} (key: value), not {type(data).__name__}")
    # YAML allows keys that are not text (numbers, booleans); these files name things by text.
    return {str(key): value for key, value in data.items()}


def read_config_file(path: Path) -> dict[str, object]:
    """A TOML (.toml) or YAML (.yaml, .yml) file's top-level table."""
    return read_table(path, "config file", "options")


def file_values(options: Mapping[str, Option], data: Mapping[str, object], path: Path) -> dict[str, Any]:
    """Each key of the file, checked against the options and converted; unknown keys are errors."""
    values: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        option = options.get(key)
        if option is None:
            close = difflib.get_close_matches(key, list(options), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; the keys are: {', '.join(sorted(options))}"
            raise ConfigError(f"config file {path}: unknown key {raw_key!r}{hint}")
        values[key] = option.from_file(value, f"config file {path}")
    return values


def env_values(options: Mapping[str, Option], environ: Mapping[str, str]) -> dict[str, Any]:
    """The options set in the environment; other EDGESCOPE_* variables are left to their users."""
    return {key: option.from_env(environ[option.env]) for key, option in options.items() if option.env in environ}


def given_flags(parser: argparse.ArgumentParser, command: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The dests of ``command``'s options that ``argv`` gives explicitly (even when equal to the default)."""
    saved = {action: action.default for action in command._actions}
    try:
        for action in command._actions:
            action.default = argparse.SUPPRESS
        parsed = parser.parse_args(argv)
    finally:
        for action, default in saved.items():
            action.default = default
    return set(vars(parsed))


def apply_config(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    command: argparse.ArgumentParser,
    argv: Sequence[str],
    config_file: Path | None,
    environ: Mapping[str, str] = os.environ,
    *,
    skip: Sequence[str] = ("config",),
) -> argparse.Namespace:
    """``args`` with each option not given as a flag taken from the environment, else the file."""
    options = options_of(command, skip=skip)
    from_file = file_values(options, read_config_file(config_file), config_file) if config_file else {}
    from_env = env_values(options, environ)
    flags = given_flags(parser, command, argv)
    merged = argparse.Namespace(**vars(args))
    for key in options:
        if key in flags:
            continue
        if key in from_env:
            setattr(merged, key, from_env[key])
        elif key in from_file:
            setattr(merged, key, from_file[key])
    return merged
