"""End to end on tiny random models: trajectory files, nested masks, targets hit, restore, resume, bad input."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, SMOKE, compose

from gisp.config import load_settings, model_spec
from gisp.errors import GispError
from gisp.eval.suite import eval_task_specs
from gisp.io import read_json
from gisp.models.families import family_spec
from gisp.models.loading import load_model_and_tokenizer
from gisp.models.structure import describe, layer_modules
from gisp.pipeline import run
from gisp.prune.masks import MaskApplier, Masks
from gisp.runs import RunDir


def masks_of(run_dir):
    traj = RunDir(run_dir).trajectory
    return [(s["step"], traj.masks_at(s["step"])) for s in traj.steps]


@pytest.fixture(scope="module")
def mistral_run(tmp_path_factory):
    """One tiny Mistral (GQA) run to 30% and 50%, shared by the checks below."""
    
    tmp = tmp_path_factory.mktemp("mistral")
    cfg = compose("config", *["model=tiny_mistral", "sparsity=[0.3,0.5]", "logger=csv", "progress=false",
                                       f"cache_dir={tmp / 'cache'}", f"store_dir={tmp / 'store'}", *SMOKE])
    results = run(load_settings(cfg), run_dir=tmp / "run")
    return cfg, tmp / "run", results


def test_outputs_and_targets(mistral_run):
    _, run_dir, results = mistral_run
    on_disk = read_json(run_dir / "results.json")
    assert on_disk == json.loads(json.dumps(results))
    assert set(on_disk["targets"]) == {"0.3", "0.5"}
    for key, entry in on_disk["targets"].items():
        assert abs(entry["sparsity"] - float(key)) < 0.005
        assert entry["metrics"]["wikitext2_ppl"] > 1
    assert on_disk["dense"]["metrics"]["wikitext2_ppl"] > 1
    assert on_disk["calibration"]["name"] == "austen" and on_disk["evaluation"]["wikitext2_ppl"]["dataset"]
    assert on_disk["complete"] and on_disk["trajectory"]["computed_steps"] and not on_disk["trajectory"]["reused_steps"]
    traj = RunDir(run_dir).trajectory
    assert traj.id == on_disk["trajectory"]["id"] and traj.reached >= 0.5
    assert traj.steps[-2]["sparsity"] < 0.5  # the trajectory stops at the first step past the largest target
    for step in traj.steps:
        assert {"step", "structural_ratio", "sparsity", "masks", "order"} <= set(step)
        assert (traj.directory / step["masks"]).exists() and (traj.directory / step["order"]).exists()
    for entry in on_disk["targets"].values():
        assert (run_dir / entry["masks"]).exists()
    assert (run_dir / "csv").exists()


def test_masks_nested_and_protected_untouched(mistral_run):
    _, run_dir, _ = mistral_run
    steps = masks_of(run_dir)
    for (_, earlier), (_, later) in itertools.pairwise(steps):
        assert later.is_nested_in(earlier) and later.n_pruned >= earlier.n_pruned
    last = steps[-1][1]
    assert last.heads[3].all() and last.channels[3].all()  # 4 layers: the last one is protected


def test_restoring_a_snapshot_reproduces_the_step(mistral_run):
    """A fresh dense model + the step's masks gives the perplexity measured live during the run, and the same
    logits as the reference's weight-zeroing of that step's structures."""
    cfg, run_dir, results = mistral_run
    model, tok = load_model_and_tokenizer(model_spec(cfg["model"]), cfg["cache_dir"])
    structure = describe(model)
    layers = layer_modules(model, family_spec("mistral"))
    entry = results["targets"]["0.5"]
    masks = Masks.load(run_dir / entry["masks"])
    applier = MaskApplier(layers, structure)
    applier.set(masks)
    from gisp.data.sources import resolve_data_dir
    from gisp.eval.suite import build_evaluator

    evaluator = build_evaluator(eval_task_specs(cfg["eval"]), tok, resolve_data_dir(None))
    assert evaluator(model, progress=False)["wikitext2_ppl"] == pytest.approx(entry["metrics"]["wikitext2_ppl"],
                                                                              rel=1e-6)
    ids = torch.randint(0, len(tok), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        masked = model(ids).logits
        applier.remove()
        for i, m in enumerate(layers):
            cols = (~masks.heads[i]).repeat_interleave(structure.head_dim)
            m.o.weight[:, cols] = 0
            m.down.weight[:, ~masks.channels[i]] = 0
        torch.testing.assert_close(model(ids).logits, masked, rtol=1e-5, atol=1e-5)


def test_resume_gives_the_uninterrupted_masks(mistral_run, compose_cfg, tmp_path):
    _, full_dir, full_results = mistral_run
    cfg = compose_cfg("model=tiny_mistral", "sparsity=[0.3,0.5]", "prune.max_steps_per_run=2", *SMOKE)
    assert run(load_settings(cfg), run_dir=tmp_path / "r") is None
    assert not (tmp_path / "r" / "results.json").exists()
    assert len(masks_of(tmp_path / "r")) == 2
    cfg["prune"]["max_steps_per_run"] = None
    resumed = run(load_settings(cfg), run_dir=tmp_path / "r")
    full, again = masks_of(full_dir), masks_of(tmp_path / "r")
    assert [s for s, _ in full] == [s for s, _ in again]
    for (_, a), (_, b) in zip(full, again):
        assert a.heads.equal(b.heads) and a.channels.equal(b.channels)
    assert resumed["targets"] == full_results["targets"]


def test_resume_refuses_another_config(mistral_run, compose_cfg):
    _, run_dir, _ = mistral_run
    with pytest.raises(GispError, match="another configuration"):
        run(load_settings(compose_cfg("model=tiny_mistral", "sparsity=[0.3,0.5]", "prune.normalization=paper", *SMOKE)),
            run_dir=run_dir)


def test_llama_without_gqa_single_target(compose_cfg, tmp_path):
    cfg = compose_cfg("model=tiny_llama", "sparsity=0.4", "schedule=cosine", "eval=none", *SMOKE)
    results = run(load_settings(cfg), run_dir=tmp_path)
    assert abs(results["targets"]["0.4"]["sparsity"] - 0.4) < 0.005
    assert results["dense"]["metrics"] == {}


@pytest.mark.parametrize("overrides, match", [
    (["sparsity=0.9"], "not reachable"),
    (["sparsity=1.5"], r"outside \[0, 1\)"),
    (["data=local_text", "data.text.local_files=[TMP/short.txt]", "data.seq_len=64"], "seq_len"),
    (["prune.normalization=bogus"], "normalization"),
    (["prune.grad_dtype=float16"], "grad_dtype"),
])
def test_bad_input_fails_early_without_results(compose_cfg, tmp_path, overrides, match):
    (tmp_path / "short.txt").write_text("Too short for one calibration window.")
    overrides = [o.replace("TMP", str(tmp_path)) for o in overrides]
    with pytest.raises(GispError, match=match):
        run(load_settings(compose_cfg("model=tiny_mistral", *SMOKE, *overrides)), run_dir=tmp_path)
    assert not (tmp_path / "results.json").exists()


def test_non_finite_gradients_are_reported(compose_cfg, tmp_path, monkeypatch):
    from gisp import pipeline

    real_loader = pipeline.load_model_and_tokenizer

    def poisoned(spec, cache_dir, **kwargs):
        model, tok = real_loader(spec, cache_dir, **kwargs)
        with torch.no_grad():
            model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
        return model, tok

    monkeypatch.setattr(pipeline, "load_model_and_tokenizer", poisoned)
    with pytest.raises(GispError, match="non-finite gradient"):
        run(load_settings(compose_cfg("model=tiny_mistral", "eval=none", *SMOKE)), run_dir=tmp_path)
    assert not (tmp_path / "results.json").exists()
    assert not list((tmp_path / "store").rglob("step_*"))


@pytest.mark.e2e
def test_an_unknown_model_is_refused_on_the_command_line(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "gisp.run", "model=no_such_model", f"hydra.run.dir={tmp_path / 'r'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert bad.returncode != 0 and "no_such_model" in bad.stderr
    assert not (tmp_path / "r").exists()


def test_wandb_offline_logger_writes_a_run(compose_cfg, tmp_path):
    cfg = compose_cfg("model=tiny_mistral", "sparsity=0.2", *SMOKE)
    cfg["logger"] = compose_cfg("logger=wandb")["logger"]  # the default logger: wandb, offline
    run(load_settings(cfg), run_dir=tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    tables = list(runs[0].glob("files/media/table/results_*.table.json"))  # metric x level table
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["level", "sparsity", "step", "metric", "value", "stderr"]
    assert {row[3] for row in table["data"]} == {"wikitext2_ppl", "wikitext2_ppl_2048"}
    assert all(row[5] > 0 for row in table["data"] if row[3] == "wikitext2_ppl")  # over the 8 windows
    assert {row[0] for row in table["data"]} == {"dense", "0.2"}
    assert (tmp_path / "metrics.png").exists()


def test_export_from_run_dir(mistral_run, tmp_path):
    from gisp.compact import GispDecoderForCausalLM
    from gisp.deploy import export_from_run

    cfg, run_dir, results = mistral_run
    with pytest.raises(GispError, match="never reached sparsity 0.9"):
        export_from_run(run_dir, tmp_path / "x", sparsity=0.9, cache_dir=cfg["cache_dir"])
    assert not (tmp_path / "x").exists()
    out = export_from_run(run_dir, tmp_path / "t50", sparsity=0.5, cache_dir=cfg["cache_dir"])
    with pytest.raises(GispError, match="already exists"):
        export_from_run(run_dir, out, sparsity=0.5, cache_dir=cfg["cache_dir"])
    model, _ = load_model_and_tokenizer(model_spec(cfg["model"]), cfg["cache_dir"])
    structure = describe(model)
    MaskApplier(layer_modules(model, family_spec("mistral")), structure).set(
        Masks.load(run_dir / results["targets"]["0.5"]["masks"]))
    compact = GispDecoderForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 259, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(compact(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)
    assert read_json(out / "gisp_export.json")["step"] == results["targets"]["0.5"]["step"]
