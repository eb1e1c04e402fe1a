"""Layer-by-layer reduction of models larger than memory, resumable after interruption (``reduce --stream``)."""

from moemerge.streaming.reduce import reduce_streaming

__all__ = ["reduce_streaming"]
