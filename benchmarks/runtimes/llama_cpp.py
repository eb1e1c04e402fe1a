"""llama.cpp runs moemerge's reduced models: perplexity against transformers, and tokens/s (not a test).

Usage: ``python benchmarks/runtimes/llama_cpp.py [--cache DIR] [--work DIR] [--out DIR]`` (default
``benchmarks/results/runtimes``; writes ``llama_cpp.md`` and ``.json``).

llama.cpp is the one that ``llama-cpp-python`` ``LLAMA_CPP_PYTHON`` vendors (its source distribution, fetched by
pip from the package index; the project's own repository is not reachable here). On first use it is built into
``--cache`` (default ``~/.cache/moemerge/llama.cpp``): cmake, the four tools below, 20-30 minutes on 2 cores; the
converter's one dependency the project's environment lacks (sentencepiece) goes into ``CACHE/pydeps``.

For each benchmark model (benchmarks/models/), ``moemerge.reduce`` keeps half the experts (the defaults: hc-smoe,
``--router reduce``, the same count in every layer). The original and the reduced model are then converted by
llama.cpp's own ``convert_hf_to_gguf.py`` to f32 GGUF, quantised by ``llama-quantize`` to Q8_0 and Q4_K_M, and
measured:

- tokens: ``llama-tokenize``'s ids of the test text must equal the transformers tokenizer's (else the perplexities
  below would not be of the same tokens, and the run stops).
- perplexity: ``llama-perplexity`` over the first ``CHUNKS`` chunks of ``CTX`` tokens of the test text (its
  protocol: each chunk scored on its second half; a chunk's first token becomes BOS where the vocabulary adds
  one), against :func:`transformers_perplexity`, the same protocol computed by transformers in float32.
- speed: ``llama-bench`` prompt processing of ``CTX`` tokens and generation of ``GENERATE`` tokens, 2 threads,
  original and reduced f32 and Q4_K_M in one run.

The converter runs unchanged but for one method: the benchmark models share a byte-level BPE tokenizer trained
for this project, whose pre-tokenizer the converter identifies by hashing token ids of a test string, so it does
not recognise it; it is GPT-2's, which ``get_vocab_base_pre`` is told. Real models' tokenizers need no such help.
The test text interleaves the documents of the five test splits (benchmarks/data/test/), joined by blank lines.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from itertools import zip_longest
from pathlib import Path

import gguf
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import moemerge

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("speed_run", REPO / "benchmarks" / "speed" / "run.py")
speed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(speed)

LLAMA_CPP_PYTHON = "0.3.36"
TOOLS = ("llama-perplexity", "llama-quantize", "llama-bench", "llama-tokenize")
MODELS = ("mixtral-upcycled", "qwen2moe-upcycled", "olmoe-scratch", "qwen3moe-scratch", "deepseek-scratch")
REWRITE = ("qwen2moe-upcycled", "olmoe-scratch")  # see for_llama_cpp()
# Converted, but llama.cpp cannot load the result, for a reason of the benchmark model's shape:
NOT_RUN = {
    "deepseek-scratch": "llama.cpp's DeepSeek-V2/V3 loader requires q_lora_rank except for the 'lite' variants, "
    "which it recognises by layer count (26, 27 or 48; src/models/deepseek2.cpp); this 6-layer model has no q-LoRA "
    "(q_lora_rank null, like DeepSeek-V2-Lite), so loading stops with 'key not found in model: "
    "deepseek2.attention.q_lora_rank'. DeepSeek-V3 itself has q_lora_rank 1536.",
}
QUANTS = ("Q8_0", "Q4_K_M")
CTX, CHUNKS, GENERATE, THREADS = 256, 48, 64, 2
DOMAINS = ("austen", "bible", "lambada", "wiki", "pydocs")
# Runs llama.cpp's converter (argv: llama.cpp folder, then the converter's own arguments) with the one override.
CONVERT = """
import runpy, sys
llama = sys.argv[1]
sys.path[:0] = [llama, llama + "/gguf-py"]
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = [llama + "/convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run(argv: list, **kwargs) -> subprocess.CompletedProcess:
    """``argv`` run to completion (text output captured); its output in the exception when it fails."""
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kwargs)
    if done.returncode:
        raise RuntimeError(f"{argv[0]} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def build(cache: Path) -> Path:
    """The llama.cpp source folder in ``cache``, with its tools built in build/bin (built here if absent)."""
    source = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if all((source / "build" / "bin" / tool).exists() for tool in TOOLS):
        return source
    cache.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    spec = f"llama-cpp-python=={LLAMA_CPP_PYTHON}"
    run([*pip, "download", spec, "--no-deps", "--no-binary", ":all:", "-d", cache])
    with tarfile.open(cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as archive:
        archive.extractall(cache, filter="data")
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF"]
    run(["cmake", "-S", source, "-B", source / "build", *flags])
    run(["cmake", "--build", source / "build", "-j", os.cpu_count(), "--target", *TOOLS])
    run([*pip, "install", "--quiet", "--target", cache / "pydeps", "sentencepiece"])
    return source


def for_llama_cpp(model: Path, out: Path) -> Path:
    """A copy of the single-file checkpoint ``model`` in ``out``, rewritten to the same function in the two ways
    llama.cpp needs for two benchmark models (real OLMoE and Qwen1.5-MoE checkpoints need neither):

    - a tied output embedding is written out as ``lm_head.weight``: llama.cpp's OLMoE and Qwen2-MoE graphs require
      an output tensor (src/models/olmoe.cpp, qwen2moe.cpp), and the converter writes none for a tied model;
    - OLMoE's grouped key/value heads become one per query head (each copied ``groups`` times, k_norm's weight
      with them; the RMS over copies is the RMS over the originals): llama.cpp's OLMoE graph normalises keys over
      n_embd, i.e. assumes as many key/value heads as query heads.
    """
    shutil.copytree(model, out)
    tensors = load_file(out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    if config.get("tie_word_embeddings"):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        config["tie_word_embeddings"] = False
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    if config["model_type"] == "olmoe" and kv_heads < heads:
        for name in [n for n in tensors if n.endswith(("k_proj.weight", "v_proj.weight", "k_norm.weight"))]:
            t = tensors[name]
            tensors[name] = t.view(kv_heads, -1, *t.shape[1:]).repeat_interleave(heads // kv_heads, 0).flatten(0, 1)
        config["num_key_value_heads"] = heads
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def convert(llama: Path, cache: Path, model: Path, out: Path) -> Path:
    env = os.environ | {"PYTHONPATH": str(cache / "pydeps")}
    run([sys.executable, "-c", CONVERT, llama, model, "--outtype", "f32", "--outfile", out], env=env)
    return out


def write_test_text(path: Path) -> Path:
    """The five test splits' documents, interleaved one by one and joined by blank lines, as a text file."""
    splits = []
    for domain in DOMAINS:
        with gzip.open(REPO / "benchmarks" / "data" / "test" / f"{domain}.jsonl.gz", "rt", encoding="utf-8") as f:
            splits.append([json.loads(line)["text"] for line in f])
    docs = [doc for row in zip_longest(*splits) for doc in row if doc is not None]
    path.write_text("\n\n".join(docs), encoding="utf-8")
    return path


def llama_tokens(bin_dir: Path, model_file: Path, text: Path) -> list[int]:
    out = run([bin_dir / "llama-tokenize", "-m", model_file, "-f", text, "--ids", "--no-escape", "--log-disable"])
    return json.loads(out.stdout.strip().splitlines()[-1])


def llama_perplexity(bin_dir: Path, model_file: Path, text: Path, attempts: int = 5) -> float:
    """llama-perplexity's perplexity over the first CHUNKS chunks: its running value after chunk CHUNKS, which
    is exp(mean NLL) over exactly those chunks. Its log is written by a thread that the process may end before
    the last lines are out (seen here: the final estimate and the last chunks missing, exit code 0), so it runs
    4 chunks further, and again if the value is still missing."""
    log = model_file.with_suffix(".perplexity.log")
    argv = [bin_dir / "llama-perplexity", "-m", model_file, "-f", text, "-c", CTX, "-b", CTX, "--chunks", CHUNKS + 4]
    for _ in range(attempts):
        out = run([*argv, "-t", THREADS, "--log-file", log])
        for found in re.finditer(rf"\[{CHUNKS}\]([0-9.]+),", out.stdout + out.stderr + log.read_text()):
            return float(found.group(1))
    raise RuntimeError(f"llama-perplexity printed no value for chunk {CHUNKS} of {model_file.name} in {attempts} runs")


@torch.inference_mode()
def transformers_perplexity(model_dir: Path, tokens: list[int], bos: int | None) -> float:
    """llama-perplexity's protocol in transformers, float32: chunk c is tokens[c*CTX : (c+1)*CTX] with its first
    token replaced by ``bos`` (unless None); the logits at positions CTX/2 .. CTX-2 score the next tokens."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    chunks = torch.tensor(tokens[: CHUNKS * CTX]).view(CHUNKS, CTX)
    targets = chunks[:, CTX // 2 + 1 :].clone()
    if bos is not None:
        chunks[:, 0] = bos
    nll, count = 0.0, 0
    for batch, target in zip(chunks.split(8), targets.split(8), strict=True):
        logits = model(input_ids=batch).logits[:, CTX // 2 : -1].double()
        nll -= logits.log_softmax(-1).gather(-1, target[..., None]).sum().item()
        count += target.numel()
    return math.exp(nll / count)


def bench(bin_dir: Path, ggufs: dict[str, Path]) -> dict[str, dict[str, float]]:
    """{variant: {"prompt": tokens/s, "generate": tokens/s}} from one llama-bench run over every file."""
    argv = [bin_dir / "llama-bench", "-p", CTX, "-n", GENERATE, "-t", THREADS, "-r", 5, "-o", "json"]
    for path in ggufs.values():
        argv += ["-m", path]
    rows = json.loads(run(argv).stdout)
    by_file = {str(path): name for name, path in ggufs.items()}
    result: dict[str, dict[str, float]] = {}
    for row in rows:
        kind = "prompt" if row["n_prompt"] else "generate"
        result.setdefault(by_file[row["model_filename"]], {})[kind] = row["avg_ts"]
    return result


def gguf_experts(path: Path) -> dict[str, int]:
    """{"expert_count": the GGUF's expert count, "stacked": the leading size of every ``*_exps`` tensor, which
    must be one number}, read back with the gguf package."""
    reader = gguf.GGUFReader(path)
    field = next(f for name, f in reader.fields.items() if name.endswith(".expert_count"))
    stacked = {int(t.shape[-1]) for t in reader.tensors if t.name.endswith("_exps.weight")}
    assert len(stacked) == 1, (path, stacked)
    return {"expert_count": int(field.parts[field.data[0]][0]), "stacked": stacked.pop()}


def same_tokens(llama: list[int], model_dir: Path, text: Path) -> int | None:
    """The BOS id llama.cpp puts first (None if it adds none), after checking that its ids of ``text`` are the
    transformers tokenizer's; raises on any difference, naming the first."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(text.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id if llama[:1] == [tokenizer.bos_token_id] and len(llama) == len(ids) + 1 else None
    body = llama[1:] if bos is not None else llama
    if body != ids:
        first = next((i for i, (a, b) in enumerate(zip(body, ids, strict=False)) if a != b), min(len(body), len(ids)))
        raise RuntimeError(
            f"{model_dir.name}: llama.cpp's token {first} differs from transformers' ({len(body)} vs {len(ids)} tokens)"
        )
    return bos


def measure(name: str, work: Path, llama: Path, cache: Path, text: Path) -> dict:
    bin_dir = llama / "build" / "bin"
    source = REPO / "benchmarks" / "models" / name
    work = work / name
    reduced = work / "reduced"
    calib = REPO / "benchmarks" / "data" / "calib_general.jsonl.gz"
    result = moemerge.reduce(source, reduced, ratio=0.5, calib=str(calib), progress=False, report=False)
    row = {
        "model": name,
        "experts": f"{result.num_experts} -> {result.experts}",
        "perplexity": {},
        "gguf_experts": {},
    }
    files = {}
    for variant, folder in (("original", source), ("reduced", reduced)):
        converted = for_llama_cpp(folder, work / f"{variant}-rewritten") if name in REWRITE else folder
        f32 = convert(llama, cache, converted, work / f"{variant}-f32.gguf")
        files[f"{variant} f32"] = f32
        row["gguf_experts"][variant] = gguf_experts(f32)
        if name in NOT_RUN:
            continue
        for quant in QUANTS:
            files[f"{variant} {quant}"] = work / f"{variant}-{quant}.gguf"
            run([bin_dir / "llama-quantize", f32, files[f"{variant} {quant}"], quant, THREADS])
        tokens = llama_tokens(bin_dir, f32, text)
        bos = same_tokens(tokens, folder, text)
        ppl = {"transformers f32": transformers_perplexity(folder, tokens, bos)}
        for kind in ("f32", *QUANTS):
            ppl[f"llama.cpp {kind}"] = llama_perplexity(bin_dir, files[f"{variant} {kind}"], text)
        row["perplexity"][variant] = ppl
    row["gguf_mb"] = {key: path.stat().st_size / 1e6 for key, path in files.items()}
    if name in NOT_RUN:
        row["not_run"] = NOT_RUN[name]
    else:
        row["tokens_per_s"] = bench(bin_dir, {k: v for k, v in files.items() if not k.endswith("Q8_0")})
    shutil.rmtree(work)
    return row


def markdown(results: dict) -> str:
    lines = [
        "# llama.cpp runs the reduced models",
        "",
        f"Machine: {results['machine']}. llama.cpp: the one vendored by llama-cpp-python {LLAMA_CPP_PYTHON}.",
        "Command: `python benchmarks/runtimes/llama_cpp.py`. Each benchmark model reduced to half its experts by",
        "`moemerge.reduce` (hc-smoe, `--router reduce`, uniform), converted by llama.cpp's own converter (f32) and",
        "quantised by `llama-quantize`.",
        "",
        f"Perplexity of the first {CHUNKS} chunks of {CTX} tokens of the test text (the five test splits' documents",
        "interleaved; llama-perplexity's protocol, each chunk scored on its second half; transformers computes the",
        "same protocol on the same token ids, which llama-tokenize and the transformers tokenizer agree on):",
        "",
        "| model | experts | variant | transformers f32 | llama.cpp f32 | Q8_0 | Q4_K_M |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        for variant, ppl in row["perplexity"].items():  # empty for a model llama.cpp cannot load
            lines.append(
                f"| {row['model']} | {row['experts']} | {variant} | {ppl['transformers f32']:.3f} | "
                f"{ppl['llama.cpp f32']:.3f} | {ppl['llama.cpp Q8_0']:.3f} | {ppl['llama.cpp Q4_K_M']:.3f} |"
            )
    lines += [
        "",
        f"llama-bench, {THREADS} threads, 5 repetitions, all files of a model in one run: prompt processing of {CTX}",
        f"tokens and generation of {GENERATE} tokens (tokens/s), and the GGUF file size:",
        "",
        "| model | file | MB | prompt tok/s | generate tok/s | generate vs original |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in [r for r in results["rows"] if "tokens_per_s" in r]:
        speeds = row["tokens_per_s"]
        for key, speed_row in speeds.items():
            kind = key.split(" ", 1)[1]
            ratio = speed_row["generate"] / speeds[f"original {kind}"]["generate"]
            lines.append(
                f"| {row['model']} | {key} | {row['gguf_mb'][key]:.1f} | {speed_row['prompt']:.0f} | "
                f"{speed_row['generate']:.0f} | {ratio:.2f}x |"
            )
    lines += ["", "Expert count in the GGUF (metadata / leading size of every stacked expert tensor):", ""]
    lines += [
        f"- {row['model']}: original {g['original']['expert_count']} / {g['original']['stacked']}, reduced "
        f"{g['reduced']['expert_count']} / {g['reduced']['stacked']}"
        + (f". Not run: {row['not_run']}" if "not_run" in row else "")
        for row in results["rows"]
        for g in [row["gguf_experts"]]
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "moemerge" / "llama.cpp")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "runtimes")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    args = parser.parse_args()
    llama = build(args.cache)
    work = Path(tempfile.mkdtemp(dir=args.work))
    text = write_test_text(work / "test.txt")
    rows = [measure(name, work, llama, args.cache, text) for name in args.models]
    shutil.rmtree(work)
    results = {"machine": speed.machine(), "llama_cpp_python": LLAMA_CPP_PYTHON, "rows": rows}
    speed.write_results(args.out, "llama_cpp", results, markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
