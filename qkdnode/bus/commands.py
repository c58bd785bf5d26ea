"""The allowlist of control commands: what each does, who may call it, and when.

Every command validates its ``content`` with a pydantic model (unknown fields refused,
strict JSON types, ranges); a command without arguments uses :class:`NoContent`, whose
JSON Schema is the empty object. The ``commands`` command publishes each schema.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

Role = Literal["monitor", "operator"]
ROLE_RANK: dict[str, int] = {"monitor": 1, "operator": 2}


@dataclass(frozen=True)
class CallerInfo:
    """Who sent a request: config name and role of its CURVE key (``plaintext`` if none)."""

    name: str
    role: str
    public_key: str | None = None


Handler = Callable[[dict[str, Any], CallerInfo], Coroutine[Any, Any, dict[str, Any]]]


class Content(BaseModel):
    """Base of command content models: unknown fields are refused, JSON types are strict
    (``"1"`` is not an integer, ``true`` is not a number); an integer is a valid number."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class NoContent(Content):
    """The content of a command without arguments: the empty object ``{}``."""


@dataclass(frozen=True)
class CommandSpec:
    """One allowed command.

    ``allowed_states`` None means any node state. ``role`` is the minimum role
    (``operator`` includes ``monitor``). ``request_model`` validates ``content`` (None
    means :class:`NoContent`); the handler then receives the validated, normalised dict.
    ``errors`` lists the error codes of the handler's own refusals (published by
    ``commands``; the server's generic codes come on top).
    """

    name: str
    handler: Handler
    allowed_states: frozenset[str] | None = None
    role: Role = "operator"
    request_model: type[BaseModel] | None = None
    description: str = ""
    errors: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.request_model is None:
            object.__setattr__(self, "request_model", NoContent)

    @property
    def content_model(self) -> type[BaseModel]:
        return self.request_model or NoContent

    def role_allows(self, caller_role: str) -> bool:
        return ROLE_RANK.get(caller_role, 0) >= ROLE_RANK[self.role]

    def describe(self, caller_role: str) -> dict[str, Any]:
        """The entry of this command in the ``commands`` reply."""
        return {
            "name": self.name,
            "role": self.role,
            "allowed_states": None if self.allowed_states is None else sorted(self.allowed_states),
            "callable": self.role_allows(caller_role),
            "description": self.description,
            "content_schema": self.content_model.model_json_schema(),
            "errors": [str(code) for code in self.errors],
        }


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


# ------------------------------------------------------------------ daemon command content
#: Most keys one ``keys.get`` delivers.
KEYS_GET_MAX_NUMBER = 1024
#: Largest key ``keys.get`` delivers, in bits (the largest configurable stored key size).
KEYS_GET_MAX_SIZE_BITS = 65536


class KeysGetContent(Content):
    """Content of ``keys.get``."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"number": 2, "size_bits": 256}]})

    number: int = Field(1, ge=1, le=KEYS_GET_MAX_NUMBER, description="how many keys")
    size_bits: int | None = Field(
        None,
        ge=8,
        le=KEYS_GET_MAX_SIZE_BITS,
        multiple_of=8,
        description="size of each key in bits; null or absent: keystore.key_size_bits",
    )


#: Faults of the simulated link (the same list as ``drivers.simlink.world.FAULTS``).
SimFault = Literal[
    "fiber_cut",
    "encoding_drift",
    "eve",
    "bright_light",
    "detector_disconnect",
    "clock_step",
    "polarization_jump",
]


class SimInjectContent(Content):
    """Content of ``sim.inject``: start (or, with ``clear``, end) a simulated fault.

    ``angle_rad`` belongs to ``encoding_drift`` and ``polarization_jump``; ``fraction``
    and ``mode`` to ``eve``.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"fault": "fiber_cut"},
                {"fault": "encoding_drift", "angle_rad": 0.6},
                {"fault": "eve", "fraction": 1.0, "mode": "intercept-resend"},
                {"fault": "fiber_cut", "clear": True},
            ]
        }
    )

    fault: SimFault = Field(description="the fault to inject or clear")
    clear: bool = Field(False, description="true: end the fault instead of starting it")
    angle_rad: float | None = Field(
        None,
        ge=-math.pi,
        le=math.pi,
        description="encoding_drift: step of the polarisation reference (radians, real "
        "space); polarization_jump: the fiber's SU(2) jump (radians on the Poincaré sphere, "
        "default 1)",
    )
    fraction: float | None = Field(
        None, ge=0.0, le=1.0, description="eve only: share of the pulses attacked (default 1)"
    )
    mode: Literal["intercept-resend", "beam-splitting"] | None = Field(
        None, description="eve only: the attack (default intercept-resend)"
    )
    step_ps: int | None = Field(
        None,
        ge=-(10**12),
        le=10**12,
        description="clock_step only: jump of the receiver's tagger clock, picoseconds "
        "(default 1 000 000)",
    )

    @field_validator("angle_rad")
    @classmethod
    def _angle_for_drift(cls, v: float | None, info: ValidationInfo) -> float | None:
        _only_for(v, info, "encoding_drift", "polarization_jump")
        return v

    @field_validator("fraction", "mode")
    @classmethod
    def _eve_params(cls, v: Any, info: ValidationInfo) -> Any:
        _only_for(v, info, "eve")
        return v

    @field_validator("step_ps")
    @classmethod
    def _step_for_clock(cls, v: int | None, info: ValidationInfo) -> int | None:
        _only_for(v, info, "clock_step")
        return v

    def fault_parameters(self) -> dict[str, Any]:
        """The parameters given for the fault (those that are not null)."""
        values = {
            "angle_rad": self.angle_rad,
            "fraction": self.fraction,
            "mode": self.mode,
            "step_ps": self.step_ps,
        }
        return {k: v for k, v in values.items() if v is not None}


def _only_for(value: Any, info: ValidationInfo, *faults: str) -> None:
    given = info.data.get("fault")
    if value is not None and given is not None and given not in faults:
        raise ValueError(f"only allowed with fault {' or '.join(map(repr, faults))}")
