"""The allowlist of control commands: what each does, who may call it, and when."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

Role = Literal["monitor", "operator"]
ROLE_RANK: dict[str, int] = {"monitor": 1, "operator": 2}


@dataclass(frozen=True)
class CallerInfo:
    """Who sent a request: config name and role of its CURVE key (``plaintext`` if none)."""

    name: str
    role: str
    public_key: str | None = None


Handler = Callable[[dict[str, Any], CallerInfo], Coroutine[Any, Any, dict[str, Any]]]


@dataclass(frozen=True)
class CommandSpec:
    """One allowed command.

    ``allowed_states`` None means any node state. ``role`` is the minimum role
    (``operator`` includes ``monitor``). ``request_model`` validates ``content``; the
    handler then receives the validated, normalised dict.
    """

    name: str
    handler: Handler
    allowed_states: frozenset[str] | None = None
    role: Role = "operator"
    request_model: type[BaseModel] | None = None
    description: str = ""

    def role_allows(self, caller_role: str) -> bool:
        return ROLE_RANK.get(caller_role, 0) >= ROLE_RANK[self.role]


class CommandTable:
    """Command name -> :class:`CommandSpec`. Only names in the table can be called."""

    def __init__(self, specs: Iterable[CommandSpec] = ()) -> None:
        self._specs: dict[str, CommandSpec] = {}
        for spec in specs:
            self.add(spec)

    def add(self, spec: CommandSpec) -> None:
        if spec.name in self._specs:
            raise ValueError(f"command {spec.name!r} registered twice")
        self._specs[spec.name] = spec

    def get(self, name: str) -> CommandSpec | None:
        return self._specs.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Any:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def names(self) -> list[str]:
        return sorted(self._specs)
