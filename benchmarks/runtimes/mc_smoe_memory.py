"""What mc-smoe's compact output saves when it runs (not a test).

Usage: ``python benchmarks/runtimes/mc_smoe_memory.py [--work DIR] [--out DIR]`` (default
``benchmarks/results/runtimes``; writes ``mc_smoe_memory.md`` and ``.json``).

Each model is reduced to half its experts with ``--method mc-smoe`` twice: the default compact output (experts only as
low-rank and sparse factors, run by ``moemerge.load_model`` as ``CompressedExperts``) and ``--mc-smoe-dense`` (the dense
reconstruction L R + S in the model files, which vanilla transformers runs). The original, the dense reconstruction
and the compact output are then each measured alone in a fresh process by ``moemerge.evaluation.cost`` (float32,
batch 1, greedy: peak resident memory above the process's baseline after its imports, prefill latency, decode tokens
per second), beside their bytes on disk, parameters and the bytes of the tensors the loaded model holds, and the
largest logit differences of the compact output on one 128-token window (:func:`logit_differences`).

Models: the benchmark models ``mixtral-upcycled`` (8 experts of 224 x 256) and ``qwen3moe-scratch`` (64 experts of
28 x 256), default rank (I/4) and sparsity (0.9); and one synthetic decoder layer of Qwen1.5-MoE-A2.7B's shape
(16 of its experts of 1408 x 2048, random weights, vocabulary 4096) with ``--param-budget 0.5``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import moemerge
from moemerge.checkpoint import inspect_source
from moemerge.checkpoint.source import FACTORS, LOWRANK_FILE, factor_key
from moemerge.evaluation.cost import bytes_on_disk, measure_in_fresh_process
from moemerge.merging.low_rank import reconstruct

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("speed_run", REPO / "benchmarks" / "speed" / "run.py")
speed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(speed)

CALIB = dict(calib_samples=8, calib_seq_len=256, progress=False, report=False)
WINDOW = 128


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct tensors (parameters and buffers) a loaded model holds."""
    tensors = {t.data_ptr(): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def variant(path: Path) -> dict:
    model = moemerge.load_model(path, dtype="float32")
    row = {"parameters": sum(p.numel() for p in model.parameters()), "held_bytes": held_bytes(model)}
    del model
    measured = measure_in_fresh_process(path, "float32")
    return row | {
        "bytes_on_disk": bytes_on_disk(path),
        "memory_above_baseline_bytes": measured["peak_memory_bytes"] - measured["baseline_memory_bytes"],
        "prefill_latency_s": measured["prefill_latency_s"],
        "decode_tokens_per_s": measured["decode_tokens_per_s"],
    }


def stored_factors(factors: dict, key: str, shape: tuple[int, int]) -> torch.Tensor:
    """The float32 L R + S of one stored matrix ``key`` of the factor file's ``factors``."""
    left, right, indices, values = (factors[f"{key}.{part}"] for part in FACTORS)
    return reconstruct(left, right, indices.long(), values, shape)


@torch.no_grad()
def logit_differences(dense: Path, compact: Path, vocab: int) -> dict:
    """Largest logit difference of the compact output against (a) the dense output as stored (its L R + S rounded
    to the model's dtype) and (b) that model with every expert replaced by the float32 L R + S of the stored
    factors, which is what the compact output computes."""
    ids = torch.randint(0, vocab, (1, WINDOW), generator=torch.Generator().manual_seed(0))
    got = moemerge.load_model(compact, dtype="float32")(input_ids=ids).logits
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    stored = model(input_ids=ids).logits
    factors = load_file(dense / LOWRANK_FILE)
    for view in inspect_source(dense).family.moe_layers(model):
        rebuilt = []
        for name, weights in zip(("gate", "up", "down"), view.expert_weights(), strict=True):
            keys = [factor_key(view.layer, e, name) for e in range(len(weights))]
            rebuilt.append(torch.stack([stored_factors(factors, key, tuple(weights.shape[1:])) for key in keys]))
        view.set_experts(*rebuilt)
    exact = model(input_ids=ids).logits
    return {"stored_dense": (got - stored).abs().max().item(), "exact_reconstruction": (got - exact).abs().max().item()}


def measure(name: str, source: Path, work: Path, experts: int, options: dict) -> dict:
    compact, dense = work / f"{name}-compact", work / f"{name}-dense"
    reduce = dict(experts=experts, method="mc-smoe", **CALIB, **options)
    result = moemerge.reduce(source, compact, **reduce)
    moemerge.reduce(source, dense, mc_smoe_dense=True, **reduce)
    vocab = AutoModelForCausalLM.from_pretrained(source).get_input_embeddings().num_embeddings
    row = {
        "model": name,
        "experts": f"{result.num_experts} -> {experts}",
        "options": options,
        "original": variant(source),
        "dense": variant(dense),
        "compact": variant(compact),
        "max_logit_difference": logit_differences(dense, compact, vocab),
    }
    shutil.rmtree(compact)
    shutil.rmtree(dense)
    return row


def markdown(results: dict) -> str:
    lines = [
        "# mc-smoe's compact output at inference",
        "",
        f"Machine: {results['machine']}. Command: `python benchmarks/runtimes/mc_smoe_memory.py`. float32, batch 1,",
        "greedy, each variant alone in a fresh process. Memory: peak resident set above the process's baseline after",
        "its imports (loading transients included); held: bytes of the loaded model's tensors.",
        "",
        "| model | experts | variant | parameters | held MB | disk MB | memory MB | prefill ms | decode tok/s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        for name in ("original", "dense", "compact"):
            v = row[name]
            lines.append(
                f"| {row['model']} | {row['experts']} | {name} | {v['parameters']:,} | {v['held_bytes'] / 1e6:.1f} | "
                f"{v['bytes_on_disk'] / 1e6:.1f} | {v['memory_above_baseline_bytes'] / 1e6:.0f} | "
                f"{v['prefill_latency_s'] * 1e3:.1f} | {v['decode_tokens_per_s']:.1f} |"
            )
    lines += [
        "",
        "Largest logit difference of the compact output (one window of random tokens) against the dense output as",
        "stored (L R + S rounded to the model's dtype, run by vanilla transformers) and against the float32 L R + S",
        "of the stored factors put into the same model:",
        "",
    ]
    lines += [
        f"- {row['model']}: {d['stored_dense']:.2e} against the stored dense, {d['exact_reconstruction']:.2e} against "
        "the float32 reconstruction"
        for row in results["rows"]
        for d in [row["max_logit_difference"]]
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "runtimes")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.work))
    models = REPO / "benchmarks" / "models"
    calib = {"calib": str(REPO / "benchmarks" / "data" / "calib_general.jsonl.gz")}
    rows = [
        measure("mixtral-upcycled", models / "mixtral-upcycled", work, 4, calib),
        measure("qwen3moe-scratch", models / "qwen3moe-scratch", work, 32, calib),
    ]
    synthetic = work / "qwen1.5-layer"
    speed.synthetic.write_synthetic_checkpoint(
        synthetic, "qwen1.5-moe-a2.7b", 1, num_experts=16, vocab_size=4096, progress=False
    )
    ids = torch.randint(
        0, 4096, (CALIB["calib_samples"], CALIB["calib_seq_len"]), generator=torch.Generator().manual_seed(0)
    )
    token_rows = work / "calib.jsonl"  # the synthetic model has no tokenizer: random token ids
    token_rows.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in ids.tolist()), encoding="utf-8")
    rows.append(measure("qwen1.5-moe layer", synthetic, work, 8, {"calib": str(token_rows), "param_budget": 0.5}))
    shutil.rmtree(work)
    results = {"machine": speed.machine(), "rows": rows}
    speed.write_results(args.out, "mc_smoe_memory", results, markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
