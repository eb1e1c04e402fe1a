"""Layer-by-layer reduction, memory of about one decoder layer whatever the depth, resumable after interruption
(``moemerge reduce``)."""

from moemerge.streaming.driver import reduce, reduce_streaming

__all__ = ["reduce", "reduce_streaming"]
