"""gisp's lm-eval task YAMLs over local documents (package data; loaded by :mod:`gisp.eval.multiple_choice`)."""
