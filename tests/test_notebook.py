"""notebooks/analysis.ipynb runs on the outputs of a tiny real run: figures, table and summary.json written, the
per-layer heatmap values are the masks files' kept fractions, and the stored notebook carries no outputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import REPO, compose

from gisp.config import load_settings
from gisp.pipeline import run

pytestmark = pytest.mark.e2e  # end to end: runs as users type, in fresh processes

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = REPO / "notebooks" / "analysis.ipynb"
PNG = b"\x89PNG\r\n\x1a\n"


def tiny_overrides(text_file) -> list[str]:
    """test_pipeline's TINY, over a short local text for both calibration and perplexity (tokenizing the whole of
    Austen and WikiText-2 would take most of the run's time), without the 2048-token perplexity."""
    return ["data=local_text", f"data.text.local_files=[{text_file}]", "data.n_samples=8", "data.seq_len=32",
            "data.batch_size=4", f"eval.tasks.wikitext2_ppl.text.local_files=[{text_file}]",
            "eval.tasks.wikitext2_ppl.text.source=local", "eval.tasks.wikitext2_ppl.max_windows=8",
            "eval.tasks.wikitext2_ppl.seq_len=64", "~eval.tasks.wikitext2_ppl_2048"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One real tiny Mistral run to 30% and 50%, and two copies of it: one relabelled oneshot, one without the
    method's "pruner" key (read as gisp; two runs sharing a method are told apart by their dir names)."""
    tmp = tmp_path_factory.mktemp("notebook")
    text = "\n\n".join(p.read_text() for p in sorted((REPO / "gisp").glob("*.py")))[:60_000]  # any text will do
    (tmp / "text.txt").write_text(text)
    overrides = ["model=tiny_mistral", "sparsity=[0.3,0.5]", "logger=none", "progress=false", "threads=1",
                 f"cache_dir={tmp / 'cache'}", *tiny_overrides(tmp / "text.txt")]
    cfg = compose("config", *overrides)
    runs = tmp / "runs"
    run(load_settings(cfg), run_dir=runs / "run_gisp")
    from gisp.recovery.runner import recover_run
    from gisp.recovery.settings import recover_settings

    recover_run(runs / "run_gisp", recover_settings({"method": "lora", "tokens": 1024, "seq_len": 32, "batch_size": 4,
                                                     "val_tokens": 256}), progress=False)  # pruned vs recovered
    for name, pruner in (("run_gisp_again", None), ("run_oneshot", "oneshot"), ("run_oneshot_seed1", "oneshot")):
        shutil.copytree(runs / "run_gisp", runs / name)
        results = json.loads((runs / name / "results.json").read_text())
        results["method"].pop("pruner", None)  # an older run: no key, read as gisp
        if pruner:
            results["method"]["pruner"] = pruner
        if name.endswith("seed1"):  # the same setting with another calibration seed: other values
            results["seed"] = 1
            results["targets"]["0.5"]["metrics"]["wikitext2_ppl"] *= 1.1
        (runs / name / "results.json").write_text(json.dumps(results))
    return runs


@pytest.fixture(scope="module")
def executed(runs, tmp_path_factory):
    """The notebook executed over the runs (two globs: dirs and a results.json): (figures folder, notebook)."""
    figures = tmp_path_factory.mktemp("figures")
    with pytest.MonkeyPatch.context() as mp:  # the kernel inherits this environment
        mp.setenv("GISP_RUNS", f"{runs}/run_gisp*:{runs}/run_oneshot/results.json:{runs}/run_oneshot_seed1")
        mp.setenv("GISP_FIGURES", str(figures))
        mp.delenv("GISP_WANDB_PROJECT", raising=False)
        nb = execute()
    return figures, nb


def execute():
    """Runs the stored notebook in a fresh python3 kernel started in the repo root (it inherits os.environ)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO)}}).execute()
    return nb


def test_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


def test_figures_table_and_summary(executed, runs):
    figures, _ = executed
    summary = json.loads((figures / "summary.json").read_text())
    expected = {"metric_wikitext2_ppl.png", "layers_oneshot_run_oneshot.png", "layers_gisp_run_gisp.png",
                "layers_gisp_run_gisp_again.png"}
    assert expected <= set(summary["figures"])
    for name in summary["figures"]:
        data = (figures / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000, name
    assert {r["method"] for r in summary["runs"]} == {"gisp", "oneshot"}
    assert sorted(r["label"] for r in summary["runs"]) == ["gisp (run_gisp)", "gisp (run_gisp_again)",
                                                           "oneshot (run_oneshot)", "oneshot (run_oneshot_seed1)"]
    seeds = (figures / summary["seed_table"]).read_text()  # the two oneshot seeds: mean +- std over n=2
    row = next(line for line in seeds.splitlines() if line.startswith("| oneshot") and "| 0.5 |" in line)
    assert "(n=2)" in row and "metrics_seeds.png" in summary["figures"]
    assert "wikitext2_ppl" in summary["metrics"]
    table = (figures / summary["table"]).read_text()
    assert "| oneshot (run_oneshot) |" in table and "| gisp (run_gisp) |" in table
    oneshot = [line for line in table.splitlines() if line.startswith("| oneshot (run_oneshot) |")]
    assert len([line for line in oneshot if "+lora" not in line]) == 3  # dense, 0.3, 0.5 (+ the copied recovery)
    recovered = [line for line in table.splitlines() if line.startswith("| gisp (run_gisp) |") and "+lora" in line]
    assert [line.split("|")[3].strip() for line in recovered] == ["0.3+lora", "0.5+lora"]  # pruned vs recovered


def test_heatmap_values_are_the_masks_kept_fractions(executed, runs):
    from safetensors.numpy import load_file

    figures, _ = executed
    summary = json.loads((figures / "summary.json").read_text())
    entry = next(e for e in summary["layers"] if e["method"] == "oneshot")
    assert entry["figure"] == "layers_oneshot_run_oneshot.png" and entry["levels"] == ["0.3", "0.5"]
    results = json.loads((runs / "run_oneshot" / "results.json").read_text())
    for j, level in enumerate(entry["levels"]):
        masks = load_file(str(runs / "run_oneshot" / results["targets"][level]["masks"]))
        n_layers = len(entry["heads_kept"])
        heads = [masks[f"layers.{i}.heads"].mean() for i in range(n_layers)]
        channels = [masks[f"layers.{i}.channels"].mean() for i in range(n_layers)]
        np.testing.assert_allclose([row[j] for row in entry["heads_kept"]], heads)
        np.testing.assert_allclose([row[j] for row in entry["channels_kept"]], channels)
    assert min(min(row) for row in entry["channels_kept"]) < 1  # something was pruned: the comparison means something
    assert entry["heads_kept"][-1] == entry["channels_kept"][-1] == [1.0, 1.0]  # the last layer is protected


def test_runs_without_any_run_dir(tmp_path, monkeypatch):
    """An empty glob is no error: an empty table and a summary with no figures."""
    monkeypatch.setenv("GISP_RUNS", str(tmp_path / "nothing" / "**" / "results.json"))
    monkeypatch.setenv("GISP_FIGURES", str(tmp_path / "figures"))
    monkeypatch.delenv("GISP_WANDB_PROJECT", raising=False)
    execute()
    summary = json.loads((tmp_path / "figures" / "summary.json").read_text())
    assert summary["runs"] == [] and summary["figures"] == []
