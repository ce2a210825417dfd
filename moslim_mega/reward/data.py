"""Reward-model data: rated (prompt, response) records → tokenised examples with class labels.

A record is one JSON object per line: ``{"prompt", "response", "ratings": {dim: raw|null},
"prompt_id"?}``. Raw ratings are binned by the :class:`PreferenceSpec`; ``null`` means the head
is unlabelled for this record (masked in the loss). Every spec dimension must be present in
``ratings`` — a missing key is an error, not a silent "unlabelled".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.template import encode_pair, pad_batch
from ..prefs import LabelError, PreferenceSpec, PrefixError, strip_prefix


class RecordError(ValueError):
    """A bad data record; the message names the file, line and field."""


@dataclass
class RMExamples:
    """A tokenised RM data set. labels_NH holds class indices, −1 = unlabelled."""

    input_ids: list[list[int]]
    labels_NH: torch.Tensor
    groups: list[str]
    prompts: list[str]
    responses: list[str]

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, idx: list[int], pad_id: int):
        ids_BT, mask_BT = pad_batch([self.input_ids[i] for i in idx], pad_id)
        return ids_BT, mask_BT, self.labels_NH[idx]


def check_prompt_response(rec, where: str) -> None:
    """A record must be an object with string ``prompt`` and non-empty string ``response``."""
    if not isinstance(rec, dict):
        raise RecordError(f"{where}: record must be a JSON object, got {type(rec).__name__}")
    for key in ("prompt", "response"):
        if key not in rec:
            raise RecordError(f"{where}: missing field {key!r}")
        if not isinstance(rec[key], str):
            raise RecordError(f"{where}: field {key!r} must be a string, got {type(rec[key]).__name__}")
    if not rec["response"].strip():
        raise RecordError(f"{where}: field 'response' is empty")


def parse_record(rec, spec: PreferenceSpec, where: str) -> tuple[str, str, str, list[int]]:
    """Validate one record → (prompt without prefix, response, group id, labels per head)."""
    check_prompt_response(rec, where)
    ratings = rec.get("ratings")
    if not isinstance(ratings, dict):
        raise RecordError(f"{where}: missing or non-object field 'ratings'")
    labels = [-1] * len(spec)
    for key, raw in ratings.items():
        try:
            head = spec.index(key)
        except PrefixError:
            raise RecordError(f"{where}: ratings.{key}: unknown dimension; known: {', '.join(spec.names)}") from None
        if raw is None:
            continue
        try:
            labels[head] = spec.dimensions[head].rating_to_class(raw)
        except LabelError as e:
            raise RecordError(f"{where}: ratings.{key}: {e}") from None
    missing = [n for n in spec.names if not any(spec.index(k) == spec.index(n) for k in ratings)]
    if missing:
        raise RecordError(f"{where}: ratings has no {missing[0]!r} (use null for an unlabelled head)")
    try:
        prompt = strip_prefix(rec["prompt"], spec)  # the RM never sees a preference prefix
    except PrefixError as e:
        raise RecordError(f"{where}: field 'prompt': {e}") from None
    group = str(rec.get("prompt_id", prompt))
    return prompt, rec["response"], group, labels


def read_jsonl(path: str | Path) -> list[tuple[str, object]]:
    """(where, parsed object) per non-empty line; bad JSON raises RecordError naming the line."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"data file not found: {path}")
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rows.append((where, json.loads(line)))
            except json.JSONDecodeError as e:
                raise RecordError(f"{where}: invalid JSON ({e.msg})") from None
    return rows


def load_rm_examples(path, spec: PreferenceSpec, tokenizer, max_length: int) -> RMExamples:
    prompts, responses, groups, labels, ids = [], [], [], [], []
    for where, rec in read_jsonl(path):
        prompt, response, group, lab = parse_record(rec, spec, where)
        prompts.append(prompt)
        responses.append(response)
        groups.append(group)
        labels.append(lab)
        ids.append(encode_pair(tokenizer, prompt, response, max_length))
    if not ids:
        raise RecordError(f"{path}: no records")
    return RMExamples(ids, torch.tensor(labels, dtype=torch.long), groups, prompts, responses)
