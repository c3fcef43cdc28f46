"""Settings from a TOML file (``--config FILE``): the source after flags and environment.

The file's keys are the long flag names (``upstream``, ``cache-size``, ``no-padding``), at the
top level, each with the TOML type its flag takes: a list of strings for a repeatable flag, an
integer or a number (an integer is a number too) for counts and seconds, a string for names,
a boolean for a switch; ``workers`` and ``hedge-after`` also take their words ("auto",
"off"). The file is read whole and every key checked when it is loaded, so a typo anywhere in
it stops the start (or a reload) with one line naming the file and the key, whatever the
flags and variables set. Values then go through the same conversions and checks as a flag's,
and errors name them as ``FILE: key``.
"""

from __future__ import annotations

import difflib
import enum
import tomllib
from collections.abc import Mapping
from typing import Final

from dot_proxy.errors import ConfigError

__all__ = ["SHAPES", "ConfigFile", "Shape"]


class Shape(enum.Enum):
    """What a key's TOML value must be, as errors say it."""

    INTEGER = "an integer"
    NUMBER = "a number"
    STRING = "a string"
    BOOLEAN = "true or false"
    STRINGS = "a list of strings"
    INTEGER_OR_AUTO = 'an integer or "auto"'
    NUMBER_OR_WORD = 'a number, "auto" or "off"'


INT, NUM, STR = Shape.INTEGER, Shape.NUMBER, Shape.STRING
#: Every key a file may hold (every flag but --config and --version), and its shape.
SHAPES: Final[Mapping[str, Shape]] = {
    "listen": Shape.STRINGS,
    "port": INT,
    "upstream": Shape.STRINGS,
    "ca-file": STR,
    "timeout": NUM,
    "log-level": STR,
    "log-format": STR,
    "tcp-idle-timeout": NUM,
    "max-connections": INT,
    "max-pipeline": INT,
    "upstream-idle-timeout": NUM,
    "max-in-flight": INT,
    "allow": Shape.STRINGS,
    "max-tcp-clients": INT,
    "ratelimit": NUM,
    "user": STR,
    "no-padding": Shape.BOOLEAN,
    "upstream-policy": STR,
    "workers": Shape.INTEGER_OR_AUTO,
    "cache-size": INT,
    "cache-min-ttl": INT,
    "cache-max-ttl": INT,
    "serve-stale": NUM,
    "hedge-after": Shape.NUMBER_OR_WORD,
    "metrics": STR,
    "forward": Shape.STRINGS,
    "hosts": STR,
    "no-local-zones": Shape.BOOLEAN,
    "keep-ecs": Shape.BOOLEAN,
}


def _fits(shape: Shape, value: object) -> bool:
    integer = isinstance(value, int) and not isinstance(value, bool)
    number = integer or isinstance(value, float)
    if shape is Shape.INTEGER:
        return integer
    if shape is Shape.NUMBER:
        return number
    if shape is Shape.STRING:
        return isinstance(value, str)
    if shape is Shape.BOOLEAN:
        return isinstance(value, bool)
    if shape is Shape.STRINGS:
        return isinstance(value, list) and all(isinstance(item, str) for item in value)
    if shape is Shape.INTEGER_OR_AUTO:
        return integer or isinstance(value, str)
    return number or isinstance(value, str)


def _toml_type(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list" if all(isinstance(item, str) for item in value) else "a list of non-strings"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"  # dates and times


def read_setting_file(path: str, where: str) -> bytes:
    """The bytes of a file a setting names (``where``: the flag, variable or file key).

    Error handling: raises :class:`ConfigError`, one line, when it does not exist, is a
    directory or cannot be read.
    """
    try:
        with open(path, "rb") as file:
            return file.read()
    except FileNotFoundError:
        raise ConfigError(f"{where}: {path!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{where}: {path!r} is a directory, not a file") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path!r}: {exc.strerror or exc}") from None


class ConfigFile:
    """A loaded, checked config file: a settings source for ``cli``'s lookup."""

    def __init__(self, path: str, values: Mapping[str, object]) -> None:
        self.path = path
        self.values = dict(values)

    @classmethod
    def load(cls, path: str, *, where: str = "--config") -> ConfigFile:
        """Read and check ``path``. ``where`` names the setting that gave the path.

        Error handling: raises :class:`ConfigError`, one line, for a file that cannot be
        read, is not TOML, or holds an unknown key or a value of the wrong type.
        """
        try:
            data = tomllib.loads(read_setting_file(path, where).decode())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not valid TOML: not UTF-8 text") from None
        for key, value in data.items():
            cls._check(path, key, value)
        return cls(path, data)

    @staticmethod
    def _check(path: str, key: str, value: object) -> None:
        shape = SHAPES.get(key)
        if shape is None:
            close = difflib.get_close_matches(key, SHAPES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            if isinstance(value, dict):
                hint = "; settings are top-level keys, not tables"
            raise ConfigError(f"{path}: unknown key {key!r}{hint}")
        if not _fits(shape, value):
            raise ConfigError(f"{path}: {key}: expected {shape.value}, got {_toml_type(value)}")

    def get(self, option: str) -> tuple[str, object] | None:
        """``(how errors name it, raw value)`` if the file sets ``option``; the raw value is a
        string or a list of strings, as a flag's would be (numbers and booleans as text)."""
        if option not in self.values:
            return None
        value = self.values[option]
        if isinstance(value, list):
            raw: object = [str(item) for item in value]
        elif isinstance(value, bool):
            raw = "true" if value else "false"
        else:
            raw = str(value)
        return f"{self.path}: {option}", raw
