"""NodeStats as the ``status`` reply shows it: every counter, the running exchange
counted, the monotonic start time never shown."""

from __future__ import annotations

import dataclasses
import json
import time

from qkdnode.context import NodeStats


def test_as_dict_shows_every_counter_and_counts_the_running_exchange() -> None:
    stats = NodeStats(
        pulses=10,
        detections=7,
        qber=0.02,
        secret_bits=1000,
        exchange_seconds=4.0,
        exchange_started_at=time.monotonic() - 1.0,
        last_failure="peer lost",
        last_block={"block_id": 3, "leak": {"cascade": 12}},
    )
    shown = stats.as_dict()
    expected = {f.name for f in dataclasses.fields(NodeStats)} - {"exchange_started_at"}
    assert set(shown) == expected | {"secret_key_rate_bps"}
    assert shown["pulses"] == 10 and shown["qber"] == 0.02
    assert shown["last_failure"] == "peer lost"
    assert shown["last_block"] == {"block_id": 3, "leak": {"cascade": 12}}
    assert 4.9 < shown["exchange_seconds"] < 6.0
    assert abs(shown["secret_key_rate_bps"] - 1000 / shown["exchange_seconds"]) < 5.0
    json.dumps(shown, allow_nan=False)  # the reply is JSON
