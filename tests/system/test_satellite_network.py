"""The satellite as a trusted node between two ground stations, with real daemons: three
sites, the satellite SAT (the transmitter of both its links) and the ground stations GA
and GB, each link carrying light only in its pass (one Micius-like pass in view of both
stations). After the pass, an SAE at GA gets keys that an SAE at GB fetches: relayed
through SAT by the key managers of docs/network.md, one-time padded with the key of GA's
pass on the first hop and of GB's pass on the second, while no light flows.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qkdnode.demo.network_run import NetworkDemo, NetworkSummary
from qkdnode.demo.network_spec import (
    LinkPasses,
    NetworkDemoLink,
    NetworkDemoSae,
    NetworkDemoSpec,
    NetworkRun,
)
from qkdnode.demo.runner import Reporter
from qkdnode.demo.satellite_run import load_satellite_config

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(1500)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetworkDemo]:
    sat = load_satellite_config(ROOT / "configs" / "satellite.toml")
    orbit = sat.satellite.orbit
    # one real pass seen by both stations at once (the satellite in view of both)
    passes = LinkPasses(orbit=orbit, first_rise_after_s=40.0)
    pass_s = 274.5
    spec = NetworkDemoSpec(
        run=NetworkRun(mode="loopback", cut=None, origin_sae="sae-ga", destination_sae="sae-gb"),
        sites=["GA", "SAT", "GB"],
        links=[
            NetworkDemoLink(id="SAT-GA", a="SAT", b="GA", satellite=passes),
            NetworkDemoLink(id="SAT-GB", a="SAT", b="GB", satellite=passes),
        ],
        saes=[
            NetworkDemoSae(sae_id="sae-ga", site="GA"),
            NetworkDemoSae(sae_id="sae-gb", site="GB"),
        ],
        pairs=[("sae-ga", "sae-gb"), ("sae-gb", "sae-ga")],
        protocol=sat.protocol,
        satellite_link=sat.link,
        satellite_sync=sat.sync,
        satellite_calibration=sat.calibration,
    )
    demo = NetworkDemo(spec, tmp_path_factory.mktemp("satnet"), Reporter(), "loopback")
    summary = NetworkSummary()
    try:
        demo._setup(summary)
        for site in demo.sites.values():
            site.start()
        # both passes over, each link holding key from its pass
        demo._wait("both satellite links with key", 40.0 + pass_s + 300.0)
        yield demo
    finally:
        for client in demo.clients.values():
            client.close()
        for site in demo.sites.values():
            site.terminate()
        if demo.topology is not None:
            demo.topology.close()


def test_keys_relayed_through_the_satellite(net: NetworkDemo) -> None:
    before = net._view("GA")
    assert before is not None
    keys = net._sae("sae-ga").enc_keys("sae-gb", 2, 256)
    got = net._sae("sae-gb").dec_keys("sae-ga", [k.key_id for k in keys])
    assert [g.key for g in got] == [k.key for k in keys] and len(keys) == 2
    after = net._view("GA")
    assert after is not None
    crossed = {
        link: bits - before["relays"]["bits_by_link"].get(link, 0)
        for link, bits in after["relays"]["bits_by_link"].items()
        if bits != before["relays"]["bits_by_link"].get(link, 0)
    }
    # two hops, each padded with its own pass's key
    assert crossed == {"SAT-GA": 512, "SAT-GB": 512}, crossed
    # and the other way
    back = net._sae("sae-gb").enc_keys("sae-ga", 1, 256)
    assert net._sae("sae-ga").dec_keys("sae-gb", [back[0].key_id])[0].key == back[0].key
