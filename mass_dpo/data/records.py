"""The record shape every benchmark (and a user's own preference data) is turned into, and its checks.

One record per prompt:

- ``id``          str, unique and stable across runs and machines;
- ``prompt``      plain text (no chat template), ending in an answer cue;
- ``candidates``  list[str], the responses in presentation order;
- ``target``      int, index of the preferred response in ``candidates``;
- ``chosen``      ``candidates[target]``;
- ``rejected``    the other candidates, order kept;
- source fields:  ``history`` (list[str]) for recommendation, ``subject`` (str) for MedMCQA, ``messages`` (str)
  for a user's preference file (:mod:`mass_dpo.data.preferences`: its conversational rows' message lists).

Everything random here is seeded from record ids (:func:`rng_for`, :func:`stable_fraction`), never from the
global RNG, so every construction is deterministic.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

#: Columns every record has, in this order; datasets add their source fields after them.
BASE_COLUMNS = ("id", "prompt", "candidates", "target", "chosen", "rejected")

#: Extra (source) columns per dataset, with their type (``"str"`` or ``"list"``).
SOURCE_COLUMNS: dict[str, dict[str, str]] = {
    "lastfm": {"history": "list"},
    "movielens": {"history": "list"},
    "medmcqa": {"subject": "str"},
    "qasc": {},
    "preferences": {"messages": "str"},
}

#: How many problems an error message lists before it says "... and N more".
MAX_LISTED = 20


class RecordError(ValueError):
    """A record (or a source row) that cannot be used; the message names the record id or row and the file."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def stable_fraction(key: str, salt: str = "") -> float:
    """A number in [0, 1) fixed by ``salt`` and ``key`` (SHA-256), the same on every machine and Python."""
    return int.from_bytes(_digest(f"{salt}\x1f{key}")[:8], "big") / 2**64


def rng_for(key: str, salt: str = "") -> random.Random:
    """A private ``random.Random`` seeded from ``salt`` and ``key`` (never the global RNG)."""
    return random.Random(int.from_bytes(_digest(f"{salt}\x1f{key}")[:8], "big"))


def short_hash(text: str, n: int = 16) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:n]


def normalize_text(text: str | None) -> str:
    """Casefolded text with runs of whitespace collapsed: what "the same option" means when deduplicating."""
    return re.sub(r"\s+", " ", (text or "").strip()).casefold()


class Complement(Sequence):
    """``[x for x in universe if x not in excluded]``, without building the list.

    ``random.sample`` only calls ``len()`` and indexes its population, so sampling from this gives exactly
    what sampling from the materialized list gives (the S-DPO rebuild relies on this), in O(k * |excluded|)
    instead of O(|universe|) per draw.
    """

    def __init__(self, universe: Sequence, position: dict, excluded: Iterable):
        self._universe = universe
        self._skip = sorted({position[x] for x in excluded if x in position})
        self._len = len(universe) - len(self._skip)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, j):  # type: ignore[override]
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(len(self)))]
        if j < 0:
            j += self._len
        if not 0 <= j < self._len:
            raise IndexError(j)
        p = j
        for s in self._skip:
            if s <= p:
                p += 1
            else:
                break
        return self._universe[p]


def sdpo_candidates(universe: Sequence, position: dict, history: Iterable, target, num_candidates: int) -> list:
    """Candidates built as S-DPO builds them (``negative_sampling`` in its ``lastfm_data.py``).

    ``num_candidates - 1`` items drawn with ``random.seed(target)`` then ``random.sample`` from the items outside
    the history and the target (in ``universe`` order), the target appended, then ``random.seed(target)`` again
    and ``random.shuffle``. A private ``random.Random`` is used, so the global RNG is untouched.
    """
    population = Complement(universe, position, [*history, target])
    rng = random.Random(target)
    cands = rng.sample(population, num_candidates - 1) + [target]
    rng.seed(target)
    rng.shuffle(cands)
    return cands


def letters(n: int) -> list[str]:
    """Option labels A, B, ..., Z, AA, AB, ... for ``n`` options."""
    out = []
    for i in range(n):
        label, i = "", i + 1
        while i:
            i, r = divmod(i - 1, 26)
            label = chr(65 + r) + label
        out.append(label)
    return out


def qa_prompt(question: str, options: Sequence[str], template: str) -> str:
    """A multiple-choice prompt: ``template`` with ``{question}`` and ``{options}`` ("(A) text" one a line)."""
    opts = "\n".join(f"({lab}) {text}" for lab, text in zip(letters(len(options)), options))
    return template.format(question=question.strip(), options=opts, n=len(options))


def make_record(rid: str, prompt: str, candidates: list[str], target: int, **source: Any) -> dict[str, Any]:
    """One record; ``chosen``/``rejected`` derived from ``candidates`` and ``target``."""
    candidates = list(candidates)
    rec: dict[str, Any] = {
        "id": rid,
        "prompt": prompt,
        "candidates": candidates,
        "target": int(target),
        "chosen": candidates[target] if 0 <= target < len(candidates) else None,
        "rejected": [c for i, c in enumerate(candidates) if i != target],
    }
    rec.update(source)
    return rec


def record_problems(rec: dict[str, Any]) -> list[str]:
    """What is wrong with one record (empty list when it is fine)."""
    problems = []
    cands = rec.get("candidates")
    target = rec.get("target")
    if not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
        problems.append("empty prompt")
    if not cands:
        problems.append("empty candidate pool")
        return problems
    if len(cands) < 2:
        problems.append("no rejected candidate (pool of one)")
    if any(not isinstance(c, str) or not c.strip() for c in cands):
        problems.append("empty or non-text candidate")
    if not isinstance(target, int) or not 0 <= target < len(cands):
        problems.append(f"target {target!r} missing from its {len(cands)} candidates")
        return problems
    chosen = cands[target]
    same = [i for i, c in enumerate(cands) if c.strip() == chosen.strip()]
    if len(same) > 1:
        problems.append(f"target text {chosen!r} duplicated among its candidates (positions {same})")
    if rec.get("chosen") is not None and rec["chosen"] != chosen:
        problems.append("chosen differs from candidates[target]")
    return problems


def check_records(records: list[dict[str, Any]], source: str | Path) -> None:
    """Raise :class:`RecordError` naming each bad record's id and ``source`` (the file it came from)."""
    errors = []
    seen: dict[str, int] = {}
    for rec in records:
        rid = rec.get("id")
        if rid in seen:
            errors.append(f"record {rid}: id not unique")
        seen[rid] = 1
        for p in record_problems(rec):
            errors.append(f"record {rid}: {p}")
    if errors:
        raise RecordError(summarize(f"{len(errors)} bad record(s) in {source}", errors))


def summarize(head: str, items: list[str]) -> str:
    shown = items[:MAX_LISTED]
    more = f"\n  ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return head + ":\n  " + "\n  ".join(shown) + more


def features(dataset: str):
    """The ``datasets.Features`` of a dataset's records (so the column set and types never vary)."""
    import datasets

    List = getattr(datasets, "List", None) or datasets.Sequence  # datasets>=4 has List; 3.x has Sequence
    string = datasets.Value("string")
    feats = {
        "id": string,
        "prompt": string,
        "candidates": List(string),
        "target": datasets.Value("int64"),
        "chosen": string,
        "rejected": List(string),
    }
    for name, kind in SOURCE_COLUMNS[dataset].items():
        feats[name] = List(string) if kind == "list" else string
    return datasets.Features(feats)


def to_dataset(records: list[dict[str, Any]], dataset: str, source: str | Path):
    """Check the records, then make a ``datasets.Dataset`` with a fixed column set."""
    import datasets
    import pyarrow as pa

    check_records(records, source)
    feats = features(dataset)
    columns = {name: [rec.get(name) for rec in records] for name in feats}
    # straight to Arrow: Dataset.from_dict encodes row by row, ~10x slower on 50k+ records
    table = pa.Table.from_pydict(columns, schema=feats.arrow_schema)
    return datasets.Dataset(table)


def read_text(path: Path) -> str:
    """A UTF-8 text file (a leading byte-order mark is dropped); text in another encoding raises
    :class:`RecordError` naming the file, the byte and the fix."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise RecordError(f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                          "save it as UTF-8") from None


def read_json_rows(path: Path, *, keep_blank: bool = False, text: str | None = None) -> list[Any]:
    """The rows of a JSON-lines file (a JSON list is accepted too; ``text``: the file's text, already read). A
    line that is not JSON, a JSON list that does not parse and a file holding one JSON object (rows wrapped under a
    key) raise :class:`RecordError` naming the file, the place and the fix; ``keep_blank`` keeps blank lines as
    ``None`` so that ``rows[i]`` is line ``i + 1``."""
    text = read_text(path) if text is None else text
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except ValueError as err:
            raise RecordError(f"{path}: not valid JSON (line {err.lineno} column {err.colno}: {err.msg}); fix it, or "
                              "write one JSON object per line (JSON lines)") from None
    rows: list[Any] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            if keep_blank:
                rows.append(None)
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as err:
            _wrapped_rows(path, text)
            raise RecordError(f"{path}: line {lineno} is not JSON ({err})") from err
    return rows


def _wrapped_rows(path: Path, text: str) -> None:
    """Raise :class:`RecordError` when ``text`` is one JSON object spread over several lines (e.g. rows under a
    ``"data"`` key) rather than JSON lines."""
    try:
        whole = json.loads(text)
    except ValueError:
        return
    if isinstance(whole, dict):
        keys = ", ".join(repr(k) for k in list(whole)[:5])
        raise RecordError(f"{path} holds one JSON object (keys {keys}), not rows; give a JSON list of rows or one row "
                          "per line (JSON lines)")
