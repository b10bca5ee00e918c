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
which was not published. MovieLens may not be redistributed: nothing of it ships with this package. Instead
:func:`download` fetches ``ml-100k.zip`` from GroupLens into the cache on first use (network needed), checks the
SHA-256 of the two files read here and unzips it atomically; offline it raises a one-line
:class:`MovieLensUnavailable` naming ``MASS_DPO_DATA``.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import shutil
import time
import urllib.error
import urllib.request
import zipfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from .records import RecordError, make_record, sdpo_candidates, summarize

NAME = "movielens"
HAS_SAMPLE = False
FILES = ("movielens/ml-100k/u.data", "movielens/ml-100k/u.item")
URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
URL_ENV = "MASS_DPO_MOVIELENS_URL"  # overrides URL (a mirror, or a local server in the tests)
#: The switch that stops the GroupLens download. The hub's ``HF_HUB_OFFLINE`` does not: GroupLens is not the hub, and
#: ``mass-dpo reproduce`` sets that one for its offline profiles (their models are local) while MovieLens still downloads.
OFFLINE_ENVS = ("MASS_DPO_OFFLINE",)
# SHA-256 of the files the loader reads, from the GroupLens release (the same bytes in every copy of ml-100k.zip)
SHA256 = {
    "u.data": "f30990191c9ccfc53952ae5d6e29c78a3e35d7237d3127a7392ae534facea542",
    "u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
}
TIMEOUT_S = 20.0  # per socket operation, and for the whole download
MAX_BYTES = 64 * 2**20  # the zip is about 5 MB

_YEAR = re.compile(r"\s*\((\d{4})\)(\s*\(V\))?\s*$")
_ARTICLE = re.compile(r"^(?P<main>.*?), (?P<art>The|A|An)(?P<alt>(?: \([^()]*\))*)$")


def required_files(split: str) -> list[list[str]]:
    return [list(FILES)]


class MovieLensUnavailable(FileNotFoundError):
    """MovieLens is not in the cache and could not be downloaded (offline, network error, bad checksum)."""


def offline() -> bool:
    """``$MASS_DPO_OFFLINE`` set to a true value (1 / true / yes / on); ``$HF_HUB_OFFLINE`` is the hub's only."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on") for k in OFFLINE_ENVS)


def download_url(url: str | None = None) -> str:
    """The argument, else ``$MASS_DPO_MOVIELENS_URL``, else GroupLens' ``ml-100k.zip``."""
    return url or os.environ.get(URL_ENV) or URL


def _unavailable(url: str, why: str) -> MovieLensUnavailable:
    why = " ".join(str(why).split())  # one line
    env = os.environ.get("MASS_DPO_DATA")
    now = (f" (now MASS_DPO_DATA={env}, which has no movielens/ml-100k/u.data and u.item)"
           if env and env != "samples" else "")
    quiet = "" if offline() else "; without network, MASS_DPO_OFFLINE=1 says so at once instead of trying"
    return MovieLensUnavailable(
        f"movielens: {why}, so {url} cannot be fetched; MovieLens ships no sample (its licence forbids "
        f"redistribution): set MASS_DPO_DATA=<folder> with movielens/ml-100k/u.data and u.item in it (GroupLens' "
        f"ml-100k.zip unzipped there){now}, or run once with network access to download it into the cache{quiet}."
    )


def _fetch(url: str, timeout: float) -> bytes:
    """The body of ``url``, within ``timeout`` seconds per read and in all; at most ``MAX_BYTES``."""
    deadline = time.monotonic() + timeout
    chunks, size = [], 0
    with urllib.request.urlopen(url, timeout=timeout) as response:
        while True:
            chunk = response.read(1 << 16)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > MAX_BYTES:
                raise OSError(f"more than {MAX_BYTES} bytes: not ml-100k.zip")
            if time.monotonic() > deadline:
                raise TimeoutError(f"download took longer than {timeout:.0f} s")
            chunks.append(chunk)


def _release_members(archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """File name -> member for the files of the zip's ``ml-100k/`` folder (no sub-folders, no odd paths)."""
    out = {}
    for info in archive.infolist():
        parts = info.filename.split("/")
        if info.is_dir() or len(parts) != 2 or parts[0] != "ml-100k" or parts[1] in ("", ".", ".."):
            continue
        out[parts[1]] = info
    return out


def download(data_dir: Path, url: str | None = None, timeout: float = TIMEOUT_S) -> Path:
    """Fetch ``ml-100k.zip`` into ``data_dir/movielens/ml-100k/`` and return ``data_dir``.

    The SHA-256 of ``u.data`` and ``u.item`` (the files :func:`build` reads) must equal :data:`SHA256`. The
    release is unzipped into a temporary folder beside the target and renamed into place, so the target is either
    complete or absent: on any failure (offline, network error or timeout, not a zip, wrong checksum) nothing is
    left in ``data_dir`` and :class:`MovieLensUnavailable` (a ``FileNotFoundError``) is raised with a one-line
    message naming ``MASS_DPO_DATA``. Offline (:func:`offline`) no connection is attempted.
    """
    url = download_url(url)
    if offline():
        flags = " / ".join(f"{k}={os.environ[k]}" for k in OFFLINE_ENVS if os.environ.get(k))
        raise _unavailable(url, f"not in {data_dir / 'movielens' / 'ml-100k'} and offline ({flags})")
    try:
        body = _fetch(url, timeout)
        archive = zipfile.ZipFile(io.BytesIO(body))
        members = _release_members(archive)
        contents = {name: archive.read(info) for name, info in members.items()}
    except (urllib.error.URLError, OSError, ValueError, zipfile.BadZipFile) as err:
        reason = getattr(err, "reason", None) or err
        raise _unavailable(url, f"download failed ({type(err).__name__}: {reason})") from None
    for name, expected in SHA256.items():
        if name not in contents:
            raise _unavailable(url, f"the downloaded zip has no ml-100k/{name}; nothing was cached")
        got = hashlib.sha256(contents[name]).hexdigest()
        if got != expected:
            raise _unavailable(
                url, f"checksum mismatch for ml-100k/{name} (sha256 {got[:16]}..., expected {expected[:16]}...); "
                "nothing was cached")
    target = data_dir / "movielens" / "ml-100k"
    if target.exists() and not all((target / n).is_file() for n in SHA256):
        raise _unavailable(url, f"{target} exists without u.data and u.item: remove that folder and retry")
    created = [p for p in (data_dir, data_dir / "movielens") if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    from ..files import clean_orphans, temp_name

    clean_orphans(target.parent, prefix=target.name)  # the partial folder of a killed download on this host
    tmp = temp_name(target)  # named so that clean_orphans recognises it
    tmp.mkdir()
    try:
        for name, data in contents.items():
            (tmp / name).write_bytes(data)
        try:
            os.replace(tmp, target)  # atomic; fails when a folder is already there
        except OSError:
            if not all((target / n).is_file() for n in SHA256):  # not another process's complete download
                raise
            shutil.rmtree(tmp)  # another process (e.g. a rank under accelerate launch) finished first: keep its copy
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in reversed(created):
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()
        raise
    return data_dir


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
            if len(parts) < 4 or not all(parts[i].isdigit() for i in (0, 1, 3)):
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


def check_release(folder: Path) -> None:
    """One warning per file of ``folder`` whose SHA-256 is not the GroupLens release's (:data:`SHA256`): a truncated
    copy, or one re-saved in another encoding, builds other splits than the paper's without any error."""
    import warnings

    for name, expected in SHA256.items():
        got = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        if got != expected:
            warnings.warn(f"{folder / name} is not the GroupLens ml-100k release (sha256 {got[:16]}..., expected "
                          f"{expected[:16]}...; truncated, edited or re-encoded?): its splits are not the paper's. "
                          f"Restore it from {URL}", stacklevel=4)


def build(data_dir: Path, split: str, settings: dict[str, Any]) -> tuple[list[dict[str, Any]], Path]:
    folder = data_dir / "movielens" / "ml-100k"
    check_release(folder)
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
