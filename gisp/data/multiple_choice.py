"""Multiple-choice tasks (the seven commonsense "CMQA" tasks and MedQA): documents and what lm-eval scores of them.

Documents come in the Hugging Face schema that lm-eval's own task of the same name consumes, from the hub (the
task's ``dataset_path``/``dataset_name``) or from the offline copies in the data directory (MANIFEST §3). Offline,
calibration never sees what is evaluated: ARC Dev / OpenBookQA train calibrate and ARC Test / OpenBookQA test are
evaluated (as lm-eval does); the single labelled file of BoolQ, PIQA, HellaSwag and WinoGrande is split by a seeded
permutation, first half calibration, second half evaluation.

:func:`render` turns a document into exactly the (context, continuation) pairs lm-eval scores: it runs lm-eval's
``ConfigurableTask`` (through :mod:`gisp.eval.harness`) on gisp's task YAMLs (``gisp/eval/tasks``), the same files
:mod:`gisp.eval.multiple_choice` evaluates.
"""

from __future__ import annotations

import bz2
import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gisp.data.sources import SOURCES, choose_source, resolve_data_dir
from gisp.errors import GispError
from gisp.hub import OFFLINE_VARS
from gisp.io import file_sha256, read_jsonl

CMQA_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
MC_TASKS = (*CMQA_TASKS, "medqa")
PARTS = ("calibration", "evaluation")
TASKS_DIR = Path(__file__).resolve().parent.parent / "eval" / "tasks"


@dataclass(frozen=True)
class TaskSpec:
    """One task: lm-eval's own task (hub), gisp's YAML (local) and the local files of each part."""

    name: str
    lm_eval_task: str  # lm-eval's task name
    lm_eval_yaml: str  # its config, relative to lm_eval/tasks
    metric: str  # the metric gisp reports: acc or acc_norm
    calibration_files: tuple[str, ...]  # relative to the data directory
    evaluation_files: tuple[str, ...]  # equal to calibration_files: one labelled file, split in halves

    @property
    def gisp_yaml(self) -> Path:
        return TASKS_DIR / f"gisp_{self.name}.yaml"

    @property
    def split_locally(self) -> bool:
        return self.calibration_files == self.evaluation_files


def _spec(name, lm_task, yaml, metric, calib, evaluation=None) -> TaskSpec:
    return TaskSpec(name, lm_task, yaml, metric, calib, calib if evaluation is None else evaluation)


SPECS: dict[str, TaskSpec] = {s.name: s for s in (
    _spec("boolq", "boolq", "super_glue/boolq/default.yaml", "acc", ("boolq/val.jsonl",)),
    _spec("piqa", "piqa", "piqa/piqa.yaml", "acc_norm", ("piqa/valid.jsonl", "piqa/valid-labels.lst")),
    _spec("hellaswag", "hellaswag", "hellaswag/hellaswag.yaml", "acc_norm", ("hellaswag/hellaswag_val_full.txt.bz2",)),
    _spec("winogrande", "winogrande", "winogrande/default.yaml", "acc",
          ("mosaicml_icl/winogrande.jsonl", "winogrande/dev-labels.lst")),
    _spec("arc_easy", "arc_easy", "arc/arc_easy.yaml", "acc_norm", ("arc_easy/ARC-Easy-Dev.jsonl",),
          ("arc_easy/ARC-Easy-Test.jsonl",)),
    _spec("arc_challenge", "arc_challenge", "arc/arc_challenge.yaml", "acc_norm",
          ("arc_challenge/ARC-Challenge-Dev.jsonl",), ("arc_challenge/ARC-Challenge-Test.jsonl",)),
    _spec("openbookqa", "openbookqa", "openbookqa/openbookqa.yaml", "acc_norm", ("openbookqa/train.tsv",),
          ("openbookqa/test.tsv",)),
    # No offline copy exists in ../shared/data; users may place HF-schema jsonl files (sent1, ending0-3, label) here.
    _spec("medqa", "medqa_4options", "medqa/medqa.yaml", "acc_norm", ("medqa/train.jsonl",), ("medqa/test.jsonl",)),
)}


@dataclass(frozen=True)
class Candidate:
    context: str
    continuation: str  # target_delimiter (" ") + the choice (or, for winogrande, the shared rest of the sentence)


@dataclass(frozen=True)
class MCQuestion:
    task: str
    doc_id: str
    candidates: tuple[Candidate, ...]
    gold: int


def task_spec(task: str) -> TaskSpec:
    if task not in SPECS:
        raise GispError(f"unknown multiple-choice task {task!r}; use one of {list(MC_TASKS)}")
    return SPECS[task]


def lm_eval_yaml(task: str) -> Path:
    """lm-eval's installed config of ``task`` (what the hub mode runs and gisp's YAML mirrors)."""
    from gisp.eval.harness import installed_task_yaml

    return installed_task_yaml(task_spec(task).lm_eval_yaml)


def load_task_config(path: Path) -> dict:
    """A task YAML as lm-eval reads it (``include`` merged, ``!function`` resolved), without structural keys."""
    from gisp.eval.harness import load_task_yaml

    cfg = load_task_yaml(path, resolve_func=True)
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    return cfg


# ----------------------------------------------------------------------------------------------- local readers


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _read_boolq(paths):
    labels = {"true": 1, "false": 0}
    docs = []
    for row in read_jsonl(paths[0]):  # SuperGLUE stores the label as the string "true"/"false"; HF as 1/0
        label = row["label"]
        label = labels[label.lower()] if isinstance(label, str) else int(label)
        docs.append({"question": row["question"], "passage": row["passage"], "idx": row["idx"], "label": label})
    return docs


def _read_piqa(paths):
    rows, labels = read_jsonl(paths[0]), _lines(paths[1])
    if len(rows) != len(labels):
        raise GispError(f"{paths[0]} has {len(rows)} items but {paths[1]} {len(labels)} labels; restore both files")
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(y)} for r, y in zip(rows, labels)]


def hellaswag_query(local_query: str) -> str:
    """lm-eval's query from the llama.cpp text line ``activity_label: ctx`` (MANIFEST §3, HellaSwag).

    lm-eval builds ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``; the local line keeps
    ``ctx_b`` as is and a few ``[...]`` spans. ``ctx_b`` (ActivityNet items only; empty for WikiHow) is the
    lower-case fragment after the last sentence, so it is capitalized here and lm-eval's preprocess is applied again.
    """
    from gisp.eval.harness import hellaswag_preprocess

    query = hellaswag_preprocess(local_query)
    match = re.fullmatch(r"(.*\.) ([a-z][^.]*)", query)
    return f"{match.group(1)} {match.group(2).capitalize()}" if match else query


def _read_hellaswag(paths):
    from gisp.eval.harness import hellaswag_preprocess as preprocess

    with bz2.open(paths[0], "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    docs = []
    for start in range(0, len(lines) - 5, 6):  # query, label, 4 endings
        query, label, *endings = lines[start:start + 6]
        docs.append({"query": hellaswag_query(query), "choices": [preprocess(e) for e in endings],
                     "label": label.strip(), "gold": int(label)})
    return docs


def winogrande_doc(context_options: list[str], continuation: str, answer: str) -> dict:
    """The HF winogrande document whose lm-eval rendering is ``context_options`` and ``continuation``.

    The options start after the last space the two contexts share (the blank follows a space); the rest of the
    sentence follows the blank after a space unless it starts with punctuation. lm-eval strips that part, so the
    rendering is exact either way (checked on every item by the tests).
    """
    shared = os.path.commonprefix(list(context_options))
    cut = shared.rfind(" ") + 1
    gap = " " if continuation[:1].isalnum() else ""
    return {"sentence": context_options[0][:cut] + "_" + gap + continuation, "option1": context_options[0][cut:],
            "option2": context_options[1][cut:], "answer": answer}


def _read_winogrande(paths):
    rows, labels = read_jsonl(paths[0]), _lines(paths[1])
    if len(rows) != len(labels):
        raise GispError(f"{paths[0]} has {len(rows)} items but {paths[1]} {len(labels)} labels; restore both files")
    docs = []
    for row, label in zip(rows, labels):
        if int(row["gold"]) + 1 != int(label):
            docs.append(None)  # the two copies disagree on the answer: skipped
            continue
        docs.append(winogrande_doc(row["context_options"], row["continuation"], label))
    return docs


def _read_arc(paths):
    docs = []
    for row in read_jsonl(paths[0]):
        choices = row["question"]["choices"]
        labels = [c["label"] for c in choices]
        docs.append(None if row["answerKey"] not in labels else {
            "id": row["id"], "question": row["question"]["stem"],
            "choices": {"text": [c["text"] for c in choices], "label": labels}, "answerKey": row["answerKey"]})
    return docs


def _read_openbookqa(paths):
    docs = []
    with paths[0].open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        for row in reader:  # Choices: "(A) text (B) text (C) text (D) text"
            parts = re.split(r"\s*\(([A-D])\)\s", " " + row["Choices"].strip())
            labels, texts = parts[1::2], [t.strip() for t in parts[2::2]]
            ok = labels == ["A", "B", "C", "D"] and all(texts) and row["Answer Key"].strip() in labels
            docs.append({"id": row["ID"], "question_stem": row["Question Stem"],
                         "choices": {"text": texts, "label": labels}, "answerKey": row["Answer Key"]} if ok else None)
    return docs


def _read_medqa(paths):
    return read_jsonl(paths[0])


READERS = {"boolq": _read_boolq, "piqa": _read_piqa, "hellaswag": _read_hellaswag, "winogrande": _read_winogrande,
           "arc_easy": _read_arc, "arc_challenge": _read_arc, "openbookqa": _read_openbookqa, "medqa": _read_medqa}
SKIP_REASONS = {"winogrande": "mosaicml gold disagrees with dev-labels.lst", "arc_easy": "answerKey not a label",
                "arc_challenge": "answerKey not a label", "openbookqa": "choices not '(A) .. (D) ..' or bad answer key"}

# ----------------------------------------------------------------------------------------------------- loading


def local_files(task: str, part: str, data_dir: str | Path | None) -> list[Path] | None:
    """The local files of ``task``/``part``, or None when no data directory is known."""
    spec = task_spec(task)
    root = resolve_data_dir(data_dir)
    files = spec.calibration_files if part == "calibration" else spec.evaluation_files
    return None if root is None else [root / rel for rel in files]


def _what(task: str, part: str) -> str:
    extra = " (there is no offline MedQA copy in ../shared/data)" if task == "medqa" else ""
    return f"{task} {part} data{extra}"


def _fix(task: str, paths: list[Path] | None) -> str:
    spec = task_spec(task)
    where = ", ".join(map(str, paths)) if paths else "<data_dir>/" + ", <data_dir>/".join(spec.evaluation_files)
    return (f"Fix: place the files at {where} (data_dir= or $GISP_DATA_DIR; MANIFEST.md lists the formats), or run "
            f"with network access and source='hub' (lm-eval task {spec.lm_eval_task!r}; "
            f"unset {'/'.join(OFFLINE_VARS)})")


def _no_data_error(task: str, part: str, paths: list[Path] | None, why: str) -> GispError:
    return GispError(f"{_what(task, part)}: {why}. {_fix(task, paths)}")


def resolve_source(task: str, part: str, data_dir: str | Path | None, source: str) -> str:
    """``local`` or ``hub`` for ``source`` (auto: local when all local files exist); raises if neither can work."""
    if source not in SOURCES:
        raise GispError(f"unknown source {source!r}; use one of {list(SOURCES)}")
    if part not in PARTS:
        raise GispError(f"unknown part {part!r}; use one of {list(PARTS)}")
    paths = local_files(task, part, data_dir)
    present = paths is not None and all(p.is_file() for p in paths)
    if source == "local" and not present:
        missing = [p for p in paths or [] if not p.is_file()]
        what = ", ".join(map(str, missing)) or "no data directory found"
        raise _no_data_error(task, part, paths, f"local file(s) missing: {what}")
    return choose_source(source, present, _what(task, part), _fix(task, paths))


def _load_local(task: str, part: str, data_dir, split_seed: int) -> tuple[list[dict], dict]:
    spec = task_spec(task)
    paths = local_files(task, part, data_dir)
    raw = READERS[task](paths)
    rows = [i for i, doc in enumerate(raw) if doc is not None]
    prov: dict[str, Any] = {
        "files": [{"file": rel, "sha256": file_sha256(p)} for rel, p in
                  zip(spec.calibration_files if part == "calibration" else spec.evaluation_files, paths)],
        "n_skipped": len(raw) - len(rows),
    }
    if prov["n_skipped"]:
        prov["skipped_why"] = SKIP_REASONS.get(task, "unreadable item")
    if spec.split_locally:
        perm = np.random.default_rng(split_seed).permutation(len(rows))
        half = len(rows) // 2
        picked = perm[:half] if part == "calibration" else perm[half:]
        rows = [rows[i] for i in picked]
        prov["formed"] = (f"seeded permutation (numpy default_rng({split_seed})) of the {len(perm)} labelled items; "
                          f"first {half} -> calibration, remaining {len(perm) - half} -> evaluation")
    else:
        prov["formed"] = f"the whole file ({'calibration' if part == 'calibration' else 'evaluation'} split)"
    prov["rows"] = rows  # indices of the documents in the (first) file, in document order
    return [raw[i] for i in rows], prov


def _load_hub(task: str, part: str) -> tuple[list[dict], dict]:
    import datasets

    cfg = load_task_config(lm_eval_yaml(task))
    split = cfg.get("training_split") if part == "calibration" else cfg.get("test_split") or cfg["validation_split"]
    try:
        ds = datasets.load_dataset(cfg["dataset_path"], cfg.get("dataset_name"), split=split)
    except Exception as exc:  # any hub failure gets the same fix
        raise _no_data_error(task, part, None, f"loading {cfg['dataset_path']} ({split}) failed: {exc}") from exc
    if callable(cfg.get("process_docs")):
        ds = cfg["process_docs"](ds)
    docs = list(ds)
    hub = f"{cfg['dataset_path']}" + (f"/{cfg['dataset_name']}" if cfg.get("dataset_name") else "")
    return docs, {"hub": hub, "split": split, "fingerprint": getattr(ds, "_fingerprint", None),
                  "formed": f"the hub {split} split", "n_skipped": 0}


def load_docs(task: str, part: str, data_dir: str | Path | None = None, source: str = "auto",
              split_seed: int = 1234) -> tuple[list[dict], dict]:
    """Documents of ``task`` for ``part`` ("calibration" | "evaluation") in lm-eval's HF schema, and provenance."""
    src = resolve_source(task, part, data_dir, source)
    docs, prov = _load_local(task, part, data_dir, split_seed) if src == "local" else _load_hub(task, part)
    return docs, {"task": task, "source": src, "part": part, "n": len(docs), "split_seed": split_seed, **prov}


# --------------------------------------------------------------------------------------------------- rendering


def build_renderer(config: dict, docs: list[dict]):
    """lm-eval's ``ConfigurableTask`` for ``config`` over in-memory ``docs`` (no download): the prompt machinery."""
    from gisp.eval.harness import task_renderer

    return task_renderer(config, docs)


def render_with(lm_task, task: str, doc: dict, doc_id: str = "") -> MCQuestion:
    """What ``lm_task`` scores for ``doc`` zero-shot: its loglikelihood requests and the gold index."""
    ctx = lm_task.fewshot_context(doc=doc, num_fewshot=0)
    requests = lm_task.construct_requests(doc=doc, ctx=ctx, metadata=(task, 0, 1))
    gold = lm_task.doc_to_text(doc) if lm_task.multiple_input else lm_task.doc_to_target(doc)
    if isinstance(gold, str):
        gold = lm_task.doc_to_choice(doc).index(gold)
    candidates = tuple(Candidate(*req.arguments[:2]) for req in requests)
    return MCQuestion(task=task, doc_id=doc_id, candidates=candidates, gold=int(gold))


_RENDERERS: dict[str, Any] = {}  # task -> ConfigurableTask over gisp's YAML (a cache; the schema is per task)


def render(task: str, doc: dict, doc_id: str = "") -> MCQuestion:
    """The candidates lm-eval scores for ``doc`` with gisp's task YAML (identical to lm-eval's own task)."""
    if task not in _RENDERERS:
        _RENDERERS[task] = build_renderer(load_task_config(task_spec(task).gisp_yaml), [doc])
    if not doc_id:
        doc_id = str(doc.get("id", doc.get("idx", doc.get("ind", ""))))
    return render_with(_RENDERERS[task], task, doc, doc_id)


def load_questions(task: str, part: str, data_dir: str | Path | None = None, source: str = "auto",
                   split_seed: int = 1234) -> tuple[list[MCQuestion], dict]:
    """:func:`load_docs` + :func:`render`; doc ids are ``file:row`` locally and ``split:index`` from the hub."""
    docs, prov = load_docs(task, part, data_dir, source, split_seed)
    if prov["source"] == "local":
        stem = Path(prov["files"][0]["file"]).name
        ids = [f"{stem}:{row}" for row in prov["rows"]]
    else:
        ids = [f"{prov['split']}:{i}" for i in range(len(docs))]
    from gisp.eval.harness import compiled_templates

    with compiled_templates():
        return [render(task, doc, doc_id) for doc, doc_id in zip(docs, ids)], prov
