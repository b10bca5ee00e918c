#!/usr/bin/env python
"""Regenerate the real data samples shipped in ``mass_dpo/data/samples/`` from the full copies.

    python scripts/make_samples.py                      # reads ../shared/data beside the checkout
    python scripts/make_samples.py --source /path/to/data --out mass_dpo/data/samples

The samples are sized for the ``cpu`` profile (at least 1,000 train / 200 valid / 500 test prompts per dataset,
the whole split where smaller), a little above it (``COUNTS``). Rows are picked by a hash of their record id
(deterministic; rerunning gives the same files), and every sample is a subset of the full data that the loaders
split exactly as they split the full data:

- lastfm (S-DPO format, one JSON list per split, an ``id`` key added to each row): rows copied from S-DPO's
  MIT-licensed ``lastfm-val.json`` (the sample's train and valid splits, disjoint) and ``lastfm-test.json`` (test);
- medmcqa: the whole ``dev.json`` (its candidates are pooled over the whole file, so only the whole file gives the
  full data's records; 2.5 MB);
- qasc: whole lines of ``train.jsonl`` (every valid-carved row and ``COUNTS["train"]`` train-carved rows) and the
  whole ``dev.jsonl`` (test).

MovieLens is never sampled: its licence forbids redistribution. The licence notes (README.md and each
folder's LICENSE.md) are kept as they are; this script only rewrites the data files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mass_dpo.data import dataset_settings  # noqa: E402
from mass_dpo.data import lastfm, qasc  # noqa: E402
from mass_dpo.data.records import stable_fraction  # noqa: E402

SALT = "mass-dpo-sample-v1"
COUNTS = {"train": 1200, "valid": 240, "test": 600}


def pick(keys: list[str], n: int) -> set[str]:
    """The ``n`` keys with the smallest hash (so a sample is stable when the source grows)."""
    return set(sorted(keys, key=lambda k: stable_fraction(k, SALT))[:n])


def write_json_list(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    path.write_text("[\n" + body + "\n]\n", encoding="utf-8")


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line if line.endswith("\n") else line + "\n" for line in lines), encoding="utf-8")


def sample_lastfm(src: Path, out: Path) -> None:
    """Only S-DPO's MIT-licensed prompt files are sampled: train and valid rows both come from
    ``lastfm-val.json`` (disjoint), test rows from ``lastfm-test.json``. Nothing is taken from LLaRA's
    ``*_data.jsonl`` (HetRec terms)."""
    for split, name, count in (("valid", "lastfm-val.json", COUNTS["valid"] + COUNTS["train"]),
                               ("test", "lastfm-test.json", COUNTS["test"])):
        rows = json.loads((src / "lastfm" / name).read_text(encoding="utf-8"))
        ids = [lastfm.record_id(split, k) for k in range(len(rows))]
        order = sorted(range(len(rows)), key=lambda k: stable_fraction(ids[k], SALT))[:count]
        if split == "test":
            parts = {"lastfm-test.json": sorted(order)}
        else:
            parts = {"lastfm-val.json": sorted(order[: COUNTS["valid"]]),
                     "lastfm-train.json": sorted(order[COUNTS["valid"]:])}
        for file_name, keep in parts.items():
            write_json_list(out / "lastfm" / file_name, [{"id": ids[k], **rows[k]} for k in keep])


def sample_medmcqa(src: Path, out: Path) -> None:
    """The whole ``dev.json``: each question's 16 pooled candidates come from its subject's options over the whole
    file, so a subset of the lines would give other candidates than the full data."""
    lines = (src / "medmcqa" / "dev.json").read_text(encoding="utf-8").splitlines()
    write_lines(out / "medmcqa" / "dev.json", [line for line in lines if line.strip()])


def sample_qasc(src: Path, out: Path) -> None:
    """Every valid-carved row of ``train.jsonl`` (the whole valid split), COUNTS["train"] train-carved rows and
    the whole ``dev.jsonl`` (the test split, 926 questions)."""
    settings = dataset_settings("qasc")

    def keyed(path: Path):
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                stem, choices, _ = qasc.parse_row(json.loads(line))
                out.append((qasc.record_id(stem, [t for _, t in choices]), qasc.carve(stem, settings), line))
        return out

    train = keyed(src / "qasc" / "train.jsonl")
    keep = pick([k for k, s, _ in train if s == "train"], COUNTS["train"])
    write_lines(out / "qasc" / "train.jsonl", [line for k, s, line in train if k in keep or s == "valid"])
    dev = (src / "qasc" / "dev.jsonl").read_text(encoding="utf-8").splitlines()
    write_lines(out / "qasc" / "dev.jsonl", [line for line in dev if line.strip()])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=REPO.parent / "shared" / "data", help="full data folder")
    parser.add_argument("--out", type=Path, default=REPO / "mass_dpo" / "data" / "samples", help="samples folder")
    args = parser.parse_args(argv)
    if not (args.source / "MANIFEST.md").is_file() and not (args.source / "lastfm").is_dir():
        parser.error(f"no data folder at {args.source}")
    sample_lastfm(args.source, args.out)
    sample_medmcqa(args.source, args.out)
    sample_qasc(args.source, args.out)
    for folder in ("lastfm", "medmcqa", "qasc"):
        size = sum(p.stat().st_size for p in (args.out / folder).iterdir() if p.is_file())
        print(f"{folder}: {size / 1024:.0f} KiB in {args.out / folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
