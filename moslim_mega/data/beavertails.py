"""PKU-Alignment/BeaverTails → safety labels (extra harmlessness data, DPA baseline).

Rows are ``{prompt, response, is_safe: bool, category: {name: bool}}``. The 330k splits
annotate the same (prompt, response) pair several times, so pairs are grouped and ``is_safe``
decided by majority vote; a tied vote has no label and is dropped (and reported). A record is
``{"prompt", "response", "is_safe", "votes": {"safe", "unsafe"}, "category_votes": {name: n},
"where"}``, where ``category_votes`` counts the annotations that flag each category.
"""

from __future__ import annotations

from collections import Counter

from .fields import RowProblem, get_field, get_text, row_object
from .sources import iter_records
from .stats import DropLog


def load_beavertails(src: str, split: str | None = None, source: str = "beavertails"):
    """``(records, DropLog)``: one record per distinct (prompt, response), majority-voted."""
    log = DropLog()
    groups: dict[tuple[str, str], dict] = {}
    for row in iter_records(src, split):
        log.count(f"{source}.rows")
        try:
            data = row_object(row)
            prompt = get_text(data, "prompt", "prompt")
            response = get_text(data, "response", "response")
            is_safe = get_field(data, "is_safe", "is_safe", bool)
            category = data.get("category") or {}
            if not isinstance(category, dict):
                raise RowProblem(f"wrong type: category must be dict, got {type(category).__name__}")
        except RowProblem as e:
            log.drop(source, row.where, str(e))
            continue
        key = (prompt.strip(), response.strip())
        group = groups.setdefault(
            key, {"prompt": prompt, "response": response, "votes": Counter(), "cats": Counter(), "where": row.where}
        )
        group["votes"]["safe" if is_safe else "unsafe"] += 1
        group["cats"].update(name for name, flagged in category.items() if flagged is True)
    out = []
    for g in groups.values():
        safe, unsafe = g["votes"]["safe"], g["votes"]["unsafe"]
        if safe + unsafe > 1:
            log.count(f"{source}.duplicate_annotations", safe + unsafe - 1)
        if safe and unsafe:
            log.count(f"{source}.disagreements")
        if safe == unsafe:
            log.drop(source, g["where"], f"tied vote: {safe} safe vs {unsafe} unsafe annotations")
            continue
        out.append(
            {"prompt": g["prompt"], "response": g["response"], "is_safe": safe > unsafe,
             "votes": {"safe": safe, "unsafe": unsafe}, "category_votes": dict(g["cats"]), "where": g["where"]}
        )
    return out, log
