"""The report folder: PNGs, ``summary.txt`` (also printed by the CLI) and ``report.html`` that shows them.

The HTML has no scripts, styles from elsewhere or absolute paths: the folder can be moved, zipped or served as is.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from moemerge.report.figures import expert_distances, layer_figure, usage_heatmaps, usage_matrix
from moemerge.statistics import LayerStatistics

USAGE_PNG = "usage.png"


def summary_text(
    architecture: dict,
    stats_by_set: dict[str, dict[int, LayerStatistics]],
    groups: dict[int, list[list[int]]] | None = None,
) -> str:
    """Plain-text summary: the architecture, then per MoE layer its usage extremes and closest experts."""
    a = architecture
    shared = "yes" if a["shared_experts"] else "no"
    lines = [
        f"{a['model']}: {a['model_type']}, {a['decoder_layers']} decoder layers, {a['moe_layers']} MoE layers, "
        f"{a['experts']} experts per layer, top-{a['top_k']}, shared expert: {shared}",
        f"parameters: {a['parameters']:,} total, {a['expert_parameters']:,} in routed experts "
        f"({100 * a['expert_parameters'] / a['parameters']:.1f} %), {a['other_parameters']:,} elsewhere",
    ]
    for name, stats in stats_by_set.items():
        tokens = next(iter(stats.values())).num_tokens
        lines.append(f"calibration {name}: {tokens:,} tokens; per MoE layer, share of the top-k routing slots:")
        usage = usage_matrix(stats)
        for (layer, layer_stats), row in zip(stats.items(), usage, strict=True):
            entropy = -sum(p * math.log(p) for p in row if p > 0) / math.log(len(row)) if len(row) > 1 else 1.0
            distances = expert_distances(layer_stats) + np.diag(np.full(len(row), np.inf))
            i, j = np.unravel_index(np.argmin(distances), distances.shape)
            line = (
                f"  layer {layer}: most used {row.argmax()} ({100 * row.max():.1f} %), least used {row.argmin()} "
                f"({100 * row.min():.1f} %), usage entropy {entropy:.2f} of 1; closest outputs: experts {min(i, j)} "
                f"and {max(i, j)} ({distances[i, j]:.3g})"
            )
            if groups is not None and layer in groups:
                line += f"; groups {groups[layer]}"
            lines.append(line)
    return "\n".join(lines)


def write_report(
    out: Path,
    architecture: dict,
    stats_by_set: dict[str, dict[int, LayerStatistics]],
    groups: dict[int, list[list[int]]] | None = None,
    linkage_method: str = "average",
    title: str = "moemerge inspect",
    progress: bool = False,
) -> str:
    """Write the figures, ``summary.txt`` and ``report.html`` into the folder ``out``; return the summary.

    The per-layer figures use the first calibration set; ``groups`` (from a reduction) colour the dendrograms.
    """
    out.mkdir(parents=True, exist_ok=True)
    summary = summary_text(architecture, stats_by_set, groups)
    (out / "summary.txt").write_text(summary + "\n", encoding="utf-8")
    usage_heatmaps(stats_by_set, out / USAGE_PNG)
    first = next(iter(stats_by_set.values()))
    layer_pngs = []
    for layer, stats in tqdm(first.items(), desc="report", unit="layer", disable=not progress):
        name = f"layer_{layer:03d}.png"
        layer_figure(stats, out / name, linkage_method, None if groups is None else groups.get(layer))
        layer_pngs.append((layer, name))
    sets = ", ".join(stats_by_set)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}: {html.escape(architecture['model'])}</title>",
        "<style>body{font-family:sans-serif;max-width:1600px;margin:1em auto;padding:0 1em}"
        "img{max-width:100%;border:1px solid #ddd;margin:0.5em 0}td,th{padding:2px 10px;text-align:left}"
        "pre{background:#f6f6f6;padding:0.8em;overflow-x:auto}</style></head><body>",
        f"<h1>{html.escape(title)}: {html.escape(architecture['model'])}</h1>",
        "<h2>Architecture</h2><table>",
        *(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_cell(v))}</td></tr>" for k, v in architecture.items()),
        "</table>",
        "<h2>Summary</h2>",
        f"<pre>{html.escape(summary)}</pre>",
        f"<h2>Expert usage per layer (calibration: {html.escape(sets)})</h2>",
        f'<img src="{USAGE_PNG}" alt="expert usage heatmap">',
        "<h2>Per MoE layer: expert-output distances, router-logit similarity, dendrogram</h2>",
        *(f'<h3>Layer {layer}</h3><img src="{name}" alt="layer {layer}">' for layer, name in layer_pngs),
        "</body></html>",
    ]
    (out / "report.html").write_text("\n".join(parts) + "\n", encoding="utf-8")
    return summary


def _cell(value) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
