"""moemerge: make sparse Mixture-of-Experts language models smaller by merging experts, without retraining.

Python API: :func:`reduce` (the ``moemerge reduce`` command) and :func:`load_model`.
"""

from moemerge.checkpoint import load_model
from moemerge.errors import MoemergeError
from moemerge.pipeline import ReduceResult, apply_groups, plan_groups, reduce

__all__ = ["MoemergeError", "ReduceResult", "apply_groups", "load_model", "plan_groups", "reduce"]
