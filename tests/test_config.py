"""Every option of every config group composes with the defaults and passes the typed checks of gisp.config."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CONF
from hydra import compose, initialize_config_dir

from gisp.config import RunSettings, load_settings
from gisp.errors import GispError

# Options that need a companion setting to make sense with the defaults (everything else composes alone).
COMPANIONS = {
    ("objective", "answer_ppl"): ["data=gsm8k"],
    ("objective", "margin"): ["data=cmqa"],
    ("data", "local_text"): ["data.text.local_files=[austen/emma.txt]"],
    ("sweep", "table6_tiny"): ["calib=cmqa_margin"],
    ("trainer", "fsdp"): ["eval=none"],  # sharded: evaluate afterwards with gisp.evaluate
    ("model", "hf"): ["model.path=Qwen/Qwen2.5-0.5B"],  # a model by path: the path is the option
}
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())
OPTIONS = [(group, f.stem) for group in GROUPS for f in sorted((CONF / group).glob("*.yaml"))]


def _settings(*overrides: str) -> RunSettings:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return load_settings(compose("config", overrides=list(overrides)))


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
