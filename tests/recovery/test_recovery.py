"""Recovery on tiny models: students equal their oracles (compact == masked, merged == unmerged adapter, a nested
adapter sees the masked inputs), the loss goes down, results and artefacts are recorded, recovered levels export
exactly (HF without gisp, GGUF in llama.cpp), a killed fit resumes to the uninterrupted weights, SIGTERM stops it."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, SMOKE, compose
from safetensors.torch import load_file

from gisp.compact.slicing import compact_model_state, compact_state_dict
from gisp.config import load_settings
from gisp.errors import GispError
from gisp.eval.suite import eval_task_specs
from gisp.io import read_json
from gisp.models.families import family_spec
from gisp.models.structure import layer_modules
from gisp.pipeline import run
from gisp.prune.masks import MaskApplier
from gisp.recovery.artefacts import compact_model, load_recovered
from gisp.recovery.data import training_set
from gisp.recovery.runner import recover_run
from gisp.recovery.settings import LoraSettings, recover_settings
from gisp.recovery.students import base_model, compact_student, merged, with_lora
from gisp.runs import RunDir

# A few seconds per recovery on the tiny model
SMALL = {"tokens": 4096, "seq_len": 32, "batch_size": 4, "val_every": 8, "val_tokens": 256, "lr": 5e-3}
SMALL_CLI = [f"recover.{k}={v}" for k, v in SMALL.items()]


def _cfg(tmp, *overrides):
    return compose("config", *["logger=none", "progress=false", f"cache_dir={tmp / 'cache'}",
                                        f"store_dir={tmp / 'store'}", *SMOKE, "sparsity=[0.3,0.5]", *overrides])


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A finished tiny run (targets 0.3, 0.5), copied by the tests that change it."""
    tmp = tmp_path_factory.mktemp("pruned")
    run(load_settings(_cfg(tmp)), tmp / "run")
    return tmp / "run"


@pytest.fixture
def run_dir(pruned, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(pruned, copy)
    return copy


def _random_adapter(model) -> None:
    """A LoRA that changes the outputs (peft starts B at zero)."""
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)


def _ids(n=2, t=24):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(3))


# ---------------------------------------------------------------------------------------------------------------
# Students and their oracles


def test_merged_adapter_equals_the_unmerged_one_with_the_level_shapes(pruned):
    run_ = RunDir(pruned)
    live = run_.load_model()
    level = run_.level(target=0.5, live=live)
    student = with_lora(compact_student(live.model, level.masks, live.structure), LoraSettings())
    _random_adapter(student)
    student.eval()
    with torch.no_grad():
        unmerged = student(_ids()).logits
        recovered = merged(student)
        torch.testing.assert_close(recovered(_ids()).logits, unmerged, rtol=1e-5, atol=1e-5)
    state, _ = compact_state_dict(live.model, level.masks, live.structure)
    shapes = {k: tuple(v.shape) for k, v in compact_model_state(recovered).items()}
    assert shapes == {k: tuple(v.shape) for k, v in state.items()}  # exactly the level's compact shapes
    live.set_level(level)  # and the student before training is the masked dense model
    with torch.no_grad():
        fresh = compact_student(live.model, level.masks, live.structure)
        torch.testing.assert_close(fresh(_ids()).logits, live.model(_ids()).logits, rtol=1e-5, atol=1e-5)


def test_a_nested_adapter_sees_the_masked_inputs(pruned):
    """The nested student's masks act on the adapter-wrapped o_proj / down_proj, so LoRA cannot route a pruned
    head's or channel's output around the mask: the masked, unmerged student equals the compact model of the merged
    weights. Masks on the wrapped base layers (the trap) would let it through."""
    run_ = RunDir(pruned)
    live = run_.load_model()
    level = run_.level(target=0.5, live=live)
    live.applier.remove()
    student = with_lora(live.model, LoraSettings())
    _random_adapter(student)
    student.eval()
    spec = family_spec(live.model.config.model_type)
    right = MaskApplier(layer_modules(base_model(student), spec), live.structure)
    right.set(level.masks)
    with torch.no_grad():
        masked = student(_ids()).logits
    right.remove()
    wrong = MaskApplier([type(m)(**{f: getattr(m, f).base_layer for f in ("q", "k", "v", "o", "gate", "up", "down")})
                         for m in layer_modules(base_model(student), spec)], live.structure)
    wrong.set(level.masks)
    with torch.no_grad():
        leaky = student(_ids()).logits
    wrong.remove()
    recovered = merged(student)
    with torch.no_grad():
        exported = compact_student(recovered, level.masks, live.structure)(_ids()).logits
    torch.testing.assert_close(masked, exported, rtol=1e-5, atol=1e-5)
    assert (leaky - exported).abs().max() > 1e-3


def test_training_and_validation_items_are_disjoint(pruned):
    run_ = RunDir(pruned)
    live = run_.load_model()
    settings = load_settings(_cfg(pruned.parent))
    data = training_set(settings.calibration, live.tokenizer, settings.data_dir, 2048, 32, 256, seed=0)
    stream_tokens = data.train[0][0].numel()
    assert len(data.val) == 8 and all(x.numel() == stream_tokens == 32 for x, _ in data.train + data.val)
    val = {tuple(x.tolist()) for x, _ in data.val}
    assert not val & {tuple(x.tolist()) for x, _ in data.train}
    assert data.record["train_tokens"] >= 2048 and data.record["content_sha256"] == data.content_sha256()
    from gisp.data.recipes import MultipleChoiceRecipe

    cmqa = MultipleChoiceRecipe(tasks=("piqa", "arc_easy", "winogrande"), budget_tokens=6000)
    items = training_set(cmqa, live.tokenizer, settings.data_dir, 9000, 256, 1000, seed=0)
    ids = lambda part: {tuple(x.tolist()) for x, _ in part}
    assert not ids(items.val) & ids(items.train) and items.record["scored"] == "answer tokens"
    assert all((y == -100).any() and (y != -100).any() for _, y in items.train)  # prompt unscored, answer scored


# ---------------------------------------------------------------------------------------------------------------
# The stage: results, artefacts, exports


def test_lora_recovery_lowers_the_perplexity_and_is_recorded(run_dir):
    before = read_json(run_dir / "results.json")
    results = recover_run(run_dir, recover_settings({"method": "lora", **SMALL}), progress=False)
    for key in ("0.3", "0.5"):
        entry = results["targets"][key]["recovered"]["lora"]
        assert entry["metrics"]["wikitext2_ppl"] < 0.9 * before["targets"][key]["metrics"]["wikitext2_ppl"]
        assert entry["evaluated"] == results["targets"][key]["evaluated"]  # the run's protocol
        assert entry["tokens"] >= SMALL["tokens"] and entry["tokens_per_s"] > 0 and entry["val_loss"]["val_loss"] > 0
        assert (run_dir / entry["artefact"] / "adapter_model.safetensors").is_file()
        assert results["targets"][key]["metrics"] == before["targets"][key]["metrics"]  # the pruned level is kept
    definition = results["recovery"]["lora"]
    assert definition["method"] == "lora" and definition["data"]["content_sha256"] and definition["tokens"] == 4096
    assert results["complete"] and not (run_dir / "recovered" / "lora" / "level_0.5" / "checkpoints").exists()
    from gisp.eval.report import levels_text

    assert "0.5+lora" in levels_text(results)
    again = recover_run(run_dir, recover_settings({"method": "lora", **SMALL}), progress=False)  # already done
    assert again["targets"]["0.5"]["recovered"]["lora"]["metrics"] == entry["metrics"]
    with pytest.raises(GispError, match="another definition"):
        recover_run(run_dir, recover_settings({"method": "lora", **SMALL, "lr": 1e-3}), progress=False)


@pytest.mark.e2e
def test_exports_of_a_recovered_level_reload_without_gisp_and_run_in_llama_cpp(run_dir, tmp_path):
    """HF folder: the recovered model's logits after a reload in a fresh process without gisp; GGUF (f32) in a real
    llama.cpp: the same logits; both with the unrecovered level's shapes."""
    from gisp.deploy import export_from_run

    recover_run(run_dir, recover_settings({"method": "distill", "adapter": "none", **SMALL}), sparsity=[0.5],
                progress=False)
    run_ = RunDir(run_dir)
    live = run_.load_model()
    level = run_.level(target=0.5, live=live)
    recovered = compact_model(run_dir, "distill", live, level)
    ids = _ids(1, 20)
    with torch.no_grad():
        want = recovered(ids).logits[0]
    out = export_from_run(run_dir, tmp_path / "hf", sparsity=0.5, recovered="distill")
    plain = export_from_run(run_dir, tmp_path / "hf_pruned", sparsity=0.5)
    shapes = lambda folder: {k: tuple(v.shape) for k, v in load_file(str(folder / "model.safetensors")).items()}
    assert shapes(out) == shapes(plain)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(plain / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # recovered weights, not the pruned ones
    script = ("import sys, json, torch\nfrom transformers import AutoModelForCausalLM\n"
              "assert 'gisp' not in sys.modules\n"
              f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()\n"
              f"ids = torch.tensor({ids.tolist()})\n"
              "with torch.no_grad(): print(json.dumps(m(ids).logits[0].tolist()))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env,
                          check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    torch.testing.assert_close(torch.tensor(json.loads(proc.stdout)), want, rtol=1e-4, atol=1e-4)
    llama_cpp = pytest.importorskip("llama_cpp") if not os.environ.get("GISP_REQUIRE_LLAMA_CPP") else \
        __import__("llama_cpp")
    gguf = export_from_run(run_dir, tmp_path / "r.gguf", sparsity=0.5, recovered="distill", format="gguf", dtype="f32")
    llm = llama_cpp.Llama(model_path=str(gguf), logits_all=True, n_threads=1, verbose=False, n_ctx=64)
    llm.eval(ids[0].tolist())
    got = torch.tensor(llm.scores[: ids.shape[1]])
    torch.testing.assert_close(got, want, rtol=1e-3, atol=2e-3)


def test_nested_recovery_in_gisp_run_reads_every_level_out_of_one_training(tmp_path):
    """recover=nested inside gisp.run: one fit, every target recovered from the same weights; each level's export
    equals the recovered dense model under its masks; the levels stay nested."""
    cfg = _cfg(tmp_path, "recover=nested", *SMALL_CLI)
    results = run(load_settings(cfg), tmp_path / "run")
    record = read_json(tmp_path / "run" / "recovered" / "nested" / "recovery.json")
    assert list(record["levels"]) == ["nested"] and record["definition"]["levels"] == [0.3, 0.5]
    assert results["complete"]
    run_ = RunDir(tmp_path / "run")
    live = run_.load_model()
    levels = [run_.level(target=t, live=live) for t in (0.3, 0.5)]
    assert levels[1].masks.is_nested_in(levels[0].masks)
    for level in levels:
        entry = results["targets"][f"{level.target:g}"]["recovered"]["nested"]
        assert entry["artefact"] == "recovered/nested/nested/adapter" and entry["metrics"]["wikitext2_ppl"] > 0
        recovered = load_recovered(tmp_path / "run", "nested", live, level)
        live.set_level(level)
        with torch.no_grad():
            masked = recovered(_ids()).logits
            exported = compact_model(tmp_path / "run", "nested", live, level)(_ids()).logits
        torch.testing.assert_close(exported, masked, rtol=1e-5, atol=1e-5)


def test_gisp_evaluate_measures_a_recovered_level(run_dir):
    from gisp.deploy import evaluate_run

    recover_run(run_dir, recover_settings({"method": "lora", **SMALL}), sparsity=[0.3], tasks=(), progress=False)
    assert "metrics" not in read_json(run_dir / "results.json")["targets"]["0.3"]["recovered"]["lora"]  # eval=none
    tasks = eval_task_specs(_cfg(run_dir.parent)["eval"])
    results = evaluate_run(run_dir, tasks, recovered="lora", progress=False)
    assert results["targets"]["0.3"]["recovered"]["lora"]["metrics"]["wikitext2_ppl"] > 0
    with pytest.raises(GispError, match=r"has not recovered levels \[0.5\]"):
        evaluate_run(run_dir, tasks, sparsity=[0.5], recovered="lora", progress=False)
    with pytest.raises(GispError, match="no recovery named 'other'"):
        evaluate_run(run_dir, tasks, recovered="other", progress=False)


def test_settings_are_checked_before_anything_loads(tmp_path):
    with pytest.raises(GispError, match="recover.method"):
        recover_settings({"method": "qlora"})
    with pytest.raises(GispError, match="unknown field"):
        recover_settings({"method": "lora", "epochs": 2})
    with pytest.raises(GispError, match="plain folder name"):
        recover_settings({"method": "lora", "name": "../x"})
    with pytest.raises(GispError, match="lora.targets"):
        recover_settings({"method": "lora", "lora": {"targets": ["qkv"]}})
    with pytest.raises(GispError, match="python -m gisp.recover"):
        load_settings(_cfg(tmp_path, "recover=lora", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"))
    a = load_settings(_cfg(tmp_path, "recover=none")).definition("x")
    assert a == load_settings(_cfg(tmp_path, "recover=distill")).definition("x")  # not part of the trajectory


# ---------------------------------------------------------------------------------------------------------------
# The command line: kills, resumes, signals


def _recover_cli(run_dir, name, *extra):
    return [sys.executable, "-m", "gisp.recover", f"run_dir={run_dir}", "sparsity=[0.5]", "recover=lora",
            f"recover.name={name}", *SMALL_CLI, "recover.tokens=32768", "recover.val_every=8", "eval=none",
            "threads=1", *extra]


def _start(argv, log):
    """A command whose output goes to a file (a pipe nobody reads would block it once full)."""
    return subprocess.Popen(argv, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)


def _wait_for(path, proc, log, timeout=240):
    started = time.monotonic()
    while not path.is_file():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() - started < timeout, log.read_text()[-3000:]
        time.sleep(0.02)


@pytest.mark.e2e
def test_fsdp_recovery_is_refused_before_anything_loads(run_dir):
    proc = subprocess.run(_recover_cli(run_dir, "sharded", "trainer=fsdp", "trainer.accelerator=cpu",
                                       "trainer.devices=2"), cwd=REPO, capture_output=True, text=True, timeout=300,
                          check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "does not train under trainer=fsdp yet" in out, out[-2000:]
    assert "Traceback" not in out and not (run_dir / "recovered" / "sharded").exists()


@pytest.mark.e2e
def test_a_killed_recovery_resumes_to_the_uninterrupted_weights(run_dir):
    """SIGKILL after the first validation (mid-fit: its checkpoint is the only thing on disk), then the same command:
    it resumes from that checkpoint, says so, and the adapter equals an uninterrupted run's, bit for bit."""
    assert subprocess.run(_recover_cli(run_dir, "whole"), cwd=REPO, capture_output=True, timeout=600,
                          check=False).returncode == 0
    log = run_dir.parent / "killed.log"
    killed = _start(_recover_cli(run_dir, "killed"), log)
    checkpoint = run_dir / "recovered" / "killed" / "level_0.5" / "checkpoints" / "last.ckpt"
    _wait_for(checkpoint, killed, log)
    killed.kill()  # somewhere in the epoch after the first checkpoint
    killed.wait()
    assert killed.returncode != 0 and checkpoint.is_file()
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)  # plain tensors and values only
    assert 0 < saved["global_step"] < 32768 // (4 * 32)  # mid-fit: not the end of the fit
    assert not (run_dir / "recovered" / "killed" / "level_0.5" / "adapter").exists()
    resumed = subprocess.run(_recover_cli(run_dir, "killed"), cwd=REPO, capture_output=True, text=True, timeout=600,
                             check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = resumed.stdout + resumed.stderr
    assert f"resuming the recovery of 0.5 from its checkpoint after {saved['global_step']} of" in out, out[-3000:]
    a = load_file(str(run_dir / "recovered" / "whole" / "level_0.5" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run_dir / "recovered" / "killed" / "level_0.5" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = read_json(run_dir / "recovered" / "killed" / "recovery.json")["levels"]["0.5"]
    assert record["tokens"] == read_json(run_dir / "recovered" / "whole" / "recovery.json")["levels"]["0.5"]["tokens"]

    def curve(name: str) -> list[tuple[str, str]]:  # the training curve: each step once, as uninterrupted
        path = run_dir / "recovered" / name / "level_0.5" / "csv" / "metrics.csv"
        return [(r["step"], r["recover/train_loss"]) for r in csv.DictReader(path.open()) if r["recover/train_loss"]]

    assert curve("killed") == curve("whole")


@pytest.mark.e2e
def test_a_damaged_checkpoint_is_named_with_the_fix(run_dir):
    """A checkpoint cut short (a kill while the disk was full): the rerun is refused naming the file and the fix,
    with no traceback; deleting it trains the level from its start."""
    folder = run_dir / "recovered" / "damaged" / "level_0.5" / "checkpoints"
    log = run_dir.parent / "damaged.log"
    proc = _start(_recover_cli(run_dir, "damaged"), log)
    _wait_for(folder / "last.ckpt", proc, log)
    proc.kill()
    proc.wait()
    data = (folder / "last.ckpt").read_bytes()
    (folder / "last.ckpt").write_bytes(data[: len(data) // 2])
    again = subprocess.run(_recover_cli(run_dir, "damaged"), cwd=REPO, capture_output=True, text=True, timeout=600,
                           check=False)
    out = again.stdout + again.stderr
    assert again.returncode == 2 and "Traceback" not in out, out[-3000:]
    assert "cannot be read" in out and f"rm {folder / 'last.ckpt'}" in out, out[-3000:]
    (folder / "last.ckpt").unlink()
    assert subprocess.run(_recover_cli(run_dir, "damaged"), cwd=REPO, capture_output=True, timeout=600,
                          check=False).returncode == 0


@pytest.mark.e2e
def test_sigterm_stops_a_recovery_within_seconds_with_the_resume_command(run_dir):
    log = run_dir.parent / "stopped.log"
    proc = _start(_recover_cli(run_dir, "stopped"), log)
    _wait_for(run_dir / "recovered" / "stopped" / "level_0.5" / "checkpoints" / "last.ckpt", proc, log)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    out = log.read_text()
    assert proc.returncode == 128 + signal.SIGTERM and time.monotonic() - sent < 10, out[-3000:]
    assert "Resume with the same command" in out and "python -m gisp.recover" in out
    assert "recovered" not in read_json(run_dir / "results.json")["targets"]["0.5"]


@pytest.mark.e2e
def test_recovery_over_two_ddp_processes(run_dir):
    """trainer=ddp: the fits run over both processes (each reads its share of every batch), rank 0 stores and
    evaluates; every recovered level is recorded once."""
    proc = subprocess.run([sys.executable, "-m", "gisp.recover", f"run_dir={run_dir}", "recover=lora", *SMALL_CLI,
                           "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "threads=1"], cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in proc.stdout + proc.stderr
    results = read_json(run_dir / "results.json")
    for key in ("0.3", "0.5"):
        entry = results["targets"][key]["recovered"]["lora"]
        assert entry["tokens"] >= SMALL["tokens"] and entry["metrics"]["wikitext2_ppl"] > 0
        assert entry["steps"] == -(-SMALL["tokens"] // SMALL["seq_len"] // (SMALL["batch_size"] * 2))  # 2 processes
