"""Paths through the network: pure functions over what the adverts say.

The network is a directed graph: an edge X -> Y exists for a link between X and Y when
both sites' adverts are fresh and say the link is up; it carries X's key level (the key X
can draw to send over it). A relay of ``need_bits`` (keys plus tags) takes the path of
least cost among edges with at least that level, each hop costing its link's
configured ``cost`` (1 by default; more for a backup link) plus ``need / level`` (so a
path of fuller links wins between paths of equal cost); edges named in
``avoid`` (links that just failed) are left out. Ties break on site names, so every run
picks the same path.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Edge:
    """X -> Y over link ``link_id``: ``level_bits`` that X can draw, ``rate_bps``."""

    src: str
    dst: str
    link_id: str
    level_bits: int
    rate_bps: float = 0.0
    cost: float = 1.0


@dataclass
class Graph:
    """Sites and the usable directed edges between them."""

    sites: set[str] = field(default_factory=set)
    edges: dict[str, list[Edge]] = field(default_factory=dict)

    def add(self, edge: Edge) -> None:
        self.sites.update((edge.src, edge.dst))
        self.edges.setdefault(edge.src, []).append(edge)

    def edge(self, src: str, dst: str) -> Edge | None:
        for e in self.edges.get(src, []):
            if e.dst == dst:
                return e
        return None


@dataclass(frozen=True)
class Route:
    """A path (site names, origin first) and the links it crosses, in order."""

    sites: tuple[str, ...]
    links: tuple[str, ...]

    @property
    def hops(self) -> int:
        return len(self.links)


def shortest_route(
    graph: Graph,
    src: str,
    dst: str,
    *,
    need_bits: int,
    avoid: frozenset[str] = frozenset(),
    max_hops: int = 16,
) -> Route | None:
    """The cheapest route from ``src`` to ``dst`` whose every edge holds ``need_bits``
    and crosses no link in ``avoid``, with at most ``max_hops`` hops; None if there is
    none (or ``src == dst``)."""
    if src == dst:
        return None
    best: dict[str, float] = {src: 0.0}
    heap: list[tuple[float, int, tuple[str, ...], tuple[str, ...]]] = [(0.0, 0, (src,), ())]
    while heap:
        cost, hops, sites, links = heapq.heappop(heap)
        here = sites[-1]
        if here == dst:
            return Route(sites, links)
        if cost > best.get(here, float("inf")) or hops >= max_hops:
            continue
        for e in sorted(graph.edges.get(here, []), key=lambda e: (e.dst, e.link_id)):
            if e.link_id in avoid or e.level_bits < need_bits or e.dst in sites:
                continue
            step = e.cost + need_bits / max(e.level_bits, 1)
            total = cost + step
            if total < best.get(e.dst, float("inf")):
                best[e.dst] = total
                heapq.heappush(heap, (total, hops + 1, (*sites, e.dst), (*links, e.link_id)))
    return None
