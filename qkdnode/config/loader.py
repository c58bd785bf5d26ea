"""Load and validate a node configuration file.

Errors name the file, the dotted key path and what was expected, e.g.
``configs/transmitter.sim.toml: source.mu_signal: must be > 0, got -0.5``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from qkdnode.config.model import NodeConfig


class ConfigError(Exception):
    """An unreadable or invalid configuration. ``problems`` lists one line per error."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(f"{path}: {p}" for p in problems))


def _loc(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def _num(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _describe(err: Any) -> str:
    kind = err["type"]
    msg: str = err["msg"]
    ctx = err.get("ctx") or {}
    if kind == "greater_than":
        msg = f"must be > {_num(ctx['gt'])}"
    elif kind == "greater_than_equal":
        msg = f"must be >= {_num(ctx['ge'])}"
    elif kind == "less_than":
        msg = f"must be < {_num(ctx['lt'])}"
    elif kind == "less_than_equal":
        msg = f"must be <= {_num(ctx['le'])}"
    elif kind == "extra_forbidden":
        return "unknown key (not part of the schema; see `qkdnode config schema`)"
    elif kind == "missing":
        return "required key is missing"
    elif msg.startswith("Value error, "):
        msg = msg.removeprefix("Value error, ")
    if kind != "missing" and "input" in err and not isinstance(err["input"], dict):
        shown = repr(err["input"])
        if len(shown) > 80:
            shown = shown[:77] + "..."
        msg = f"{msg}, got {shown}"
    return msg


def format_validation_error(exc: ValidationError) -> list[str]:
    return [f"{_loc(tuple(e['loc']))}: {_describe(e)}" for e in exc.errors()]


def parse_config(data: dict[str, Any], source: str = "<config>") -> NodeConfig:
    try:
        return NodeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, format_validation_error(exc)) from None


def read_toml(path: str | Path) -> dict[str, Any]:
    """The parsed TOML of ``path``. Raises :class:`ConfigError` when it cannot be read."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read file: {exc.strerror or exc}"]) from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), [f"not UTF-8 text: {exc.reason}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [f"invalid TOML: {exc}"]) from None


def load_config(path: str | Path) -> NodeConfig:
    """Read and validate the one-link config ``path``. Raises :class:`ConfigError` on any
    problem, and for a node with several links (``[[links]]``: see
    :func:`qkdnode.config.site.load_site`)."""
    data = read_toml(path)
    if "links" in data:
        raise ConfigError(
            str(path),
            [
                "links: this node hosts several links; this tool takes one link's config "
                "(or the link's own endpoints)"
            ],
        )
    return parse_config(data, str(path))
