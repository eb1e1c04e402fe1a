"""``moemerge inspect``: look at a model's experts before choosing how far to reduce it, one decoder layer in
memory at a time (pickle weights, which cannot be read one tensor at a time, are loaded whole)."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig

from moemerge.calibration import check_calibration_size, check_spec, load_calibration
from moemerge.checkpoint import inspect_source, load_source
from moemerge.checkpoint.source import load_tokenizer
from moemerge.defaults import CALIB_SAMPLES, CALIB_SEQ_LEN
from moemerge.errors import MoemergeError
from moemerge.evaluation.cost import parameter_counts
from moemerge.output_files import atomic_output, check_output
from moemerge.precision import compute_in_fastest, describe
from moemerge.progress import log, phase
from moemerge.report.figures import usage_matrix
from moemerge.report.page import write_report
from moemerge.statistics import collect_statistics
from moemerge.streaming.calibrate import LayerStream, layer_statistics


def architecture(name: str, model, family, config) -> dict:
    """Family, layer and expert counts, and where the parameters are, of a loaded model."""
    views = family.moe_layers(model)
    counts = parameter_counts(model, family)
    shared = sum(
        p.numel()
        for view in views
        for attr in ("shared_expert", "shared_experts", "shared_expert_gate")
        if hasattr(view.block, attr)
        for p in getattr(view.block, attr).parameters()
    )
    return {
        "model": name,
        "model_type": config.model_type,
        "decoder_layers": config.num_hidden_layers,
        "moe_layers": len(views),
        "experts": family.num_experts(config),
        "top_k": family.routing_rule(config).top_k,
        "shared_experts": any(view.has_shared_expert for view in views),
        "parameters": counts["parameters"],
        "expert_parameters": counts["expert_parameters"],
        "shared_expert_parameters": shared,
        "other_parameters": counts["parameters"] - counts["expert_parameters"] - shared,
        "active_parameters": counts["active_parameters"],
    }


def inspect(
    model: str | Path,
    out: str | Path,
    calib: list[str | None] | None = None,
    calib_samples: int = CALIB_SAMPLES,
    calib_seq_len: int = CALIB_SEQ_LEN,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "auto",
    force: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
) -> dict:
    """Calibrate ``model`` on each spec in ``calib`` (default: the bundled corpus) and write the report folder
    ``out`` (see :func:`moemerge.report.write_report`). Returns {"architecture", "usage": {calibration spec:
    {layer: [share of routing slots per expert]}}, "summary": the plain-text summary}."""
    specs = list(calib or [None])
    if len(set(specs)) != len(specs):
        raise MoemergeError("--calib names the same calibration set twice; give each once")
    for spec in specs:
        check_spec(spec)
    check_output(out, force, reads=(model, *specs))
    out = Path(out)
    source = inspect_source(model, allow_pickle=allow_pickle)
    config = AutoConfig.from_pretrained(source.path)
    check_calibration_size(calib_samples, calib_seq_len, config.max_position_embeddings)
    tokenizer, vocab = load_tokenizer(source), config.get_text_config().vocab_size
    calibrations = [load_calibration(spec, tokenizer, calib_samples, calib_seq_len, seed, vocab) for spec in specs]
    what = " and ".join(f"{c.num_tokens:,} tokens of {c.spec}" for c in calibrations)
    if source.uses_pickle:  # pickle weights cannot be read one tensor at a time
        with phase(f"loading {source.path}"):
            loaded, _ = load_source(source, dtype=dtype, device=device)
            compute_in_fastest(loaded)
        layers = source.family.moe_layers(loaded)
        _check_has_moe_layers(layers, source)
        with phase(f"statistics on {what}"):
            found = [
                collect_statistics(loaded, layers, c.sequences, {"router_logit_features"}, progress=progress)
                for c in calibrations
            ]
    else:
        stream = LayerStream(source, config, dtype, device)
        log.info(describe(stream.storage, stream.compute))
        loaded = stream.skeleton
        views = {view.layer: view for view in source.family.moe_layers(loaded)}
        _check_has_moe_layers(views, source)
        with phase(f"statistics on {what}, one decoder layer at a time"):
            sets = [c.sequences for c in calibrations]
            found = layer_statistics(stream, views, sets, {"router_logit_features"}, progress)
    stats_by_set = {c.spec: stats for c, stats in zip(calibrations, found, strict=True)}
    info = architecture(str(model), loaded, source.family, config)
    with atomic_output(out, force) as tmp, phase(f"report {out}"):
        summary = write_report(tmp, info, stats_by_set, progress=progress)
    usage = {
        name: {layer: row.tolist() for layer, row in zip(stats, usage_matrix(stats), strict=True)}
        for name, stats in stats_by_set.items()
    }
    return {"architecture": info, "usage": usage, "summary": summary}


def _check_has_moe_layers(layers, source) -> None:
    if not layers:
        raise MoemergeError(f"{source.path} has no MoE layers (every layer is dense): nothing to inspect")
