"""Task-aligned objectives: answer-only labels, the multiple-choice recipe, and the one-backward margin gradient."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import tiny_model

from gisp.data.calibration import encode_pair, from_pairs, from_questions, from_windows
from gisp.data.multiple_choice import Candidate, MCQuestion
from gisp.errors import GispError
from gisp.lightning.datamodule import CalibrationData
from gisp.lightning.scoring import GradientPass
from gisp.models.byte_tokenizer import byte_level_tokenizer
from gisp.models.families import family_spec
from gisp.models.structure import describe, layer_modules
from gisp.prune.importance import structure_scores
from gisp.prune.objectives import OBJECTIVES, get_objective, sequence_nll

TOK = byte_level_tokenizer()


def question(task: str, i: int, context: str, choices: list[str], gold: int) -> MCQuestion:
    return MCQuestion(task, f"{task}-{i}", tuple(Candidate(context, " " + c) for c in choices), gold)


QUESTIONS = {
    "boolq": [question("boolq", i, f"Passage {i}: the sky is blue.\nQuestion: is it blue?\nAnswer:", ["no", "yes"],
                       i % 2) for i in range(4)],
    "arc_easy": [question("arc_easy", i, f"Question: what is {i} + 1?\nAnswer:", [str(i + 1), str(i), "ten"], 0)
                 for i in range(3)],
}


def test_answer_only_masking_puts_minus_100_on_every_prompt_token():
    pairs = [("Q: Tom has 3 apples and buys 2.\nA: ", "3 + 2 = 5\n#### 5"), ("Q: 10 - 4?\nA: ", "6\n#### 6")]
    calib = from_pairs(pairs, TOK, get_objective("answer_ppl"))
    full = from_pairs(pairs, TOK, get_objective("ppl"))
    for prompt, answer in pairs:
        ids, n_prompt = encode_pair(TOK, prompt, answer)
        # The prompt's trailing space moves to the answer, as lm-eval does: "A:" ends the prompt.
        assert TOK.decode(ids[:n_prompt]) == prompt.rstrip() and TOK.decode(ids[n_prompt:]) == " " + answer
        row = next(i for i, x in enumerate(calib.input_ids) if x.tolist() == ids)
        labels = calib.labels[row]
        assert (labels[:n_prompt] == -100).all()
        assert labels[n_prompt:].tolist() == ids[n_prompt:]
        row_full = next(i for i, x in enumerate(full.input_ids) if x.tolist() == ids)
        assert full.labels[row_full].tolist() == ids  # objective=ppl scores the prompt too
    assert torch.allclose(calib.weights, torch.full((2,), 0.5, dtype=torch.float64))
    with pytest.raises(GispError, match="multiple-choice data"):
        from_pairs(pairs, TOK, get_objective("margin"))


def test_text_windows_support_only_ppl():
    windows = torch.randint(0, 256, (4, 16))
    assert len(from_windows(windows, OBJECTIVES["ppl"])) == 4
    for name in ("answer_ppl", "margin"):
        with pytest.raises(GispError, match="data=gsm8k"):
            from_windows(windows, OBJECTIVES[name])
    with pytest.raises(GispError, match="unknown objective"):
        get_objective("hinge")


def test_multiple_choice_recipe_budget_cap_and_weights():
    long_q = question("boolq", 99, "Passage: " + "very " * 60 + "long.\nQuestion: ok?\nAnswer:", ["no", "yes"], 1)
    pool = {"boolq": [*QUESTIONS["boolq"], long_q], "arc_easy": QUESTIONS["arc_easy"]}
    margin = from_questions(pool, TOK, get_objective("margin"), budget_tokens=100_000, cap_percentile=75, seed=0)
    rec = margin.record["tasks"]
    assert rec["boolq"]["skipped_over_cap"] == 1 and rec["boolq"]["questions"] == 4  # the long one is over the cap
    assert rec["arc_easy"]["questions"] == 3
    assert margin.record["n_sequences"] == 4 * 2 + 3 * 3 and margin.record["n_gold"] == 7
    # Signed weights: +1/n+ on the 7 gold candidates, -1/n- on the 10 others; they sum to 1 and -1.
    pos, neg = margin.weights[margin.weights > 0], margin.weights[margin.weights < 0]
    assert len(pos) == 7 and len(neg) == 10
    assert float(pos.sum()) == pytest.approx(1.0) and float(neg.sum()) == pytest.approx(-1.0)
    # ppl / answer_ppl draw the same questions and keep the gold candidate only.
    gold = from_questions(pool, TOK, get_objective("answer_ppl"), budget_tokens=100_000, cap_percentile=75, seed=0)
    assert gold.record["n_sequences"] == 7 and gold.record["tasks"] == rec
    # A budget too small for one question of a task is refused with the fix.
    with pytest.raises(GispError, match="raise data.budget_tokens"):
        from_questions(pool, TOK, get_objective("margin"), budget_tokens=20, cap_percentile=99, seed=0)
    # The budget is split evenly and respected per task.
    small = from_questions(pool, TOK, get_objective("margin"), budget_tokens=600, cap_percentile=100, seed=0)
    assert all(t["tokens"] <= 300 for t in small.record["tasks"].values())


def _trainer() -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     inference_mode=False, use_distributed_sampler=False)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_margin_one_backward_equals_the_two_sweep_definition(batch_size):
    """|(g_bar+ - g_bar-) * W| from one backward of signed weights == two sweeps with a stored second gradient."""
    calib = from_questions(QUESTIONS, TOK, get_objective("margin"), budget_tokens=100_000, cap_percentile=100, seed=0)
    gold_mask = calib.weights > 0

    # The reference's definition: sweep 1 over gold candidates, sweep 2 over the others, each a mean of answer losses.
    oracle = tiny_model("llama")
    structure = describe(oracle)
    oracle_layers = layer_modules(oracle, family_spec("llama"))
    sweeps, sweep_losses = [], []
    for select in (gold_mask, ~gold_mask):
        oracle.zero_grad(set_to_none=True)
        rows = [i for i in range(len(calib)) if select[i]]
        losses = torch.stack([sequence_nll(oracle, calib.input_ids[i][None], calib.labels[i][None])[0] for i in rows])
        losses.mean().backward()
        sweeps.append({id(p): p.grad.clone() for p in oracle.parameters() if p.grad is not None})
        sweep_losses.append(losses.mean().item())
    g_pos, g_neg = sweeps
    ref = structure_scores(oracle_layers, structure, "reference", grad_of=lambda w: g_pos[id(w)] - g_neg[id(w)])

    model = tiny_model("llama")
    module = GradientPass(model, layer_modules(model, family_spec("llama")), structure, n_samples=len(calib))
    _trainer().validate(module, datamodule=CalibrationData(calib, batch_size), verbose=False)
    torch.testing.assert_close(module.scores[0], ref[0], rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(module.scores[1], ref[1], rtol=1e-4, atol=1e-9)
    assert module.calib_loss == pytest.approx(sweep_losses[0] - sweep_losses[1], rel=1e-4, abs=1e-6)
