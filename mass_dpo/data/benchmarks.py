"""``load_benchmark``: the four benchmarks as records, offline from a data directory or online from the hub.

Where the data is read from (first that applies):

1. the ``data_dir`` argument;
2. the environment variable ``MASS_DPO_DATA``;
3. the per-user cache folder ``<cache root>/data`` (``$MASS_DPO_CACHE``, else ``~/.cache/mass_dpo``).

Each is a folder laid out like ``../shared/data``: ``lastfm/``, ``movielens/ml-100k/``, ``medmcqa/``, ``qasc/``.
The value ``"samples"`` (argument or variable) means the small real samples shipped in the package. When
nothing was given (no argument, no variable) and the cache folder lacks the files, the shipped sample is used
for lastfm / medmcqa / qasc with a :class:`SampleDataWarning`. MovieLens, which ships no sample, is read (for
``"samples"`` or nothing given) from ``$MASS_DPO_DATA`` when that holds it, else from the cache folder, where
ml-100k is downloaded from GroupLens on first use (checksums verified); offline, a one-line FileNotFoundError
names ``MASS_DPO_DATA``. A folder that was given explicitly and lacks the files raises
:class:`FileNotFoundError` (no fallback).
"""

from __future__ import annotations

import functools
import json
import numbers
import os
import warnings
from pathlib import Path
from typing import Any

from ..files import compute_once
from ..params import cache_root, load_params
from . import lastfm, medmcqa, movielens, qasc
from .records import RecordError, rng_for, to_dataset

BENCHMARKS = {"lastfm": lastfm, "movielens": movielens, "medmcqa": medmcqa, "qasc": qasc}
SPLITS = ("train", "valid", "test")
_SPLIT_ALIASES = {"val": "valid", "validation": "valid", "dev": "valid", "eval": "valid"}
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
ENV_VAR = "MASS_DPO_DATA"
SOURCES = ("local", "hub")


class SampleDataWarning(UserWarning):
    """The shipped sample (a few hundred prompts) is being used instead of the full benchmark."""


def dataset_settings(name: str) -> dict[str, Any]:
    """``params/datasets/<name>.yaml``."""
    _module(name)
    return load_params(f"datasets/{name}")


def benchmark_sizes(name: str) -> dict[str, int]:
    """The paper's prompt counts (``train``, ``valid``, ``test``) and candidate cap (``candidates``) for ``name``.

    The runner subsamples with them: ``load_benchmark(name, split, limit=benchmark_sizes(name)[split])``
    (a limit larger than the split returns the whole split).
    """
    s = dataset_settings(name)
    return {**{k: int(v) for k, v in s["sizes"].items()}, "candidates": int(s["num_candidates"])}


def cache_dir() -> Path:
    """``<cache root>/data``: ``$MASS_DPO_CACHE/data``, else ``$XDG_CACHE_HOME/mass_dpo/data``, else
    ``~/.cache/mass_dpo/data``."""
    return cache_root() / "data"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """(folder, where it came from): the argument, else ``$MASS_DPO_DATA``, else the cache folder."""
    if data_dir is not None:
        value, origin = data_dir, "the data_dir argument"
    elif os.environ.get(ENV_VAR):
        value, origin = os.environ[ENV_VAR], f"${ENV_VAR}"
    else:
        return cache_dir(), "the default cache folder"
    if str(value) == "samples":
        return SAMPLES_DIR, f"{origin} ('samples': the shipped samples)"
    return Path(value).expanduser(), origin  # as given: runs hash it (a relative path reads from the working folder)


def _module(name: str):
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise ValueError(
            f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}, or give a preference file "
            f"(.jsonl/.json/.parquet with prompt, chosen, rejected; on the command line: --data FILE)"
        ) from None


def _split(split: str) -> str:
    s = _SPLIT_ALIASES.get(split, split)
    if s not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return s


def _present(folder: Path, name: str, split: str) -> list[Path] | None:
    """The first complete file set for (name, split) under ``folder``, or None."""
    for alternative in _module(name).required_files(split):
        paths = [folder / p for p in alternative]
        if all(p.is_file() for p in paths):
            return paths
    return None


def _missing_message(folder: Path, origin: str, name: str, split: str, settings: dict[str, Any]) -> str:
    alternatives = [" + ".join(alt) for alt in _module(name).required_files(split)]
    expected = alternatives[0] + "".join(f", or {a}" for a in alternatives[1:])
    state = " (a file, not a folder)" if folder.is_file() else " (no such folder)" if not folder.exists() else ""
    msg = (
        f"{name} {split}: data files not found. Expected {expected} under {folder}{state} (from {origin}). "
        f"Get them from {settings['upstream']}; then pass data_dir=<folder> or set {ENV_VAR}=<folder>, the "
        f"folder laid out as <folder>/{name}/... (e.g. {ENV_VAR}=../shared/data in a checkout)."
    )
    if not _module(name).HAS_SAMPLE:
        msg += (f" No sample of {name} ships with the package: its licence forbids redistribution. With no data_dir"
                f" (or data_dir='samples') it is downloaded from GroupLens into {cache_dir()} on first use.")
    elif folder != SAMPLES_DIR:
        msg += " data_dir='samples' reads the small shipped sample."
    return msg


def locate(name: str, split: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The data folder that will be read for (name, split), applying the fallback rules above."""
    name, split = _module(name).NAME, _split(split)
    settings = dataset_settings(name)
    folder, origin = resolve_data_dir(data_dir)
    if _present(folder, name, split):
        return folder
    if origin == "the default cache folder" and _module(name).HAS_SAMPLE and _present(SAMPLES_DIR, name, split):
        warnings.warn(
            f"{name}: no data in {folder}; using the small shipped SAMPLE, not the benchmark. For the full data "
            f"set {ENV_VAR} (or pass data_dir=) to a folder with {name}/ in it (docs/data.md).",
            SampleDataWarning,
            stacklevel=3,
        )
        return SAMPLES_DIR
    if name == movielens.NAME and (origin == "the default cache folder" or folder == SAMPLES_DIR):
        return _movielens_cached_or_downloaded()
    raise FileNotFoundError(_missing_message(folder, origin, name, split, settings))


def _movielens_cached_or_downloaded() -> Path:
    """MovieLens under no explicit folder ("samples" or nothing given): ``$MASS_DPO_DATA`` when it holds it, else
    the cache folder, downloading ml-100k there on first use (:func:`mass_dpo.data.movielens.download`; offline or
    on failure a one-line :class:`~mass_dpo.data.movielens.MovieLensUnavailable`, a FileNotFoundError). Parallel
    jobs over one cache download once: the others wait for the download's lock, then read its copy."""
    env = os.environ.get(ENV_VAR)
    if env and env != "samples" and _present(Path(env).expanduser(), movielens.NAME, "train"):
        return Path(env).expanduser()
    root = cache_dir()
    if movielens.offline() and not _present(root, movielens.NAME, "train"):
        return movielens.download(root)  # its one-line offline message; no lock taken, nothing written
    return compute_once(root / movielens.NAME, "the MovieLens download",
                        load=lambda: root if _present(root, movielens.NAME, "train") else None,
                        compute=lambda: movielens.download(root))


def _fingerprint(paths: list[Path]) -> tuple:
    return tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in paths)


@functools.lru_cache(maxsize=16)
def _build_local(name: str, split: str, folder: str, fingerprint: tuple, settings_json: str):
    settings = json.loads(settings_json)
    records, source = _module(name).build(Path(folder), split, settings)
    return to_dataset(records, name, source)


@functools.lru_cache(maxsize=8)
def _build_hub(name: str, split: str, settings_json: str):
    mod = _module(name)
    if not hasattr(mod, "build_hub"):
        raise ValueError(f"{name} has no hub source; read it from a data_dir (source='local')")
    records, source = mod.build_hub(split, json.loads(settings_json))
    return to_dataset(records, name, source)


def apply_limit(ds, limit: int | None, seed: int = 0, key: str = ""):
    """A seeded random subset of ``limit`` rows, kept in source order; ``None`` (or a larger limit) keeps all.

    Subsets are nested: with the same seed, the first 200 rows chosen are among the first 2,000.
    """
    if limit is None or limit >= len(ds):
        return ds
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    order = list(range(len(ds)))
    rng_for(str(seed), f"limit:{key}").shuffle(order)
    return ds.select(sorted(order[:limit]))


def load_benchmark(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    seed: int = 0,
    source: str = "local",
):
    """One split of a benchmark as a ``datasets.Dataset`` of records (see :mod:`mass_dpo.data.records`).

    ``name``: lastfm, movielens, medmcqa or qasc; ``split``: train, valid or test. ``limit=None`` returns the
    whole split in source order; ``limit=n`` a subset of ``n`` rows seeded by ``seed`` (source order kept).
    ``source="hub"`` reads MedMCQA / QASC from the Hugging Face hub instead of ``data_dir`` (network needed).
    A preference file given as ``name`` (a path, or a name ending in .jsonl/.json/.parquet) is read with
    :func:`mass_dpo.data.preferences.load_preferences` (``split``: its ``split`` column, or carved by a fixed seed).
    """
    from .preferences import is_preference_file, limit_preferences, load_preferences

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1):
        raise ValueError(f"limit must be a whole number >= 1 (or None for the whole split), got {limit!r}")
    limit = None if limit is None else int(limit)
    if is_preference_file(name):
        return limit_preferences(load_preferences(name, split=split), limit, seed, split)
    mod = _module(name)
    split = _split(split)
    settings_json = json.dumps(dataset_settings(name), sort_keys=True)
    if source == "hub":
        ds = _build_hub(mod.NAME, split, settings_json)
    elif source == "local":
        folder = locate(name, split, data_dir)
        paths = _present(folder, name, split)
        ds = _build_local(mod.NAME, split, str(folder), _fingerprint(paths), settings_json)
        if len(ds) == 0:
            blank = [p for p in paths if not p.read_bytes().strip()]
            if blank:
                raise RecordError(f"{mod.NAME} {split}: {' + '.join(map(str, blank))} holds nothing (an empty or "
                                  f"truncated copy); restore it from {dataset_settings(name)['upstream']}")
            warnings.warn(f"{mod.NAME} {split}: no prompts from {' + '.join(map(str, paths))} (a copy this small "
                          "leaves the split empty)")
    else:
        raise ValueError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    return apply_limit(ds, limit, seed, key=f"{name}:{split}")
