"""The report's pictures (matplotlib, no display needed): expert usage heatmaps and one figure per MoE layer.

Every function draws on a fresh ``Figure`` and saves a PNG without a timestamp, so the same statistics give
byte-identical files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy.cluster.hierarchy import dendrogram, linkage
from scipy.spatial.distance import pdist, squareform

from moemerge.statistics import LayerStatistics

GROUP_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")


def save(fig: Figure, path: Path) -> None:
    fig.savefig(path, metadata={"Software": None})


def usage_matrix(stats: dict[int, LayerStatistics]) -> np.ndarray:
    """[MoE layers, n] share of each layer's top-k routing slots that each expert got (rows sum to 1)."""
    counts = np.stack([s.counts.double().numpy() for s in stats.values()])
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)


def usage_heatmaps(stats_by_set: dict[str, dict[int, LayerStatistics]], path: Path) -> None:
    """One heatmap (MoE layers x experts, share of routing slots in %) per calibration set, stacked, on one
    colour scale."""
    matrices = {name: 100 * usage_matrix(stats) for name, stats in stats_by_set.items()}
    layers = list(next(iter(stats_by_set.values())))
    n = next(iter(matrices.values())).shape[1]
    vmax = max(m.max() for m in matrices.values())
    height = (1.4 + 0.32 * len(layers)) * len(matrices) + 0.4
    fig = Figure(figsize=(min(5 + 0.35 * n, 16), height), dpi=100, layout="constrained")
    axes = fig.subplots(len(matrices), 1, squeeze=False)[:, 0]
    for ax, (name, matrix) in zip(axes, matrices.items(), strict=True):
        image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"expert usage, calibration: {name}", fontsize=10)
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer (decoder index)")
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
        ax.set_xticks(range(n), [str(j) for j in range(n)], fontsize=7 if n <= 64 else 4, rotation=90 if n > 32 else 0)
    fig.colorbar(image, ax=axes.tolist(), label="% of top-k routing slots")
    save(fig, path)


def expert_distances(stats: LayerStatistics) -> np.ndarray:
    """[n, n] Euclidean distances between the experts' mean outputs (HC-SMoE's feature)."""
    return squareform(pdist(stats.mean_output.double().numpy()))


def router_similarity(stats: LayerStatistics) -> np.ndarray | None:
    """[n, n] cosine similarity of the experts' router logits over all calibration tokens, or None if not kept."""
    if stats.router_logit_features is None:
        return None
    logits = stats.router_logit_features.double().numpy()
    unit = logits / np.maximum(np.linalg.norm(logits, axis=1, keepdims=True), 1e-12)
    return unit @ unit.T


def layer_figure(
    stats: LayerStatistics,
    path: Path,
    linkage_method: str = "average",
    groups: list[list[int]] | None = None,
) -> None:
    """Expert-output distances, router-logit similarity (when kept) and the hierarchical-clustering dendrogram
    of one MoE layer; with ``groups``, each leaf label is coloured by its group."""
    n = stats.mean_output.shape[0]
    similarity = router_similarity(stats)
    panels = 3 if similarity is not None else 2
    fig = Figure(figsize=(5.2 * panels, 4.6), dpi=100, layout="constrained")
    fig.get_layout_engine().set(wspace=0.06)
    axes = fig.subplots(1, panels)
    ticks = dict(fontsize=7 if n <= 32 else 4)
    distances = expert_distances(stats)
    image = axes[0].imshow(distances, cmap="magma_r", interpolation="nearest")
    axes[0].set_title(f"layer {stats.layer}: distance of mean expert outputs", fontsize=10)
    fig.colorbar(image, ax=axes[0], shrink=0.8, label="Euclidean distance")
    panel = 1
    if similarity is not None:
        image = axes[1].imshow(similarity, cmap="coolwarm", vmin=-1, vmax=1, interpolation="nearest")
        axes[1].set_title(f"layer {stats.layer}: router-logit cosine similarity", fontsize=10)
        fig.colorbar(image, ax=axes[1], shrink=0.8, label="cosine similarity")
        panel = 2
    for ax in axes[:panel]:
        ax.set_xlabel("expert")
        ax.set_ylabel("expert")
        if n <= 64:
            ax.set_xticks(range(n), [str(j) for j in range(n)], **ticks, rotation=90 if n > 16 else 0)
            ax.set_yticks(range(n), [str(j) for j in range(n)], **ticks)
    tree_ax = axes[panel]
    if n > 1:
        tree = linkage(stats.mean_output.double().numpy(), method=linkage_method, metric="euclidean")
        dendrogram(
            tree, ax=tree_ax, labels=[str(j) for j in range(n)], color_threshold=0, above_threshold_color="black"
        )
        tree_ax.tick_params(axis="x", labelsize=ticks["fontsize"])
    colour = {}
    if groups is not None:
        colour = {j: GROUP_COLOURS[g % len(GROUP_COLOURS)] for g, members in enumerate(groups) for j in members}
        for label in tree_ax.get_xticklabels():
            label.set_color(colour.get(int(label.get_text()), "lightgrey"))
            label.set_fontweight("bold")
            label.set_fontsize(11 if n <= 16 else ticks["fontsize"] + 1)
    title = f"layer {stats.layer}: {linkage_method}-linkage dendrogram"
    tree_ax.set_title(title + (f", colours: {len(groups)} groups" if groups else ""), fontsize=10)
    tree_ax.set_xlabel("expert" + (" (grey: dropped)" if groups is not None and len(colour) < n else ""))
    tree_ax.set_ylabel("merge distance")
    save(fig, path)
