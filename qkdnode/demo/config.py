"""The demo's own configuration: one TOML file with every simulation parameter.

Layout (see ``configs/demo.toml``)::

    [demo]      run settings: duration, seed, output directory, bus security, timeouts
    [link]      drivers.simlink.params.LinkParams: source, fiber, receiver, clock, eve ...
                (the whole link; each node's config gets only its own side of it)
    [protocol]  the nodes' protocol settings (block size, epsilons, QBER limits, EC target)
    [keystore]  the nodes' key store settings (key size)

Every table and key is optional: a missing one takes the documented default, so
``DemoConfig()`` is the built-in demo (25 km, superconducting detectors). Unknown keys are
errors. Command-line options override the file through :func:`apply_overrides`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from drivers.simlink.params import EveParams, LinkParams
from drivers.simlink.truths import resolve_truths
from qkdnode.config.loader import ConfigError, format_validation_error
from qkdnode.config.sections import KeystoreSection, ProtocolSection

Security = Literal["curve", "plaintext"]


class RunSection(BaseModel):
    """How the demo runs (not physics)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    duration_s: float = Field(60.0, gt=0, le=86_400, description="key exchange time per run")
    seed: int | None = Field(
        None, ge=0, description="derives both link seeds; None keeps [link]'s own seeds"
    )
    out_dir: Path = Field(Path("demo-out"), description="node state, logs, configs, results")
    security: Security = Field(
        "curve", description="bus security: CURVE keys generated per run, or plaintext"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    startup_timeout_s: float = Field(120.0, gt=0, le=600, description="daemons up and IDLE")
    step_timeout_s: float = Field(180.0, gt=0, le=3600, description="calibrate, sync, stop")
    progress_interval_s: float = Field(0.5, gt=0, le=60, description="status poll period")
    auto_block_size: bool = Field(
        False,
        description="shrink protocol.block_detections so that about 2.5 blocks of light "
        "fit in the run at the detection rate the link budget predicts (quick looks only: "
        "small blocks cost key; by default blocks follow what the finite-key bound needs "
        "and the run is extended to finish the block that is filling)",
    )


class DemoConfig(BaseModel):
    """The whole demo file."""

    model_config = ConfigDict(extra="forbid")

    demo: RunSection = RunSection()
    link: LinkParams = LinkParams()
    #: larger blocks than a node's default: the demo's two daemons share one machine's
    #: memory (about 3.3 GB for the receiver and 2.6 GB for the transmitter at 48 M
    #: detections per block, measured at 25 km) and come closer to the asymptotic rate
    protocol: ProtocolSection = ProtocolSection(block_detections=48_000_000)
    keystore: KeystoreSection = KeystoreSection(max_key_count=4_000_000)


def parse_demo_config(data: dict[str, Any], source: str = "<demo config>") -> DemoConfig:
    try:
        return DemoConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, format_validation_error(exc)) from None


def load_demo_config(path: str | Path | None) -> DemoConfig:
    """Read and validate a demo TOML; ``None`` gives the built-in defaults.

    Raises :class:`qkdnode.config.ConfigError` naming the file and the key path.
    """
    if path is None:
        return DemoConfig()
    p = Path(path)
    try:
        text = p.read_text("utf-8")
    except OSError as exc:
        raise ConfigError(str(p), [f"cannot read file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(str(p), [f"not UTF-8 text: {exc.reason}"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(p), [f"invalid TOML: {exc}"]) from None
    return parse_demo_config(data, str(p))


EVE_MODES: tuple[str, ...] = tuple(m for m in get_args(EveParams.model_fields["mode"].annotation))


def parse_eve(spec: str) -> EveParams:
    """``MODE:FRACTION`` (e.g. ``intercept-resend:0.5``) -> :class:`EveParams`.

    Raises ValueError with the accepted forms when ``spec`` is malformed.
    """
    attacks = [m for m in EVE_MODES if m != "none"]
    mode, sep, frac_text = spec.partition(":")
    if mode not in attacks or not sep:
        raise ValueError(f"--eve {spec!r}: expected MODE:FRACTION with MODE one of {attacks}")
    try:
        fraction = float(frac_text)
    except ValueError:
        raise ValueError(f"--eve {spec!r}: FRACTION {frac_text!r} is not a number") from None
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"--eve {spec!r}: FRACTION must lie in [0, 1]")
    return EveParams(mode=mode, fraction=fraction)  # type: ignore[arg-type]


def link_seeds(seed: int) -> tuple[int, int]:
    """Two independent 32-bit seeds (transmitter, receiver) derived from one demo seed."""
    words = np.random.SeedSequence(seed).generate_state(2, dtype=np.uint32)
    return int(words[0]), int(words[1])


def apply_overrides(
    cfg: DemoConfig,
    *,
    distance_km: float | None = None,
    duration_s: float | None = None,
    seed: int | None = None,
    eve: EveParams | None = None,
    out_dir: Path | None = None,
    security: Security | None = None,
) -> DemoConfig:
    """A new, re-validated config with the command-line overrides applied."""
    data = cfg.model_dump(mode="python")
    run, link = data["demo"], data["link"]
    if distance_km is not None:
        link["fiber"]["length_km"] = distance_km
    if duration_s is not None:
        run["duration_s"] = duration_s
    if seed is not None:
        run["seed"] = seed
    if out_dir is not None:
        run["out_dir"] = out_dir
    if security is not None:
        run["security"] = security
    if eve is not None:
        link["eve"] = eve.model_dump()
    if run["seed"] is not None:
        link["transmitter_seed"], link["receiver_seed"] = link_seeds(run["seed"])
    out = parse_demo_config(data, "<command line>")
    if out.demo.auto_block_size:
        block = fitted_block_detections(out)
        if block != out.protocol.block_detections:
            data["protocol"]["block_detections"] = block
            out = parse_demo_config(data, "<command line>")
    return out


MIN_AUTO_BLOCK = 1_000_000


def expected_detection_rate_hz(link: LinkParams) -> float:
    """Detections per second the receiver should see, from the link budget of the
    simulated boxes (their drawn truths)."""
    from qkdnode.demo.compare import TheoryInputs

    th = TheoryInputs.from_link(resolve_truths(link), ProtocolSection())
    src = link.source
    classes = (
        (src.p_signal, src.mu_signal),
        (src.p_decoy, src.mu_decoy),
        (src.p_vacuum, src.mu_vacuum),
    )
    gain = sum(p * (1 - (1 - th.y0) * np.exp(-th.transmittance * mu)) for p, mu in classes)
    return float(gain * src.slot_rate_hz)


def fitted_block_detections(cfg: DemoConfig) -> int:
    """``protocol.block_detections``, reduced so that ~2.5 blocks of light fit in ``duration_s``
    (the last block must still be processed before the run ends)."""
    expected = expected_detection_rate_hz(cfg.link) * cfg.demo.duration_s
    fit = int(expected / 2.5 / 100_000) * 100_000
    return int(min(cfg.protocol.block_detections, max(MIN_AUTO_BLOCK, fit)))
