"""A site's status in the shape of ETSI GS QKD 015's ``qkd_node`` (V2.1.1 YANG module
``etsi-qkd-sdn-node``, JSON encoding of RFC 7951).

Made from the site's :class:`~qkdnode.kms.view.NetworkView`; docs/network.md maps every
field. The top-level member is module-qualified (``etsi-qkd-sdn-node:qkd_node``),
identity values name their module (``etsi-qkd-node-types:PHYS``), members outside the
model are never added (a strict YANG client would refuse them: what qkdnode knows
beyond the model is in ``/api/v1/network/view``).

IDs: ``qkdn_id``, ``qkdl_id`` and ``app_id`` are UUIDs (``yang:uuid``), name-based (RFC
9562 version 5) on the site's, link's or SAE's name, so every site computes the same ID
for the same thing. ``qkdi_id`` is a ``uint32``: CRC-32 of ``"<site>/<link>"``, again the
same at every site.

* ``qkd_interfaces``: one per link of this site (its end of the link).
* ``qkd_links``: the site's physical links (``PHYS``) and one virtual link (``VIRT``,
  "multi-hop") per site this site reaches by relay now, ``virt_next_hop`` the first hop
  of the route in use (``virt_prev_hop`` absent: this site is an end of it).
  ``qkdl_performance``: ``skr`` the link's secret key rate, ``eskr`` what is left after
  the key manager's own use (tags), ``expected_consumption`` the key rate relays drew
  from the link since the site started (bit/s).
* ``qkd_applications``: the SAEs registered at this site, with ``consumed_bits``: bits
  of end-to-end key issued to each as master since the store began (``uint32``, capped).
"""

from __future__ import annotations

import datetime as dt
import uuid
import zlib
from typing import Any

from qkdnode import __version__
from qkdnode.kms.view import LocalLinkView, NetworkView

MODULE = "etsi-qkd-sdn-node"
TYPES = "etsi-qkd-node-types"
UINT32_MAX = 2**32 - 1
_NAMESPACE = uuid.UUID("6f1b1f0e-4e7a-5d0c-9c1e-7164686e6f64")


def name_uuid(kind: str, name: str) -> str:
    """The UUID every site gives to ``name`` of ``kind`` (node, link, app)."""
    return str(uuid.uuid5(_NAMESPACE, f"qkdnode:{kind}:{name}"))


def interface_id(site: str, link_id: str) -> int:
    """``qkdi_id`` (uint32) of ``site``'s end of ``link_id``."""
    return zlib.crc32(f"{site}/{link_id}".encode())


def _t(identity: str) -> str:
    return f"{TYPES}:{identity}"


def _u32(value: float) -> int:
    return max(0, min(UINT32_MAX, int(value)))


def _when(unix_s: float) -> str:
    return dt.datetime.fromtimestamp(unix_s, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _link_status(local: LocalLinkView) -> str:
    """ACTIVE: generating key and usable; PENDING: coming up; OFF: failed or down."""
    if local.usable and local.state == "EXCHANGING":
        return "ACTIVE"
    if local.state in ("FAULT", "SHUTDOWN"):
        return "OFF"
    if local.usable:
        return "PASSIVE"
    return "PENDING"


def qkd_node(
    view: NetworkView, *, started_at_unix_s: float, roles: dict[str, str]
) -> dict[str, Any]:
    """``{"etsi-qkd-sdn-node:qkd_node": {...}}`` for the site of ``view``; ``roles``
    maps each of its links to this site's role on it (transmitter or receiver)."""
    me = view.site
    node_id = name_uuid("node", me)
    uptime_s = max(view.at_unix_s - started_at_unix_s, 1.0)
    interfaces: list[dict[str, Any]] = []
    links: list[dict[str, Any]] = []
    for port, local in enumerate(view.local_links, start=1):
        qkdi = interface_id(me, local.link_id)
        role = "TRANSMITTER" if roles.get(local.link_id) == "transmitter" else "RECEIVER"
        failed = local.state in ("FAULT",)
        interfaces.append(
            {
                "qkdi_id": qkdi,
                "qkdi_model": "qkdnode BB84 decoy-state",
                "qkdi_type": _t("DV-QKD"),
                "qkdi_att_point": {"device": me, "port": port},
                "qkdi_capabilities": {"role_support": _t(role)},
                "qkdi_status": _t("FAILED" if failed else "ENABLED"),
            }
        )
        drawn = local.relay_out_bits + local.auth_out_bits
        links.append(
            {
                "qkdl_id": name_uuid("link", local.link_id),
                "qkdl_status": _t(_link_status(local)),
                "qkdl_enable": True,
                "qkdl_local": {"qkdn_id": node_id, "qkdi_id": qkdi},
                "qkdl_remote": {
                    "qkdn_id": name_uuid("node", local.peer),
                    "qkdi_id": interface_id(local.peer, local.link_id),
                },
                "qkdl_type": _t("PHYS"),
                "phys_qkd_role": _t(role),
                "qkdl_performance": {
                    "expected_consumption": _u32(drawn / uptime_s),
                    "skr": _u32(local.rate_bps),
                    "eskr": _u32(max(0.0, local.rate_bps - local.auth_out_bits / uptime_s)),
                },
            }
        )
    for route in view.routes:
        links.append(
            {
                "qkdl_id": name_uuid("virtual-link", f"{me}>{route.destination}"),
                "qkdl_status": _t("ACTIVE"),
                "qkdl_enable": True,
                "qkdl_local": {"qkdn_id": node_id},
                "qkdl_remote": {"qkdn_id": name_uuid("node", route.destination)},
                "qkdl_type": _t("VIRT"),
                "virt_next_hop": [name_uuid("node", route.path[1])],
            }
        )
    apps = [
        {
            "app_id": name_uuid("app", sae.sae_id),
            "app_status": _t("ON"),
            "app_type": _t("CLIENT"),
            "app_statistics": {
                "statistics": [
                    {
                        "start_time": _when(started_at_unix_s),
                        "end_time": _when(view.at_unix_s),
                        "consumed_bits": _u32(sae.consumed_bits),
                    }
                ]
            },
            "local_qkdn_id": node_id,
        }
        for sae in view.saes
        if sae.local
    ]
    any_up = any(local.usable for local in view.local_links)
    return {
        f"{MODULE}:qkd_node": {
            "qkdn_id": node_id,
            "qkdn_status": _t("OPERATING" if any_up else "DOWN"),
            "qkdn_version": __version__,
            "qkdn_location_id": me,
            "qkdn_capabilities": {
                "link_stats_support": True,
                "application_stats_support": True,
                "key_relay_mode_enable": True,
            },
            "qkd_applications": {"qkd_app": apps},
            "qkd_interfaces": {"qkd_interface": interfaces},
            "qkd_links": {"qkd_link": links},
        }
    }
