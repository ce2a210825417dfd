"""nvidia/HelpSteer and HelpSteer2 → regression targets (for the DPA baseline's reward model).

Each row is ``{prompt, response, helpfulness, correctness, coherence, complexity, verbosity}``
with integer 0-4 attributes. A record is ``{"prompt", "response", "targets": {attr: float},
"where"}``; ``targets`` are the raw 0-4 scores, or divided by 4 with ``scale=True``.

HelpSteer2 packs multi-turn prompts as ``turn<extra_id_1>Assistant\\nturn<extra_id_1>User\\nturn``;
those become hh-rlhf transcripts (``\\n\\nHuman: …\\n\\nAssistant: …\\n\\nAssistant:``), which
:mod:`moslim_mega.data.template` renders turn by turn with any chat template.
"""

from __future__ import annotations

from .fields import RowProblem, get_text, parse_rating, row_object
from .sources import iter_records
from .stats import DropLog

ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
TURN_SEP = "<extra_id_1>"
_ROLE_LINES = {"User": "Human", "Assistant": "Assistant"}


def unpack_turns(prompt: str) -> str:
    """A HelpSteer2 packed prompt as an hh-rlhf transcript; a single-turn prompt is unchanged."""
    if TURN_SEP not in prompt:
        return prompt
    first, *rest = prompt.split(TURN_SEP)
    parts = [f"\n\nHuman: {first.strip()}"]
    for piece in rest:
        role, sep, text = piece.partition("\n")
        if not sep or role.strip() not in _ROLE_LINES:
            raise RowProblem(f"malformed multi-turn prompt: turn {piece[:30]!r} does not start with 'User' or 'Assistant'")
        parts.append(f"\n\n{_ROLE_LINES[role.strip()]}: {text.strip()}")
    if not parts[-1].startswith("\n\nHuman:"):
        raise RowProblem("malformed multi-turn prompt: the last turn is not the user's")
    return "".join(parts) + "\n\nAssistant:"


def load_helpsteer(src: str, split: str | None = None, scale: bool = False, source: str = "helpsteer"):
    """``(records, DropLog)``: valid rows as regression examples, invalid ones logged with a reason."""
    log = DropLog()
    out = []
    for row in iter_records(src, split):
        log.count(f"{source}.rows")
        try:
            data = row_object(row)
            prompt = unpack_turns(get_text(data, "prompt", "prompt"))
            response = get_text(data, "response", "response")
            targets = {}
            for attr in ATTRIBUTES:
                value = parse_rating(data.get(attr), attr, 0.0, 4.0)
                if value is None:
                    raise RowProblem(f"non-numeric rating: {attr}='N/A'")
                targets[attr] = value / 4.0 if scale else value
        except RowProblem as e:
            log.drop(source, row.where, str(e))
            continue
        if prompt.startswith("\n\nHuman:"):
            log.count(f"{source}.multi_turn")
        out.append({"prompt": prompt, "response": response, "targets": targets, "where": row.where})
    return out, log
