"""The network demo's own configuration (``configs/network.toml``): the sites, the links
between them, where the SAEs are, the physics every link shares and how the run goes.

Layout::

    [run]        mode (auto | netns | loopback), durations, the link to cut, SAE traffic
    sites        the site names
    [[links]]    id, a (transmitter), b (receiver), length_km, cost (routing); a
                 satellite link has ``satellite`` (its passes, :class:`LinkPasses`)
    [[saes]]     sae_id, site
    pairs        [master, slave] SAE pairs served end to end (both ways are listed)
    [link]       drivers.simlink.params.LinkParams for every link (seeds are derived per
                 link; each link's length from its [[links]] entry)
    [protocol]   every node's protocol settings
    [keystore]   every node's key store settings

Unknown keys are errors naming their path (``qkdnode demo --network FILE`` exits 2).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from drivers.satellite_pass import SatellitePassParams
from drivers.simlink.params import LinkParams
from qkdnode.config.loader import ConfigError, format_validation_error
from qkdnode.config.sections import CalibrationSection, KeystoreSection, ProtocolSection
from qkdnode.procedures.sync_model import SyncConfig

_NAME = r"^[A-Za-z0-9_.-]+$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NetworkRun(_Strict):
    mode: Literal["auto", "netns", "loopback"] = Field(
        "auto",
        description="netns: each site in its own network namespace (root only); loopback: "
        "every daemon on 127.0.0.1; auto: netns when this host allows it",
    )
    out_dir: Path = Path("demo-network-out")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    security: Literal["curve", "plaintext"] = "curve"
    warmup_timeout_s: float = Field(900.0, gt=0, le=7200, description="every link exchanging")
    relay_s: float = Field(40.0, gt=0, le=86400, description="relaying before the cut")
    after_cut_s: float = Field(40.0, gt=0, le=86400, description="relaying after the cut")
    cut: str | None = Field("C-D", description="the link cut mid-run (none: no cut)")
    origin_sae: str = "sae-a"
    destination_sae: str = "sae-e"
    request_interval_s: float = Field(0.5, gt=0, le=60)
    keys_per_request: int = Field(2, ge=1, le=128)
    key_size_bits: int = Field(256, ge=64, le=4096, multiple_of=8)


class NetworkDemoLink(_Strict):
    id: str = Field(min_length=1, max_length=64, pattern=_NAME)
    a: str = Field(min_length=1, max_length=64, pattern=_NAME, description="transmitter site")
    b: str = Field(min_length=1, max_length=64, pattern=_NAME, description="receiver site")
    length_km: float = Field(10.0, ge=0, le=300)
    cost: float = Field(1.0, gt=0, le=1000)
    satellite: LinkPasses | None = Field(
        None, description="a satellite downlink: passes instead of a fibre of length_km"
    )


class LinkPasses(_Strict):
    """A satellite link of the network: light only in passes (docs/satellite.md). The
    link's transmitter site is the satellite, its receiver site a ground station."""

    orbit: SatellitePassParams = SatellitePassParams()
    passes: int = Field(1, ge=1, le=20)
    first_rise_after_s: float = Field(
        60.0, ge=5, le=86_400, description="after the configs are written"
    )
    gap_s: float = Field(20.0, ge=1, le=86_400, description="from one set to the next rise")
    time_scale: float = Field(1.0, ge=1.0, le=100.0, description="pass compression")


class NetworkDemoSae(_Strict):
    sae_id: str = Field(min_length=1, max_length=256)
    site: str = Field(min_length=1, max_length=64, pattern=_NAME)


def _default_link() -> LinkParams:
    # a reduced pulse rate: five simulated links share two cores
    return LinkParams.model_validate({"source": {"slot_rate_hz": 5e6}})


class NetworkDemoSpec(_Strict):
    run: NetworkRun = NetworkRun()
    sites: list[str] = Field(min_length=2, max_length=16)
    links: list[NetworkDemoLink] = Field(min_length=1, max_length=32)
    saes: list[NetworkDemoSae] = Field(default_factory=list)
    pairs: list[tuple[str, str]] = Field(default_factory=list)
    link: LinkParams = Field(default_factory=_default_link)
    protocol: ProtocolSection = ProtocolSection(block_detections=1_000_000)
    #: the physics, clock sync and calibration of the satellite links (configs/satellite.toml
    #: has the values for a Micius-like downlink)
    satellite_link: LinkParams | None = None
    satellite_sync: SyncConfig = SyncConfig()
    satellite_calibration: CalibrationSection = CalibrationSection()
    keystore: KeystoreSection = KeystoreSection(max_key_count=1_000_000)

    @model_validator(mode="after")
    def _consistent(self) -> NetworkDemoSpec:
        problems = []
        sites = set(self.sites)
        for i, link in enumerate(self.links):
            for end in ("a", "b"):
                if getattr(link, end) not in sites:
                    problems.append(f"links[{i}].{end}: {getattr(link, end)!r} is not a site")
        ids = [link.id for link in self.links]
        if len(set(ids)) != len(ids):
            problems.append("links: a link id is used twice")
        saes = {s.sae_id for s in self.saes}
        for i, sae in enumerate(self.saes):
            if sae.site not in sites:
                problems.append(f"saes[{i}].site: {sae.site!r} is not a site")
        for i, (m, s) in enumerate(self.pairs):
            for who in (m, s):
                if who not in saes:
                    problems.append(f"pairs[{i}]: {who!r} is not an SAE")
        for key in ("origin_sae", "destination_sae"):
            if getattr(self.run, key) not in saes:
                problems.append(f"run.{key}: {getattr(self.run, key)!r} is not an SAE")
        if self.run.cut is not None and self.run.cut not in ids:
            problems.append(f"run.cut: {self.run.cut!r} is not a link")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def site_of(self, sae_id: str) -> str:
        return next(s.site for s in self.saes if s.sae_id == sae_id)


def load_network_spec(path: str | Path) -> NetworkDemoSpec:
    """Read and validate; :class:`ConfigError` names the file and each key path."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text("utf-8"))
    except OSError as exc:
        raise ConfigError(str(p), [f"cannot read: {exc.strerror or exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(p), [f"not valid TOML: {exc}"]) from None
    try:
        return NetworkDemoSpec.model_validate(data)
    except ValidationError as exc:
        problems: list[str] = []
        for line in format_validation_error(exc):
            if line.startswith("(top level): "):  # the cross-checks: one problem a line
                problems.extend(line.removeprefix("(top level): ").split("; "))
            else:
                problems.append(line)
        raise ConfigError(str(p), problems) from None
