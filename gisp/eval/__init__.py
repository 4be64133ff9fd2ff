"""Evaluation of the live masked model: perplexity, lm-eval tasks (through the one module that imports lm_eval,
:mod:`gisp.eval.harness`), the suite that runs them per sparsity level, and the report (table, figure)."""
