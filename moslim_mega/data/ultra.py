"""UltraFeedback + UltraSafety → multi-head reward-model data (paper §3.1, Appendix B, Table 5).

One record per rated completion, in the RM data format of :mod:`moslim_mega.reward.data`::

    {"prompt_id", "prompt", "response", "source",
     "ratings": {"helpfulness": r|null, "honesty": r|null, "harmlessness": r|null},
     "labels":  {"helpfulness": c, "honesty": c, "harmlessness": c}}     # c = class, −1 = masked

``ratings`` are the raw scores (UltraFeedback 1-5, UltraSafety 0/1), so ``moslim rm train`` bins
them with whatever ``prefs.datatype`` it is given; ``labels`` are the classes of the DataType
chosen at build time (the histograms in ``stats.json`` count them). A head is ``null``/−1 when
its rating is ``"N/A"`` or when the source does not rate it: UltraFeedback gives helpfulness and
honesty, UltraSafety harmlessness (Appendix B) — masked heads are left out of the loss (Eq. 6-9).

Rows are validated one by one; a malformed row or completion is dropped and listed in
``stats.json`` with its location and reason, and every valid completion is kept.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from ..prefs import PreferenceSpec, PrefixError, check_plain_prompt
from .fields import RowProblem, get_field, get_text, parse_rating, row_object
from .sources import Row, iter_records
from .stats import DropLog, class_histogram, write_stats

HEADS = ("helpfulness", "honesty", "harmlessness")
UF_HEADS = ("helpfulness", "honesty")  # the UltraFeedback aspects MOSLIM uses (§3.1)
UF_RANGE = (1.0, 5.0)
US_RANGE = (0.0, 1.0)
# Some UltraSafety prompts are jailbreak templates with a slot for the instruction.
JAILBREAK_SLOT = "[INSERT PROMPT HERE]"
# Whether a prompt opens with a preference tag depends only on the dimension names, not on the
# class counts, so one preset serves every DataType.
_TAG_SPEC = PreferenceSpec.datatype(4)


def prompt_id(prompt: str) -> str:
    """Stable id of a prompt text: completions of the same prompt share it (pairwise groups, split)."""
    return hashlib.sha1(prompt.strip().encode("utf-8")).hexdigest()[:16]


def _row_completions(row: Row, source: str, log: DropLog) -> list | None:
    """The row's completion list, or None after logging why the row is dropped."""
    try:
        completions = get_field(row_object(row), "completions", "completions", list)
    except RowProblem as e:
        log.drop(source, row.where, str(e))
        return None
    if not completions:
        log.drop(source, row.where, "no completions")
        return None
    log.count(f"{source}.completions_per_row.{len(completions)}")
    return completions


def _response_and_annotations(comp) -> tuple[str, dict]:
    """A completion's response text and annotations object (field names are relative to the
    completion; the drop entry carries the completion's index)."""
    if not isinstance(comp, dict):
        raise RowProblem(f"not an object: completion is {type(comp).__name__}")
    return get_text(comp, "response", "response"), get_field(comp, "annotations", "annotations")


def _record(source: str, prompt: str, response: str, ratings: dict, where: str) -> dict:
    full = {h: ratings.get(h) for h in HEADS}
    return {"prompt_id": prompt_id(prompt), "prompt": prompt, "response": response, "source": source,
            "ratings": full, "where": where}


def completion_records(rows, log: DropLog, source: str, prompt_of, ratings_of) -> list[dict]:
    """One record per rated completion of UltraFeedback-shaped rows (``completions`` list with
    ``response`` and ``annotations``). ``prompt_of(row) -> str`` and ``ratings_of(annotations,
    log) -> ({head: rating | None}, {head: problem})`` read the source-specific parts; both raise
    :class:`RowProblem` for what makes the whole row/completion unusable. A per-head problem masks
    that head only and is listed under ``masked_heads`` in the stats."""
    out = []
    for row in rows:
        log.count(f"{source}.rows")
        completions = _row_completions(row, source, log)
        if completions is None:
            continue
        try:
            prompt = prompt_of(row.data)
            # Markup (<div>, <code>) is kept; a prompt that opens with a preference tag is not:
            # `rm train` would strip it (a changed prompt) or refuse it.
            check_plain_prompt(prompt, _TAG_SPEC)
        except RowProblem as e:
            log.drop(source, row.where, str(e))
            continue
        except PrefixError as e:
            log.drop(source, row.where, f"preference tag: {e}")
            continue
        for j, comp in enumerate(completions):
            log.count(f"{source}.completions")
            try:
                response, ann = _response_and_annotations(comp)
                ratings, problems = ratings_of(ann, log)
            except RowProblem as e:
                log.drop(source, row.where, str(e), completion=j)
                continue
            if problems and all(r is None for r in ratings.values()):
                # Every head is unusable: nothing of this completion survives, so it is a drop.
                log.drop(source, row.where, "; ".join(problems.values()), completion=j)
                continue
            for head, reason in problems.items():
                # One bad rating masks only its own head: the other heads' valid labels are kept.
                log.mask_head(source, row.where, head, reason, completion=j)
            for head, rating in ratings.items():
                if rating is None and head not in problems:
                    log.count(f"{source}.na.{head}")
            if all(r is None for r in ratings.values()):
                log.drop(source, row.where, "no labelled head: every rating is N/A", completion=j)
                continue
            out.append(_record(source, prompt, response, ratings, row.where))
    return out


def _uf_ratings(ann: dict, log: DropLog) -> tuple[dict, dict]:
    """``({head: rating | None}, {head: problem})``: a malformed aspect masks only its head."""
    ratings, problems = {}, {}
    for head in UF_HEADS:
        try:
            aspect = get_field(ann, head, f"annotations.{head}")
            ratings[head] = parse_rating(aspect.get("Rating"), f"annotations.{head}.Rating", *UF_RANGE)
        except RowProblem as e:
            ratings[head], problems[head] = None, str(e)
    return ratings, problems


def ultrafeedback_records(rows, log: DropLog, source: str = "ultrafeedback") -> list[dict]:
    """One record per UltraFeedback completion with helpfulness/honesty ratings (N/A → null)."""
    return completion_records(rows, log, source, lambda d: get_text(d, "instruction", "instruction"), _uf_ratings)


def ultrasafety_prompt(data: dict) -> str:
    """The text the UltraSafety completions answered: the jailbreak ``prompt`` (its slot filled
    with the ``instruction`` when it has one), or the bare ``instruction`` when there is none."""
    prompt = data.get("prompt") if isinstance(data, dict) else None
    instruction = data.get("instruction") if isinstance(data, dict) else None
    if isinstance(prompt, str) and prompt.strip():
        if JAILBREAK_SLOT in prompt and isinstance(instruction, str):
            return prompt.replace(JAILBREAK_SLOT, instruction)
        return prompt
    return get_text(data, "instruction", "instruction")


def _harmlessness(ann: dict, source: str, log: DropLog) -> dict:
    """UltraSafety stores harmlessness as a *list* of annotations: take the first element."""
    value = get_field(ann, "harmlessness", "annotations.harmlessness", (list, dict))
    if isinstance(value, dict):
        log.count(f"{source}.harmlessness_as_object")
        return value
    if not value:
        raise RowProblem("empty list: annotations.harmlessness")
    if not isinstance(value[0], dict):
        raise RowProblem("not an object: annotations.harmlessness[0]")
    if len(value) > 1:
        log.count(f"{source}.harmlessness_extra_annotations", len(value) - 1)
    return value[0]


def _us_ratings(ann: dict, log: DropLog, source: str = "ultrasafety") -> tuple[dict, dict]:
    # One head only: a malformed rating leaves nothing to keep, so it raises (the completion drops).
    first = _harmlessness(ann, source, log)
    return {"harmlessness": parse_rating(first.get("Rating"), "annotations.harmlessness[0].Rating", *US_RANGE)}, {}


def ultrasafety_records(rows, log: DropLog, source: str = "ultrasafety") -> list[dict]:
    """One record per UltraSafety completion with a harmlessness rating (1 harmless, 0 harmful)."""
    return completion_records(rows, log, source, ultrasafety_prompt, lambda a, lg: _us_ratings(a, lg, source))


def attach_labels(records: list[dict], spec: PreferenceSpec) -> None:
    """Add ``labels`` (the DataType's class per head, −1 = masked) to every record, in place."""
    for rec in records:
        rec["labels"] = {
            d.name: -1 if rec["ratings"][d.name] is None else d.rating_to_class(rec["ratings"][d.name])
            for d in spec.dimensions
        }


def split_by_prompt(records: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Train/validation split on prompt ids: no prompt has completions on both sides.

    Stratified by source so the small UltraSafety set (3k prompts against UltraFeedback's 64k)
    still puts harmlessness labels into validation. Seeded; independent of record order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = random.Random(seed)
    val_ids: set[str] = set()
    seen: set[str] = set()
    for source in sorted({r["source"] for r in records}):
        ids = sorted({r["prompt_id"] for r in records if r["source"] == source} - seen)
        seen.update(ids)
        rng.shuffle(ids)
        n_val = round(val_fraction * len(ids))
        if val_fraction > 0 and len(ids) >= 2:
            n_val = min(max(n_val, 1), len(ids) - 1)  # both sides non-empty
        val_ids.update(ids[:n_val])
    train = [r for r in records if r["prompt_id"] not in val_ids]
    val = [r for r in records if r["prompt_id"] in val_ids]
    return train, val


def split_summary(records: list[dict], spec: PreferenceSpec) -> dict:
    return {
        "records": len(records),
        "prompts": len({r["prompt_id"] for r in records}),
        "by_source": {s: sum(r["source"] == s for r in records) for s in sorted({r["source"] for r in records})},
        "histograms": {
            d.name: class_histogram([r["labels"][d.name] for r in records], d.num_classes) for d in spec.dimensions
        },
    }


def build_rm_data(
    out_dir: str | Path,
    datatype: int,
    ultrafeedback: str | None = None,
    ultrasafety: str | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
    split: str | None = None,
) -> dict:
    """Read, validate, label, split and write the RM data; returns the stats (also ``stats.json``).

    Files in ``out_dir``: ``rm_train.jsonl`` / ``rm_eval.jsonl`` (what ``moslim rm train
    run.data_dir=out_dir`` reads), the same two splits as a ``datasets.DatasetDict`` saved in
    ``dataset/`` (``datasets.load_from_disk``) and ``stats.json``.
    """
    if not ultrafeedback and not ultrasafety:
        raise ValueError("build-rm needs --ultrafeedback and/or --ultrasafety")
    spec = PreferenceSpec.datatype(datatype)
    log = DropLog()
    records: list[dict] = []
    # Both sources are opened (and a missing one reported) before either is read.
    uf_rows = iter_records(ultrafeedback, split) if ultrafeedback else ()
    us_rows = iter_records(ultrasafety, split) if ultrasafety else ()
    records += ultrafeedback_records(uf_rows, log)
    records += ultrasafety_records(us_rows, log)
    if not records:
        raise ValueError(f"no valid records in the sources ({len(log.drops)} dropped; first: {log.drops[:1]})")
    attach_labels(records, spec)
    train, val = split_by_prompt(records, val_fraction, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _save_splits(out, {"train": train, "validation": val})
    stats = {
        "datatype": datatype,
        "spec": spec.to_dict(),
        "sources": {"ultrafeedback": ultrafeedback, "ultrasafety": ultrasafety},
        "seed": seed,
        "val_fraction": val_fraction,
        "records": len(records),
        "na_ratings": {h: log.counts.get(f"{s}.na.{h}", 0) for h, s in
                       (("helpfulness", "ultrafeedback"), ("honesty", "ultrafeedback"), ("harmlessness", "ultrasafety"))},
        "splits": {"train": split_summary(train, spec), "validation": split_summary(val, spec)},
        "train_command": f"moslim rm train --out RUN_DIR run.data_dir={out} prefs.datatype={datatype}",
        **log.to_dict(),
    }
    write_stats(out / "stats.json", stats)
    return stats


def _save_splits(out: Path, splits: dict[str, list[dict]]) -> None:
    import datasets

    features = datasets.Features(
        {
            "prompt_id": datasets.Value("string"),
            "prompt": datasets.Value("string"),
            "response": datasets.Value("string"),
            "source": datasets.Value("string"),
            "ratings": {h: datasets.Value("float64") for h in HEADS},
            "labels": {h: datasets.Value("int64") for h in HEADS},
            "where": datasets.Value("string"),
        }
    )
    # Column-wise, so an empty split (val_fraction=0) still carries the schema.
    dd = datasets.DatasetDict(
        {
            name: datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features)
            for name, rows in splits.items()
        }
    )
    dd.save_to_disk(str(out / "dataset"))
    for name, fname in (("train", "rm_train.jsonl"), ("validation", "rm_eval.jsonl")):
        with open(out / fname, "w", encoding="utf-8") as f:
            for rec in splits[name]:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
