"""Record a TagBlock stream to a file, and replay a file as a virtual time tagger.

File format "QKDTAGS" version 1 (little-endian throughout)::

    magic     8 bytes   b"QKDTAGS1"
    hlen      uint32    length of the JSON header that follows
    header    hlen      UTF-8 JSON: {"version": 1, "channels": [...], "metadata": {...}}
    blocks    repeated until end of file:
        n_tags        uint64
        overflow      uint8  (0/1)
        missed_events uint64
        start_ps      int64
        stop_ps       int64
        tags          n_tags records of TAG_DTYPE packed: channel int16, time_ps int64

A file cut short (recorder killed) is read up to its last complete block.
"""

from __future__ import annotations

import json
import math
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt
from pydantic import Field

from drivers.common import DriverOptions, health_check
from drivers.errors import DriverConfigError, NotConnectedError, OutOfRangeError, ProtocolError
from drivers.interfaces import TAG_DTYPE, HealthLevel, InstrumentHealth, TagBlock, TimeTagger

MAGIC = b"QKDTAGS1"
_BLOCK_HEAD = struct.Struct("<QBQqq")
#: TAG_DTYPE packed little-endian, as stored on disk.
FILE_TAG_DTYPE = np.dtype([("channel", "<i2"), ("time_ps", "<i8")])


class TagFileWriter:
    """Appends TagBlocks to a tag file. Use as a context manager or call :meth:`close`."""

    def __init__(
        self, path: str | Path, channels: list[int], metadata: dict[str, Any] | None = None
    ) -> None:
        self.path = Path(path)
        self._fh: BinaryIO = self.path.open("wb")
        header = json.dumps(
            {"version": 1, "channels": list(channels), "metadata": metadata or {}}
        ).encode()
        self._fh.write(MAGIC + struct.pack("<I", len(header)) + header)
        self.blocks_written = 0
        self.tags_written = 0

    def write_block(self, block: TagBlock) -> None:
        tags = np.asarray(block.tags).astype(FILE_TAG_DTYPE, copy=False)
        self._fh.write(
            _BLOCK_HEAD.pack(
                len(tags), int(block.overflow), block.missed_events, block.start_ps, block.stop_ps
            )
        )
        self._fh.write(np.ascontiguousarray(tags).tobytes())
        self.blocks_written += 1
        self.tags_written += len(tags)

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> TagFileWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: Longest JSON header a reader accepts (a corrupted length must not allocate gigabytes).
MAX_HEADER_BYTES = 1 << 20


def read_header(fh: BinaryIO, source: str) -> dict[str, Any]:
    """The JSON header after the magic; :class:`ProtocolError` names what is wrong with a
    file that is not a tag file, is cut inside its header, or has a header that is not
    ``{"version": 1, "channels": [int, ...], ...}``."""
    magic = fh.read(len(MAGIC))
    if magic != MAGIC:
        raise ProtocolError(source, "read header", f"not a tag file (magic {magic!r})")
    raw_len = fh.read(4)
    if len(raw_len) < 4:
        raise ProtocolError(source, "read header", "file ends inside the header length")
    (hlen,) = struct.unpack("<I", raw_len)
    if hlen > MAX_HEADER_BYTES:
        raise ProtocolError(
            source, "read header", f"header length {hlen} bytes above {MAX_HEADER_BYTES}"
        )
    raw = fh.read(hlen)
    if len(raw) < hlen:
        raise ProtocolError(source, "read header", f"file ends inside the {hlen}-byte header")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(source, "read header", f"header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(source, "read header", f"header is not an object: {header!r:.60}")
    if header.get("version") != 1:
        raise ProtocolError(source, "read header", f"unsupported version {header.get('version')!r}")
    channels = header.get("channels")
    if not isinstance(channels, list) or not all(
        isinstance(c, int) and not isinstance(c, bool) for c in channels
    ):
        raise ProtocolError(source, "read header", f"channels {channels!r:.60} not a list of int")
    return header


def iter_blocks(fh: BinaryIO) -> Iterator[TagBlock]:
    """Blocks from the current position to the last complete one (a block whose tag count
    runs past the end of the file ends the stream: the file was cut short)."""
    pos = fh.tell()
    end = fh.seek(0, 2)
    fh.seek(pos)
    while True:
        head = fh.read(_BLOCK_HEAD.size)
        if len(head) < _BLOCK_HEAD.size:
            return
        n, overflow, missed, start_ps, stop_ps = _BLOCK_HEAD.unpack(head)
        if n * FILE_TAG_DTYPE.itemsize > end - fh.tell():
            return
        raw = fh.read(n * FILE_TAG_DTYPE.itemsize)
        if len(raw) < n * FILE_TAG_DTYPE.itemsize:
            return
        tags = np.frombuffer(raw, dtype=FILE_TAG_DTYPE).astype(TAG_DTYPE)
        yield TagBlock(tags, bool(overflow), missed, start_ps, stop_ps)


def read_tag_file(path: str | Path) -> tuple[dict[str, Any], list[TagBlock]]:
    """Header and every complete block of a tag file."""
    with Path(path).open("rb") as fh:
        header = read_header(fh, str(path))
        return header, list(iter_blocks(fh))


def record(tagger: TimeTagger, path: str | Path, max_blocks: int, timeout_s: float = 1.0) -> int:
    """Stream ``max_blocks`` blocks (or until a read times out) from ``tagger`` into ``path``.

    Returns the number of tags written. The tagger's stream is started and stopped here.
    """
    with TagFileWriter(path, tagger.channels(), {"source": tagger.name}) as writer:
        tagger.start_stream()
        try:
            for _ in range(max_blocks):
                block = tagger.read_block(timeout_s)
                if block is None:
                    break
                writer.write_block(block)
        finally:
            tagger.stop_stream()
        return writer.tags_written


class TagFileReplayOptions(DriverOptions):
    loop: bool = Field(False, description="start again at the first block after the last")
    realtime: bool = Field(False, description="pace blocks by their start_ps/stop_ps span")


class TagFileReplayTagger(TimeTagger):
    """A virtual tagger replaying a tag file; ``resource`` is the file path.

    Input delays shift a channel's tag times (blocks are re-sorted after the shift);
    trigger levels are stored only (a recording cannot be re-discriminated).
    """

    Options = TagFileReplayOptions

    def __init__(
        self,
        name: str,
        resource: str,
        timeout_s: float = 2.0,
        options: TagFileReplayOptions | None = None,
    ) -> None:
        self.name = name
        self.path = Path(resource)
        self.options = options or TagFileReplayOptions()
        self._lock = threading.RLock()
        self._header: dict[str, Any] | None = None
        self._blocks: list[TagBlock] = []
        self._pos = 0
        self._streaming = False
        self._delays: dict[int, int] = {}
        self._levels: dict[int, float] = {}
        self._rates: dict[int, float] = {}
        self._wall_start = 0.0

    def _require(self, command: str) -> dict[str, Any]:
        if self._header is None:
            raise NotConnectedError(self.name, command, "not connected")
        return self._header

    def _check_channel(self, command: str, channel: int) -> None:
        if channel not in self.channels():
            raise DriverConfigError(
                self.name, command, f"channel {channel} not in {self.channels()}"
            )

    def connect(self) -> None:
        with self._lock:
            if self._header is not None:
                return
            if not self.path.is_file():
                raise DriverConfigError(self.name, "resource", f"no tag file at {self.path}")
            header, blocks = read_tag_file(self.path)
            self._header, self._blocks = header, blocks

    def close(self) -> None:
        with self._lock:
            self._streaming = False
            self._header = None
            self._blocks = []

    def identify(self) -> str:
        header = self._require("identify")
        n = len(self._blocks)
        return f"qkdnode tag-file replay,{self.path.name},{n} blocks,v{header['version']}"

    def safe_state(self) -> None:
        self._streaming = False

    def health(self) -> InstrumentHealth:
        def probe() -> InstrumentHealth:
            self._require("health")
            return InstrumentHealth(HealthLevel.OK, f"{len(self._blocks)} blocks loaded")

        return health_check(self.name, probe)

    def channels(self) -> list[int]:
        return [int(c) for c in self._require("channels")["channels"]]

    def set_input_delay_ps(self, channel: int, delay_ps: int) -> None:
        self._check_channel("set_input_delay_ps", channel)
        self._delays[channel] = int(delay_ps)

    def input_delay_ps(self, channel: int) -> int:
        self._check_channel("input_delay_ps", channel)
        return self._delays.get(channel, 0)

    def set_trigger_level_v(self, channel: int, level_v: float) -> None:
        self._check_channel("set_trigger_level_v", channel)
        self._levels[channel] = float(level_v)

    def trigger_level_v(self, channel: int) -> float:
        self._check_channel("trigger_level_v", channel)
        return self._levels.get(channel, 0.5)

    def start_stream(self) -> None:
        with self._lock:
            self._require("start_stream")
            self._pos = 0
            self._streaming = True
            self._wall_start = time.monotonic()

    def stop_stream(self) -> None:
        self._streaming = False

    def read_block(self, timeout_s: float) -> TagBlock | None:
        """Next block; a ``timeout_s`` below zero waits not at all (NaN is refused)."""
        if math.isnan(timeout_s):
            raise OutOfRangeError(self.name, "read_block", "timeout_s is NaN")
        timeout_s = max(0.0, float(timeout_s))
        with self._lock:
            self._require("read_block")
            if not self._streaming or not self._blocks:
                time.sleep(min(timeout_s, 0.01))
                return None
            if self._pos >= len(self._blocks):
                if not self.options.loop:
                    return None
                self._pos = 0
            block = self._blocks[self._pos]
            self._pos += 1
        if self.options.realtime:
            first_start = self._blocks[0].start_ps
            due = self._wall_start + (block.stop_ps - first_start) * 1e-12
            wait = due - time.monotonic()
            if wait > timeout_s:
                with self._lock:
                    self._pos -= 1
                time.sleep(timeout_s)
                return None
            if wait > 0:
                time.sleep(wait)
        out = TagBlock(
            self._apply_delays(block.tags),
            block.overflow,
            block.missed_events,
            block.start_ps,
            block.stop_ps,
        )
        self._update_rates(out)
        return out

    def _apply_delays(self, tags: npt.NDArray[np.void]) -> npt.NDArray[np.void]:
        if not any(self._delays.values()):
            return tags.copy()
        out = tags.copy()
        for channel, delay in self._delays.items():
            out["time_ps"][out["channel"] == channel] += delay
        order = np.argsort(out["time_ps"], kind="stable")
        return out[order]

    def _update_rates(self, block: TagBlock) -> None:
        span_s = (block.stop_ps - block.start_ps) * 1e-12
        if span_s <= 0:
            return
        chans, counts = np.unique(block.tags["channel"], return_counts=True)
        rates = dict.fromkeys(self.channels(), 0.0)
        rates.update({int(c): float(n) / span_s for c, n in zip(chans, counts, strict=True)})
        self._rates = rates

    def count_rates_hz(self) -> dict[int, float]:
        self._require("count_rates_hz")
        return dict(self._rates) if self._rates else dict.fromkeys(self.channels(), 0.0)
