"""moemerge: make sparse Mixture-of-Experts language models smaller by merging experts, without retraining.

Python API: :func:`reduce` (the ``moemerge reduce`` command), :func:`plan_recipe` / :func:`apply_recipe`
(``plan`` / ``apply``), :func:`inspect` and :func:`load_model`.
"""

from moemerge.checkpoint import load_model
from moemerge.errors import MoemergeError
from moemerge.pipeline import ReduceResult, apply_groups, plan_groups
from moemerge.recipes import apply_recipe, plan_recipe
from moemerge.report import inspect
from moemerge.streaming import reduce

__all__ = [
    "MoemergeError",
    "ReduceResult",
    "apply_groups",
    "apply_recipe",
    "inspect",
    "load_model",
    "plan_groups",
    "plan_recipe",
    "reduce",
]
