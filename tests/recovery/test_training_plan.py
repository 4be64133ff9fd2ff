"""The training memory plan's rows against the tensors a recovery step really holds (tiny models)."""

from __future__ import annotations

import pytest
import torch
from conftest import saved_tensor_bytes, tiny_model

from gisp.memory.shapes import meta_structure, model_config
from gisp.memory.training import training_plan
from gisp.models.structure import describe
from gisp.prune.methods import random_cut
from gisp.recovery.losses import head_loss
from gisp.recovery.settings import recover_settings
from gisp.recovery.students import all_trainable, compact_student, hidden_states, output_head, with_lora


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("family", ["llama", "mistral", "phi"])  # phi: a plain MLP, no gate to adapt
@pytest.mark.parametrize("adapter", ["lora", "none"])
def test_plan_rows_match_the_step(family, adapter):
    model = tiny_model(family)
    structure = describe(model)
    masks = random_cut(structure, 0.4, seed=0).masks
    s = recover_settings({"method": "lora", "adapter": adapter, "batch_size": 2, "seq_len": 64, "chunk": 16,
                          "lora": {"dropout": 0.05}})
    from gisp.models.spec import ModelSpec

    config = model_config(ModelSpec(name="t", source="random", model_type=family, config={
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 4 if family == "llama" else 2, "head_dim": 16, "vocab_size": 300}
        if family != "phi" else {k: v for k, v in model.config.to_diff_dict().items() if k != "model_type"}))
    meta, counts = meta_structure(config, torch.float32, {}, "query")
    assert meta.decoder_params == structure.decoder_params
    plan = training_plan("t", structure, {**counts, "params": sum(p.numel() for p in model.parameters())}, 4, s,
                         masks, "0.4")
    dense = {p.untyped_storage().data_ptr() for p in model.parameters()}
    student = compact_student(model, masks, structure, own_weights=adapter == "none")
    own = [p for p in student.parameters() if p.untyped_storage().data_ptr() not in dense]
    own = list({p.untyped_storage().data_ptr(): p for p in own}.values())  # tied weights once
    student = with_lora(student, s.lora) if adapter == "lora" else all_trainable(student)
    student.train()
    trainable = [p for p in student.parameters() if p.requires_grad]
    ids = torch.randint(0, 259, (2, 64), generator=torch.Generator().manual_seed(0))
    kept = {}

    def step():
        kept["loss"], _ = head_loss(hidden_states(student, ids, None), output_head(student), ids, s.chunk)

    activations = saved_tensor_bytes(student, step)
    kept["loss"].backward()
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    optimizer.step()
    states = [t for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t) and t.numel() > 1]
    assert plan.device["dense model"] == _bytes(model.parameters())
    assert plan.device["student copies"] == pytest.approx(_bytes(own), rel=0.02)
    # exact, except that the plan leaves biases out (Phi-2's are ~1% of this tiny model when all of it trains)
    exact = {} if family != "phi" or adapter == "lora" else {"rel": 0.02}
    assert plan.device["trainable"] == pytest.approx(_bytes(trainable), **exact)
    assert plan.device["gradients"] == pytest.approx(_bytes(p.grad for p in trainable), **exact)
    assert plan.device["optimizer (AdamW)"] == pytest.approx(_bytes(states), **exact)
    assert 0.6 * activations <= plan.device["activations"] <= 1.5 * activations, (plan.device["activations"],
                                                                                   activations)
