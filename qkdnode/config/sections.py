"""Pydantic models of every section of a node's TOML configuration.

Every model forbids unknown keys so that a typo is an error, not a silently ignored
setting. Physical quantities carry their unit in the field name.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from drivers.satellite_pass import SatellitePassParams
from drivers.simulation import ReceiverSimParams, TransmitterSimParams

Role = Literal["transmitter", "receiver"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NodeSection(Section):
    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    role: Role
    peer_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    state_dir: Path = Field(
        Path("state"),
        description="state directory (keys, calibration results); "
        "$STATE_DIRECTORY overrides a relative default under systemd",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    autostart: bool = Field(
        False,
        description="transmitter: calibrate, synchronize and exchange key without an "
        "operator, and return to key exchange by itself after faults",
    )


class SourceSection(Section):
    """Protocol targets of the transmitter's source (what calibration aims for)."""

    slot_rate_hz: float = Field(25e6, gt=0, le=10e9)
    mu_signal: float = Field(0.5, gt=0, le=2)
    mu_decoy: float = Field(0.1, gt=0, le=2)
    p_signal: float = Field(0.6, gt=0, lt=1)
    p_decoy: float = Field(0.2, gt=0, lt=1)
    p_basis_z: float = Field(0.8, gt=0, lt=1)
    wavelength_nm: float = Field(1550.12, ge=1260, le=1675)

    @model_validator(mode="after")
    def _check(self) -> SourceSection:
        if self.mu_decoy >= self.mu_signal:
            raise ValueError(
                f"mu_decoy ({self.mu_decoy}) must be smaller than mu_signal ({self.mu_signal})"
            )
        if self.p_signal + self.p_decoy >= 1:
            raise ValueError("p_signal + p_decoy must be < 1 (the rest is vacuum)")
        return self


class CalibrationSection(Section):
    """Calibration settings and the box constants calibration relies on."""

    tap_to_output_db: float | None = Field(
        None,
        ge=0,
        le=120,
        description="transmitter: attenuation from the power-meter tap to the box output, "
        "measured at the factory or at commissioning with calibrated meters at both ports "
        "(it cannot be measured in the field). Unset: the box is not commissioned and "
        "calibration refuses to run",
    )
    tap_to_output_uncertainty_db: float = Field(
        0.2,
        ge=0,
        le=3,
        description="transmitter: uncertainty (bound) of tap_to_output_db; 0.2 dB is typical "
        "of a measurement with two calibrated power meters",
    )
    power_meter_uncertainty: float = Field(
        0.03,
        ge=0,
        lt=0.5,
        description="transmitter: relative calibration uncertainty (bound) of the power "
        "meter; benchtop InGaAs sensors specify 2-3.5 % at 1550 nm, plus their linearity",
    )
    intensity_drift_allowance: float = Field(
        0.05,
        ge=0,
        lt=0.5,
        description="transmitter: relative drift of the mean photon numbers allowed until the "
        "next calibration, common to the classes (laser power, VOA): the factor common to "
        "the classes in the decoy bound, and the limit of the key mixture's tap power",
    )
    signal_drift_allowance: float = Field(
        0.005,
        ge=0,
        lt=0.5,
        description="transmitter: relative change of the signal alone that the decoy bound "
        "allows for (the modulator's bias moves it to second order, at the top of the "
        "curve); the per-class checks stop the exchange beyond it",
    )
    decoy_drift_allowance: float = Field(
        0.05,
        ge=0,
        lt=0.5,
        description="transmitter: relative change of the decoy alone that the decoy bound "
        "allows for (the modulator's bias moves it to first order, on the curve's slope), "
        "each class independently; the per-class checks stop the exchange beyond it",
    )
    vacuum_drift_allowance: float = Field(
        1.0,
        ge=0,
        le=100,
        description="transmitter: relative rise of the vacuum class alone (near the curve's "
        "minimum a few mV of bias move it by tens of per cent) that the decoy bound allows "
        "for by widening its upper bound; costs almost no key (mu_vacuum ~ 1e-4 mu_signal)",
    )
    integration_time_s: float = Field(
        0.12, gt=0, le=60, description="receiver: count-rate integration time per scan point"
    )
    probe_detections: int = Field(
        20_000,
        ge=100,
        le=200_000,
        description="detections disclosed per error-rate probe of the encoding compensation",
    )
    encoder_v_pi_v: float = Field(
        3.0,
        gt=0,
        le=50,
        description="transmitter: encoder half-wave voltage from the datasheet: the starting "
        "guess of its measurement after synchronization, which replaces it",
    )
    bias_track_interval_s: float = Field(
        60.0,
        ge=0,
        le=86_400,
        description="transmitter, while exchanging: seconds between two steps of the "
        "intensity modulator's bias tracking (a dithered reading of the tap power in a "
        "window withheld from every block), each followed by the check of the mean photon "
        "numbers; 0 = off (the 10 s tap-power check still stops the exchange on drift)",
    )
    bias_track_min_interval_s: float = Field(
        5.0,
        gt=0,
        le=86_400,
        description="transmitter: the shortest interval between two tracking steps: the "
        "interval is halved (down to this) while the bias moves one intensity class (the "
        "decoy, on the slope of the modulator's curve) by more than intensity_remeasure_at "
        "of its allowance (signal_, decoy_, vacuum_drift_allowance) between steps, "
        "and relaxes back to bias_track_interval_s when it moves them by less than half of "
        "that",
    )
    bias_track_walk_v_per_sqrt_s: float = Field(
        0.0,
        ge=0,
        le=1,
        description="transmitter: random walk of the modulator's bias optimum (V/sqrt(s)) "
        "the per-class check allows for between two tracking steps (3 sigma of a random "
        "walk's excursion beyond the straight path); 0 = the bias is taken to move "
        "monotonically between steps",
    )
    bias_track_window_s: float = Field(
        2.0,
        gt=0,
        le=60,
        description="transmitter: seconds of slots set aside for one tracking step (the "
        "receiver drops their detections); the window ends shortly after the step does, "
        "so only the slots the step needed are withheld from the key (extended if the "
        "step takes longer)",
    )
    intensity_remeasure_at: float = Field(
        0.5,
        gt=0,
        le=1,
        description="transmitter: fraction of intensity_drift_allowance at which a tracking "
        "step measures the mean photon numbers again (inside a withheld window, key flowing "
        "around it) instead of letting them drift out of their intervals; the fraction of "
        "each class's allowance at which the tracking interval is shortened",
    )
    detector_gate_width_ns: float | None = Field(
        None,
        gt=0,
        le=1e6,
        description="receiver: the detectors' sensitive time per slot (gate width, one gate "
        "per slot; a free-running detector: the slot period), ns, for the in-flight dark "
        "rate (dark counts outside the acceptance window are counted by the detectors but "
        "not in a block); None: read from the detectors (gate_width_ns), and without either the "
        "in-flight dark rate is off",
    )
    dark_track_interval_s: float = Field(
        30.0,
        ge=0,
        le=86_400,
        description="while exchanging: seconds between two in-flight measurements of the "
        "receiver's dark count rate from the vacuum decoy class (no dark window); each "
        "updates the floor of the receiver's light-loss test. 0 = off (the floor stays "
        "the calibration's light-off value)",
    )
    dark_track_window_s: float = Field(
        300.0,
        gt=0,
        le=86_400,
        description="transmitter: the blocks sifted in the last this many seconds make one "
        "in-flight dark-rate measurement",
    )
    dark_track_min_counts: int = Field(
        100,
        ge=10,
        le=10_000_000,
        description="transmitter: detections in the vacuum slots of the window below which "
        "no in-flight dark rate is reported",
    )
    dark_rise_factor: float = Field(
        3.0,
        ge=1.0,
        le=10_000,
        description="receiver: alarm dark_count_rise when the in-flight lower bound exceeds "
        "this factor times the light-off calibration's upper bound",
    )


class InstrumentSection(Section):
    """One instrument: which driver, where it is, and driver-specific options."""

    driver: str = Field(min_length=1, description="driver name, see `qkdnode drivers list`")
    resource: str = Field(
        "", description="VISA resource, serial URL (socket://, /dev/ttyUSB0, pty path) or ''"
    )
    timeout_s: float = Field(2.0, gt=0, le=120)
    options: dict[str, Any] = Field(default_factory=dict)


def _check_z85(v: str) -> None:
    """A Z85 CURVE key is 40 characters of the Z85 alphabet (ZeroMQ RFC 32)."""
    if not _Z85.fullmatch(v):
        raise ValueError("not a Z85 CURVE key (40 characters of the Z85 alphabet)")


_Z85 = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")


class CurveClient(Section):
    name: str = Field(min_length=1)
    public_key: str = Field(min_length=40, max_length=40, description="Z85 CURVE public key")
    role: Literal["monitor", "operator", "peer"]

    @field_validator("public_key")
    @classmethod
    def _key(cls, v: str) -> str:
        _check_z85(v)
        return v


class BusSection(Section):
    control_endpoint: str = "tcp://127.0.0.1:5550"
    telemetry_endpoint: str = "tcp://127.0.0.1:5551"
    peer_endpoint: str = Field(
        "tcp://127.0.0.1:5552",
        description="transmitter binds this endpoint; receiver connects to it",
    )
    allow_plaintext: bool = Field(
        False, description="unencrypted sockets; for local tests only (logged as a warning)"
    )
    server_secret_key_file: Path | None = Field(
        None, description="Z85 CURVE secret key file of this node (or credential 'curve.key')"
    )
    peer_public_key: str | None = Field(None, min_length=40, max_length=40)
    clients: list[CurveClient] = Field(default_factory=list)
    max_frame_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_control_frame_bytes: int = Field(256 * 1024, ge=1024)
    max_peer_header_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="largest JSON header frame accepted from the peer node (authenticated "
        "by CURVE); the key-ID sync summary takes up to 9 bytes per stored key plus 4 MiB "
        "(checked against keystore.max_key_count)",
    )
    client_rate_limit_per_s: float = Field(5000.0, gt=0)
    heartbeat_interval_s: float = Field(1.0, gt=0, le=60)
    heartbeat_liveness: int = Field(
        10,
        ge=1,
        le=100,
        description="heartbeats missed before a peer or client is declared gone; generous "
        "because a busy node (calibration scans, a loaded CPU) may answer late",
    )
    plaintext_role: Literal["monitor", "operator"] = Field(
        "monitor",
        description="role given to every caller when allow_plaintext is true; operator "
        "actions over a plaintext bus must be allowed explicitly with 'operator'",
    )
    reconnect_max_s: float = Field(
        30.0, gt=0, le=3600, description="longest wait between reconnect attempts (backoff cap)"
    )
    max_inflight_requests: int = Field(
        1024, ge=1, description="control requests being handled at once; more get 'busy'"
    )
    monitor_endpoint: str | None = Field(
        None,
        description="a second control socket, for monitoring: 'status' and 'alarms' "
        "answered by a thread of their own from a snapshot at most monitor_max_age_s old "
        "(same keys, roles and rate limit as control_endpoint; nothing else is served); "
        "off when unset",
    )
    monitor_max_age_s: float = Field(
        0.5,
        ge=0.01,
        le=60,
        description="oldest snapshot the monitor endpoint serves (s); the event loop "
        "re-takes it five times as often, and on every state change",
    )

    @field_validator("control_endpoint", "telemetry_endpoint", "peer_endpoint", "monitor_endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not (v.startswith("tcp://") or v.startswith("ipc://")):
            raise ValueError(f"must start with tcp:// or ipc://, got {v!r}")
        if v.startswith("tcp://") and "*" in v:
            raise ValueError(f"wildcard bind {v!r} not allowed: name the interface address")
        if v.startswith("tcp://"):
            host, sep, port = v.removeprefix("tcp://").rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
                raise ValueError(f"needs tcp://HOST:PORT with a port in 0..65535, got {v!r}")
        return v

    @field_validator("peer_public_key")
    @classmethod
    def _peer_key(cls, v: str | None) -> str | None:
        if v is not None:
            _check_z85(v)
        return v


class ProtocolSection(Section):
    block_detections: int = Field(
        16_000_000,
        ge=10_000,
        le=100_000_000,
        description="detections per key block: the largest block (memory) with block_size "
        "'auto', every block with 'fixed'",
    )
    block_size: Literal["auto", "fixed"] = Field(
        "auto",
        description="auto: the first block is at most max_block_seconds of light; later "
        "blocks follow what the finite-key bound needs on the link the last block measured "
        "(the transmitter advises, the receiver clamps to block_detections); fixed: always "
        "block_detections",
    )
    settings: Literal["auto", "fixed"] = Field(
        "auto",
        description="transmitter: auto: after a block has measured the link, the settings "
        "that maximise the finite-key rate of the next block size (signal and decoy mean "
        "photon numbers, class and basis probabilities) replace [source]'s at the next "
        "calibration; fixed: always [source]'s",
    )
    max_block_seconds: float = Field(
        300.0,
        gt=0,
        le=86_400,
        description="auto: no block needs longer than this to fill (a slow link gets smaller "
        "blocks instead of none)",
    )
    eps_sec: float = Field(1e-10, gt=0, lt=1)
    eps_cor: float = Field(1e-15, gt=0, lt=1)
    qber_warning: float = Field(0.03, gt=0, lt=0.5)
    qber_abort: float = Field(0.11, gt=0, lt=0.5)
    ec_efficiency_target: float = Field(1.1, ge=1.0, le=2.0)
    auth_psk_file: Path | None = Field(
        None, description="pre-shared authentication secret (or credential 'auth.psk')"
    )

    @model_validator(mode="after")
    def _check(self) -> ProtocolSection:
        if self.qber_warning >= self.qber_abort:
            raise ValueError("qber_warning must be smaller than qber_abort")
        return self


class TrackingSection(Section):
    """Transmitter: tracking of the polarisation reference while key flows (a lock-in on
    the encoder bias fed by short disclosed windows of detections; see qkdnode.tracking)."""

    interval_s: float = Field(
        10.0, ge=0, le=3600, description="one lock-in step (two windows) this often; 0: off"
    )
    window_detections: int = Field(
        20_000,
        ge=1000,
        le=200_000,
        description="detections disclosed per window (two windows per step); they never carry key",
    )
    max_disclosed_fraction: float = Field(
        0.02,
        gt=0,
        le=0.5,
        description="at most this share of the detections goes to windows: on a slow link the "
        "steps are spaced further apart than interval_s",
    )
    dither_fraction: float = Field(
        0.03, gt=0, le=0.2, description="bias dither during a window, as a fraction of V_pi"
    )
    gain: float = Field(0.5, gt=0, le=1, description="fraction of the measured offset corrected")
    max_step_fraction: float = Field(
        0.05, gt=0, le=0.5, description="largest bias move per step, as a fraction of V_pi"
    )


class PassWindow(Section):
    """One predicted pass: the satellite above the ground station's minimum elevation."""

    rise_unix_s: float = Field(ge=0, description="rise above the minimum elevation (Unix s)")
    set_unix_s: float = Field(ge=0, description="set below it (Unix s)")

    @model_validator(mode="after")
    def _order(self) -> PassWindow:
        if self.set_unix_s <= self.rise_unix_s:
            raise ValueError(
                f"set_unix_s ({self.set_unix_s}) must be after rise_unix_s ({self.rise_unix_s})"
            )
        return self


class PassesSection(Section):
    """A link that carries light only in windows: a satellite downlink's passes (both
    nodes, from the pass predictions). Outside a window the node waits in AWAITING_PASS,
    keeping its calibration; at a rise it acquires the clock and exchanges key; at the set
    (or when the light goes during the pass, a cloud) the receiver ends its block with what
    it holds and the pair returns to AWAITING_PASS. See docs/satellite.md."""

    windows: list[PassWindow] = Field(default_factory=list, description="predicted passes")
    block_per_pass: bool = Field(
        True,
        description="one finite-key block per pass (the whole pass's statistics); false: "
        "blocks of protocol.block_detections as on a fiber",
    )
    orbit: SatellitePassParams | None = Field(
        None,
        description="the predicted pass geometry (drivers/satellite_pass.py): the ground "
        "station removes the predicted time of flight from its tags before synchronising; "
        "None: no pre-compensation",
    )
    time_scale: float = Field(
        1.0,
        ge=1.0,
        le=100.0,
        description="passes compressed this many times (simulated demonstrations only; 1 "
        "for a real satellite)",
    )
    close_timeout_s: float = Field(
        600.0,
        gt=0,
        le=7200,
        description="after a set, how long the transmitter serves the pass's last block "
        "before it leaves the exchange anyway",
    )

    @model_validator(mode="after")
    def _in_order(self) -> PassesSection:
        for a, b in zip(self.windows, self.windows[1:], strict=False):
            if b.rise_unix_s < a.set_unix_s:
                raise ValueError(
                    f"windows: a pass rising at {b.rise_unix_s} overlaps the one setting at "
                    f"{a.set_unix_s} (windows must be in order and disjoint)"
                )
        return self

    def window_at(self, unix_s: float) -> PassWindow | None:
        """The window holding ``unix_s``, or None between passes."""
        for w in self.windows:
            if w.rise_unix_s <= unix_s < w.set_unix_s:
                return w
        return None

    def next_after(self, unix_s: float) -> PassWindow | None:
        """The first window rising after ``unix_s``."""
        for w in self.windows:
            if w.rise_unix_s > unix_s:
                return w
        return None


class PolarizationSection(Section):
    """Receiver: compensation of the fiber's SU(2) polarisation drift with the receiver's
    polarisation controller, while key flows (qkdnode.polarization; docs/polarization.md).
    Runs when the node has a PolarizationController instrument and ``interval_s`` > 0."""

    interval_s: float = Field(
        2.0,
        ge=0,
        le=3600,
        description="one step (two dithered windows) this often; 0: off. A jump is corrected "
        "at the next step and its follow-up at once",
    )
    window_detections: int = Field(
        20_000,
        ge=2_000,
        le=30_000,
        description="detections disclosed per window (two windows per step); they never carry "
        "key (30 000 fit one control frame of the default size)",
    )
    max_disclosed_fraction: float = Field(
        0.03,
        gt=0,
        le=0.5,
        description="at most this share of the detections goes to windows: on a slow link "
        "the steps are spaced further apart than interval_s",
    )
    dither_rad: float = Field(
        0.15,
        gt=0,
        le=1.5,
        description="dither of the controller's last retarder during a window (radians): it "
        "only tells the rotation from its mirror image, and the detections between the "
        "controller's move and the window (lead_s) are key that sees it: sin^2(dither/2), "
        "0.56 % in Z, for about a quarter of the time at the defaults",
    )
    gain: float = Field(
        0.7, gt=0, le=1, description="fraction of the estimated rotation undone per step"
    )
    deadband_rad: float = Field(
        0.02,
        ge=0,
        le=0.5,
        description="estimated error (radians on the Poincaré sphere) below which the "
        "controller is left alone",
    )
    jump_rad: float = Field(
        0.2,
        gt=0,
        le=3.2,
        description="estimated error above which a step is a jump's: gain 1, next step at once",
    )
    lead_s: float = Field(
        0.1,
        gt=0,
        le=10,
        description="a window starts this long after the light's present slot (estimated "
        "from the detections read; covers the controller's settling and the time tagger's "
        "buffering): every detection in it comes after the controller moved. The key "
        "detections of the lead see the dither",
    )


class KeystoreSection(Section):
    path: Path = Field(Path("keys.sqlite"), description="relative to node.state_dir")
    key_size_bits: int = Field(256, ge=64, le=65536, multiple_of=8)
    max_key_count: int = Field(100_000, ge=1)
    key_ttl_s: float = Field(86400.0, gt=0)
    erase_interval_s: float = Field(
        10.0, gt=0, le=3600, description="period of the sweep that erases expired keys"
    )
    compact_interval_s: float = Field(
        300.0,
        ge=0,
        le=86400,
        description="at most this long after an erasure the database file is rewritten "
        "(VACUUM) so no stale copy of an erased key survives in free page space",
    )


class SaeEntry(Section):
    sae_id: str = Field(min_length=1)
    certificate_cn: str = Field(min_length=1, description="CN of the SAE's client certificate")


_REMOVED_DELIVERY_KEYS = ("require_peer_notice", "peer_notice_wait_s")


class DeliverySection(Section):
    enabled: bool = False
    listen_host: str = "127.0.0.1"
    listen_port: int = Field(8443, ge=1, le=65535)
    kme_id: str = "KME-1"
    peer_kme_id: str = "KME-2"
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    client_ca_file: Path | None = None
    saes: list[SaeEntry] = Field(default_factory=list)
    pairs: list[tuple[str, str]] = Field(
        default_factory=list, description="(master SAE ID, slave SAE ID) pairs served"
    )
    max_key_per_request: int = Field(128, ge=1, le=1024)
    min_key_size_bits: int = Field(64, ge=8, multiple_of=8)
    max_key_size_bits: int = Field(4096, ge=8, multiple_of=8)
    max_sae_id_count: int = Field(
        8,
        ge=0,
        le=15,
        description="most additional_slave_SAE_IDs in one enc_keys request (0: multicast off)",
    )
    crl_file: Path | None = Field(
        None,
        description="certificate revocation list (PEM or DER) of client_ca_file's CA; an SAE "
        "whose certificate is on it gets no service. Reloaded on SIGHUP",
    )

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in _REMOVED_DELIVERY_KEYS:
                if name in data:
                    raise ValueError(
                        f"{name} is no longer valid: dec_keys always requires the issuing "
                        "KME's durable activation of the key for that SAE pair; remove the line"
                    )
        return data

    #: every SAE of ``pairs`` must be listed in ``saes`` (a link's KME knows both ends of
    #: its pairs; a network KME's pairs may name SAEs registered at other sites)
    pairs_listed_here: ClassVar[bool] = True

    @model_validator(mode="after")
    def _check_saes(self) -> DeliverySection:
        ids = [s.sae_id for s in self.saes]
        cns = [s.certificate_cn for s in self.saes]
        for what, values in (("sae_id", ids), ("certificate_cn", cns)):
            dup = sorted({v for v in values if values.count(v) > 1})
            if dup:
                raise ValueError(f"saes: duplicate {what} {dup}")
        for i, (master, slave) in enumerate(self.pairs):
            if master == slave:
                raise ValueError(f"pairs[{i}]: master and slave are both {master!r}")
            unknown = [x for x in (master, slave) if x not in ids]
            if unknown and self.pairs_listed_here:
                raise ValueError(f"pairs[{i}]: SAE ID {unknown[0]!r} is not listed in saes")
        if self.min_key_size_bits > self.max_key_size_bits:
            raise ValueError("min_key_size_bits must not exceed max_key_size_bits")
        return self


class AlarmsSection(Section):
    """When the node raises its alarms (docs/operations.md lists them)."""

    no_key_block_factor: float = Field(
        4.0, ge=1.5, le=100, description="no_key: no commit for this many expected block times"
    )
    no_key_min_s: float = Field(
        60.0, ge=1, le=86400, description="no_key: never before this many seconds without commit"
    )
    not_exchanging_grace_s: float = Field(
        600.0,
        ge=10,
        le=86400,
        description="no_key: time allowed to calibrate and synchronise before key must flow",
    )
    aborted_blocks: int = Field(3, ge=1, le=1000, description="blocks_aborting: in a row")
    peer_down_s: float = Field(15.0, ge=1, le=3600, description="peer_down: after this long")
    pair_mismatch_s: float = Field(
        30.0, ge=5, le=3600, description="pair_inconsistent: states disagree for this long"
    )
    disk_free_min_bytes: int = Field(
        200_000_000, ge=0, description="disk_nearly_full: below this many free bytes"
    )
    disk_free_min_ratio: float = Field(
        0.02, ge=0, le=0.5, description="disk_nearly_full: or below this share of the disk"
    )
    calibration_max_age_s: float = Field(
        7 * 86400.0, gt=0, description="calibration_stale: after this long"
    )
    no_light_fade_floor: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="no_light: a link whose light falls to this share of its starting click "
        "rate (dark counts apart) is faded, not cut",
    )
    no_light_false_alarm_probability: float = Field(
        1e-9,
        ge=1e-15,
        le=1e-3,
        description="no_light: probability that one window of a link at its fade floor is "
        "called dark",
    )
    no_light_window_s: float = Field(
        1.0,
        ge=0.1,
        le=10,
        description="no_light: shortest window of tagger time (lengthened on slow links "
        "until a cut is seen with probability 1 - 1e-6)",
    )
    no_light_confirm_windows: int = Field(
        2, ge=0, le=10, description="no_light: dark windows in a row after the first"
    )


class MetricsSection(Section):
    """Prometheus ``/metrics`` endpoint (docs/operations.md lists the metrics)."""

    enabled: bool = False
    listen_host: str = Field(
        "127.0.0.1",
        description="address to bind: loopback, or the management interface's address "
        "for a remote Prometheus; wildcards (0.0.0.0, ::) are refused",
    )
    listen_port: int = Field(9464, ge=1, le=65535)

    @field_validator("listen_host")
    @classmethod
    def _listen_host(cls, v: str) -> str:
        host = v.strip().strip("[]")
        if host in ("", "*", "0.0.0.0", "::"):
            raise ValueError(f"wildcard bind {v!r} not allowed: name the interface address")
        return host


class SimulationSection(Section):
    """Simulated backends: this node's side of the simulated link, nothing of the other.

    ``fiber_endpoint`` carries simulated photons TX -> RX. A transmitter holds
    ``[simulation.transmitter]`` (its secret seed, source, fiber, eavesdropper and box), a
    receiver ``[simulation.receiver]`` (its seed, box and clock); a missing table takes
    the defaults of the node's side. A config holding the other side's table is refused
    (:meth:`for_role`, checked with ``node.role``).
    """

    enabled: bool = True
    fiber_endpoint: str = "tcp://127.0.0.1:5560"
    transmitter: TransmitterSimParams | None = None
    receiver: ReceiverSimParams | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_whole_link(cls, data: Any) -> Any:
        if isinstance(data, dict) and "link" in data:
            raise ValueError(
                "simulation.link is no longer valid: a node holds only its own side of the "
                "simulated link, [simulation.transmitter] or [simulation.receiver]"
            )
        return data

    def for_role(self, role: Role) -> SimulationSection:
        """This section with the node's side filled in (defaults if absent).

        Raises ValueError naming the other side's table when it is present: a receiver
        never holds the transmitter's secret seed or hardware truths, nor the reverse."""
        other = "receiver" if role == "transmitter" else "transmitter"
        if getattr(self, other) is not None:
            raise ValueError(
                f"[simulation.{other}] holds the {other}'s side of the simulated link (its "
                f"seed and hardware truths): a {role} node holds only [simulation.{role}]"
            )
        if role == "transmitter":
            return self.model_copy(
                update={"transmitter": self.transmitter or TransmitterSimParams()}
            )
        return self.model_copy(update={"receiver": self.receiver or ReceiverSimParams()})

    def side(self) -> TransmitterSimParams | ReceiverSimParams:
        """This node's side (after :meth:`for_role`); ValueError when none or both."""
        sides = [s for s in (self.transmitter, self.receiver) if s is not None]
        if len(sides) != 1:
            raise ValueError("the simulation section must hold exactly one side of the link")
        return sides[0]
