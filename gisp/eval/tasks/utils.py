"""``!function`` helpers of gisp's lm-eval task YAMLs (the prompts of lm-eval's own winogrande and medqa tasks).

``tests/test_mc_tasks.py`` checks that they render exactly what lm-eval's installed task configs render.
"""

from __future__ import annotations


def winogrande_doc_to_text(doc: dict) -> int:
    """The gold option's index: an int from doc_to_text tells lm-eval that the *contexts* are the choices."""
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_choice(doc: dict) -> list[str]:
    """One context per option: the sentence up to the blank, with the option filled in."""
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]


def winogrande_doc_to_target(doc: dict) -> str:
    """The continuation shared by both contexts: the rest of the sentence after the blank."""
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def medqa_doc_to_text(doc: dict) -> str:
    options = "".join(f"{letter}. {doc[f'ending{i}']}\n" for i, letter in enumerate("ABCD"))
    return f"Question: {doc['sent1']}\n{options}Answer:"
