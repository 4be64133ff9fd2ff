"""Evaluation kind `lm_eval`: lm-eval's own tasks by name. Offline, built-in tasks fail before any model work; a local
task YAML (include_path) runs on the live tiny model and its accuracy equals the one computed by hand from the
model's log-likelihoods of each choice."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import CONF, tiny_model

from gisp.errors import GispError
from gisp.eval.lm_eval_tasks import LmEvalTasks, flatten_results
from gisp.eval.suite import EVAL_KINDS, eval_task_spec
from gisp.models.byte_tokenizer import byte_level_tokenizer

ITEMS = [
    ("The sky on a clear day is", ["blue", "green", "loud"], 0),
    ("Water freezes at zero degrees", ["Celsius", "Kelvin", "volts"], 0),
    ("A cat says", ["woof", "meow", "moo"], 1),
    ("Two plus two is", ["three", "five", "four"], 2),
    ("The opposite of hot is", ["cold", "warm"], 0),
    ("Bees make", ["honey", "milk", "silk", "wax"], 0),
    ("The sun rises in the", ["west", "east"], 1),
    ("Fish live in", ["trees", "water", "sand"], 1),
]


def _write_task(root, name="my_task", dataset_path="json", files=None):
    """A tiny multiple-choice task YAML and its jsonl in ``root`` (the datasets cache goes next to ``root``)."""
    root.mkdir(parents=True, exist_ok=True)
    data = root / "items.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": y}) + "\n" for q, c, y in ITEMS))
    cfg = {
        "task": name,
        "dataset_path": dataset_path,
        "dataset_kwargs": {"data_files": {"test": str(data.resolve()) if files is None else files},
                           "cache_dir": str((root.parent / f"{root.name}_hf").resolve())},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }
    (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return root


@torch.no_grad()
def _oracle(model, tokenizer, n: int) -> tuple[float, float]:
    """acc and acc_norm from each choice's summed log-likelihood of " choice" after the question (byte tokens)."""
    acc, acc_norm = [], []
    for question, choices, label in ITEMS[:n]:
        lls = []
        for choice in choices:
            ctx = tokenizer(question, add_special_tokens=False)["input_ids"]
            ids = tokenizer(question + " " + choice, add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)  # (len, vocab)
            lls.append(sum(float(logp[t - 1, ids[t]]) for t in range(len(ctx), len(ids))))
        norm = [ll / len(c) for ll, c in zip(lls, choices)]
        acc.append(float(max(range(len(lls)), key=lls.__getitem__) == label))
        acc_norm.append(float(max(range(len(norm)), key=norm.__getitem__) == label))
    return sum(acc) / n, sum(acc_norm) / n


def test_offline_builtin_task_fails_before_the_run():
    with pytest.raises(GispError) as err:
        LmEvalTasks(names=("arc_easy",))
    msg = str(err.value)
    assert "arc_easy" in msg and "eval=cmqa" in msg and "eval=gsm8k" in msg and "include_path" in msg


def test_settings_and_local_data_are_checked_at_construction(tmp_path):
    for bad in ({"names": ()}, {"names": ("a", "a")}, {"names": ("my_task",), "limit": 0},
                {"names": ("my_task",), "batch_size": 0}, {"names": ("my_task",), "num_fewshot": -1},
                {"names": ("my_task",), "include_path": str(tmp_path / "nope")}):
        with pytest.raises(GispError):
            LmEvalTasks(**bad)
    hub = _write_task(tmp_path / "hub", dataset_path="allenai/ai2_arc")
    with pytest.raises(GispError, match=r"my_task.*not available offline.*hub.*eval=cmqa"):
        LmEvalTasks(names=("my_task",), include_path=str(hub))
    with pytest.raises(GispError, match="relative path"):
        LmEvalTasks(names=("my_task",), include_path=str(_write_task(tmp_path / "rel", files="items.jsonl")))
    with pytest.raises(GispError, match="other_task.*not a local task"):
        LmEvalTasks(names=("my_task", "other_task"), include_path=str(_write_task(tmp_path / "ok")))


def test_local_task_accuracy_equals_hand_computation(tmp_path):
    root = _write_task(tmp_path / "tasks")
    model, tok = tiny_model("llama"), byte_level_tokenizer()  # vocab 300 covers the 259 byte tokens
    assert model.config.vocab_size >= len(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()

    node = yaml.safe_load((CONF / "eval" / "lm_eval.yaml").read_text())["tasks"]["lm_eval"]
    spec = eval_task_spec("lm_eval", {**node, "names": ["my_task"], "include_path": str(root)})
    task = EVAL_KINDS["lm_eval"].build(spec, None, tmp_path / "work")  # the registry entry and conf/eval YAML
    assert isinstance(task, LmEvalTasks) and task.names == ("my_task",) and task.num_fewshot == 0

    metrics = task(model, tok, progress=False)
    assert set(metrics) == {"my_task_acc", "my_task_acc_norm", "my_task_acc_stderr", "my_task_acc_norm_stderr"}
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    acc, acc_norm = _oracle(model.eval(), tok, len(ITEMS))
    assert metrics["my_task_acc"] == pytest.approx(acc) and metrics["my_task_acc_norm"] == pytest.approx(acc_norm)
    info = task.describe()
    assert info["n_evaluated"] == {"my_task": len(ITEMS)} and info["names"] == ["my_task"]
    assert info["tasks"]["my_task"]["source"] == "local" and info["include_path"] == str(root.resolve())
    assert info["lm_eval_version"] and info["num_fewshot"] == 0 and info["limit"] is None

    few = LmEvalTasks(names=("my_task",), include_path=str(root), limit=3, metrics={"my_task": "acc"})
    got = few(model, tok, progress=False)
    assert got["my_task_acc"] == pytest.approx(_oracle(model, tok, 3)[0]) and set(got) <= {"my_task_acc",
                                                                                        "my_task_acc_stderr"}
    assert few.describe()["n_evaluated"] == {"my_task": 3}


def test_metric_names_keep_stderr_and_drop_the_none_filter():
    results = {"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1,
                         "exact_match,flexible-extract": 0.5},
               "arc_easy": {"acc,none": 0.4, "acc_stderr,none": 0.02, "acc_norm,none": 0.375}}
    assert flatten_results(results) == {"gsm8k_exact_match_strict_match": 0.25,
                                        "gsm8k_exact_match_strict_match_stderr": 0.1,
                                        "gsm8k_exact_match_flexible_extract": 0.5,
                                        "arc_easy_acc": 0.4, "arc_easy_acc_stderr": 0.02, "arc_easy_acc_norm": 0.375}
    assert flatten_results(results, {"arc_easy": ("acc_norm",)}) == {"arc_easy_acc_norm": 0.375}
    assert flatten_results(results, {"arc_easy": ("acc",)}) == {"arc_easy_acc": 0.4, "arc_easy_acc_stderr": 0.02}
    with pytest.raises(GispError, match="arc_easy_f1"):
        flatten_results(results, {"arc_easy": ("f1",)})
