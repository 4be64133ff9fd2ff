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
from gisp.memory.scoring import GiB, PlanInputs, build_plan, check_fits, plan_for_run, plan_model
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


def test_compact_scoring_adds_host_memory_not_device_memory(compose_cfg):
    """prune.compact (the default): each compact model is sliced in host memory (where Lightning leaves the model
    between passes) and moved to the device for its pass alone, so the device rows are a masked run's; FSDP and
    prune.compact=false plan no compact model."""
    ddp = [*SMOKE, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    compact = plan_for_run(load_settings(compose_cfg(*ddp)))
    masked = plan_for_run(load_settings(compose_cfg(*ddp, "prune.compact=false")))
    assert compact.inputs.compact and not masked.inputs.compact
    assert compact.device == masked.device
    decoder = (compact.counts["params"] - compact.counts["root"]) * 4
    assert compact.host["compact model (sliced on the host)"] == 2 * decoder
    assert "compact model (sliced on the host)" not in masked.host and any("compact" in n for n in compact.notes)
    assert any("processes of a node" in n for n in compact.notes)  # the plan's other notes stay beside it
    fsdp = plan_for_run(load_settings(compose_cfg("model=llama2_70b", "data=c4", "eval=none", "trainer=fsdp",
                                                  "trainer.devices=8"), here=False))
    assert not fsdp.inputs.compact


def test_the_command_prints_and_refuses(capsys):
    main(["model=llama2_70b", "trainer=fsdp", "trainer.devices=8", "device_memory_gb=80"])
    out = capsys.readouterr().out
    assert "fsdp on 8 device(s)" in out and "fits: 50.0 GiB" in out
    with pytest.raises(SystemExit) as e:
        main(["model=llama2_70b", "device_memory_gb=80"])
    assert e.value.code == 2


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_estimate_matches_the_saved_tensors(family, dtype):
    """The bytes autograd keeps for backward in one forward of a masked model (saved-tensor hooks, weights
    excluded) are 90-100% of the plan's activations: the plan is a slight over-estimate."""
    config = transformers.AutoConfig.for_model(
        family, hidden_size=128, intermediate_size=352, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=8 if family == "llama" else 2, vocab_size=1000)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    structure = describe(model)
    layers = layer_modules(model, family_spec(family))
    masks = Masks.dense(structure)
    masks.heads[:, 0] = masks.channels[:, 0] = False
    MaskApplier(layers, structure).set(masks)
    model.requires_grad_(False)
    for i in structure.unprotected:
        for p in scored_weights(layers[i], structure):
            p.requires_grad_(True)
    B, T = 2, 64
    kept = saved_tensor_bytes(model, lambda: model(torch.randint(0, 1000, (B, T)), use_cache=False))
    _, counts = meta_structure(config, dtype, {}, "query")
    dtype_name = "float32" if dtype == torch.float32 else "bfloat16"
    plan = build_plan(family, structure, counts, PlanInputs("single", 1, 1, dtype_name, None, False, False, B, T))
    assert 0.9 <= kept / plan.device["activations"] <= 1.0
