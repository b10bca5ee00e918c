"""MovieLens 100k, rebuilt from the raw release (``ml-100k/u.data``, ``ml-100k/u.item``).

Construction (settings in ``params/datasets/movielens.yaml``):

1. Titles cleaned as LLaRA does (:func:`clean_title`): the trailing ``" (YYYY)"`` dropped and a trailing
   ``", The"`` / ``", A"`` / ``", An"`` moved to the front. The ``unknown`` entry (no title) is dropped with its
   ratings. Entries of ``u.item`` with the very same raw title are one movie listed twice: they are merged
   into the lowest item id. Different movies whose cleaned titles collide (remakes: *Cape Fear* 1962 / 1991,
   *Sabrina*, ...) keep their year, so every candidate text names one movie.
2. Per user, ratings in timestamp order, ties broken by item id; a movie rated twice (a merged duplicate)
   counts once, at its first rating.
3. Sliding windows: every position ``t >= min_history`` of a user's sequence gives one prompt, history = the
   last ``window`` items before ``t``, target = item ``t``.
4. Users (not windows) are split disjointly into train / valid / test: the sorted user ids shuffled by
   ``random.Random(user_split.seed)``, the first ``round(valid * n)`` to valid, the next ``round(test * n)`` to
   test, the rest to train.
5. 20 candidates drawn as for LastFM (S-DPO's draw, seeded by the target's 0-based item id), from the catalog
   in item-id order, outside the window's history and the target.

This rebuilds the paper's *kind* of split (LLaRA-style windows, users held out), not the paper's exact split,
which was not published. MovieLens may not be redistributed: nothing of it ships with this package.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from .records import RecordError, make_record, sdpo_candidates, summarize

NAME = "movielens"
HAS_SAMPLE = False
FILES = ("movielens/ml-100k/u.data", "movielens/ml-100k/u.item")

_YEAR = re.compile(r"\s*\((\d{4})\)(\s*\(V\))?\s*$")
_ARTICLE = re.compile(r"^(?P<main>.*?), (?P<art>The|A|An)(?P<alt>(?: \([^()]*\))*)$")


def required_files(split: str) -> list[list[str]]:
    return [list(FILES)]


def clean_title(raw: str, keep_year: bool = False) -> str:
    """LLaRA's title cleaning: ``"Usual Suspects, The (1995)"`` -> ``"The Usual Suspects"``.

    The trailing ``" (YYYY)"`` (and a video marker ``" (V)"`` after it) is dropped, or kept with ``keep_year``;
    a trailing ``", The"`` / ``", A"`` / ``", An"`` moves to the front, also when an alternative title in
    parentheses follows it (``"Big Blue, The (Grand bleu, Le)"`` -> ``"The Big Blue (Grand bleu, Le)"``).
    """
    title = raw.strip()
    m = _YEAR.search(title)
    year = m.group(1) if m else None
    if m:
        title = title[: m.start()].rstrip()
    a = _ARTICLE.match(title)
    if a:
        title = f"{a.group('art')} {a.group('main')}{a.group('alt')}"
    if keep_year and year:
        title = f"{title} ({year})"
    return title


def read_catalog(path: Path) -> tuple[dict[int, str], dict[int, int]]:
    """``u.item`` -> (canonical 0-based id -> cleaned title, raw 1-based id -> canonical 0-based id)."""
    raw_titles: dict[int, str] = {}
    errors = []
    with open(path, encoding="ISO-8859-1") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("|")
            if len(parts) < 2 or not parts[0].isdigit():
                errors.append(f"line {lineno}: not an 'id|title|...' row")
                continue
            raw_titles[int(parts[0])] = parts[1].strip()
    if errors:
        raise RecordError(summarize(f"{path}: {len(errors)} malformed line(s)", errors))
    first_of_raw: dict[str, int] = {}
    canonical: dict[int, int] = {}
    for item, title in sorted(raw_titles.items()):
        if not title or title.lower() == "unknown":
            continue
        first = first_of_raw.setdefault(title, item)
        canonical[item] = first - 1
    by_clean: dict[str, list[str]] = defaultdict(list)
    for title, item in first_of_raw.items():
        by_clean[clean_title(title)].append(title)
    names: dict[int, str] = {}
    for title, item in sorted(first_of_raw.items(), key=lambda kv: kv[1]):
        cleaned = clean_title(title)
        names[item - 1] = clean_title(title, keep_year=True) if len(by_clean[cleaned]) > 1 else cleaned
    seen: dict[str, int] = {}
    for i, n in names.items():
        if n in seen:
            raise RecordError(f"{path}: items {seen[n] + 1} and {i + 1} both clean to {n!r}")
        seen[n] = i
    return names, canonical


def read_sequences(path: Path, canonical: dict[int, int]) -> dict[int, list[int]]:
    """``u.data`` -> per user, canonical item ids in timestamp order (ties by raw item id), repeats dropped."""
    ratings: dict[int, list[tuple[int, int]]] = defaultdict(list)
    errors = []
    with open(path, encoding="ISO-8859-1") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) < 4:
                errors.append(f"line {lineno}: not a 'user item rating timestamp' row")
                continue
            user, item, ts = int(parts[0]), int(parts[1]), int(parts[3])
            ratings[user].append((ts, item))
    if errors:
        raise RecordError(summarize(f"{path}: {len(errors)} malformed line(s)", errors))
    out = {}
    for user, rows in ratings.items():
        seq, seen = [], set()
        for _, item in sorted(rows):
            c = canonical.get(item)
            if c is None or c in seen:
                continue
            seen.add(c)
            seq.append(c)
        out[user] = seq
    return out


def split_users(users: list[int], settings: dict[str, Any]) -> dict[str, list[int]]:
    """Disjoint user split: sorted ids shuffled by ``random.Random(seed)``; valid first, then test, rest train."""
    cfg = settings["construction"]["user_split"]
    order = sorted(users)
    random.Random(cfg["seed"]).shuffle(order)
    n_valid, n_test = round(cfg["valid"] * len(order)), round(cfg["test"] * len(order))
    return {
        "valid": sorted(order[:n_valid]),
        "test": sorted(order[n_valid : n_valid + n_test]),
        "train": sorted(order[n_valid + n_test :]),
    }


def windows(seq: list[int], window: int, min_history: int):
    """``(t, history, target)`` for every ``t >= min_history``, history the last ``window`` items before ``t``."""
    for t in range(min_history, len(seq)):
        yield t, seq[max(0, t - window) : t], seq[t]


def build(data_dir: Path, split: str, settings: dict[str, Any]) -> tuple[list[dict[str, Any]], Path]:
    folder = data_dir / "movielens" / "ml-100k"
    cons = settings["construction"]
    names, canonical = read_catalog(folder / "u.item")
    sequences = read_sequences(folder / "u.data", canonical)
    users = split_users(list(sequences), settings)[split]
    universe = list(names)  # canonical 0-based ids, ascending
    position = {x: i for i, x in enumerate(universe)}
    template, sep = settings["prompt"]["template"], settings["prompt"].get("separator", ", ")
    records = []
    for user in users:
        for t, hist, target in windows(sequences[user], cons["window"], cons["min_history"]):
            cand_ids = sdpo_candidates(universe, position, hist, target, settings["num_candidates"])
            history = [names[x] for x in hist]
            candidates = [names[x] for x in cand_ids]
            prompt = template.format(history=sep.join(history), candidates=sep.join(candidates), n=len(candidates))
            records.append(
                make_record(f"movielens-u{user:04d}-{t:04d}", prompt, candidates, cand_ids.index(target), history=history)
            )
    return records, folder / "u.data"
