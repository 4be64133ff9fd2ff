"""Reconstructed levels through the commands, on a tiny Mistral (GQA): gisp.run records each level's reconstruction
and evaluates it; the masks stay the trajectory's; a second run dir reuses the stored reconstruction; a run dir holds
one reconstruction (another is refused, naming the command that measures it); the export of a reconstructed level has
the level's shapes and reloads without gisp (HF) and in llama.cpp (GGUF) with the logits gisp evaluated; a recovery
starts from the reconstructed weights; reconstruct=none evaluates the plain masked levels."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO, SMOKE, compose
from llama_cpp_check import assert_logits_close, cpp_logits, load_gguf

from gisp.config import load_settings
from gisp.deploy import evaluate_run
from gisp.errors import GispError
from gisp.io import read_json
from gisp.pipeline import run
from gisp.prune.masks import Masks
from gisp.reconstruct.store import ReconstructionStore
from gisp.runs import RunDir

LEVELS = "sparsity=[0.3,0.5]"
SMALL = ["reconstruct.tokens=2048", "reconstruct.seq_len=32"]


def _cfg(tmp, *overrides):
    return compose("config", "logger=csv", "progress=false", f"cache_dir={tmp / 'cache'}", f"store_dir={tmp / 'store'}",
                   *SMOKE, LEVELS, *overrides)


@pytest.fixture(scope="module")
def lsq_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reconstructed")
    overrides = ["reconstruct=lsq", *SMALL]
    results = run(load_settings(_cfg(tmp, *overrides), overrides=[*SMOKE, LEVELS, *overrides]), run_dir=tmp / "run")
    return tmp, tmp / "run", results


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def test_run_records_reconstructed_levels_and_keeps_the_masks(lsq_run):
    _, run_dir, results = lsq_run
    record = results["reconstruction"]
    definition = record["definition"]
    assert definition["method"] == "lsq" and definition["damp"] == 0.01 and definition["target"] == "local"
    data = record["definition"]["data"]
    assert data["name"] == "austen" and data["tokens"] == 2048 and len(data["content_sha256"]) == 64
    assert record["memory_plan"]["device_total_bytes"] > 0
    run = RunDir(run_dir)
    store = ReconstructionStore(run.trajectory.directory.parent)
    for key, entry in results["targets"].items():
        rec = entry["reconstruction"]
        assert rec["method"] == "lsq" and rec["computed"] and rec["blocks_refitted"] == (3 if key == "0.3" else 0)
        assert (store.root / rec["id"] / "level.safetensors").is_file()
        # the masks are the trajectory's read-out, unchanged by the reconstruction
        assert Masks.load(run_dir / entry["masks"]).equal(run.level(target=float(key), masks_only=True).masks)
        assert entry["metrics"]["wikitext2_ppl"] > 1


def test_second_run_dir_reuses_and_none_is_the_plain_masked_level(lsq_run):
    tmp, _, results = lsq_run
    overrides = ["reconstruct=lsq", *SMALL]
    again = run(load_settings(_cfg(tmp, *overrides)), run_dir=tmp / "again")
    for key, entry in again["targets"].items():
        assert entry["reconstruction"]["id"] == results["targets"][key]["reconstruction"]["id"]
        assert not entry["reconstruction"]["computed"]  # read from the store
        assert entry["metrics"] == results["targets"][key]["metrics"]
    plain = run(load_settings(_cfg(tmp, "reconstruct=none")), run_dir=tmp / "plain")
    assert plain["trajectory"]["id"] == results["trajectory"]["id"] and not plain["trajectory"]["computed_steps"]
    assert plain["reconstruction"]["definition"] == {"method": "none"}
    assert plain["dense"]["metrics"] == results["dense"]["metrics"]
    assert all("reconstruction" not in entry for entry in plain["targets"].values())
    # at 30% the refit changes the model (at 50% the tiny model's pruned blocks lost every input: nothing to refit)
    assert plain["targets"]["0.3"]["metrics"]["wikitext2_ppl"] != results["targets"]["0.3"]["metrics"]["wikitext2_ppl"]
    # the plain run's levels are the masked dense model, as before reconstructions existed
    live = RunDir(tmp / "plain").load_model(tmp / "cache")
    level = RunDir(tmp / "plain").level(target=0.5, live=live)
    x = torch.randint(3, live.model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with live.at(level) as masked:
        expected = _logits(masked, x)
    live.applier.set(level.masks)
    torch.testing.assert_close(_logits(live.model, x), expected, rtol=0, atol=0)


def test_a_run_dir_holds_one_reconstruction(lsq_run, tmp_path):
    tmp, run_dir, _ = lsq_run
    with pytest.raises(GispError, match=r"(?s)evaluated with reconstruct=lsq.*gisp\.run .*reconstruct=bias "
                                        r"hydra\.run\.dir=NEW_RUN_DIR"):
        evaluate_run(run_dir, cache_dir=tmp / "cache", reconstruct={"method": "bias"},
                     reconstruct_overrides=["reconstruct=bias"])
    with pytest.raises(GispError, match="differs in damp"):
        run(load_settings(_cfg(tmp, "reconstruct=lsq", *SMALL, "reconstruct.damp=0.5")), run_dir=run_dir)
    with pytest.raises(GispError, match="reconstruct.damp must be a number"):
        load_settings(_cfg(tmp_path, "reconstruct=lsq", "reconstruct.damp=-1"))
    with pytest.raises(GispError, match=r"\+data@reconstruct.data=wikitext2"):
        load_settings(_cfg(tmp_path, "reconstruct=lsq", "reconstruct.data=wikitext2"))
    # the run's own reconstruction (reconstruct=null) re-evaluates without computing anything
    again = evaluate_run(run_dir, cache_dir=tmp / "cache")
    assert again["reconstruction"]["definition"]["method"] == "lsq"


@pytest.mark.e2e
def test_export_of_a_reconstructed_level_is_what_gisp_evaluated(lsq_run, tmp_path):
    """HF folder: the level's shapes, reloaded in a fresh process without gisp, the logits of the reconstructed model
    gisp evaluated; GGUF: the same logits in llama.cpp."""
    tmp, run_dir, results = lsq_run
    folder, gguf_file = tmp_path / "hf", tmp_path / "m.gguf"
    for out, extra in ((folder, []), (gguf_file, ["format=gguf", "dtype=f32"])):
        proc = subprocess.run([sys.executable, "-m", "gisp.export", f"run_dir={run_dir}", "sparsity=0.3", f"out={out}",
                               f"cache_dir={tmp / 'cache'}", *extra], cwd=REPO, capture_output=True, text=True,
                              timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "reused from the store" in proc.stderr + proc.stdout
    run = RunDir(run_dir)
    live = run.load_model(tmp / "cache")
    level = run.reconstructor(live, run.reconstruct_settings(), None).level(run.level(target=0.3, live=live))
    x = torch.randint(3, live.model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(2))
    with live.at(level) as model:
        expected = _logits(model, x)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # the reconstruction changed the weights: the masked dense model computes something else
    live.applier.set(level.masks)
    assert (_logits(live.model, x) - expected).abs().max() > 1e-3
    live.applier.set(Masks.dense(live.structure))
    torch.save({"ids": x, "logits": expected, "shapes": shapes}, tmp_path / "expected.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
d = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
with torch.no_grad():
    torch.testing.assert_close(m(d["ids"]).logits, d["logits"], rtol=1e-4, atol=1e-5)
assert {{k: tuple(v.shape) for k, v in m.state_dict().items()}} == d["shapes"]
assert not any(name.startswith("gisp") for name in sys.modules), "gisp was imported"
print("OK")
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          check=False, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
    provenance = read_json(folder / "gisp_export.json")
    assert provenance["reconstruction"]["id"] == results["targets"]["0.3"]["reconstruction"]["id"]
    assert provenance["metrics"]["wikitext2_ppl"] == results["targets"]["0.3"]["metrics"]["wikitext2_ppl"]
    llm = load_gguf(gguf_file)
    assert_logits_close(cpp_logits(llm, x[0].tolist()), expected[0].numpy())
    llm.close()


def test_recovery_starts_from_the_reconstructed_level(lsq_run):
    from gisp.recovery.runner import recover_run
    from gisp.recovery.settings import recover_settings

    tmp, run_dir, _ = lsq_run
    small = {"tokens": 2048, "seq_len": 32, "batch_size": 4, "val_every": 8, "val_tokens": 256}
    results = recover_run(run_dir, recover_settings({"method": "lora", **small}), sparsity=[0.5],
                          cache_dir=tmp / "cache", tasks=[])
    assert results["recovery"]["lora"]["reconstruction"]["method"] == "lsq"
    with pytest.raises(GispError, match="reconstructed levels each carry their own weights"):
        recover_run(run_dir, recover_settings({"method": "nested", **small}), sparsity=[0.3, 0.5],
                    cache_dir=tmp / "cache", tasks=[])
