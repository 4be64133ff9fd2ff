"""The memory plan: equal to a hand computation for Llama-2 7B / 13B / 70B, refuses before loading and names what
fits, and its activation estimate agrees with the tensors autograd really keeps."""

from __future__ import annotations

import pytest
import torch
import transformers
import yaml
from conftest import CONF, SMOKE, saved_tensor_bytes

from gisp import pipeline
from gisp.config import load_settings, model_spec
from gisp.errors import GispError
from gisp.memory.scoring import HEADROOM, GiB, PlanInputs, build_plan, check_fits, plan_for_run, plan_model
from gisp.memory.shapes import meta_structure
from gisp.models.families import family_spec
from gisp.models.structure import describe, layer_modules
from gisp.plan import main
from gisp.prune.importance import scored_weights
from gisp.prune.masks import MaskApplier, Masks

LLAMA2 = {  # hidden, layers, heads (MHA), MLP; vocab 32000, untied lm_head
    "llama2_7b": ("meta-llama/Llama-2-7b-hf", 4096, 32, 32, 11008),
    "llama2_13b": ("meta-llama/Llama-2-13b-hf", 5120, 40, 40, 13824),
    "llama2_70b": ("meta-llama/Llama-2-70b-hf", 8192, 80, 64, 28672),
}


def hand_plan(d: int, n_layers: int, H: int, F: int, devices: int, B: int = 2, T: int = 256) -> dict[str, int]:
    """The plan's rows written out for a Llama-2 in bf16 (w = 2 bytes): 70B has 8 KV heads (GQA), the others MHA."""
    w, V, d_h = 2, 32000, 128
    K = 8 if n_layers == 80 else H
    layer = 2 * d * H * d_h + 2 * d * K * d_h + 3 * d * F + 2 * d  # q, o, k, v, gate, up, down, 2 norms
    params = n_layers * layer + 2 * V * d + d  # + embeddings, lm_head, final norm
    first = int(0.1 * n_layers)  # protected: the first int(0.1 L) layers and the last one
    scored_layer = 2 * d * H * d_h + 3 * d * F + (2 * d * K * d_h if K == H else 0)  # GQA: q + o only
    scored = (n_layers - first - 1) * scored_layer
    act = w * (2 * d + 3 * H * d_h + 2 * K * d_h + 4 * F) + 8 * d + 4 * H + 8  # per token and layer
    rows = {"weights": -(-params // devices) * w, "gradients (resident)": -(-scored // devices) * w,
            "gradients (in flight)": (scored_layer if devices > 1 else d * F) * w,
            "activations": B * T * act * (n_layers - first), "logits": B * T * V * (w + 12), "reserve": GiB}
    if devices > 1:
        rows["weights gathered (root + 2 layers)"] = (2 * V * d + d + 2 * layer) * w
    return rows


@pytest.mark.parametrize("devices", [1, 8])
@pytest.mark.parametrize("name", list(LLAMA2))
def test_llama2_plans_equal_the_hand_computation(name, devices):
    path, d, n_layers, H, F = LLAMA2[name]
    spec = model_spec(yaml.safe_load((CONF / "model" / f"{name}.yaml").read_text()))  # its shape: the model YAML's
    assert (spec.source, spec.path, spec.dtype) == ("hub", path, "bfloat16")
    inputs = PlanInputs("fsdp" if devices > 1 else "single", devices, devices, "bfloat16", None, False, False, 2, 256)
    plan = plan_model(spec, inputs)
    assert plan.device == hand_plan(d, n_layers, H, F, devices)
    assert plan.host["model load"] == plan.counts["params"] * 2  # FSDP: rank 0 alone reads the weights


def test_a_70b_is_refused_on_one_80gb_gpu_before_loading(compose_cfg, tmp_path, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline, "load_model_and_tokenizer", must_not_load)
    monkeypatch.setattr(pipeline, "visible_device_memory", lambda trainer: 80 * 10**9)
    settings = load_settings(compose_cfg("model=llama2_70b", "data=c4", "eval=none"))
    with pytest.raises(GispError, match=r"(?s)needs 254\.\d GiB per device.*trainer=fsdp trainer\.devices=8") as e:
        pipeline.run(settings, run_dir=tmp_path / "run")
    assert "nothing was loaded" in str(e.value) and not (tmp_path / "run" / "results.json").exists()
    fsdp = load_settings(compose_cfg("model=llama2_70b", "data=c4", "eval=none", "trainer=fsdp", "trainer.devices=8"),
                         here=False)  # a plan for a GPU node, made here
    plan = plan_for_run(fsdp)
    assert plan.inputs.strategy == "fsdp" and plan.inputs.devices == 8
    check_fits(plan, 80 * 10**9)  # fits: no error


def test_a_7b_on_a_24gb_card_names_gradient_offload():
    spec = model_spec(yaml.safe_load((CONF / "model" / "llama2_7b.yaml").read_text()))
    plan = plan_model(spec, PlanInputs("single", 1, 1, "bfloat16", None, False, False, 2, 256))
    with pytest.raises(GispError, match="prune.grad_offload=cpu: 16.3 GiB") as e:
        check_fits(plan, 24 * 10**9)
    assert "trainer=fsdp trainer.devices=2" in str(e.value)
    # peak / weight bytes: 2.14x plain (the reference needs 3.2x), 1.30x with offload
    assert plan.total / plan.device["weights"] == pytest.approx(2.14, abs=0.01)


def test_settings_give_the_strategy_and_the_sequence(compose_cfg):
    ddp = load_settings(compose_cfg(*SMOKE, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"))
    plan = plan_for_run(ddp)
    assert (plan.inputs.strategy, plan.inputs.devices, plan.inputs.seq_len, plan.inputs.batch_size) == ("ddp", 2, 32, 4)
    assert plan.host["model load"] == 2 * plan.counts["params"] * 4
    assert plan_for_run(load_settings(compose_cfg(*SMOKE, "pruner=wanda_sp"))) is None  # no gradients: no plan


def test_compact_scoring_places_the_dense_weights_where_memory_allows(compose_cfg):
    """prune.compact (the default): the compact model is sliced on the device beside the dense weights (a device
    row: the decoder layers at most) where that fits; where not, and with grad_offload=cpu, the dense weights wait in
    host memory (a host row, the device rows of a masked run); FSDP and prune.compact=false plan neither."""
    ddp = [*SMOKE, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    compact = plan_for_run(load_settings(compose_cfg(*ddp)))
    masked = plan_for_run(load_settings(compose_cfg(*ddp, "prune.compact=false")))
    offload = plan_for_run(load_settings(compose_cfg(*ddp, "prune.grad_offload=cpu")))
    assert (compact.inputs.compact, masked.inputs.compact, offload.inputs.compact) == ("device", None, "host")
    decoder = (compact.counts["params"] - compact.counts["root"]) * 4
    assert compact.device.pop("compact model (prune.compact)") == decoder and compact.device == masked.device
    assert offload.host["dense weights during compact passes"] == 2 * offload.counts["params"] * 4
    # a device that holds the masked run but not the compact model beside it: the dense weights go to the host
    tight = plan_for_run(load_settings(compose_cfg(*ddp)), device_memory=int((masked.total + decoder / 2) / HEADROOM))
    assert tight.inputs.compact == "host" and tight.device == masked.device
    check_fits(tight, int((masked.total + decoder / 2) / HEADROOM))
    fsdp = plan_for_run(load_settings(compose_cfg("model=llama2_70b", "data=c4", "eval=none", "trainer=fsdp",
                                                  "trainer.devices=8"), here=False))
    assert fsdp.inputs.compact is None
