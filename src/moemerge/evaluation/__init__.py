"""Evaluation: perplexity, fidelity to the original, cluster quality, zero-shot accuracy and cost."""

from moemerge.evaluation.cluster_quality import cluster_quality, group_labels
from moemerge.evaluation.cost import parameter_counts
from moemerge.evaluation.evaluate import evaluate
from moemerge.evaluation.fidelity import fidelity
from moemerge.evaluation.perplexity import perplexity, windows

__all__ = [
    "cluster_quality",
    "evaluate",
    "fidelity",
    "group_labels",
    "parameter_counts",
    "perplexity",
    "windows",
]
