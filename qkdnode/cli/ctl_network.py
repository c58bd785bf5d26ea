"""``qkdnode ctl network``: the key management network as one site sees it.

Any link's control endpoint of the site answers (``--config SITE.toml`` takes the
first). Shows every link of the map with what both ends advertise (up or down, key
level), the routes the site would take now, its own links' key accounting and its relay
counters; ``--json`` prints the reply (docs/network.md, "Status")."""

from __future__ import annotations

import argparse
import json
from typing import Any

from qkdnode.bus.errors import BusError
from qkdnode.cli import EXIT_OK
from qkdnode.cli.ctl_errors import bus_error
from qkdnode.cli.ctl_nodes import node_addrs, open_client


def _kbit(bits: int) -> str:
    return f"{bits / 1000:.1f} kbit" if bits < 10_000_000 else f"{bits / 1e6:.1f} Mbit"


def render_network(view: dict[str, Any]) -> list[str]:
    out = [
        f"site {view['site']}: {len(view['sites'])} sites in the map, adverts heard from "
        f"{', '.join(view['sites_heard']) or 'none'}",
        "",
        "links (level: key the end can draw to send over the link):",
    ]
    for link in view["links"]:
        a, b = link["a"], link["b"]

        def end(e: dict[str, Any]) -> str:
            if not e["heard"]:
                return f"{e['site']} (not heard)"
            return f"{e['site']} {'up' if e['up'] else 'down'} {_kbit(e['level_bits'])}"

        flag = "usable" if link["usable"] else "DOWN"
        if link["avoided"]:
            flag += " (a relay just failed on it)"
        out.append(f"  {link['link_id']:<12} {end(a):<28} {end(b):<28} {flag}")
    out += ["", f"routes from {view['site']}:"]
    if not view["routes"]:
        out.append("  none")
    for route in view["routes"]:
        out.append(f"  to {route['destination']:<8} {' > '.join(route['path'])}")
    out += [
        "",
        "this site's links (level: what relays may draw, above the reserves; bits the key "
        "manager drew / erased):",
    ]
    for local in view["local_links"]:
        out.append(
            f"  {local['link_id']:<12} peer {local['peer']:<8} {local['state']:<13} "
            f"level {_kbit(local['level_bits']):<12} (held {_kbit(local['held_bits'])}) "
            f"relay {local['relay_out_bits']}/"
            f"{local['relay_in_bits']}  tags {local['auth_out_bits']}/{local['auth_in_bits']}"
            + (f"  refused tags {local['tags_refused']}" if local["tags_refused"] else "")
        )
    r = view["relays"]
    hop = f", median {r['median_hop_ms']:.1f} ms per hop" if r["median_hop_ms"] else ""
    out += [
        "",
        f"relays: originated {r['originated']}, stored {r['stored']}, failed {r['failed']}, "
        f"rerouted {r['rerouted']}; forwarded {r['forwarded']}, landed here {r['landed']}"
        f"{hop}",
    ]
    return out


def network_action(args: argparse.Namespace) -> int:
    nodes = node_addrs(args)
    try:
        with open_client(args, nodes[0]) as client:
            reply = client.request("network", {})
    except BusError as exc:
        return bus_error(args, exc)
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True))
    else:
        print("\n".join(render_network(reply)))
    return EXIT_OK
