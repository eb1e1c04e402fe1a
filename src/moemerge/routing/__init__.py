"""Routing after a reduction: new router rows (``--router reduce``) or the original router kept (``grouped``)."""

from moemerge.routing.grouped import GroupedRouter, expert_map
from moemerge.routing.router_rows import router_rows

__all__ = ["GroupedRouter", "expert_map", "router_rows"]
