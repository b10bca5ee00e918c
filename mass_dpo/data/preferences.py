"""``load_preferences``: a user's own preference data (TRL's ``prompt`` / ``chosen`` / ``rejected``) as records.

Accepted: a JSONL file (a JSON list works too), a Parquet file, a ``datasets.Dataset``, or a list of dicts, with
TRL's columns ``prompt``, ``chosen`` and ``rejected``, where ``rejected`` is one response (as in TRL) or a list of
responses (the negative pool; TRL reads one only). Both of TRL's forms are read:

- standard: plain text (``"prompt": "...", "chosen": "...", "rejected": ["...", "..."]``);
- conversational: message lists (``"prompt": [{"role": "user", "content": "..."}]``, ``"chosen": [{"role":
  "assistant", "content": "..."}]``, ``"rejected"``: one such list or a list of them). A prompt of one message
  becomes its content; a longer one becomes ``"<Role>: <content>"`` lines. A response becomes the content of its
  messages, joined by newlines. These texts name and check the rows; the tokens scored are TRL's own, from the
  message lists (:func:`mass_dpo.data.formatting.encode_trl_pool`). A response holding a user or system message
  (TRL's implicit-prompt form) is refused: the prompt would be scored twice.

A conversational row keeps its message lists beside the text, in the record's ``messages`` column (JSON text of
``{"prompt": [...], "candidates": [[...], ...]}``, aligned with ``candidates``; ``""`` for a plain-text row): a field
given as plain text in such a row becomes a user turn (prompt) or an assistant turn (response). TRL's ``tools`` and
``chat_template_kwargs`` columns go with them (:data:`TEMPLATE_COLUMNS`; a plain-text row ignores them, as TRL does).
``mass-dpo select`` writes those message lists and columns back, so its output stays in TRL's conversational form.

An ``id`` column, when present, gives the record ids; otherwise they are ``<file stem>-<row>``. Rows that share an
``id``, a prompt and a chosen response are one prompt's pairs (``mass-dpo select``'s default output, one row per
(chosen, negative)): they are read as one record whose pool is their rejected responses in file order. A repeated
``id`` with another prompt or chosen response is an error. A relative file
path that does not exist from the current folder is looked up from the repository root (so a notebook finds
``notebooks/data/...`` whether its kernel starts in the root or in ``notebooks/``).

Held-out splits (``split="train" | "valid" | "test"``; ``None``: every row): a ``split`` column, when the file has
one, decides (``val``/``validation``/``dev`` mean ``valid``). Otherwise the splits are carved by a fixed seed
(:func:`carve_splits`): rows that share a prompt stay together, and the prompts are ordered by
the smallest ``stable_fraction(id, "preferences-split/<seed>")`` of their ids (SHA-256 of the id: the same on every
machine, independent of file order when the file has ids); the first ``max(1, round(0.1 G))`` of the ``G`` prompts are
``test``, the next ``max(1, round(0.1 G))`` ``valid``, the rest ``train``; each split keeps the file order. A file
needs 3 distinct prompts. A ``limit`` (:func:`limit_preferences`) draws its rows by the seed and the rows' content,
not the file's name.

The records have ``candidates = [chosen, *rejected]`` and ``target = 0``. Problems (a missing or empty field, an
empty pool, the chosen text among the rejected, a message list without content, a repeated id, a row without an id
that repeats an earlier row's prompt, chosen and rejected)
are reported by row number ("line N" of a JSONL file, 1-based; "row N" of a table, 0-based); nothing is dropped
silently: ``on_error="raise"`` (default) raises, ``on_error="drop"`` drops those rows with a warning listing them.
A negative repeated within one pool is kept once, with a warning. Texts are compared without their surrounding
whitespace: ``"yes"`` and ``"yes "`` are the same answer here (one would teach the model only a trailing space),
so such a negative is a repeat, and such a chosen text is among the rejected.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from .records import RecordError, make_record, read_json_rows, read_text, stable_fraction, summarize, to_dataset

FIELDS = ("prompt", "chosen", "rejected")

#: File types :func:`load_preferences` reads (and that ``load_benchmark`` / ``--data`` take for a preference file).
SUFFIXES = (".jsonl", ".json", ".ndjson", ".parquet")

#: Share of the rows carved out for each held-out split when the file has no ``split`` column.
HELD_OUT = {"test": 0.1, "valid": 0.1}

_SPLIT_NAMES = {"train": "train", "valid": "valid", "val": "valid", "validation": "valid", "dev": "valid",
                "eval": "valid", "test": "test"}


def repo_root() -> Path:
    """The checkout this package runs from (the folder above ``mass_dpo/``)."""
    return Path(__file__).resolve().parents[2]


def is_preference_file(name: Any) -> bool:
    """True when ``name`` names a preference file (a path, or a name ending in .jsonl/.json/.ndjson/.parquet)
    rather than a benchmark."""
    if isinstance(name, os.PathLike):
        return True
    if not isinstance(name, str):
        return False
    return name.lower().endswith(SUFFIXES) or "/" in name or os.sep in name


def resolve_path(path: str | os.PathLike) -> Path:
    """``path`` as given when it exists (absolute or from the current folder), else from the repository root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    alt = repo_root() / p
    return alt if alt.exists() else p


def check_preference_path(given: str | os.PathLike) -> Path:
    """The preference file ``given`` names (:func:`resolve_path`), else one line saying what is wrong with it: not
    there, a folder, or a type this reader does not read (``FileNotFoundError`` / ``ValueError``)."""
    path = resolve_path(given)
    what = "give the path of a JSON-lines/JSON/Parquet file of prompt, chosen, rejected"
    if path.is_dir():
        raise ValueError(f"{given} is a folder; {what}")
    if not path.is_file():
        raise FileNotFoundError(f"{given}: no such file (not found in {Path.cwd()} nor {repo_root()}); {what}")
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"{given}: unsupported preference file type {path.suffix.lower() or '(no suffix)'!r}; "
                         "use .jsonl, .json or .parquet")
    return path


def _read(source) -> tuple[list[dict[str, Any]], str, str, str]:
    """(rows, description for messages, id prefix, row label style)."""
    if isinstance(source, (str, os.PathLike)):
        path = check_preference_path(source)
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            try:
                return pq.read_table(path).to_pylist(), str(path), path.stem, "row"
            except Exception as err:  # pyarrow's ArrowInvalid and friends: not a Parquet file
                raise RecordError(f"{path}: not a readable Parquet file ({str(err).splitlines()[0]})") from err
        text = read_text(path)
        rows = read_json_rows(path, keep_blank=True, text=text)  # keeps numbering: rows[i] is line i + 1
        return rows, str(path), path.stem, "row" if text.lstrip().startswith("[") else "line"
    try:
        import datasets

        if isinstance(source, datasets.DatasetDict):
            raise ValueError(f"got a DatasetDict with splits {list(source)}; pass one split, e.g. ds['train']")
        if isinstance(source, datasets.Dataset):
            return source.to_list(), "the given Dataset", "pref", "row"
    except ImportError:  # pragma: no cover
        pass
    if isinstance(source, list):
        return source, "the given rows", "pref", "row"
    raise TypeError(f"load_preferences takes a file path, a datasets.Dataset or a list of dicts, not {type(source)}")


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def _messages_text(messages: list[dict], prompt: bool) -> str | None:
    """A conversational message list as text (see the module docstring); None when a message has no content."""
    parts = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):  # multimodal-style content parts: keep the text ones
            content = "".join(c.get("text", "") for c in content if isinstance(c, dict))
        if not isinstance(content, str) or not content.strip():
            return None
        parts.append((str(m.get("role", "user")), content))
    if not prompt or len(parts) == 1:
        return "\n".join(c for _, c in parts)
    return "\n".join(f"{role.capitalize()}: {c}" for role, c in parts)


def _text(value: Any, field: str) -> tuple[str | None, str | None]:
    if _is_messages(value) and field != "prompt":
        roles = [str(m.get("role")) for m in value if m.get("role") in ("user", "system")]
        if roles:  # the prompt repeated inside the response (TRL's implicit-prompt form): it would be scored twice
            return None, (f"'{field}' holds a {roles[0]} message; give the prompt's turns in 'prompt' and only the "
                          f"reply in '{field}' (trl.data_utils.extract_prompt splits them)")
    if _is_messages(value):
        text = _messages_text(value, prompt=field == "prompt")
        return (text, None) if text else (None, f"a message of '{field}' has no text content")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, f"missing or empty '{field}'"
    if not isinstance(value, str):
        return None, f"'{field}' is {type(value).__name__}, not text"
    return value, None


def _as_messages(value: Any, role: str) -> list[dict]:
    """A field of a conversational row as a message list (plain text becomes one ``role`` message)."""
    return value if _is_messages(value) else [{"role": role, "content": value}]


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def group_pairs(rows: list[Any]) -> list[Any]:
    """Rows that share an ``id``, a ``prompt``, a ``chosen``, a ``split`` and the template columns
    (:data:`TEMPLATE_COLUMNS`) merged into the first of them, its
    ``rejected`` the list of theirs in file order (pairwise rows back to one row per prompt). The merged rows become
    ``None`` so that ``rows[i]`` stays line ``i + 1``; a repeated id with another prompt or chosen is left for the
    caller to report."""
    first: dict[str, int] = {}
    out = list(rows)
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or row.get("id") in (None, "") or "rejected" not in row:
            continue
        rid = str(row["id"])
        j = first.setdefault(rid, i)
        if j == i:
            continue
        head = out[j]
        had, add = _as_pool(head["rejected"]), _as_pool(row["rejected"])
        if had is not None and add is not None and all(_same(head.get(k), row.get(k))
                                                       for k in ("prompt", "chosen", "split", *TEMPLATE_COLUMNS)):
            out[j] = {**head, "rejected": had + add}
            out[i] = None
    return out


def _as_pool(rejected: Any) -> list | None:
    """A ``rejected`` value as a list of negatives (one text or message list becomes a list of one); None when it
    is neither (left for the row checks to report)."""
    if isinstance(rejected, str) or _is_messages(rejected):
        return [rejected]
    return list(rejected) if isinstance(rejected, list) else None


def _split_name(value: Any) -> str | None:
    return _SPLIT_NAMES.get(str(value).strip().lower()) if value not in (None, "") else None


def carve_splits(ids: list[str], seed: int = 0, groups: list[str] | None = None) -> list[str]:
    """The held-out split of each id (``train``, ``valid`` or ``test``) for a file without a ``split`` column.

    Rows that share a ``groups`` value (the prompt) stay in one split, so no prompt is both trained and tested on
    (pairwise files repeat a prompt once per rejected response); without ``groups`` every id is its own group. The
    groups are ordered by the smallest ``stable_fraction(id, f"preferences-split/{seed}")`` of their ids; the first
    ``max(1, round(0.1 G))`` of the ``G`` groups are test, the next ``max(1, round(0.1 G))`` valid, the rest train
    (:data:`HELD_OUT`)."""
    groups = list(ids) if groups is None else list(groups)
    first: dict[str, tuple[float, int]] = {}
    for i, g in enumerate(groups):
        first[g] = min(first.get(g, (2.0, i)), (stable_fraction(ids[i], f"preferences-split/{seed}"), i))
    n = len(first)
    if n < 3:
        raise ValueError(f"{n} distinct prompt(s): carving train/valid/test needs at least 3; add rows, or a 'split' "
                         "column (train/valid/test) to choose the held-out rows yourself")
    n_test = max(1, round(HELD_OUT["test"] * n))
    n_valid = max(1, round(HELD_OUT["valid"] * n))
    order = sorted(first, key=first.__getitem__)
    held = {g: "test" if rank < n_test else "valid" for rank, g in enumerate(order[: n_test + n_valid])}
    return [held.get(g, "train") for g in groups]


#: TRL's per-row chat-template columns: ``tools`` (a list of tool schemas, or its JSON text) and
#: ``chat_template_kwargs`` (a dict of template variables); ``trl.DPOTrainer`` passes both to ``apply_chat_template``
#: for a conversational row and ignores them on a plain-text one.
TEMPLATE_COLUMNS = ("tools", "chat_template_kwargs")


def _template_columns(row: dict) -> tuple[dict[str, Any], str | None]:
    """``({column: value}, error)``: a row's :data:`TEMPLATE_COLUMNS` that hold something, ``tools`` parsed from
    JSON text as TRL parses it."""
    out: dict[str, Any] = {}
    tools = row.get("tools")
    if isinstance(tools, str) and tools.strip():
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            return {}, "'tools' is text that is not JSON (give a list of tool schemas, or its JSON text)"
    if tools not in (None, "", []):
        if not isinstance(tools, list):
            return {}, f"'tools' is {type(tools).__name__}, not a list of tool schemas"
        out["tools"] = tools
    kwargs = row.get("chat_template_kwargs")
    if kwargs not in (None, {}):
        if not isinstance(kwargs, dict):
            return {}, f"'chat_template_kwargs' is {type(kwargs).__name__}, not a dict of template variables"
        out["chat_template_kwargs"] = kwargs
    return out, None


def _conversation(prompt: Any, chosen: Any, rejected: list[Any], template: dict[str, Any] | None = None) -> str:
    """The ``messages`` field of a record: ``""`` for a plain-text row, else JSON text of its message lists
    (``{"prompt": [...], "candidates": [chosen, *rejected]}``, plain-text fields as user / assistant turns), with
    its ``tools`` and ``chat_template_kwargs`` (:data:`TEMPLATE_COLUMNS`) where the row has them."""
    if not any(_is_messages(v) for v in (prompt, chosen, *rejected)):
        return ""
    return json.dumps({"prompt": _as_messages(prompt, "user"),
                       "candidates": [_as_messages(c, "assistant") for c in (chosen, *rejected)],
                       **(template or {})}, ensure_ascii=False)


def is_conversational(record: dict) -> bool:
    """True for a record read from a conversational row (it carries its message lists)."""
    return bool(record.get("messages"))


def conversation(record: dict) -> dict:
    """A record as message lists, ``{"prompt": [...], "candidates": [[...], ...]}``: those it was read with, else its
    texts as one user turn and one assistant turn each (so that a file mixing both forms is written in one)."""
    text = record.get("messages")
    if text:
        return json.loads(text)
    return {"prompt": _as_messages(record["prompt"], "user"),
            "candidates": [_as_messages(c, "assistant") for c in record["candidates"]]}


def content_key(ds) -> str:
    """sha256 of the records' prompts and candidates, in order (not their ids, which may come from the file name)."""
    import hashlib
    import json

    h = hashlib.sha256()
    for prompt, candidates in zip(ds["prompt"], ds["candidates"]):
        h.update(json.dumps([prompt, list(candidates)], ensure_ascii=False).encode())
    return h.hexdigest()


def limit_preferences(ds, limit: int | None, seed: int = 0, split: str | None = None):
    """``limit`` rows of a preference split (:func:`mass_dpo.data.apply_limit`), drawn by ``seed`` and the rows'
    content (:func:`content_key`): a renamed or moved file keeps the same subsample."""
    from .benchmarks import apply_limit

    if limit is None or limit >= len(ds):
        return ds
    return apply_limit(ds, limit, seed, key=f"{content_key(ds)}:{split}")


def load_preferences(path_or_dataset, *, split: str | None = None, split_seed: int = 0, on_error: str = "raise"):
    """Preference rows as records (``id``, ``prompt``, ``candidates``, ``target``, ``chosen``, ``rejected``).

    ``split``: ``None`` (every row), or ``train`` / ``valid`` / ``test``: the file's ``split`` column when it has
    one, else the split carved by ``split_seed`` (:func:`carve_splits`; see the module docstring)."""
    if on_error not in ("raise", "drop"):
        raise ValueError(f"on_error must be 'raise' or 'drop', not {on_error!r}")
    want = None if split is None else _split_name(split)
    if split is not None and want is None:
        raise ValueError(f"unknown split {split!r}; choose one of train, valid, test")
    rows, where, prefix, style = _read(path_or_dataset)
    rows = group_pairs(rows)
    records, problems, repeats, ids, contents = [], [], [], {}, {}
    splits: list[str | None] = []
    for i, row in enumerate(rows):
        label = f"line {i + 1}" if style == "line" else f"row {i}"
        if row is None:
            continue
        if not isinstance(row, dict):
            problems.append(f"{label}: not an object")
            continue
        errs = [f"missing field '{f}'" for f in FIELDS if f not in row]
        prompt, e1 = _text(row.get("prompt"), "prompt") if "prompt" in row else (None, None)
        chosen, e2 = _text(row.get("chosen"), "chosen") if "chosen" in row else (None, None)
        errs += [e for e in (e1, e2) if e]
        pool: list[str] = []
        raw_pool: list[Any] = []  # the negatives as given (message lists stay message lists)
        raw: list[Any] = []
        if "rejected" in row:
            rej = row["rejected"]
            if isinstance(rej, str) or _is_messages(rej):
                rej = [rej]  # one negative
            if isinstance(rej, list):  # conversational negatives -> text (None marks one without content)
                raw = list(rej)
                inside = [e for e in (_text(r, "rejected")[1] for r in rej if _is_messages(r)) if e and "holds" in e]
                errs += inside[:1]
                rej = [(_messages_text(r, prompt=False) if _is_messages(r) else r) for r in rej]
            if rej is None or (isinstance(rej, list) and not rej):
                errs.append("empty negative pool ('rejected')")
            elif not isinstance(rej, list):
                errs.append(f"'rejected' is {type(rej).__name__}, not text or a list of texts")
            else:
                bad = [j for j, r in enumerate(rej) if not isinstance(r, str) or not r.strip()]
                if bad:
                    errs.append(f"empty or non-text negative(s) at position(s) {bad} of 'rejected'")
                else:
                    for r, given in zip(rej, raw):
                        if r.strip() in (p.strip() for p in pool):
                            repeats.append(label)
                        else:
                            pool.append(r)
                            raw_pool.append(given)
                    if chosen is not None and any(r.strip() == chosen.strip() for r in pool):
                        errs.append("the chosen text is among the rejected")
        has_id = row.get("id") not in (None, "")
        rid = str(row["id"]) if has_id else f"{prefix}-{i:06d}"
        if rid in ids:
            errs.append(f"id {rid!r} repeats {ids[rid]}")
        ids.setdefault(rid, label)
        if not has_id and not errs:  # a row without an id that repeats an earlier one: refused like a repeated id
            content = (prompt.strip(), chosen.strip(), tuple(sorted(r.strip() for r in pool)))
            if content in contents:
                errs.append(f"repeats {contents[content]} (the same prompt, chosen and rejected)")
            contents.setdefault(content, label)
        template, bad_template = _template_columns(row)
        errs += [bad_template] if bad_template else []
        if errs:
            problems.append(f"{label} (id {rid}): " + "; ".join(errs))
            continue
        own = row.get("split")
        if own not in (None, "") and _split_name(own) is None:
            problems.append(f"{label} (id {rid}): unknown split {own!r} (train, valid or test)")
            continue
        records.append(make_record(rid, prompt, [chosen, *pool], 0,
                                   messages=_conversation(row["prompt"], row["chosen"], raw_pool, template)))
        splits.append(_split_name(own))
    absent = [f for f in FIELDS if rows and all(isinstance(r, dict) and f not in r for r in rows if r is not None)]
    if absent and on_error == "raise":  # a file of other columns: say so once, not once per row
        columns = sorted({k for r in rows if isinstance(r, dict) for k in r})
        implicit = absent == ["prompt"]  # TRL's implicit-prompt form: the prompt inside chosen and rejected
        raise RecordError(f"{where}: no {', '.join(repr(f) for f in absent)} in any row (its fields: "
                          f"{', '.join(columns[:12]) or 'none'}); name them {', '.join(FIELDS)} (rejected: a list of "
                          "rejected responses)" + ("; TRL's implicit-prompt form is not read: move the shared turns "
                                                   "into a 'prompt' column (trl.data_utils.extract_prompt does it)"
                                                   if implicit else ""))
    if problems:
        head = f"{len(problems)} unusable preference row(s) in {where}"
        if on_error == "raise":
            raise RecordError(summarize(head + ": fix or remove them", problems)
                              + "\n(from Python, load_preferences(..., on_error='drop') drops them with a warning)")
        warnings.warn(summarize(head + "; dropped", problems), stacklevel=2)
    if repeats:
        warnings.warn(
            f"{where}: a negative repeated within its pool was kept once at {len(repeats)} place(s): "
            + ", ".join(sorted(set(repeats), key=repeats.index)[:20]),
            stacklevel=2,
        )
    if not records:
        raise RecordError(f"no usable preference rows in {where}")
    if want is not None:
        if any(splits):
            if not all(splits):
                raise RecordError(f"{where}: some rows have a 'split' and some do not; give every row one, or none")
        else:
            try:
                splits = carve_splits([r["id"] for r in records], split_seed, [r["prompt"] for r in records])
            except ValueError as err:
                raise RecordError(f"{where}: {err}") from None
        records = [r for r, s in zip(records, splits) if s == want]
        if not records:
            raise RecordError(f"{where}: no rows with split {want!r}; its 'split' column has "
                              f"{', '.join(sorted(set(splits)))}; label some rows {want!r}, or drop the column to "
                              "carve the splits by a fixed seed")
    return to_dataset(records, "preferences", where)
