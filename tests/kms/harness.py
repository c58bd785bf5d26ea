"""The in-process network of key managers the tests run on (:mod:`qkdnode.kms.loopnet`)."""

from __future__ import annotations

from qkdnode.kms.loopnet import KEY_SIZE_BITS, ChannelPort, Link, build, free_port
from qkdnode.kms.loopnet import LoopNet as Net

__all__ = ["KEY_SIZE_BITS", "ChannelPort", "Link", "Net", "build", "free_port"]
