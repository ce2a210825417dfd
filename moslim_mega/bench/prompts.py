"""Judge prompts, written for this project (not copied from any benchmark's own prompts)."""

from __future__ import annotations

RATING_SYSTEM = (
    "You grade answers written by an AI assistant. Be strict and impartial; ignore length and "
    "style unless they hurt the answer. Finish with the grade as [[N]], N an integer from 1 (useless "
    "or harmful) to 10 (correct, complete and helpful)."
)


def rating_single(question: str, answer: str, reference: str | None = None) -> list[dict]:
    """Grade one answer to one question (MT-Bench turn 1, or any single-turn answer)."""
    text = f"Question:\n{question}\n\n"
    if reference:
        text += f"A correct reference answer (use it to check correctness):\n{reference}\n\n"
    text += f"Assistant's answer:\n{answer}\n\nExplain your grade in a few sentences, then give it as [[N]]."
    return [{"role": "system", "content": RATING_SYSTEM}, {"role": "user", "content": text}]


def rating_followup(q1: str, a1: str, q2: str, a2: str, reference: str | None = None) -> list[dict]:
    """Grade the second answer of a two-turn conversation, in the context of the first."""
    text = (
        f"First user message:\n{q1}\n\nAssistant's first answer:\n{a1}\n\n"
        f"Second user message:\n{q2}\n\nAssistant's second answer:\n{a2}\n\n"
    )
    if reference:
        text += f"A correct reference answer for the second message:\n{reference}\n\n"
    text += "Grade only the SECOND answer (the first is context). Explain briefly, then give the grade as [[N]]."
    return [{"role": "system", "content": RATING_SYSTEM}, {"role": "user", "content": text}]


STATEMENT_SYSTEM = (
    "You check facts. Split the assistant's answer into its individual factual claims. Write one "
    "claim per line and end each line with your verdict: [[true]] if the claim is correct, "
    "[[false]] if it is wrong, [[unknown]] if you cannot verify it. If the answer makes no factual "
    "claim at all, reply with [[none]] only."
)


def statement_check(query: str, answer: str) -> list[dict]:
    """Extract and verify the factual statements of one answer (HaluEval 2.0)."""
    text = f"User question:\n{query}\n\nAssistant's answer:\n{answer}\n\nList the claims with their verdicts."
    return [{"role": "system", "content": STATEMENT_SYSTEM}, {"role": "user", "content": text}]
