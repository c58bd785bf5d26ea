"""Two real node daemons on a simulated 25 km link: power-on to key, faults, delivery.

One pair of daemons (transmitter with ``autostart = true``, ETSI GS QKD 014 delivery on
both) is shared by the tests of this module, in order, to keep the run short: power-on
to key exchange takes about half a minute. Every test starts by making sure the pair is
exchanging again (restarting both daemons if a previous test left it stuck), injects a
fault with ``sim.inject`` over the control bus, and watches states, alarms and blocks
through ``status`` and the daemons' JSON logs. No operator command moves the pair
(``calibrate``, ``sync``, ``start``, ``recover`` are never sent) except the final
``stop`` that lets the key stores be compared.
"""

from __future__ import annotations

import base64
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.system.conftest import (
    RECOVER_TIMEOUT_S,
    SAE_MASTER,
    SAE_SLAVE,
    START_TIMEOUT_S,
    Node,
    Pair,
    blocks_done,
    make_pair,
)

pytestmark = pytest.mark.slow

QBER_WARNING = 0.04  # configs/*.sim.toml [protocol]
QBER_ABORT = 0.11
#: A fault must be noticed within this time (the monitor runs twice a second).
DETECT_TIMEOUT_S = 60.0
#: How long a fault is held before it is cleared: longer than the FAULT state's first
#: automatic recovery attempt (2 s), as a real fiber cut or blinding attack would be.
HOLD_S = 8.0
COMPENSATION_TIMEOUT_S = 300.0


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    p = make_pair(tmp_path_factory.mktemp("link"), autostart=True, delivery=True)
    p.start()
    try:
        yield p
    finally:
        p.kill_all()


def restart_if_stuck(p: Pair, timeout_s: float = 45.0) -> None:
    """Give the pair ``timeout_s`` to exchange; otherwise restart both daemons.

    Keeps one test's failure (a pair stuck out of key exchange) from failing the next.
    """
    try:
        p.wait_exchanging(timeout_s)
        return
    except AssertionError:
        pass
    for n in p.nodes:
        if n.daemon is not None and n.daemon.proc.poll() is None:
            n.stop(signal.SIGTERM)
    p.start()
    p.wait_exchanging(START_TIMEOUT_S)


@pytest.fixture
def live(pair: Pair) -> Pair:
    restart_if_stuck(pair)
    return pair


def log_mark(node: Node) -> int:
    """Position in the node's log records (all runs): events after it are new."""
    return len(node.lines())


def new_events(node: Node, mark: int, event: str, **match: Any) -> list[dict[str, Any]]:
    return [
        r
        for r in node.lines()[mark:]
        if r.get("event") == event and all(r.get(k) == v for k, v in match.items())
    ]


def wait_log(
    node: Node, mark: int, event: str, timeout_s: float, **match: Any
) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = new_events(node, mark, event, **match)
        if found:
            return found[0]
        time.sleep(0.25)
    return None


def states_after(node: Node, mark: int) -> list[str]:
    return [str(r["new"]) for r in new_events(node, mark, "state_changed")]


def inject(node: Node, fault: str, **kw: Any) -> None:
    reply = node.call("sim.inject", fault=fault, **kw)
    assert reply == {"fault": fault, "cleared": False}


def clear(node: Node, fault: str) -> None:
    reply = node.call("sim.inject", fault=fault, clear=True)
    assert reply == {"fault": fault, "cleared": True}


def assert_no_key_from_bad_blocks(p: Pair) -> None:
    """Every block that produced key had an error rate below the abort threshold."""
    for n in p.nodes:
        for rec in n.events("block_summary", ok=True):
            rates = [float(rec[k]) for k in ("qber_z", "qber_x") if rec.get(k) is not None]
            assert rates, rec
            assert max(rates) <= QBER_ABORT, (n.name, rec)


def wait_new_ok_block(p: Pair, timeout_s: float = RECOVER_TIMEOUT_S) -> dict[str, Any]:
    """Wait for a block that succeeds after now (key flows again)."""
    a, _ = p.wait_exchanging()
    ok0 = int(a["stats"]["blocks_ok"])
    a, _ = p.wait(
        "a new successful block",
        lambda x, y: x is not None and int(x["stats"]["blocks_ok"]) > ok0,
        timeout_s,
    )
    return a


# --------------------------------------------------------------------------- autostart
def test_autostart_from_power_on_reaches_key_exchange(pair: Pair) -> None:
    """Power-on defaults (unknown delays, biases, clock offset and drift), no operator."""
    a, b = pair.wait_exchanging(START_TIMEOUT_S)
    assert a["role"] == "transmitter" and b["role"] == "receiver"
    assert a["peer_connected"] and b["peer_connected"]
    assert a["healthy"] and b["healthy"]
    # both walked the whole procedure by themselves
    for n in pair.nodes:
        seen = states_after(n, 0)
        for state in ("CONNECTING", "IDLE", "CALIBRATING", "SYNCHRONIZING", "EXCHANGING"):
            assert state in seen, (n.name, seen)
    reasons = {
        str(r["reason"]) for r in pair.tx.events("state_changed") if r["new"] == "CALIBRATING"
    }
    assert reasons == {"automatic"}, reasons
    # blocks are processed on both sides, with the same outcome
    a, b = pair.wait(
        "two processed blocks",
        lambda x, y: (
            x is not None and y is not None and blocks_done(x) >= 2 and blocks_done(y) >= 2
        ),
        RECOVER_TIMEOUT_S,
    )
    assert a["stats"]["synchronized"] and a["stats"]["calibrated"]
    assert a["stats"]["detections"] > 0 and b["stats"]["detections"] > 0
    assert a["stats"]["sifted_bits"] > 0
    a = wait_new_ok_block(pair)
    assert a["stats"]["secret_bits"] > 0
    assert a["stats"]["qber"] is not None and a["stats"]["qber"] < QBER_WARNING
    assert_no_key_from_bad_blocks(pair)


# --------------------------------------------------------------------------- delivery
def test_key_delivery_etsi_014_over_mutual_tls_and_control_api(live: Pair) -> None:
    p = live
    assert p.pki is not None
    p.wait(
        "keys in both stores",
        lambda a, b: (
            a is not None
            and b is not None
            and a["keystore"].get("available", 0) >= 8
            and b["keystore"].get("available", 0) >= 8
        ),
        RECOVER_TIMEOUT_S,
    )
    st, status = p.tx.etsi(p.pki, SAE_MASTER, f"{SAE_SLAVE}/status")
    assert st == 200, status
    assert status["source_KME_ID"] == "KME-ALICE" and status["target_KME_ID"] == "KME-BOB"
    assert status["key_size"] == 256

    st, enc = p.tx.etsi(p.pki, SAE_MASTER, f"{SAE_SLAVE}/enc_keys", {"number": 3, "size": 256})
    assert st == 200, enc
    assert len(enc["keys"]) == 3
    ids = [{"key_ID": k["key_ID"]} for k in enc["keys"]]
    st, dec = p.rx.etsi(p.pki, SAE_SLAVE, f"{SAE_MASTER}/dec_keys", {"key_IDs": ids})
    assert st == 200, dec
    assert dec["keys"] == enc["keys"]
    for k in enc["keys"]:
        assert len(base64.b64decode(k["key"])) == 32
    assert len({k["key"] for k in enc["keys"]}) == 3

    # a key is handed out once: the same IDs again are refused
    st, again = p.rx.etsi(p.pki, SAE_SLAVE, f"{SAE_MASTER}/dec_keys", {"key_IDs": ids})
    assert st == 400, again
    # the slave SAE is not the master of the pair: enc_keys on its behalf is refused
    st, body = p.rx.etsi(p.pki, SAE_SLAVE, f"{SAE_MASTER}/enc_keys", {"number": 1})
    assert st == 401, body

    # operator delivery over the control bus
    got = p.tx.call("keys.get", number=2, size_bits=256)
    assert len(got["keys"]) == 2
    for k in got["keys"]:
        assert len(base64.b64decode(k["key"])) == 32
    assert not {k["key_ID"] for k in got["keys"]} & {k["key_ID"] for k in enc["keys"]}
    leaked = [k["key"] for k in enc["keys"] + got["keys"]]
    for n in p.nodes:
        text = n.log_path.read_text(errors="replace")
        assert not any(key in text for key in leaked), f"key bytes in {n.name}'s log"


def test_fiber_cut_faults_the_receiver_and_the_pair_recovers(live: Pair) -> None:
    p = live
    mark = log_mark(p.rx)
    inject(p.tx, "fiber_cut")
    alarm = wait_log(p.rx, mark, "alarm", DETECT_TIMEOUT_S, alarm="no_light")
    time.sleep(HOLD_S)
    states = states_after(p.rx, mark)
    clear(p.tx, "fiber_cut")
    wait_new_ok_block(p)
    alarms = [r["alarm"] for r in new_events(p.rx, mark, "alarm")]
    assert alarm is not None, f"no 'no_light' alarm; receiver alarms {alarms}, states {states}"
    assert "FAULT" in states, states
    assert_no_key_from_bad_blocks(p)


def test_optimised_settings_are_applied_at_the_next_calibration(live: Pair) -> None:
    """protocol.settings = "auto": after a block has measured the link, the transmitter's
    optimiser advises better settings for the block size in use; the next calibration (here
    the one the transmitter runs after the receiver restarted: a fiber cut only makes the
    pair synchronise again) applies them to the intensity targets and the state source,
    the status shows them, and key flows with them."""
    p = live
    wait_new_ok_block(p)
    advice = [r for r in p.tx.events("link_measured") if r.get("applied_at_next_calibration")]
    assert advice, p.tx.events("link_measured")
    mark = log_mark(p.tx)
    assert p.rx.stop(signal.SIGTERM) == 0, p.rx.log_tail()
    time.sleep(3.0)
    p.rx.start()
    a = wait_new_ok_block(p)
    applied = new_events(p.tx, mark, "settings_applied")
    assert applied, "no settings_applied after the recalibration"
    st = a["settings"]
    assert st is not None
    last = applied[-1]
    for k in ("mu_signal", "mu_decoy", "p_signal", "p_decoy", "p_basis_z"):
        assert st[k] == pytest.approx(last[k], abs=1e-4), (k, st, last)
    assert (st["p_signal"], st["p_basis_z"]) != (0.6, 0.8)  # configs/*.sim.toml [source]
    calibrated = new_events(p.tx, mark, "transmitter_calibrated")
    assert calibrated and calibrated[-1]["mu_signal"] == pytest.approx(st["mu_signal"], rel=0.05)
    assert_no_key_from_bad_blocks(p)


def test_bright_light_faults_the_receiver_and_the_pair_recovers(live: Pair) -> None:
    p = live
    mark = log_mark(p.rx)
    inject(p.rx, "bright_light")
    alarm = wait_log(p.rx, mark, "alarm", DETECT_TIMEOUT_S, alarm="bright_light")
    fault = wait_log(p.rx, mark, "state_changed", 10, new="FAULT")
    time.sleep(HOLD_S)  # the attack lasts; automatic recovery attempts meanwhile
    clear(p.rx, "bright_light")
    assert alarm is not None, new_events(p.rx, mark, "alarm")
    assert fault is not None, states_after(p.rx, mark)
    wait_new_ok_block(p)
    assert_no_key_from_bad_blocks(p)


def test_detector_disconnect_faults_the_receiver_and_the_pair_recovers(live: Pair) -> None:
    p = live
    mark = log_mark(p.rx)
    inject(p.rx, "detector_disconnect")
    fault = wait_log(p.rx, mark, "state_changed", DETECT_TIMEOUT_S, new="FAULT")
    time.sleep(HOLD_S)
    a, b = p.statuses()
    clear(p.rx, "detector_disconnect")
    assert fault is not None, states_after(p.rx, mark)
    # while the detectors are unreachable the receiver stays in FAULT, unhealthy
    assert b is not None and b["state"] == "FAULT" and b["healthy"] is False, b
    assert a is not None and a["state"] != "EXCHANGING", a
    wait_new_ok_block(p)
    assert_no_key_from_bad_blocks(p)


def test_encoding_drift_is_compensated_without_operator(live: Pair) -> None:
    p = live
    mark = log_mark(p.tx)
    inject(p.tx, "encoding_drift", angle_rad=0.6)
    high = wait_log(p.tx, mark, "alarm", DETECT_TIMEOUT_S, alarm="qber_high")
    assert high is not None, new_events(p.tx, mark, "block_summary")
    # Compensation measures each bias setting on fresh key blocks (two blocks per point,
    # up to ten points): on a loaded 2-core machine that can take a few minutes.
    comp = wait_log(p.tx, mark, "encoding_compensated", COMPENSATION_TIMEOUT_S)
    assert comp is not None, p.report("no encoding_compensated")
    # QBER back below the warning level on fresh blocks, still exchanging
    a = wait_new_ok_block(p)
    a = wait_new_ok_block(p)
    assert a["stats"]["qber"] < QBER_WARNING, a["stats"]
    assert_no_key_from_bad_blocks(p)
    clear(p.tx, "encoding_drift")  # (the encoder stays compensated: QBER may rise again)


def test_full_intercept_resend_gives_no_key(live: Pair) -> None:
    p = live
    mark = log_mark(p.tx)
    inject(p.tx, "eve", fraction=1.0, mode="intercept-resend")
    try:
        # a block begun before Eve arrived may still finish; wait for her first abort
        first = wait_log(p.tx, mark, "block_summary", RECOVER_TIMEOUT_S, ok=False)
        assert first is not None, p.report("no aborted block with Eve on the line")
        a0, _ = p.statuses()
        assert a0 is not None
        digest0 = p.tx.call("keys.digest")
        time.sleep(20.0)
        a1, _ = p.statuses()
        assert a1 is not None
        digest1 = p.tx.call("keys.digest")
        after = new_events(p.tx, mark, "block_summary")
        assert len(after) >= 2, after
        assert a1["stats"]["secret_bits"] == a0["stats"]["secret_bits"]
        assert a1["stats"]["blocks_ok"] == a0["stats"]["blocks_ok"]
        assert digest1 == digest0  # nothing new in the key store
    finally:
        clear(p.tx, "eve")
    wait_new_ok_block(p)
    assert_no_key_from_bad_blocks(p)


def test_receiver_restart_pauses_the_transmitter_and_the_pair_resumes(live: Pair) -> None:
    p = live
    mark = log_mark(p.tx)
    assert p.rx.stop(signal.SIGTERM) == 0, p.rx.log_tail()
    paused = wait_log(p.tx, mark, "state_changed", DETECT_TIMEOUT_S, new="PAUSED")
    a, _ = p.statuses()
    assert a is not None and a["state"] in ("PAUSED", "IDLE"), a
    assert a["peer_connected"] is False, a
    time.sleep(3.0)
    p.rx.start()
    wait_new_ok_block(p)
    assert paused is not None, states_after(p.tx, mark)
    # the restarted receiver lost calibration and lock: the pair redid both
    seen = states_after(p.tx, mark)
    assert "SYNCHRONIZING" in seen, seen
    assert_no_key_from_bad_blocks(p)


@pytest.mark.parametrize("victim", ["transmitter", "receiver"])
def test_sigkill_and_restart_resumes_and_key_stores_agree(live: Pair, victim: str) -> None:
    p = live
    node = p.tx if victim == "transmitter" else p.rx
    assert node.daemon is not None
    node.daemon.proc.send_signal(signal.SIGKILL)
    assert node.daemon.proc.wait(30) == -signal.SIGKILL
    node.close_client()
    time.sleep(2.0)
    node.start()
    wait_new_ok_block(p)
    a, b = p.statuses()
    assert a is not None and b is not None
    if victim == "receiver":
        # last test: stop the pair, then both stores must hold exactly the same keys
        assert p.tx.call("stop")["state"] == "IDLE"
        p.wait(
            "both nodes IDLE",
            lambda x, y: (
                x is not None and y is not None and x["state"] == "IDLE" and y["state"] == "IDLE"
            ),
            60,
        )
        deadline = time.monotonic() + 60
        while True:
            da, db = p.tx.call("keys.digest"), p.rx.call("keys.digest")
            if da == db or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        assert da == db, (da, db)
        assert da["count"] > 0
        x, y = p.statuses()
        assert x is not None and y is not None
        assert x["keystore"].get("pending", 0) == 0 and y["keystore"].get("pending", 0) == 0
    assert_no_key_from_bad_blocks(p)


def test_sigterm_ends_both_daemons_with_instruments_safe(pair: Pair) -> None:
    """SIGTERM ends both daemons cleanly with every instrument safe."""
    for n in pair.nodes:
        assert n.daemon is not None
        assert n.stop(signal.SIGTERM) == 0, n.log_tail()
        safe = [r for r in n.events("instrument_safe") if r.get("safe") is not True]
        assert not safe, safe
