"""``moemerge eval``: quality, fidelity, cluster quality and cost of one model, as one JSON-able dict."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from transformers import AutoConfig

from moemerge.calibration import check_spec, load_tokens
from moemerge.checkpoint import inspect_source
from moemerge.checkpoint.identity import config_sha256, weights_sha256
from moemerge.checkpoint.loader import load_model
from moemerge.checkpoint.model_files import read_record
from moemerge.checkpoint.source import has_tokenizer, load_tokenizer
from moemerge.defaults import EVAL_MAX_TOKENS, EVAL_SEQ_LEN
from moemerge.errors import MoemergeError
from moemerge.evaluation.cluster_quality import cluster_quality, group_labels
from moemerge.evaluation.cost import bytes_on_disk, measure_in_fresh_process, parameter_counts
from moemerge.evaluation.fidelity import fidelity
from moemerge.evaluation.perplexity import perplexity, windows
from moemerge.precision import compute_in_fastest
from moemerge.progress import log
from moemerge.statistics import LayerStatistics, collect_statistics
from moemerge.streaming.calibrate import LayerStream
from moemerge.streaming.measure import Candidate, measure_layer_by_layer


def evaluate(
    model: str | Path,
    reference: str | Path | None = None,
    data: str | None = None,
    max_tokens: int = EVAL_MAX_TOKENS,
    seq_len: int = EVAL_SEQ_LEN,
    tasks: tuple[str, ...] = (),
    limit: int | None = None,
    tasks_source: str = "local",
    batch_size: int = 8,
    cost: bool = True,
    dtype: str = "auto",
    device: str = "cpu",
    allow_pickle: bool = False,
    progress: bool = True,
) -> dict:
    """Evaluate the model in directory ``model`` (an original, ``reduce``d or ``grouped`` output).

    Perplexity on the first ``max_tokens`` tokens of ``data`` (any ``--calib`` spec; default the
    bundled calibration corpus, which is *not* held-out text) in windows of ``seq_len``; with a
    ``reference`` (the original model): its perplexity on the same tokens, fidelity, and for a
    moemerge output the cluster quality of its groups on the reference's expert outputs; zero-shot
    accuracy on ``tasks`` through lm-evaluation-harness; and cost. All input is checked first, the
    ``reference`` against the source identity a moemerge output records (:func:`check_reference`).

    The models are read one decoder layer at a time (:mod:`moemerge.streaming.measure`), except for zero-shot
    tasks and pickle weights, which need the whole model in memory; the phase log says which. ``cost`` measures
    memory and speed in a process that loads the whole model.
    """
    check_evaluation(data, max_tokens, seq_len, tasks, limit, tasks_source, batch_size)
    source = inspect_source(model, allow_pickle=allow_pickle, compact=True)
    check_tokenizer_for_tasks(source, tasks)
    reference_source = (
        inspect_source(reference, allow_pickle=allow_pickle, compact=True) if reference is not None else None
    )
    if reference_source is not None:
        check_reference(source, reference_source)
    start = time.perf_counter()
    tokenizer = load_tokenizer(source)
    windows = (tokenizer, data, max_tokens, seq_len)
    whole = whole_model_reason([s for s in (source, reference_source) if s is not None], tasks)
    if whole is None:
        measured, costed = _layer_by_layer(source, reference_source, windows, dtype, device, progress)
    else:
        log.info("%s: loading the whole model", whole)
        evaluation = (tasks, limit, tasks_source, batch_size)
        loading = (dtype, device, allow_pickle)
        measured, costed = _whole(source, reference_source, windows, evaluation, loading, progress)
    result = {"model": str(model), "reference": None if reference is None else str(reference)} | measured
    if cost:
        result["cost"] = parameter_counts(costed, source.family) | {"bytes_on_disk": bytes_on_disk(source.path)}
        result["cost"] |= measure_in_fresh_process(source.path, dtype, device, allow_pickle)
    result["seconds"] = time.perf_counter() - start
    return result


def whole_model_reason(sources: list, tasks: tuple[str, ...]) -> str | None:
    """Why a measurement of ``sources`` (checked model folders) must load each whole model, or None when it can
    read them one decoder layer at a time."""
    if tasks:
        return "zero-shot tasks run the whole model through lm-evaluation-harness"
    pickled = [str(s.path) for s in sources if s.uses_pickle]
    if pickled:
        return f"{' and '.join(pickled)} hold pickle weights, which cannot be read one layer at a time"
    return None


def _data_record(text, seq_len: int) -> dict:
    return {"data": {"spec": text.spec, "tokens": text.num_tokens, "seq_len": seq_len, "sha256": text.sha256()}}


def _layer_by_layer(source, reference_source, windows: tuple, dtype: str, device: str, progress: bool):
    """(the measurements of :func:`evaluate` but cost, the model on the meta device to count its parameters), one
    decoder layer at a time."""
    stream = LayerStream(source, AutoConfig.from_pretrained(source.path), dtype, device, grouped=True)
    costed = stream.meta_model()
    text, seq_len, chunks = evaluation_windows(stream.skeleton, *windows)
    result = _data_record(text, seq_len)
    if reference_source is None:
        own, _, _ = measure_layer_by_layer(stream, source.family, chunks, {}, progress=progress)
        return result | {"perplexity": own["perplexity"]}, costed
    config = AutoConfig.from_pretrained(reference_source.path)
    original = LayerStream(reference_source, config, dtype, device, grouped=True)
    labels = hard_group_labels(source.path, source.family.num_experts(config))
    model = Candidate(stream=stream)
    ref, measured, stats = measure_layer_by_layer(
        original, source.family, chunks, {"model": model}, statistics=labels is not None, progress=progress
    )
    own = measured["model"]
    result |= {"perplexity": own["perplexity"], "reference_perplexity": ref["perplexity"], "fidelity": own["fidelity"]}
    if labels is not None:
        result["cluster_quality"] = groups_quality(stats, labels)
    return result, costed


def _whole(source, reference_source, windows: tuple, evaluation: tuple, loading: tuple, progress: bool):
    """(the measurements of :func:`evaluate` but cost, the loaded model), each model loaded whole (``loading``:
    :func:`moemerge.load_model`'s dtype, device and allow_pickle)."""
    loaded = load_model(source.path, *loading)
    compute_in_fastest(loaded)
    text, seq_len, chunks = evaluation_windows(loaded, *windows)
    result = _data_record(text, seq_len)
    original = None
    if reference_source is not None:
        original = load_model(reference_source.path, *loading)
        compute_in_fastest(original)
    result |= measure(loaded, windows[0], source.family, chunks, original, *evaluation)
    if original is not None:
        views = source.family.moe_layers(original)
        labels = hard_group_labels(source.path, views[0].num_experts)
        if labels is not None:
            stats = collect_statistics(original, views, chunks, progress=progress)
            result["cluster_quality"] = groups_quality(stats, labels)
    return result, loaded


def evaluation_windows(model, tokenizer, data: str | None, max_tokens: int, seq_len: int):
    """(the first ``max_tokens`` tokens of ``data``, the window length used: ``seq_len`` capped at the model's
    context, those tokens cut into windows of it) for perplexity and fidelity."""
    text = load_tokens(data, tokenizer, max_tokens, model.get_input_embeddings().num_embeddings)
    seq_len = min(seq_len, getattr(model.config, "max_position_embeddings", seq_len))
    return text, seq_len, windows(text.sequences[0], seq_len)


def check_evaluation(
    data: str | None,
    max_tokens: int,
    seq_len: int,
    tasks: tuple[str, ...],
    limit: int | None,
    tasks_source: str,
    batch_size: int = 8,
) -> None:
    """Raise MoemergeError for evaluation options that cannot work, before any model is loaded."""
    if max_tokens < 2 or seq_len < 2:
        raise MoemergeError(f"--max-tokens ({max_tokens}) and --seq-len ({seq_len}) must be at least 2")
    if (limit is not None and limit < 1) or batch_size < 1:
        raise MoemergeError(f"--limit ({limit}) and --batch-size ({batch_size}) must be at least 1")
    if tasks:
        from moemerge.evaluation.zero_shot import check_tasks

        check_tasks(tasks, tasks_source)
    check_spec(data)


def check_tokenizer_for_tasks(source, tasks: tuple[str, ...]) -> None:
    """Raise MoemergeError when zero-shot ``tasks`` are asked of a model without a tokenizer."""
    if tasks and not has_tokenizer(source):
        raise MoemergeError(
            f"--tasks needs the model's tokenizer to read the task prompts, and {source.path} has none "
            "(no tokenizer* files); copy its original's tokenizer files into it, or drop --tasks"
        )


def check_reference(source, reference) -> None:
    """Raise MoemergeError unless ``reference`` (a checked source) can be the original of ``source``: another
    folder, of the same family and shape, and, when ``source`` is a moemerge output that records its source's
    fingerprints (config SHA-256 and weights fingerprint), that very model. For another model there is no record
    to check it against."""
    if source.path.resolve() == reference.path.resolve():
        raise MoemergeError(
            f"--reference {reference.path} is the evaluated model itself; give the original it was reduced from"
        )
    if reference.family is not source.family:
        raise MoemergeError(
            f"--reference {reference.path} is a {reference.family.model_type} model but {source.path} is "
            f"{source.family.model_type}; compare a reduced model with its own original"
        )
    shape = ("num_hidden_layers", "hidden_size")
    if any(source.config.get(key) != reference.config.get(key) for key in shape):
        raise MoemergeError(
            f"--reference {reference.path} differs from {source.path} in layers or hidden size; compare a reduced "
            "model with its own original"
        )
    recorded = (read_record(source.path) or {"source": {}})["source"]
    found = {"config_sha256": config_sha256(reference.path), "weights_sha256": weights_sha256(reference.weight_files)}
    differ = [
        what
        for key, what in (("config_sha256", "config.json"), ("weights_sha256", "weights"))
        if recorded.get(key, found[key]) != found[key]
    ]
    if differ:
        raise MoemergeError(
            f"--reference {reference.path} is not the model {source.path} was reduced from ({', '.join(differ)} "
            f"differ from the source recorded in {source.path / 'moemerge.json'}, {recorded.get('path')}); give "
            "that model as --reference"
        )


def measure(
    model,
    tokenizer,
    family,
    chunks: list,
    original=None,
    tasks: tuple[str, ...] = (),
    limit: int | None = None,
    tasks_source: str = "local",
    batch_size: int = 8,
    reference_perplexity: bool = True,
) -> dict:
    """Perplexity on ``chunks``; with an ``original`` model the fidelity (and, unless ``reference_perplexity``
    is False, the original's perplexity); zero-shot ``tasks``."""
    result = {"perplexity": perplexity(model, chunks)}
    if original is not None:
        if reference_perplexity:
            result["reference_perplexity"] = perplexity(original, chunks)
        result["fidelity"] = fidelity(model, original, family, chunks)
    if tasks:
        from moemerge.evaluation.zero_shot import zero_shot

        result["zero_shot"] = zero_shot(model, tokenizer, tasks, limit, batch_size, tasks_source)
    return result


def hard_group_labels(path: Path, n: int) -> dict[int, np.ndarray] | None:
    """A moemerge output's groups as cluster labels [n] of the original's experts per decoder layer; None for
    other models and for pruned ones (whose dropped experts belong to no group)."""
    record = read_record(path)
    if record is None:
        return None
    entries = record["layers"]
    labels = {e["layer"]: group_labels(e["groups"], n, e.get("memberships")) for e in entries}
    return None if any(v is None for v in labels.values()) else labels


def groups_quality(stats: dict[int, LayerStatistics], labels: dict[int, np.ndarray]) -> dict:
    """Cluster quality of the groups ``labels`` per layer (and their mean) on the original's mean expert outputs
    ``stats``."""
    layers = [{"layer": layer} | cluster_quality(stats[layer].mean_output.numpy(), labels[layer]) for layer in labels]
    mean = {}
    for key in ("silhouette_euclidean", "silhouette_cosine", "dunn"):
        values = [entry[key] for entry in layers if entry[key] is not None]
        mean[key] = float(np.mean(values)) if values else None
    return {"features": "expert-output", "mean": mean, "layers": layers}
