"""GSM8K: local data and calibration pairs, the lm-eval task config (same as lm-eval's gsm8k), answer extraction
through lm-eval's own filters and metric, and an end-to-end generation run on a tiny random model."""

from __future__ import annotations

import hashlib
import re

import pytest
import torch
from conftest import tiny_model
from lm_eval.api.instance import Instance
from lm_eval.api.task import ConfigurableTask
from lm_eval.filters import build_filter_ensemble
from lm_eval.tasks._yaml_loader import load_yaml

from gisp.data.gsm8k import PROMPT_TEMPLATE, calibration_pairs, final_answer, load_gsm8k
from gisp.data.sources import resolve_data_dir
from gisp.errors import GispError
from gisp.eval.gsm8k import METRICS, TASK_YAML, GSM8KTask, lm_eval_gsm8k_yaml, task_config
from gisp.models.byte_tokenizer import byte_level_tokenizer

DATA_DIR = resolve_data_dir(None)
pytestmark = pytest.mark.skipif(
    DATA_DIR is None or not (DATA_DIR / "gsm8k" / "test.jsonl").is_file(),
    reason="local GSM8K files (../shared/data/gsm8k or $GISP_DATA_DIR) not available",
)


@pytest.fixture(scope="module")
def train_docs():
    return load_gsm8k("calibration", DATA_DIR, source="local")


@pytest.fixture(scope="module")
def test_docs():
    return load_gsm8k("evaluation", DATA_DIR, source="local")


def _task(cfg: dict, tmp_path_factory) -> ConfigurableTask:
    cfg = {**cfg, "dataset_kwargs": {**cfg["dataset_kwargs"], "cache_dir": str(tmp_path_factory.mktemp("ds"))}}
    task = ConfigurableTask(config=cfg)
    task.set_fewshot_seed(1234)
    return task


@pytest.fixture(scope="module")
def gisp_task(tmp_path_factory) -> ConfigurableTask:
    """Our YAML as lm-eval builds it, on the local files."""
    return _task(task_config("local", DATA_DIR, num_fewshot=8), tmp_path_factory)


@pytest.fixture(scope="module")
def lm_eval_task(tmp_path_factory, gisp_task) -> ConfigurableTask:
    """lm-eval's installed gsm8k.yaml with only its data source swapped for the same local files."""
    cfg = load_yaml(lm_eval_gsm8k_yaml())
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs=gisp_task.config.dataset_kwargs)
    return _task(cfg, tmp_path_factory)


# ---------------------------------------------------------------- data and calibration


def test_load_local_splits_and_provenance(train_docs, test_docs):
    docs, prov = train_docs
    assert prov["n"] == len(docs) == 7473 and test_docs[1]["n"] == len(test_docs[0]) == 1319
    assert prov["source"] == "local" and prov["split"] == "train" and prov["file"] == "gsm8k/train.jsonl"
    assert prov["sha256"] == hashlib.sha256((DATA_DIR / "gsm8k" / "train.jsonl").read_bytes()).hexdigest()
    assert test_docs[1]["file"] == "gsm8k/test.jsonl" and test_docs[1]["sha256"] != prov["sha256"]
    assert set(docs[0]) == {"question", "answer"}
    assert docs[0]["question"].startswith("Natalia sold clips to 48 of her friends")


def test_final_answer_on_real_items(train_docs):
    docs, _ = train_docs
    assert final_answer(docs[0]["answer"]) == "72" and final_answer(docs[1]["answer"]) == "10"
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", final_answer(d["answer"])) for d in docs)
    assert final_answer("so 1000 + 234 = 1,234\n#### 1,234") == "1234"
    with pytest.raises(GispError, match="#### "):
        final_answer("no final line")


def test_calibration_pairs_from_train_are_seeded(train_docs, test_docs):
    docs, prov = train_docs
    assert prov["part"] == "calibration" and prov["file"] == "gsm8k/train.jsonl"
    pairs = calibration_pairs(docs, 50, seed=0)
    assert pairs == calibration_pairs(docs, 50, seed=0) and pairs != calibration_pairs(docs, 50, seed=1)
    assert len(pairs) == 50 and len({p for p, _ in pairs}) == 50  # without replacement
    by_question = {PROMPT_TEMPLATE.format(question=d["question"]): d["answer"] for d in docs}
    test_prompts = {PROMPT_TEMPLATE.format(question=d["question"]) for d in test_docs[0]}
    for prompt, answer in pairs:
        assert prompt.startswith("Q: ") and prompt.endswith("\nA: ")
        assert by_question[prompt] == answer  # the gold solution exactly as in the train file
        assert prompt not in test_prompts
    assert PROMPT_TEMPLATE.format(question="Q1?") + "s <<1+1=2>>2\n#### 2" == "Q: Q1?\nA: s <<1+1=2>>2\n#### 2"


# ---------------------------------------------------------------- the lm-eval task config


def test_yaml_is_lm_eval_gsm8k_with_local_data():
    ours, theirs = load_yaml(TASK_YAML), load_yaml(lm_eval_gsm8k_yaml())
    same = ("doc_to_text", "doc_to_target", "output_type", "generation_kwargs", "filter_list", "metric_list",
            "training_split", "fewshot_split", "test_split", "repeats", "metadata")
    assert {k: ours[k] for k in same} == {k: theirs[k] for k in same}
    for key in ("target_delimiter", "fewshot_delimiter", "description", "fewshot_config", "process_docs"):
        assert key not in ours and key not in theirs  # same lm-eval defaults on both sides
    assert ours["dataset_path"] == "json" and ours["num_fewshot"] == 8


def test_task_config_absolute_files_and_overrides(tmp_path):
    cfg = task_config("local", DATA_DIR, num_fewshot=3, max_gen_toks=17, cache_dir=tmp_path)
    files = cfg["dataset_kwargs"]["data_files"]
    assert files == {s: str((DATA_DIR / "gsm8k" / f"{s}.jsonl").resolve()) for s in ("train", "test")}
    assert cfg["dataset_kwargs"]["cache_dir"] == str(tmp_path)
    assert cfg["num_fewshot"] == 3 and cfg["generation_kwargs"]["max_gen_toks"] == 17
    assert cfg["generation_kwargs"]["until"] == load_yaml(lm_eval_gsm8k_yaml())["generation_kwargs"]["until"]
    hub = task_config("hub", num_fewshot=8, max_gen_toks=256)
    assert hub["task"] == "gsm8k" and hub["dataset_path"] == "openai/gsm8k" and hub["num_fewshot"] == 8


def test_rendered_prompts_equal_lm_eval_gsm8k(gisp_task, lm_eval_task, test_docs):
    doc = test_docs[0][0]
    task_doc = gisp_task.test_docs()[0]
    assert task_doc["question"] == doc["question"]  # lm-eval reads the same file in the same order
    assert gisp_task.doc_to_text(task_doc) == lm_eval_task.doc_to_text(task_doc) == (
        f"Question: {doc['question']}\nAnswer:"
    )
    assert gisp_task.doc_to_target(task_doc) == lm_eval_task.doc_to_target(task_doc) == doc["answer"]
    context = gisp_task.fewshot_context(task_doc, num_fewshot=2)
    assert context == lm_eval_task.fewshot_context(task_doc, num_fewshot=2)
    assert context.count("Question: ") == 3 and context.endswith(f"Question: {doc['question']}\nAnswer:")


# ---------------------------------------------------------------- answer extraction and scoring


def _ensembles(filter_list: list[dict]) -> dict:
    """The filter pipelines exactly as lm-eval's ConfigurableTask builds them from a YAML filter_list."""
    return {
        f["name"]: build_filter_ensemble(
            f["name"], [[s["function"], {k: v for k, v in s.items() if k != "function"}] for s in f["filter"]]
        )
        for f in filter_list
    }


GENERATIONS = [  # (model output, strict-match, flexible-extract)
    ("She had 48 + 24 = 72 apples, so she has 72 apples.\n#### 72", "72", "72"),
    ("The answer is $1,234.", "[invalid]", "$1,234."),
    ("It drops by 3.5 degrees.\n#### -3.5\n\nQuestion", "-3.5", "-3.5"),
    ("I do not know.", "[invalid]", "[invalid]"),
]


def test_filters_extract_known_generations():
    ensembles = _ensembles(load_yaml(TASK_YAML)["filter_list"])
    assert set(ensembles) == set(METRICS)
    instances = [Instance("generate_until", {}, ("", {}), i, resps=[g[0]]) for i, g in enumerate(GENERATIONS)]
    for ensemble in ensembles.values():
        ensemble.apply(instances)
    assert [i.filtered_resps["strict-match"] for i in instances] == [g[1] for g in GENERATIONS]
    assert [i.filtered_resps["flexible-extract"] for i in instances] == [g[2] for g in GENERATIONS]


@pytest.mark.parametrize(("extracted", "gold", "correct"), [
    ("$1,234.", "1000 + 234 = 1234\n#### 1234", 1.0),
    ("1,234", "#### 1234", 1.0),
    ("72", "48+24 = <<48+24=72>>72\n#### 72", 1.0),
    ("1235", "#### 1234", 0.0),
    ("[invalid]", "#### 1234", 0.0),
])
def test_exact_match_metric_of_the_task(gisp_task, extracted, gold, correct):
    """lm-eval's process_results with the YAML's metric_list (regexes_to_ignore strip "$", ",", "....#### ")."""
    assert gisp_task.process_results({"question": "q", "answer": gold}, [extracted]) == {"exact_match": correct}
    assert [f.name for f in gisp_task._filters] == list(METRICS)


# ---------------------------------------------------------------- bad input


def test_bad_input_raises_gisp_error(tmp_path, train_docs, monkeypatch):
    with pytest.raises(GispError, match="GISP_DATA_DIR"):
        load_gsm8k("calibration", tmp_path, source="local")
    with pytest.raises(GispError, match="data_dir"):
        GSM8KTask(data_dir=tmp_path, source="local")
    with pytest.raises(GispError, match="part"):
        load_gsm8k("validation", DATA_DIR)
    with pytest.raises(GispError, match="n_samples"):
        calibration_pairs(train_docs[0], 7474, seed=0)
    with pytest.raises(GispError, match="n_samples"):
        calibration_pairs(train_docs[0], 0, seed=0)
    with pytest.raises(GispError, match="num_fewshot"):
        GSM8KTask(num_fewshot=-1)
    with pytest.raises(GispError, match="limit"):
        GSM8KTask(limit=0)
    tok = byte_level_tokenizer()
    tok.eos_token = None
    with pytest.raises(GispError, match="eos_token"):
        GSM8KTask(limit=1)(None, tok)  # fails before any model work

    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(GispError, match="network"):
        load_gsm8k("evaluation", tmp_path)  # auto: no local file -> hub -> offline


# ---------------------------------------------------------------- end to end


def test_gsm8k_task_end_to_end_on_tiny_model(tmp_path):
    """lm-eval generation on the live model: the prompt (2 shots, ~1500 bytes) is left-truncated by HFLM to
    max_position_embeddings - max_gen_toks = 248 byte tokens."""
    torch.set_num_threads(1)
    model, tok = tiny_model("llama"), byte_level_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    task = GSM8KTask(limit=2, num_fewshot=2, max_gen_toks=8, batch_size=2, work_dir=tmp_path)
    metrics = task(model, tok, progress=False)
    assert set(metrics) == set(METRICS.values()) | {f"{m}_stderr" for m in METRICS.values()}  # lm-eval's errors
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert model.training  # mode restored, same weights: the live model was used, not a copy
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    info = task.describe()
    assert info["source"] == "local" and info["n_evaluated"] == 2 and info["num_fewshot"] == 2
    assert info["files"]["test"]["sha256"] == load_gsm8k("evaluation", DATA_DIR)[1]["sha256"]
    assert info["filters"]["strict-match"] == "#### (\\-?[0-9\\.\\,]+)" and info["lm_eval_version"]
