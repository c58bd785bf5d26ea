from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from drivers.errors import DriverConfigError, DriverUnavailableError, ProtocolError
from drivers.interfaces import TAG_DTYPE, TagBlock
from drivers.swabian import SwabianTimeTagger
from drivers.timetag_file import (
    TagFileReplayOptions,
    TagFileReplayTagger,
    TagFileWriter,
    read_tag_file,
    record,
)


def _block(k: int, n: int = 100, overflow: bool = False) -> TagBlock:
    rng = np.random.default_rng(k)
    tags = np.zeros(n, dtype=TAG_DTYPE)
    tags["channel"] = rng.integers(1, 5, n)
    tags["time_ps"] = np.sort(rng.integers(k * 10**9, (k + 1) * 10**9, n))
    return TagBlock(tags, overflow, 3 if overflow else 0, k * 10**9, (k + 1) * 10**9)


def _write(path: Path, blocks: list[TagBlock]) -> None:
    with TagFileWriter(path, [1, 2, 3, 4], {"note": "test"}) as w:
        for b in blocks:
            w.write_block(b)


def test_roundtrip_and_truncated_file(tmp_path: Path) -> None:
    blocks = [_block(k, overflow=k == 1) for k in range(3)]
    path = tmp_path / "a.qkdtags"
    _write(path, blocks)
    header, got = read_tag_file(path)
    assert header["channels"] == [1, 2, 3, 4] and header["metadata"] == {"note": "test"}
    assert len(got) == 3
    for a, b in zip(blocks, got, strict=True):
        assert np.array_equal(a.tags, b.tags) and b.tags.dtype == TAG_DTYPE
        assert (a.overflow, a.missed_events, a.start_ps, a.stop_ps) == (
            b.overflow,
            b.missed_events,
            b.start_ps,
            b.stop_ps,
        )
    data = path.read_bytes()
    path.write_bytes(data[:-7])  # recorder killed mid-block
    assert len(read_tag_file(path)[1]) == 2
    path.write_bytes(b"NOTATAGFILE")
    with pytest.raises(ProtocolError, match="not a tag file"):
        read_tag_file(path)


def test_record_from_a_replay_and_loop(tmp_path: Path) -> None:
    src = tmp_path / "src.qkdtags"
    _write(src, [_block(k) for k in range(4)])
    player = TagFileReplayTagger("tt", str(src))
    player.connect()
    assert record(player, tmp_path / "copy.qkdtags", max_blocks=10, timeout_s=0.05) == 400
    assert [len(b) for b in read_tag_file(tmp_path / "copy.qkdtags")[1]] == [100] * 4
    looping = TagFileReplayTagger("tt", str(src), options=TagFileReplayOptions(loop=True))
    looping.connect()
    looping.start_stream()
    assert sum(len(looping.read_block(0.1) or []) for _ in range(6)) == 600
    with pytest.raises(DriverConfigError):
        looping.set_input_delay_ps(9, 1)


def test_realtime_pacing(tmp_path: Path) -> None:
    src = tmp_path / "rt.qkdtags"
    tags = np.zeros(1, dtype=TAG_DTYPE)
    _write(src, [TagBlock(tags, start_ps=0, stop_ps=int(0.2e12))])
    player = TagFileReplayTagger("tt", str(src), options=TagFileReplayOptions(realtime=True))
    player.connect()
    player.start_stream()
    assert player.read_block(0.05) is None  # not due yet
    assert player.read_block(1.0) is not None


def test_missing_file_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(DriverConfigError, match="no tag file"):
        TagFileReplayTagger("tt", str(tmp_path / "nope")).connect()


@pytest.mark.skipif(
    importlib.util.find_spec("TimeTagger") is not None, reason="vendor package installed"
)
def test_swabian_unavailable_is_clear() -> None:
    tagger = SwabianTimeTagger("tt0", "")
    with pytest.raises(DriverUnavailableError, match="TimeTagger Python package is not installed"):
        tagger.connect()
    assert tagger.health().level.name == "FAULT"
    tagger.safe_state()
    tagger.close()
