"""The site's view of the network, as `qkdnode ctl network` prints it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from qkdnode.cli.ctl_network import render_network
from qkdnode.kms.view import network_view
from tests.kms.harness import build

SITES = ["A", "B", "C"]
LINKS = [("A-B", "A", "B"), ("B-C", "B", "C")]


def test_view_and_its_rendering_tell_links_levels_routes_and_accounting(tmp_path: Path) -> None:
    async def go() -> None:
        net = await build(tmp_path, SITES, LINKS, {"sae-a": "A", "sae-c": "C"})
        try:
            await net.wait_routes()
            await net.kms["A"].issue("sae-a", ["sae-c"], 2, 256)
            await asyncio.sleep(0.5)  # the next adverts carry the new levels
            view = network_view(net.kms["B"])
            assert view.site == "B" and view.sites_heard == ["A", "B", "C"]
            assert {lv.link_id: lv.usable for lv in view.links} == {"A-B": True, "B-C": True}
            local = {lv.link_id: lv for lv in view.local_links}
            assert local["A-B"].relay_in_bits == 512 and local["B-C"].relay_out_bits == 512
            assert {r.destination: r.path for r in view.routes} == {
                "A": ["B", "A"],
                "C": ["B", "C"],
            }
            text = "\n".join(render_network(view.model_dump(mode="json")))
            assert "site B: 3 sites in the map, adverts heard from A, B, C" in text
            assert "to C        B > C" in text
            assert "A-B" in text and "relay 0/512" in text
            await net.links["B-C"].cut()
            await asyncio.sleep(2.0)  # C's adverts age out, B-C advertised down
            view = network_view(net.kms["A"])
            assert {lv.link_id: lv.usable for lv in view.links}["B-C"] is False
            assert [r.destination for r in view.routes] == ["B"]
            assert "DOWN" in "\n".join(render_network(view.model_dump(mode="json")))
        finally:
            await net.close()

    asyncio.run(go())
