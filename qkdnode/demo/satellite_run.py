"""``qkdnode demo --satellite FILE``: satellite downlink passes run end to end by two
daemons, the satellite's transmitter and the ground station's receiver.

The file (``configs/satellite.toml``) holds the demo's run settings, the pass
(:class:`drivers.simlink.satellite_channel.SatelliteChannelParams` without the times: the
runner places ``passes`` passes ``first_rise_after_s`` after it writes the configs, ``gap_s``
apart), the link's source and receiver (a :class:`~drivers.simlink.params.LinkParams`; its
fiber is replaced by the pass), the nodes' protocol, key store and clock-sync settings.

Both node configs get the pass windows (``[passes]``: the predictions a ground station
works from); only the satellite's (the transmitter's) simulation gets the channel, clouds
included (the real sky). The ground station closes one finite-key block per pass
(``passes.block_per_pass``) and writes ``passes.jsonl`` in its state directory; the runner
reads it and puts beside each pass the node's own theory for it
(:func:`pass_theory`: :mod:`qkdnode.postproc.satellite_theory` with qkdnode's finite-key
bound, on the transmittance the pass had over the slots the block spans).

Failure modes: :class:`qkdnode.config.ConfigError` for a bad file (key path named);
:class:`SatelliteDemoError` when a daemon dies or a pass cannot be observed.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from drivers.satellite_pass import SatellitePassParams
from drivers.simlink.params import LinkParams
from drivers.simlink.satellite_channel import (
    CloudParams,
    SatelliteChannel,
    SatelliteChannelParams,
)
from drivers.simlink.truths import resolve_truths
from qkdnode.config.loader import ConfigError, format_validation_error
from qkdnode.config.sections import CalibrationSection, KeystoreSection, ProtocolSection
from qkdnode.demo.config import DemoConfig, RunSection
from qkdnode.demo.nodeconfig import (
    RECEIVER_ID,
    TRANSMITTER_ID,
    CurveKeys,
    Endpoints,
    NodeFiles,
    node_config_dict,
    to_toml,
)
from qkdnode.demo.runner import Daemon, DemoError, Reporter
from qkdnode.postproc.satellite_theory import SatelliteLink
from qkdnode.procedures.mean_photon_number import MeanPhotonResult
from qkdnode.procedures.sync_model import SyncConfig

__all__ = [
    "PassFigures",
    "SatelliteDemoConfig",
    "SatelliteDemoSummary",
    "load_intensities",
    "optimise_for_pass",
    "load_satellite_config",
    "pass_theory",
    "run_satellite",
]


class SatelliteDemoError(Exception):
    """The satellite demo could not run (a daemon died, no pass record appeared)."""


class PassesRunSection(BaseModel):
    """Where the passes fall and how they are compressed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    orbit: SatellitePassParams = SatellitePassParams()
    passes: int = Field(1, ge=1, le=20, description="passes to run")
    first_rise_after_s: float = Field(
        40.0, ge=5, le=3600, description="the first pass rises this long after the start"
    )
    gap_s: float = Field(20.0, ge=1, le=86_400, description="from one set to the next rise")
    time_scale: float = Field(1.0, ge=1.0, le=100.0, description="pass compression factor")
    clouds: tuple[CloudParams, ...] = ()
    block_per_pass: bool = True
    optimise_settings: bool = Field(
        False,
        description="run with the settings that maximise the node's bound on the predicted "
        "pass instead of the link's (both parties' basis bias, class probabilities, "
        "intensities)",
    )


class SatelliteDemoConfig(BaseModel):
    """The whole ``--satellite`` file."""

    model_config = ConfigDict(extra="forbid")

    demo: RunSection = RunSection(out_dir=Path("demo-satellite-out"))
    satellite: PassesRunSection = PassesRunSection()
    link: LinkParams = LinkParams()
    protocol: ProtocolSection = ProtocolSection()
    keystore: KeystoreSection = KeystoreSection()
    sync: SyncConfig = SyncConfig()
    calibration: CalibrationSection = CalibrationSection()


def load_satellite_config(path: str | Path, out_dir: Path | None = None) -> SatelliteDemoConfig:
    """Read and validate the file; :class:`ConfigError` names the file and key path."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text("utf-8"))
    except OSError as exc:
        raise ConfigError(str(p), [f"cannot read file: {exc.strerror or exc}"]) from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(str(p), [f"invalid TOML: {exc}"]) from None
    try:
        cfg = SatelliteDemoConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(str(p), format_validation_error(exc)) from None
    if out_dir is not None:
        cfg = cfg.model_copy(update={"demo": cfg.demo.model_copy(update={"out_dir": out_dir})})
    return cfg


# --- the node's theory of one pass --------------------------------------------------------


@dataclass(frozen=True)
class PassTheory:
    """qkdnode's finite-key bound on the expected counts of an interval of a pass."""

    seconds: float
    secret_bits: int
    detections: float
    qber_z: float


def pass_theory(
    cfg: SatelliteDemoConfig,
    channel: SatelliteChannel,
    start_unix_s: float,
    stop_unix_s: float,
    settings: dict[str, float] | None = None,
    *,
    intensities: MeanPhotonResult | None = None,
) -> PassTheory:
    """The secret key qkdnode's own bound gives for the interval ``[start, stop)`` of a
    pass (wall clock), from the transmittance the channel had (clouds included) times the
    receiver's detector efficiency (its drawn truths), the dark counts and the optical
    error of the simulated boxes, and the protocol settings the nodes ran (``settings``:
    the transmitter's ``mu_*`` / ``p_*``; default the link's).

    ``intensities``: the transmitter's calibration of its mean photon numbers; the bound
    then takes them as the node does, each within its calibrated interval (the worst case
    inside it), instead of exactly known."""
    from qkdnode.postproc.satellite_theory import (
        Bound,
        ProtocolSettings,
        SatelliteKeyError,
        SatelliteSecurity,
        pass_key,
    )

    link = resolve_truths(cfg.link)
    src = link.source.model_copy(update=settings or {})
    eta, sat_link = _pass_inputs(cfg, channel, start_unix_s, stop_unix_s)
    rx_basis_z = (settings or {}).get("p_basis_z", link.receiver.p_basis_z)
    if abs(src.p_basis_z - rx_basis_z) > 1e-9:
        raise ConfigError(
            "<satellite demo>",
            ["link.source.p_basis_z and link.receiver.p_basis_z must be equal for the pass theory"],
        )
    proto = ProtocolSettings(
        p_key_basis=src.p_basis_z,
        p_signal=src.p_signal,
        p_decoy=src.p_decoy,
        mu_signal=src.mu_signal,
        mu_decoy=src.mu_decoy,
        mu_vacuum=max(src.mu_vacuum, 0.0),
    )
    security = SatelliteSecurity(eps_cor=cfg.protocol.eps_cor, eps_sec=cfg.protocol.eps_sec)
    try:
        key = pass_key(eta, proto, sat_link, security, bound=Bound.QKDNODE)
        bits, counts = key.key_bits, key.counts
        if intensities is not None:
            bits = _bits_with_intervals(counts, intensities, src, cfg.protocol)
        detections = (sum(counts.n_key) + sum(counts.n_test)) / (
            src.p_basis_z**2 + (1 - src.p_basis_z) ** 2
        )
        qber = counts.qber_key
    except SatelliteKeyError:
        bits, detections, qber = 0, 0.0, math.nan
    return PassTheory(stop_unix_s - start_unix_s, bits, detections, qber)


def _pass_inputs(
    cfg: SatelliteDemoConfig, channel: SatelliteChannel, start_unix_s: float, stop_unix_s: float
) -> tuple[npt.NDArray[np.float64], SatelliteLink]:
    """The transmittance (channel times detector efficiency) of each 50 ms of the interval,
    and the source and receiver figures of the simulated boxes (drawn truths)."""
    from qkdnode.demo.compare import TheoryInputs

    link = resolve_truths(cfg.link)
    th = TheoryInputs.from_link(link, cfg.protocol)
    n = max(1, int((stop_unix_s - start_unix_s) / 0.05))
    times = start_unix_s + (np.arange(n) + 0.5) * (stop_unix_s - start_unix_s) / n
    eta = np.array([channel.transmittance_at(float(t)) for t in times]) * th.detector_efficiency
    sat_link = SatelliteLink(
        source_rate_hz=link.source.slot_rate_hz,
        slot_duration_s=(stop_unix_s - start_unix_s) / n,
        p_extraneous=th.y0 / 4.0,  # per detector and slot
        p_afterpulse=link.receiver.afterpulse_probability,
        qber_intrinsic=link.fiber.misalignment,
    )
    return eta, sat_link


def optimise_for_pass(
    cfg: SatelliteDemoConfig, channel: SatelliteChannel, start_unix_s: float, stop_unix_s: float
) -> dict[str, float]:
    """The settings (basis bias, class probabilities, intensities) that maximise
    qkdnode's bound on the predicted pass, searched over SatQuMA's box
    (:func:`qkdnode.postproc.satellite_theory.optimise_pass`), from the link's own."""
    from qkdnode.postproc.satellite_theory import (
        Bound,
        ProtocolSettings,
        SatelliteSecurity,
        optimise_pass,
    )

    src = cfg.link.source
    eta, sat_link = _pass_inputs(cfg, channel, start_unix_s, stop_unix_s)
    best = optimise_pass(
        eta,
        sat_link,
        SatelliteSecurity(eps_cor=cfg.protocol.eps_cor, eps_sec=cfg.protocol.eps_sec),
        bound=Bound.QKDNODE,
        start=ProtocolSettings(
            p_key_basis=src.p_basis_z,
            p_signal=src.p_signal,
            p_decoy=src.p_decoy,
            mu_signal=src.mu_signal,
            mu_decoy=src.mu_decoy,
            mu_vacuum=src.mu_vacuum,
        ),
        mu_vacuum=src.mu_vacuum,
    ).settings
    return {
        "p_basis_z": round(best.p_key_basis, 4),
        "p_signal": round(best.p_signal, 4),
        "p_decoy": round(best.p_decoy, 4),
        "mu_signal": round(best.mu_signal, 4),
        "mu_decoy": round(best.mu_decoy, 4),
    }


def _bits_with_intervals(
    counts: Any, m: MeanPhotonResult, src: Any, protocol: ProtocolSection
) -> int:
    """qkdnode's bound on ``counts`` with the calibrated intensity intervals, as the
    transmitter's pipeline applies it (:meth:`ExchangeMixin._pp_params`)."""
    from qkdnode.postproc.finitekey import (
        DecoyCounts,
        FiniteKeyError,
        estimate_from_params,
        key_length_raw,
    )
    from qkdnode.postproc.params import PostprocParams
    from qkdnode.postproc.satellite_theory import leak_ec_bits

    params = PostprocParams(
        **m.bound_fields(),
        eps_sec=protocol.eps_sec,
        eps_cor=protocol.eps_cor,
        p_signal=src.p_signal,
        p_decoy=src.p_decoy,
        p_basis_z=src.p_basis_z,
    )
    decoy = DecoyCounts(n_z=counts.n_key, n_x=counts.n_test, m_x=counts.m_test)
    try:
        est = estimate_from_params(decoy, params)
    except FiniteKeyError:
        return 0
    leak = leak_ec_bits(sum(counts.n_key), counts.qber_key, protocol.eps_cor)
    return max(0, math.floor(key_length_raw(est, leak, protocol.eps_sec, protocol.eps_cor)))


def load_intensities(state_dir: Path) -> MeanPhotonResult | None:
    """The transmitter's last calibration of its mean photon numbers, if it saved one."""
    path = state_dir / "calibration" / "mean_photon_number.json"
    try:
        return MeanPhotonResult.model_validate_json(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None


# --- the run ------------------------------------------------------------------------------


@dataclass
class PassFigures:
    """One pass as the ground station recorded it, with the theory beside it."""

    index: int
    rise_unix_s: float
    set_unix_s: float
    duration_above_min_elevation_s: float
    closed_by: str
    exchanged_s: float
    detections: int
    sifted_z_bits: int
    qber_z: float | None
    secret_bits: int
    no_key_reason: str | None
    theory_secret_bits: int
    theory_detections: float
    ratio_to_theory: float | None
    #: the same bound with the intensities known exactly (no calibration uncertainty)
    theory_exact_mu_bits: int
    theory_whole_pass_bits: int
    #: the bound on the same interval cut into four blocks of equal time: what one block
    #: per pass gains over blocks of a fixed size
    theory_four_blocks_bits: int
    #: the whole pass with the settings that maximise the bound on it (both parties'
    #: basis bias, class probabilities, intensities: ``optimised_settings``)
    theory_optimised_whole_pass_bits: int
    optimised_settings: dict[str, float]


@dataclass
class SatelliteDemoSummary:
    ok: bool
    failure: str | None
    passes: list[PassFigures] = field(default_factory=list)
    keys_identical: bool = False
    key_count: dict[str, int] = field(default_factory=dict)
    daemon_exit_codes: dict[str, int | None] = field(default_factory=dict)
    time_scale: float = 1.0
    out_dir: str = ""
    #: the settings optimised for the pass (empty: the link's own, as configured)
    settings_optimised: dict[str, float] = field(default_factory=dict)

    def to_json_line(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, allow_nan=False, default=str)


def _windows(cfg: SatelliteDemoConfig, now: float) -> tuple[SatelliteChannelParams, list[float]]:
    s = cfg.satellite
    probe = SatelliteChannelParams(orbit=s.orbit, time_scale=s.time_scale)
    dur = probe.pass_duration_s
    first = now + s.first_rise_after_s
    rises = [first + k * (dur + s.gap_s) for k in range(s.passes)]
    params = SatelliteChannelParams(
        orbit=s.orbit, rises_unix_s=tuple(rises), time_scale=s.time_scale, clouds=s.clouds
    )
    return params, rises


def write_configs(
    cfg: SatelliteDemoConfig, out_dir: Path, now: float
) -> tuple[NodeFiles, NodeFiles, CurveKeys | None, SatelliteChannelParams]:
    """Both node configs: the pass windows in each, the channel only in the satellite's."""
    from qkdnode.config import parse_config

    out_dir.mkdir(parents=True, exist_ok=True)
    channel, _ = _windows(cfg, now)
    windows = [
        {"rise_unix_s": r, "set_unix_s": s} for r, s in SatelliteChannel(channel).windows_unix_s()
    ]
    link = cfg.link.model_copy(update={"satellite": channel})
    base = DemoConfig(
        demo=cfg.demo.model_copy(update={"out_dir": out_dir}),
        link=link,
        protocol=cfg.protocol,
        keystore=cfg.keystore,
    )
    ep = Endpoints.allocate()
    keys = CurveKeys.generate(out_dir / "keys") if cfg.demo.security == "curve" else None
    files: list[NodeFiles] = []
    for role in ("transmitter", "receiver"):
        data = node_config_dict(base, role, out_dir, ep, keys)
        data["node"]["autostart"] = role == "transmitter"
        data["sync"] = cfg.sync.model_dump(mode="json", exclude_none=True)
        data["calibration"] = {
            **cfg.calibration.model_dump(mode="json", exclude_unset=True),
            **data.get("calibration", {}),  # the transmitter's commissioning record
        }
        data["passes"] = {
            "windows": windows,
            "block_per_pass": cfg.satellite.block_per_pass,
            "orbit": cfg.satellite.orbit.model_dump(mode="json"),
            "time_scale": cfg.satellite.time_scale,
        }
        node_id = data["node"]["id"]
        path = out_dir / f"{node_id}.toml"
        path.write_text(
            f"# Generated by `qkdnode demo --satellite`: {role} of a satellite downlink.\n"
            + to_toml(data),
            "utf-8",
        )
        parsed = parse_config(data, str(path))
        state = parsed.node.state_dir
        if state.exists():
            shutil.rmtree(state)
        files.append(
            NodeFiles(
                role=role,
                node_id=node_id,
                config_path=path,
                log_path=out_dir / f"{node_id}.log",
                control_endpoint=data["bus"]["control_endpoint"],
                telemetry_endpoint=data["bus"]["telemetry_endpoint"],
                config=parsed,
            )
        )
    return files[0], files[1], keys, channel


def _read_passes(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text("utf-8")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _settings_used(status: dict[str, Any]) -> dict[str, float]:
    used = status.get("settings")
    if not isinstance(used, dict):
        return {}
    return {
        k: float(v)
        for k, v in used.items()
        if k in ("mu_signal", "mu_decoy", "p_signal", "p_decoy", "p_basis_z")
        and isinstance(v, int | float)
    }


def run_satellite(
    cfg: SatelliteDemoConfig, reporter: Reporter | None = None
) -> SatelliteDemoSummary:
    """Run the passes; the summary carries the failure, if any (daemons always stopped)."""
    report = reporter or Reporter()
    out_dir = cfg.demo.out_dir.resolve()
    optimised: dict[str, float] = {}
    if cfg.satellite.optimise_settings:
        probe = SatelliteChannel(
            SatelliteChannelParams(
                orbit=cfg.satellite.orbit, rises_unix_s=(0.0,), time_scale=cfg.satellite.time_scale
            )
        )
        optimised = optimise_for_pass(cfg, probe, 0.0, probe.duration_s)
        report.step(f"settings optimised for the pass: {optimised}")
        link = cfg.link.model_copy(
            update={
                "source": cfg.link.source.model_copy(update=optimised),
                "receiver": cfg.link.receiver.model_copy(
                    update={"p_basis_z": optimised["p_basis_z"]}
                ),
            }
        )
        cfg = cfg.model_copy(update={"link": link})
    tx_files, rx_files, keys, channel_params = write_configs(cfg, out_dir, time.time())
    channel = SatelliteChannel(channel_params)
    windows = channel.windows_unix_s()
    tx = Daemon(tx_files, keys, keys.tx_public if keys else None)
    rx = Daemon(rx_files, keys, keys.rx_public if keys else None)
    summary = SatelliteDemoSummary(ok=False, failure=None, time_scale=cfg.satellite.time_scale)
    summary.settings_optimised = optimised
    summary.out_dir = str(out_dir)
    records: list[dict[str, Any]] = []
    settings: dict[str, float] = {}
    try:
        report.step(
            f"starting the satellite (alice, transmitter) and the ground station (bob, "
            f"receiver); {len(windows)} pass(es) of {channel.duration_s:.0f} s, the first "
            f"in {windows[0][0] - time.time():.0f} s; logs in {out_dir}"
        )
        tx.spawn()
        rx.spawn()
        passes_file = rx_files.config.node.state_dir / "passes.jsonl"
        last_set = windows[-1][1]
        deadline = last_set + cfg.demo.step_timeout_s
        while True:
            for d in (tx, rx):
                d.check_alive()
            records = _read_passes(passes_file)
            closed_after_last = [r for r in records if r.get("set_unix_s", 0) >= last_set - 1e-6]
            now = time.time()
            if closed_after_last and any(r.get("closed_by") == "set" for r in closed_after_last):
                break
            if now > deadline:
                raise SatelliteDemoError(
                    f"the last pass is not closed {cfg.demo.step_timeout_s:g} s after its set "
                    f"(see {rx_files.log_path})"
                )
            try:
                st = tx.call("status", timeout_s=5.0)
                settings = _settings_used(st) or settings
                state = st.get("state", "?")
                rst = rx.call("status", timeout_s=5.0).get("state", "?")
                report.live(f"alice {state}, bob {rst}; {len(records)} pass record(s)")
            except Exception:
                pass
            time.sleep(1.0)
        report.end_live()
        report.step("passes done: waiting for the key-ID sync, comparing the key stores")
        _wait_in_step(tx, rx, cfg.demo.step_timeout_s)
        digests = {d.name: d.call("keys.digest", timeout_s=60.0) for d in (tx, rx)}
        a, b = digests[TRANSMITTER_ID], digests[RECEIVER_ID]
        summary.keys_identical = (
            bool(a.get("sha256"))
            and a.get("sha256") == b.get("sha256")
            and a.get("count") == b.get("count")
        )
        summary.key_count = {n: int(d.get("count", 0)) for n, d in digests.items()}
    except (DemoError, SatelliteDemoError) as exc:
        summary.failure = str(exc)
    except Exception as exc:  # bus errors, refused commands: reported, daemons stopped
        summary.failure = f"{type(exc).__name__}: {exc}"
    finally:
        report.end_live()
        for d in (tx, rx):
            d.request_stop()
        for d in (tx, rx):
            summary.daemon_exit_codes[d.name] = d.terminate()
    intensities = load_intensities(tx_files.config.node.state_dir)
    summary.passes = _figures(cfg, channel, windows, records, settings, intensities=intensities)
    key_passes = [p for p in summary.passes if p.secret_bits > 0]
    summary.ok = (
        summary.failure is None
        and summary.keys_identical
        and bool(key_passes)
        and all(c == 0 for c in summary.daemon_exit_codes.values())
    )
    if summary.failure is None and not summary.ok:
        summary.failure = (
            "no pass gave key" if not key_passes else "the key stores differ or a daemon failed"
        )
    return summary


def _wait_in_step(tx: Daemon, rx: Daemon, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        a = tx.call("status", timeout_s=5.0)
        b = rx.call("status", timeout_s=5.0)
        if a.get("delivery_in_step") is not False and b.get("delivery_in_step") is not False:
            return
        time.sleep(1.0)


def _figures(
    cfg: SatelliteDemoConfig,
    channel: SatelliteChannel,
    windows: list[tuple[float, float]],
    records: list[dict[str, Any]],
    settings: dict[str, float],
    *,
    intensities: MeanPhotonResult | None = None,
) -> list[PassFigures]:
    rate = cfg.link.source.slot_rate_hz
    out = []
    for k, (rise, set_) in enumerate(windows):
        recs = [r for r in records if abs(float(r.get("rise_unix_s", -1)) - rise) < 1e-3]
        if not recs:
            continue
        detections = sum(int(r.get("detections", 0)) for r in recs)
        sifted = sum(int(r.get("sifted_z_bits", 0)) for r in recs)
        bits = sum(int(r.get("secret_bits", 0)) for r in recs)
        qbers = [r.get("qber_z") for r in recs if isinstance(r.get("qber_z"), float)]
        theory_bits = 0
        exact_bits = 0
        theory_det = 0.0
        exchanged = 0.0
        for r in recs:
            span = int(r.get("pulses", 0)) / rate
            if span <= 0:
                continue
            stop = min(float(r.get("closed_unix_s", set_)), set_)
            th = pass_theory(cfg, channel, stop - span, stop, settings, intensities=intensities)
            exact = pass_theory(cfg, channel, stop - span, stop, settings)
            theory_bits += th.secret_bits
            exact_bits += exact.secret_bits
            theory_det += th.detections
            exchanged += span
        whole = pass_theory(cfg, channel, rise, set_, settings).secret_bits
        quarter = (set_ - rise) / 4
        four = sum(
            pass_theory(
                cfg, channel, rise + q * quarter, rise + (q + 1) * quarter, settings
            ).secret_bits
            for q in range(4)
        )
        best = optimise_for_pass(cfg, channel, rise, set_)
        best_bits = pass_theory(cfg, channel, rise, set_, best).secret_bits
        reasons = [str(r["no_key_reason"]) for r in recs if r.get("no_key_reason")]
        out.append(
            PassFigures(
                index=k,
                rise_unix_s=rise,
                set_unix_s=set_,
                duration_above_min_elevation_s=set_ - rise,
                closed_by=",".join(str(r.get("closed_by")) for r in recs),
                exchanged_s=round(exchanged, 3),
                detections=detections,
                sifted_z_bits=sifted,
                qber_z=qbers[-1] if qbers else None,
                secret_bits=bits,
                no_key_reason="; ".join(reasons) if bits == 0 and reasons else None,
                theory_secret_bits=theory_bits,
                theory_detections=round(theory_det, 1),
                ratio_to_theory=round(bits / theory_bits, 4) if theory_bits > 0 else None,
                theory_exact_mu_bits=exact_bits,
                theory_whole_pass_bits=whole,
                theory_four_blocks_bits=four,
                theory_optimised_whole_pass_bits=best_bits,
                optimised_settings=best,
            )
        )
    return out


def format_summary(s: SatelliteDemoSummary) -> str:
    """A table of the passes for a terminal."""
    lines = [
        f"satellite demo: {'ok' if s.ok else 'FAILED'}"
        + (f" ({s.failure})" if s.failure else "")
        + f"; time scale {s.time_scale:g}; keys identical: {s.keys_identical}",
        f"{'pass':>4} {'above min el (s)':>16} {'exchanged (s)':>13} {'detections':>11} "
        f"{'QBER':>7} {'secret bits':>11} {'theory':>9} {'ratio':>6}",
    ]
    for p in s.passes:
        q = f"{p.qber_z:.4f}" if p.qber_z is not None else "-"
        r = f"{p.ratio_to_theory:.3f}" if p.ratio_to_theory is not None else "-"
        lines.append(
            f"{p.index:>4} {p.duration_above_min_elevation_s:>16.1f} {p.exchanged_s:>13.1f} "
            f"{p.detections:>11} {q:>7} {p.secret_bits:>11} {p.theory_secret_bits:>9} {r:>6}"
        )
        lines.append(
            f"     theory with the intensities known exactly: {p.theory_exact_mu_bits} bits; "
            f"for the whole pass: {p.theory_whole_pass_bits} bits in one block, "
            f"{p.theory_four_blocks_bits} in four; {p.theory_optimised_whole_pass_bits} with "
            f"settings optimised for it {p.optimised_settings}"
        )
        if p.no_key_reason:
            lines.append(f"     no key: {p.no_key_reason}")
    return "\n".join(lines)
