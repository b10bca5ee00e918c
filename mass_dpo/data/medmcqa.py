"""MedMCQA: a question with its 4 options, expanded to 20 candidates from other questions of its subject.

Construction (settings in ``params/datasets/medmcqa.yaml``):

- ``cop`` (the correct option) is 1..4 in the released JSON (the local ``dev.json``) and 0..3 on the Hugging
  Face hub (``openlifescienceai/medmcqa``); the reader passes the base that belongs to its source and a value
  outside it is an error naming the row.
- The question's own options come first, in order, an exact repeat of a distractor dropped. A question whose
  correct text is repeated among its own options is ambiguous: it is skipped, with a warning naming its id
  (4 such rows in ``dev.json``).
- The pool of a subject is every distinct option text (whitespace and case folded) of the questions with the
  same ``subject_name`` in the same source file, ordered by normalized text, minus options that only make sense beside
  their own question ("All of the above", "Both", "a and c", "3", ...). Each question draws the missing
  ``num_candidates - len(own)`` texts from its subject's pool with a ``random.Random`` seeded by its id,
  skipping texts equal to any of its own options; when the subject's pool is too small (subject ``Unknown``
  has 2 questions) the rest comes from the pool of all subjects the same way. The 20 texts are then shuffled
  by the same generator, and ``target`` is the position of the correct option.
- Locally only the dev split exists, so train / valid / test are carved from it by a hash of the question id
  (:func:`carve`); on the hub, train is the hub's train split and valid / test are carved from the hub's
  validation split (the same rows as ``dev.json``) by the same rule, so offline and online valid / test agree.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

from .records import RecordError, make_record, read_json_rows, normalize_text, qa_prompt, rng_for, stable_fraction, summarize

NAME = "medmcqa"
HAS_SAMPLE = True
FILE = "medmcqa/dev.json"
OPTION_KEYS = ("opa", "opb", "opc", "opd")
HUB_ID = "openlifescienceai/medmcqa"

_REFERENTIAL = re.compile(
    r"(\b(all|none|both|either|neither|any) of (the|these|them|above)\b|\b(all|none|both)( of)? (the )?above\b"
    r"|^(all|none|both|neither|either)\b"
    r"|^[\sa-e0-9ivx,&./()+-]*((\band\b|\bor\b)[\sa-e0-9ivx,&./()+-]*)*$)",
    re.IGNORECASE,
)


def required_files(split: str) -> list[list[str]]:
    return [[FILE]]


def is_referential(text: str) -> bool:
    """Options that point at other options ("All of the above", "Both", "a and c", "1, 2 and 3", "4")."""
    return bool(_REFERENTIAL.search(normalize_text(text)))


def carve(qid: str, settings: dict[str, Any]) -> str:
    """The split of a question of the local dev file: ``valid`` / ``test`` / ``train`` by a hash of its id."""
    c = settings["construction"]["carve"]
    u = stable_fraction(qid, c["salt"])
    if u < c["valid"]:
        return "valid"
    if u < c["valid"] + c["test"]:
        return "test"
    return "train"


def read_local(path: Path) -> list[dict[str, Any]]:
    """The released JSON-lines file (a JSON list is accepted too)."""
    return read_json_rows(path)


class _Pool:
    """Distinct option texts, ordered by normalized text; ``draw`` picks ``k`` not in ``exclude`` (normalized).

    Texts equal after normalization are one entry, shown as the smallest of their spellings, so a pool depends
    on the set of questions only, not on their order.
    """

    def __init__(self) -> None:
        self._by_norm: dict[str, str] = {}
        self.texts: list[str] = []
        self.norms: list[str] = []

    def add(self, text: str) -> None:
        n = normalize_text(text)
        if n and not is_referential(text):
            shown = " ".join(text.split())
            self._by_norm[n] = min(self._by_norm.get(n, shown), shown)

    def freeze(self) -> "_Pool":
        self.norms = sorted(self._by_norm)
        self.texts = [self._by_norm[n] for n in self.norms]
        return self

    def draw(self, rng, k: int, exclude: set[str]) -> list[str]:
        if k <= 0 or not self.texts:
            return []
        # at most len(exclude) drawn positions can be excluded, so k + len(exclude) distinct positions suffice
        picks = rng.sample(range(len(self.texts)), min(len(self.texts), k + len(exclude)))
        out = []
        for i in picks:
            if self.norms[i] not in exclude:
                out.append(self.texts[i])
                if len(out) == k:
                    break
        return out


def build_records(rows: list[dict[str, Any]], cop_base: int, source: str, settings: dict[str, Any],
                  keep=lambda row: True) -> list[dict[str, Any]]:
    """Records for the rows that ``keep`` accepts, pooling over *all* ``rows`` (the whole source file)."""
    n_cands = settings["num_candidates"]
    if n_cands < 4:
        raise ValueError(f"medmcqa num_candidates must be at least 4 (a question has 4 options), got {n_cands}")
    errors, ambiguous = [], []
    parsed = []
    for i, row in enumerate(rows):
        qid = row.get("id")
        try:
            question = row["question"]
            options = [row[k] for k in OPTION_KEYS]
            cop = int(row["cop"])
            subject = row.get("subject_name") or "Unknown"
        except (KeyError, TypeError, ValueError) as err:
            errors.append(f"row {i} (id {qid}): missing or bad field {err}")
            continue
        if not qid:
            errors.append(f"row {i}: no id")
            continue
        if not cop_base <= cop < cop_base + 4:
            errors.append(f"row {i} (id {qid}): cop {cop} outside {cop_base}..{cop_base + 3} for this source")
            continue
        parsed.append((qid, question or "", [str(o or "").strip() for o in options], cop - cop_base, subject, row))
    if errors:
        raise RecordError(summarize(f"{source}: {len(errors)} bad row(s)", errors))

    pools: dict[str, _Pool] = {}
    everything = _Pool()
    for _, _, options, _, subject, _ in parsed:
        pool = pools.setdefault(subject, _Pool())
        for o in options:
            pool.add(o)
            everything.add(o)
    for pool in (*pools.values(), everything):
        pool.freeze()

    template = settings["prompt"]["template"]
    salt = settings["construction"]["candidate_salt"]
    records = []
    for qid, question, options, answer, subject, row in parsed:
        if not keep(row):
            continue
        answer_text = options[answer]
        answer_norm = normalize_text(answer_text)
        if not answer_norm or sum(normalize_text(o) == answer_norm for o in options) > 1:
            ambiguous.append(qid)
            continue
        own, own_norms = [], []
        for o in options:
            n = normalize_text(o)
            if n and n not in own_norms:
                own.append(o)
                own_norms.append(n)
        rng = rng_for(qid, salt)
        exclude = set(own_norms)
        pooled = pools[subject].draw(rng, n_cands - len(own), exclude)
        if len(own) + len(pooled) < n_cands:
            exclude |= {normalize_text(p) for p in pooled}
            pooled += everything.draw(rng, n_cands - len(own) - len(pooled), exclude)
        candidates = own + pooled
        rng.shuffle(candidates)
        target = candidates.index(answer_text)
        records.append(
            make_record(f"medmcqa-{qid}", qa_prompt(question, candidates, template), candidates, target, subject=subject)
        )
    if ambiguous:
        warnings.warn(
            f"{source}: skipped {len(ambiguous)} question(s) whose correct option text is repeated among its "
            f"options: {', '.join(ambiguous[:10])}{' ...' if len(ambiguous) > 10 else ''}",
            stacklevel=3,
        )
    return records


def build(data_dir: Path, split: str, settings: dict[str, Any]) -> tuple[list[dict[str, Any]], Path]:
    path = data_dir / FILE
    rows = read_local(path)
    records = build_records(rows, 1, str(path), settings, keep=lambda row: carve(row.get("id", ""), settings) == split)
    return records, path


def build_hub(split: str, settings: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """Online: ``openlifescienceai/medmcqa`` (``cop`` 0..3); needs the network or a warm hub cache."""
    import datasets

    if split == "train":
        rows = list(datasets.load_dataset(HUB_ID, split="train"))
        return build_records(rows, 0, f"{HUB_ID} (train)", settings), f"{HUB_ID}:train"
    rows = list(datasets.load_dataset(HUB_ID, split="validation"))
    records = build_records(
        rows, 0, f"{HUB_ID} (validation)", settings, keep=lambda row: carve(row.get("id", ""), settings) == split
    )
    return records, f"{HUB_ID}:validation"
