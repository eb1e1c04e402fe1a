"""The ``moemerge`` command line: a thin layer over :mod:`moemerge.pipeline`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields
from pathlib import Path

from moemerge.defaults import CALIB_SAMPLES, CALIB_SEQ_LEN, EVAL_MAX_TOKENS, EVAL_SEQ_LEN
from moemerge.errors import MoemergeError
from moemerge.grouping import BUDGETS, DISTANCES, KMEANS_INITS, LINKAGES, METRICS
from moemerge.options import ROUTER_MODES, VARIANT_KEYS, ReduceOptions  # importing the options registers every method
from moemerge.progress import show_phases
from moemerge.registry import names
from moemerge.signals import signal_of, signals_as_exceptions
from moemerge.streaming import reduce


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage as one ``error: ...`` line with exit code 2, and takes no abbreviated
    option (``--exp`` is not ``--experts``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="moemerge", description="Reduce the experts of a Mixture-of-Experts model without retraining."
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = commands.add_parser("reduce", help="merge each MoE layer's experts into fewer and write a checkpoint")
    p.add_argument("model", help="local model directory (config.json and *.safetensors)")
    _reduction_options(p)
    p.add_argument("--out", required=True, help="output directory (created; never overwritten without --force)")
    p.add_argument("--no-report", action="store_true", help="do not write OUT/report/ (figures of the groups)")
    p.add_argument(
        "--stream",
        action="store_true",
        help="accepted and ignored: reduce always loads, reduces and writes one decoder layer at a time (memory of "
        "about one layer), except pickle weights, which load the whole model",
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        help="collect each layer's statistics from the already-reduced layers' hidden states (default: the "
        "original model's, as the paper)",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished layer")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    _pickle_option(p)
    _device_options(p)

    pl = commands.add_parser("plan", help="calibrate and choose the groups like reduce, and save them as a recipe")
    pl.add_argument("model", help="local model directory (config.json and *.safetensors)")
    _reduction_options(pl)
    pl.add_argument("--out", required=True, metavar="RECIPE.json", help="recipe file to write")
    pl.add_argument("--force", action="store_true", help="replace an existing recipe")
    _pickle_option(pl)
    _device_options(pl)

    a = commands.add_parser("apply", help="reduce a model to the groups of a recipe made by moemerge plan")
    a.add_argument("recipe", help="recipe JSON file from moemerge plan")
    a.add_argument("model", help="the model the recipe was planned for (checked by config and weights fingerprint)")
    a.add_argument("--out", required=True, help="output directory (created; never overwritten without --force)")
    a.add_argument("--no-report", action="store_true", help="do not write OUT/report/ (figures of the groups)")
    a.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished layer")
    a.add_argument("--force", action="store_true", help="replace an existing output directory")
    _pickle_option(a)
    a.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: the recipe's)")
    a.add_argument("--dtype", help="auto, float32, bfloat16 or float16 (default: the recipe's)")
    _output_options(a)

    i = commands.add_parser("inspect", help="report a model's architecture, expert usage, distances and dendrograms")
    i.add_argument("model", help="local model directory (config.json and *.safetensors)")
    i.add_argument(
        "--calib",
        nargs="+",
        metavar="SPEC",
        help="one or more calibration sets (as reduce's --calib), compared in the usage figure; default: bundled corpus",
    )
    _calibration_size_options(i)
    i.add_argument("--seed", type=int, default=0, help="seed of the calibration sample")
    i.add_argument("--out", required=True, help="report folder (created; never overwritten without --force)")
    i.add_argument("--force", action="store_true", help="replace an existing report folder")
    _pickle_option(i)
    _device_options(i)

    e = commands.add_parser("eval", help="perplexity, fidelity to the original, zero-shot accuracy and cost of a model")
    e.add_argument("model", help="model directory: an original, or a moemerge output of either router mode")
    e.add_argument("--reference", metavar="ORIGINAL", help="the original model: adds fidelity and cluster quality")
    _evaluation_options(e)
    e.add_argument(
        "--no-cost",
        action="store_true",
        help="skip the memory and speed measurement (a process that loads the whole model; the rest reads one layer "
        "at a time)",
    )
    _pickle_option(e)
    e.add_argument("--out", metavar="FILE", help="write the results as JSON (never overwritten without --force)")
    e.add_argument("--force", action="store_true", help="replace an existing --out file")
    _device_options(e)

    c = commands.add_parser("compare", help="a grid of methods x expert counts from one calibration pass")
    c.add_argument("model", help="local model directory")
    c.add_argument(
        "--methods",
        nargs="+",
        required=True,
        metavar="METHOD",
        help=f"methods, each NAME or NAME:KEY=VALUE,... (keys: {', '.join(VARIANT_KEYS)})",
    )
    c.add_argument("--experts", type=int, nargs="+", required=True, metavar="R", help="experts per layer to try")
    c.add_argument("--out", required=True, help="output directory (created; never overwritten without --force)")
    c.add_argument("--router", default="reduce", choices=ROUTER_MODES, help="router mode of every reduced model")
    _evaluation_options(c)
    _calibration_options(c)
    c.add_argument("--force", action="store_true", help="replace an existing output directory")
    _pickle_option(c)
    _device_options(c)
    return parser


def _reduction_options(p: argparse.ArgumentParser) -> None:
    """The options of reduce and plan: size, method and its settings, router, calibration (defaults:
    :class:`moemerge.options.ReduceOptions`)."""
    d = ReduceOptions().as_dict()
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--experts", type=int, metavar="R", help="experts to keep per MoE layer")
    size.add_argument("--ratio", type=float, metavar="F", help="fraction of experts to keep per MoE layer")
    p.add_argument("--method", default=d["method"], choices=names("method"))
    p.add_argument("--metric", default=d["metric"], choices=METRICS, help="hc-smoe: what experts are compared by")
    p.add_argument("--distance", default=d["distance"], choices=DISTANCES, help="hc-smoe: distance between features")
    p.add_argument("--cluster", default=d["cluster"], choices=names("cluster"), help="hc-smoe: clustering algorithm")
    p.add_argument("--linkage", default=d["linkage"], choices=LINKAGES, help="hierarchical clustering linkage")
    p.add_argument("--kmeans-init", default=d["kmeans_init"], choices=KMEANS_INITS, help="k-means initial centres")
    p.add_argument(
        "--ream-group-size",
        type=int,
        default=d["ream_group_size"],
        metavar="C",
        help=f"ream: the most experts one group takes, its centre included (default {d['ream_group_size']}, REAM's C)",
    )
    p.add_argument(
        "--merge",
        default=d["merge"],
        choices=names("merge"),
        help="how a group is merged: weighted average (frequency, average) or neuron matching (fix-dom, zipit; "
        "saliency: REAP-saliency weights after Hungarian alignment to the most salient member, as REAM)",
    )
    p.add_argument(
        "--align",
        action="store_true",
        help="permute each group member's neurons to match the group's most used expert before merging (Hungarian)",
    )
    p.add_argument("--rank", type=int, metavar="K", help="mc-smoe: rank of each compressed matrix (default I/4)")
    p.add_argument(
        "--sparsity",
        type=float,
        default=d["sparsity"],
        help=f"mc-smoe: share of the low-rank residual set to zero (default {d['sparsity']})",
    )
    p.add_argument(
        "--param-budget",
        type=float,
        metavar="F",
        help="mc-smoe: instead of --rank, the largest rank that stores each merged matrix in at most F of its size",
    )
    p.add_argument(
        "--mc-smoe-dense",
        action="store_true",
        help="mc-smoe: also write the compressed experts as dense matrices L R + S, so that any loader runs the "
        "output (at the dense size); without it they are stored only as factors, which moemerge.load_model runs",
    )
    p.add_argument(
        "--router",
        default=d["router"],
        choices=ROUTER_MODES,
        help="reduce: standard checkpoint with an r-row router; grouped: keep the original router, and with a pruning "
        "method replace each dropped expert by its mean routed output (a novice, as MoNE); load with moemerge.load_model",
    )
    p.add_argument(
        "--router-rows",
        default=d["router_rows"],
        choices=names("router-rows"),
        help="how reduced router rows are built",
    )
    p.add_argument(
        "--refit",
        default=d["refit"],
        choices=names("refit"),
        help="down: after merging or pruning, refit each reduced expert's down projection in closed form (ridge "
        "least squares) so the layer's output matches the original's on sampled calibration tokens",
    )
    p.add_argument(
        "--oprune-budget",
        type=int,
        default=d["oprune_budget"],
        metavar="N",
        help=f"o-prune: try every subset if there are at most N, else N random ones (default {d['oprune_budget']})",
    )
    p.add_argument(
        "--budget",
        default=d["budget"],
        choices=BUDGETS,
        help="experts per layer: uniform (R each), or R on average by global expert frequency or router probability, "
        "or (search) by the least summed output error of the layers reduced at every count (reduce only; load "
        "the output with moemerge.load_model)",
    )
    _calibration_options(p)


def _calibration_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--calib",
        metavar="SPEC",
        help="a .txt, a .jsonl (text or input_ids rows) or hf:NAME[:CONFIG[:SPLIT]]; default: bundled corpus",
    )
    _calibration_size_options(p)
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the calibration sample, k-means and o-prune's random subsets"
    )


def _calibration_size_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--calib-samples",
        type=int,
        default=CALIB_SAMPLES,
        metavar="N",
        help=f"calibration sequences (default {CALIB_SAMPLES})",
    )
    p.add_argument(
        "--calib-seq-len",
        type=int,
        default=CALIB_SEQ_LEN,
        metavar="L",
        help=f"tokens per sequence (default {CALIB_SEQ_LEN})",
    )


def _evaluation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", metavar="SPEC", help="text for perplexity and fidelity, as --calib; default: bundled corpus"
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=EVAL_MAX_TOKENS,
        metavar="N",
        help=f"tokens of --data used (default {EVAL_MAX_TOKENS})",
    )
    p.add_argument(
        "--seq-len", type=int, default=EVAL_SEQ_LEN, metavar="L", help=f"window length (default {EVAL_SEQ_LEN})"
    )
    p.add_argument(
        "--tasks", nargs="+", default=[], metavar="TASK", help="zero-shot tasks through lm-eval ('paper' = all eight)"
    )
    p.add_argument("--limit", type=int, metavar="N", help="at most N examples per zero-shot task")
    p.add_argument("--tasks-source", default="local", choices=("local", "hub"), help="local data (default) or hub")
    p.add_argument("--batch-size", type=int, default=8, help="zero-shot batch size (default 8)")


def _pickle_option(p: argparse.ArgumentParser) -> None:
    """--allow-pickle, for every command that loads model weights (so that the advice to pass it always holds)."""
    p.add_argument("--allow-pickle", action="store_true", help="accept pickle (.bin) weights from a trusted source")


def _device_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="auto", help="auto (as stored), float32, bfloat16 or float16")
    _output_options(p)


def _output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")


def _reduction_kwargs(args: argparse.Namespace) -> dict:
    """reduce's / plan's keyword arguments from the parsed options."""
    return {f.name: getattr(args, f.name) for f in fields(ReduceOptions)}


def _reduce(args: argparse.Namespace) -> None:
    from moemerge.checkpoint.source import resolve_device
    from moemerge.distributed import init_from_environment, is_writer

    init_from_environment(resolve_device(args.device))
    common = dict(
        force=args.force,
        allow_pickle=args.allow_pickle,
        progress=not args.quiet and is_writer(),
        report=not args.no_report,
        **_reduction_kwargs(args),
    )
    result = reduce(args.model, args.out, sequential=args.sequential, resume=args.resume, **common)
    if is_writer():
        _print_reduced(result, args)


def _plan(args: argparse.Namespace) -> None:
    from moemerge.recipes import plan_recipe

    recipe = plan_recipe(
        args.model,
        args.out,
        force=args.force,
        allow_pickle=args.allow_pickle,
        progress=not args.quiet,
        **_reduction_kwargs(args),
    )
    if args.json:
        print(json.dumps(recipe))
    elif not args.quiet:
        counts = "/".join(str(len(layer["groups"])) for layer in recipe["layers"])
        print(f"wrote {args.out}: groups for {len(recipe['layers'])} MoE layers ({counts} experts)")


def _apply(args: argparse.Namespace) -> None:
    from moemerge.recipes import apply_recipe

    result = apply_recipe(
        args.recipe,
        args.model,
        args.out,
        force=args.force,
        device=args.device,
        dtype=args.dtype,
        allow_pickle=args.allow_pickle,
        progress=not args.quiet,
        report=not args.no_report,
        resume=args.resume,
    )
    _print_reduced(result, args)


def _print_reduced(result, args: argparse.Namespace) -> None:
    if args.json:
        fields = {k: v for k, v in vars(result).items() if k not in ("out", "groups")}
        groups = {str(layer): [list(g) for g in layer_groups] for layer, layer_groups in result.groups.items()}
        print(json.dumps({"out": str(result.out), **fields, "groups": groups}))
        return
    if args.quiet:
        return
    counts = [len(g) for g in result.groups.values()]
    average = f"{sum(counts) / len(counts):g}"
    kept = str(counts[0]) if len(set(counts)) == 1 else f"{'/'.join(map(str, counts))} (average {average})"
    print(f"wrote {result.out}: {result.num_experts} -> {kept} experts in {len(result.groups)} MoE layers")
    print(
        f"parameters: {result.params_before:,} -> {result.params_after:,} ({_change(result.params_before, result.params_after)})"
    )
    print(
        f"weights on disk: {result.bytes_before:,} -> {result.bytes_after:,} bytes ({_change(result.bytes_before, result.bytes_after)})"
    )
    if result.stored_params is not None:
        stored = result.stored_params
        print(f"stored as low-rank + sparse factors: {stored:,} parameters ({_change(result.params_before, stored)})")
    print(f"calibration: {result.calibration_tokens:,} tokens; took {result.seconds:.1f} s")


def _inspect(args: argparse.Namespace) -> None:
    from moemerge.report import inspect

    result = inspect(
        args.model,
        args.out,
        calib=args.calib,
        calib_samples=args.calib_samples,
        calib_seq_len=args.calib_seq_len,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        force=args.force,
        allow_pickle=args.allow_pickle,
        progress=not args.quiet,
    )
    if args.json:
        print(json.dumps(result))
    elif not args.quiet:
        print(result["summary"])
        print(f"wrote {args.out}: report.html, summary.txt and figures")


def _eval(args: argparse.Namespace) -> None:
    from moemerge.evaluation import evaluate
    from moemerge.output_files import check_output, write_json

    if args.out is not None:
        check_output(args.out, args.force, reads=(args.model, args.reference, args.data), file=True)
    result = evaluate(
        args.model,
        reference=args.reference,
        data=args.data,
        max_tokens=args.max_tokens,
        seq_len=args.seq_len,
        tasks=tuple(args.tasks),
        limit=args.limit,
        tasks_source=args.tasks_source,
        batch_size=args.batch_size,
        cost=not args.no_cost,
        dtype=args.dtype,
        device=args.device,
        allow_pickle=args.allow_pickle,
        progress=not args.quiet,
    )
    if args.out is not None:
        write_json(result, args.out, args.force)
    if args.json:
        print(json.dumps(result))
    elif not args.quiet:
        print(summary(result))


def _compare(args: argparse.Namespace) -> None:
    from moemerge.compare import compare

    rows = compare(
        args.model,
        args.out,
        args.methods,
        args.experts,
        data=args.data,
        max_tokens=args.max_tokens,
        seq_len=args.seq_len,
        tasks=tuple(args.tasks),
        limit=args.limit,
        tasks_source=args.tasks_source,
        batch_size=args.batch_size,
        router=args.router,
        calib=args.calib,
        calib_samples=args.calib_samples,
        calib_seq_len=args.calib_seq_len,
        dtype=args.dtype,
        device=args.device,
        seed=args.seed,
        force=args.force,
        allow_pickle=args.allow_pickle,
        progress=not args.quiet,
    )
    if args.json:
        print(json.dumps(rows))
    elif not args.quiet:
        print((Path(args.out) / "results.md").read_text(encoding="utf-8"), end="")
        print(f"wrote {args.out}: results.csv, results.md and plots ({len(rows) - 1} reduced models)")


def summary(result: dict) -> str:
    """A few lines for the terminal; the JSON has everything."""
    ppl = result["perplexity"]
    lines = [
        f"{result['model']}: perplexity {ppl['perplexity']:.3f} on {ppl['tokens']:,} tokens of {result['data']['spec']}"
    ]
    if "fidelity" in result:
        hidden = result["fidelity"]["last_hidden"]
        lines.append(
            f"reference perplexity {result['reference_perplexity']['perplexity']:.3f}; last hidden state: "
            f"relative L2 {hidden['relative_l2']:.4f}, cosine {hidden['cosine']:.4f}"
        )
        errors = ", ".join(f"{e['layer']}: {e['relative_error']:.4f}" for e in result["fidelity"]["moe_layers"])
        lines.append(f"MoE output relative error per layer: {errors}")
    if "cluster_quality" in result:
        mean = result["cluster_quality"]["mean"]
        lines.append(
            "cluster quality (mean over layers): "
            + ", ".join(f"{k} {'-' if v is None else f'{v:.4f}'}" for k, v in mean.items())
        )
    for task, scores in result.get("zero_shot", {}).items():
        lines.append(
            f"{task}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items())
        )
    if "cost" in result:
        c = result["cost"]
        lines.append(
            f"parameters {c['parameters']:,} (active per token {c['active_parameters']:,}, "
            f"{c['gflops_per_token']:.3f} GFLOPs), {c['bytes_on_disk']:,} bytes on disk, peak memory "
            f"{c['peak_memory_bytes'] / 2**20:,.0f} MiB, prefill {1000 * c['prefill_latency_s']:.1f} ms, "
            f"decode {c['decode_tokens_per_s']:.1f} tokens/s"
        )
    return "\n".join(lines)


def _change(before: int, after: int) -> str:
    return f"{100 * (after - before) / before:+.1f} %"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    show_phases(not args.quiet)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    command = dict(reduce=_reduce, plan=_plan, apply=_apply, inspect=_inspect, eval=_eval, compare=_compare)
    try:
        with signals_as_exceptions():
            command[args.command](args)
    except MoemergeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C, SIGTERM, SIGHUP: temporaries are removed by then
        print(f"error: interrupted by {signal_of(stop).name}", file=sys.stderr)
        return 128 + signal_of(stop)
    return 0
