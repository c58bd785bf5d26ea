"""Authentication key cost of a block through the real pipeline, pool refill, PSK size."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from qkdnode.cli import EXIT_OK, EXIT_USAGE
from qkdnode.cli.config_cmd import _check
from qkdnode.postproc import bench
from qkdnode.postproc.auth import (
    BOOTSTRAP_ATTEMPTS,
    REGION_BYTES,
    TAGS_PER_BLOCK,
    AuthKeyPool,
    min_psk_bytes,
)
from qkdnode.postproc.params import PostprocParams

TARGET_BITS = 4096  # per block and direction
PARAMS = PostprocParams(recv_timeout_s=30.0)


def _blocks(tmp_path: Path, detections: int, blocks: int, psk: bytes) -> list[Any]:
    block = bench.SyntheticBlock(detections, PARAMS, seed=7)
    return bench.run_block_pair(block, PARAMS, tmp_path, psk, blocks)


def test_block_costs_at_most_4096_bits_per_direction_and_refills_the_pool(
    tmp_path: Path,
) -> None:
    """Two blocks of 4e6 detections from the 4096-byte secret operators are told to make:
    each spends one region (640 bits) per direction whatever the number of Cascade
    messages, and each refills both pools with more than both directions spent."""
    psk = bytes(range(256)) * 16
    out = _blocks(tmp_path, 4_000_000, 2, psk)
    spent = {"t2r": 0, "r2t": 0}
    for t_res, r_res, a_tx, a_rx in out:
        assert t_res.ok and r_res.ok, (t_res.abort_reason, r_res.abort_reason)
        assert t_res.key_bytes == r_res.key_bytes
        assert a_tx.messages_sent + a_rx.messages_sent > 100  # Cascade round trips
        for res, t, stream in ((t_res, a_tx, "t2r"), (r_res, a_rx, "r2t")):
            assert t.tags_sent == t.tags_verified == TAGS_PER_BLOCK
            assert res.stats.auth_bits_sent == res.stats.auth_bits_received
            assert res.stats.auth_bits_sent == 8 * REGION_BYTES <= TARGET_BITS
            assert 0 < res.stats.auth_forgery_bound < 1e-20
            assert res.stats.auth_reserve_bits > 2 * res.stats.auth_bits_sent
            spent[stream] += res.stats.auth_bits_sent
    a_tx, a_rx = out[-1][2], out[-1][3]
    # what the pools themselves counted, and where their cursors stand
    assert a_tx.pool.spent_bits == spent["t2r"] == 2 * 8 * REGION_BYTES
    assert a_rx.pool.spent_bits == spent["r2t"] == 2 * 8 * REGION_BYTES
    assert a_tx.pool.snapshot()["t2r"]["send_cursor"] == (-1, 2 * REGION_BYTES)
    assert a_rx.pool.snapshot()["r2t"]["send_cursor"] == (-1, 2 * REGION_BYTES)
    # both blocks refilled both pools identically; the refill is usable once announced
    tx, rx = AuthKeyPool.load(tmp_path / "tx.pool"), AuthKeyPool.load(tmp_path / "rx.pool")
    assert tx.segments() == rx.segments() == [-1, 0, 1]
    for stream in ("t2r", "r2t"):
        assert tx.stream_digest(stream) == rx.stream_digest(stream)  # type: ignore[arg-type]
    refill = [r.stats.auth_reserve_bits // 8 // 2 for r, *_ in out]  # bytes per stream
    assert refill[0] * 8 > 4 * 8 * REGION_BYTES  # a block gives back more than it spent
    tx.peer_has |= {0, 1}
    whole_regions = sum(n // REGION_BYTES * REGION_BYTES for n in [*refill, len(psk) // 2])
    assert tx.available_bytes("t2r") == whole_regions - 2 * REGION_BYTES


def test_cost_does_not_grow_with_the_block(tmp_path: Path) -> None:
    small = _blocks(tmp_path / "s", 1_000_000, 1, bytes(min_psk_bytes()))[0]
    large = _blocks(tmp_path / "l", 4_000_000, 1, bytes(min_psk_bytes()))[0]
    assert large[2].messages_sent > small[2].messages_sent  # more Cascade traffic...
    for i in (2, 3):
        assert small[i].sent_pad_bits == large[i].sent_pad_bits == 640  # ...same key


@pytest.mark.slow
def test_bench_row_at_the_default_block_size() -> None:
    row = bench.bench_auth_key_per_block()
    assert row["name"] == "auth.key_bits_per_block" and row["target"] == "<= 4096"
    assert isinstance(row["value"], float) and row["value"] <= TARGET_BITS
    assert f"{bench.default_block_detections():g} detections" in str(row["note"])


def test_min_psk_covers_the_bootstrap_attempts(tmp_path: Path) -> None:
    need = min_psk_bytes()
    assert need == 2 * BOOTSTRAP_ATTEMPTS * REGION_BYTES == 2560
    pool = AuthKeyPool.bootstrap(tmp_path / "p", bytes(need))
    for stream in ("t2r", "r2t"):
        assert pool.available_bytes(stream) == BOOTSTRAP_ATTEMPTS * REGION_BYTES  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="attempts"):
        min_psk_bytes(0)


def test_short_psk_refused_at_bootstrap_naming_the_minimum(tmp_path: Path) -> None:
    need = min_psk_bytes()
    with pytest.raises(ValueError, match=rf"holds {need - 1} bytes, need at least {need} bytes"):
        AuthKeyPool.bootstrap(tmp_path / "p", bytes(need - 1))
    with pytest.raises(ValueError, match=r"auth\.psk"):
        AuthKeyPool.bootstrap(tmp_path / "p", bytes(16))
    with pytest.raises(ValueError, match=r"/etc/x/auth\.psk holds 16 bytes"):
        AuthKeyPool.bootstrap(tmp_path / "p", bytes(16), source="/etc/x/auth.psk")
    assert not (tmp_path / "p").exists()


def test_config_check_refuses_a_short_psk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    psk = tmp_path / "auth.psk"
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        f'[node]\nid = "a"\nrole = "transmitter"\npeer_id = "b"\nstate_dir = "{tmp_path}"\n'
        f'[bus]\nallow_plaintext = true\n[protocol]\nauth_psk_file = "{psk}"\n'
    )
    args = argparse.Namespace(file=str(cfg), json=False, root=None)
    psk.write_bytes(bytes(1000))
    assert _check(args) == EXIT_USAGE
    err = capsys.readouterr().err
    assert str(psk) in err and "1000 bytes" in err and f"at least {min_psk_bytes()}" in err
    psk.write_bytes(bytes(min_psk_bytes()))
    assert _check(args) == EXIT_OK, capsys.readouterr().err
