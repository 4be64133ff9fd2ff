"""Every option of every config group composes with the defaults and passes the typed checks of gisp.config."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CONF, compose, compose_hydra

from gisp.config import RunSettings, load_settings
from gisp.errors import GispError

# Options that need a companion setting to make sense with the defaults (everything else composes alone).
COMPANIONS = {
    ("objective", "answer_ppl"): ["data=gsm8k"],
    ("objective", "margin"): ["data=cmqa"],
    ("data", "local_text"): ["data.text.local_files=[austen/emma.txt]"],
    ("sweep", "table6_tiny"): ["calib=cmqa_margin"],
    ("experiment", "table6_tiny"): ["calib=cmqa_margin"],
    ("trainer", "fsdp"): ["eval=none"],  # sharded: evaluate afterwards with gisp.evaluate
    ("model", "hf"): ["model.path=Qwen/Qwen2.5-0.5B"],  # a model by path: the path is the option
}
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())
OPTIONS = [(group, f.stem) for group in GROUPS for f in sorted((CONF / group).glob("*.yaml"))]


def _settings(*overrides: str) -> RunSettings:
    return load_settings(compose("config", *list(overrides)))


def test_every_group_has_options():
    expected = {"model", "data", "objective", "pruner", "schedule", "eval", "logger", "trainer", "experiment"}
    assert expected <= set(GROUPS)


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_checks(group, option):
    settings = _settings(f"{group}={option}", *COMPANIONS.get((group, option), []))
    assert isinstance(settings, RunSettings)
    assert settings.targets and all(0 <= t < 1 for t in settings.targets)
    assert settings.resolved[group] is not None if group not in ("experiment", "calib", "sweep") else True


def test_deprecated_prune_keys_reach_the_pruner(caplog):
    settings = _settings("prune.normalization=paper", "prune.grad_dtype=float32")
    assert settings.pruner.normalization == "paper" and settings.pruner.grad_dtype == "float32"
    assert "moved to the pruner config" in caplog.text


@pytest.mark.parametrize("overrides,match", [
    (["sparsity=1.2"], "outside"),
    (["pruner.score=nosuch"], "unknown pruner.score"),
    (["pruner.normalization=nosuch"], "normalization"),
    (["pruner=wanda_sp", "pruner.bias_compensation=true", "pruner.score=magnitude"], "bias_compensation"),
    (["data.batch_size=0"], "batch_size"),
    (["+data.text.nosuch=1"], "nosuch"),
    (["eval.tasks.wikitext2_ppl.kind=nosuch"], "unknown kind"),
    (["+eval.tasks.wikitext2_ppl.nosuch=1"], "nosuch"),
    (["schedule.steps=0"], "schedule.steps"),
    (["prune.gqa_mode=kv"], "gqa_mode"),
    (["trainer=fsdp", "eval=cmqa"], "whole model in one process"),
    (["data=local_text"], "local_files"),
])
def test_bad_settings_fail_before_loading(overrides, match):
    with pytest.raises(GispError, match=match):
        _settings(*overrides)


def test_a_lone_local_file_is_one_file_not_characters():
    settings = _settings("data=local_text", "data.text.local_files=austen/emma.txt")
    assert settings.calibration.text.local_files == ("austen/emma.txt",)


def test_trajectory_definition_ignores_targets_evaluation_and_invocation_length():
    a = _settings().definition("sha")
    for same in (["sparsity=0.3"], ["prune.max_steps_per_run=2"], ["eval=none"], ["logger=csv"], ["trainer=ddp"]):
        assert _settings(*same).definition("sha") == a, same
    for other in (["schedule.steps=5"], ["pruner=oneshot"], ["seed=1"], ["pruner.normalization=paper"]):
        assert _settings(*other).definition("sha") != a, other
    assert _settings().definition("other data") != a  # the calibration content is part of the identity
    assert Path(str(_settings().cache_dir)).is_absolute()


def grids() -> list[str]:
    return sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")) + \
        [f"sweep={p.stem}" for p in sorted((CONF / "sweep").glob("*.yaml"))]


@pytest.mark.parametrize("grid", grids())
def test_every_experiment_and_its_grid_jobs_pass_the_checks(grid):
    """Every value of every swept setting, each in one job with the others at their first value (the jobs of a grid
    combine values that each pass alone; composing all 108 jobs of the paper's Table 4 would add nothing)."""
    choice = grid if grid.startswith("sweep=") else f"experiment={grid}"
    params = compose_hydra("config", choice).hydra.sweeper.params or {}
    axes = [[f"{k}={v}" for v in str(values).split(",")] for k, values in params.items()]
    jobs = {tuple(axis[0] for axis in axes)}
    for i, axis in enumerate(axes):
        jobs |= {tuple(value if j == i else other[0] for j, other in enumerate(axes)) for value in axis}
    for job in sorted(jobs):
        load_settings(compose("config", choice, *job), here=False)
    assert jobs


@pytest.mark.parametrize("primary", ["evaluate", "export", "recovery"])
def test_the_other_commands_configs_compose(primary):
    cfg = compose(primary, "run_dir=/some/run")
    assert cfg["sparsity"] is None and "seed" in cfg and "store_dir" in cfg  # conf/common.yaml is included


def test_the_old_names_still_work_with_a_warning(caplog):
    """One release of grace for the names the vocabulary replaced: targets / target (sparsity), recover.levels,
    sweep=NAME (experiment=NAME)."""
    import logging

    from gisp.config import levels_setting
    from gisp.recovery.settings import recover_settings

    caplog.set_level(logging.WARNING)
    assert levels_setting(compose("evaluate", "run_dir=/r", "targets=[0.3,0.2]"), old="targets") == (0.2, 0.3)
    assert levels_setting(compose("export", "target=0.4"), old="target") == (0.4,)
    assert levels_setting(compose("recovery", "run_dir=/r", "sparsity=[0.5]"), old="targets") == (0.5,)
    with pytest.raises(GispError, match="give sparsity=... only"):
        levels_setting(compose("evaluate", "run_dir=/r", "targets=[0.3]", "sparsity=[0.3]"), old="targets")
    assert recover_settings({"method": "nested", "levels": [0.3]}).levels == (0.3,)
    old_grid = load_settings(compose("config", "sweep=table4_tiny"), here=False)
    new_grid = load_settings(compose("config", "experiment=table4_tiny"), here=False)
    assert old_grid.definition("x") == new_grid.definition("x")
    warned = caplog.text
    assert "targets= is deprecated" in warned and "target= is deprecated" in warned
    assert "recover.levels is deprecated" in warned and "sweep=table4_tiny is now experiment=table4_tiny" in warned
