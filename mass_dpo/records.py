"""Run records: finished runs without their weights, to carry results from one machine's run cache to another's.

    mass-dpo runs export DEST [--match 'medmcqa_*']   finished runs of the runs root -> DEST/<run name>/
    mass-dpo runs import SRC                          the records in SRC -> the runs root
    mass-dpo runs timings SRC [--out FILE]            the measured seconds of the runs in SRC, summed per dataset

A record is a finished run folder (:func:`mass_dpo.runs.is_finished`) less its weights (``final/``, ``snapshots/``,
``checkpoints/``): config, ``metrics.json``, ``log.csv``, ``test_per_prompt.csv``, ``tuning.csv``, ``run.log``, tens of
kB. Its manifest lists what it kept and says ``"record": true``, so a record is a finished run to everything
that reads results (tables, tuning, the training curves): a grid that finds it loads it instead of training it. Only
what needs the trained policy (Table 4's re-extraction, generation from a saved run) asks for the run itself.

Use: a long grid spread over machines or sessions without a shared file system (export what finished, import it on
the next machine, run the grid again: it trains only what is missing), or the results behind a gallery kept beside
it. A run's name hashes its resolved configuration and its data folder, so a record is found by a grid that asks
for the same run over the same data folder path.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from .files import atomic_folder, atomic_write_json, check_writable, locked
from .runs import MANIFEST, is_finished, name_of, runs_root

#: The folders of a run that hold weights: left out of a record.
WEIGHT_FOLDERS = ("final", "snapshots", "checkpoints")


def is_record(path) -> bool:
    """True when ``path`` is a finished run exported without its weights."""
    try:
        return bool(json.loads((Path(path) / MANIFEST).read_text()).get("record"))
    except (OSError, ValueError, AttributeError):
        return False


def _read_json(path: Path, fix: str):
    """The JSON of ``path``, or one ``ValueError`` naming the file and ``fix``."""
    try:
        return json.loads(Path(path).read_text())
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); {fix}") from None


def _check_readable(run: Path, fix: str) -> None:
    """A finished run's or record's ``config.json`` and ``metrics.json`` parse (before anything is copied)."""
    for name in ("config.json", "metrics.json"):
        if (run / name).is_file():
            _read_json(run / name, fix)


def _kept_files(run: Path) -> list[str]:
    """The files of ``run`` a record keeps (relative POSIX paths): all but weights, temporaries and the manifest."""
    kept = []
    for f in sorted(run.rglob("*")):
        rel = f.relative_to(run).as_posix()
        if (f.is_file() and rel != MANIFEST and rel.split("/")[0] not in WEIGHT_FOLDERS
                and not any(part.startswith(".") for part in rel.split("/"))):
            kept.append(rel)
    return kept


def export_runs(dest, *, root=None, match: str = "*") -> list[Path]:
    """Write a record of every finished run of ``root`` (default the runs root) whose folder name matches the glob
    ``match`` into ``dest/<run name>/`` (atomically, under the record's lock: parallel exports into one folder
    replace an older record of the same run one at a time). Runs still training or interrupted are left out.
    Returns the records written."""
    root, dest = Path(root or runs_root()), Path(dest)
    if not match or "/" in match or "\\" in match or match.startswith(".."):
        raise ValueError(f"--match {match!r}: give a glob of run folder names, e.g. 'medmcqa_*' (no path)")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no runs root here; give --root (or set $MASS_DPO_RUNS) to the folder of "
                                "the runs to export")
    if dest.resolve() == root.resolve():
        raise ValueError(f"{dest}: is the runs root itself; export into another folder")
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"{dest} is a file; give a folder to export the records into")
    check_writable(dest, "records folder", "give a folder you can write")
    for run in _folders(root, match):  # every finished run readable before any record is written
        if is_finished(run):
            _check_readable(run, "retrain that run, or leave it out with --match")
    written = []
    for run in _folders(root, match):
        # not while another process (re)trains the run, nor while another export writes the same record
        with locked(run, f"the run {run.name}"), locked(dest / run.name, f"the record {run.name}"):
            if not is_finished(run):
                continue
            try:
                manifest = json.loads((run / MANIFEST).read_text())
            except FileNotFoundError:  # a folder of an earlier layout: finished by its config and metrics
                manifest = {}
            listed = manifest.get("files") or {}
            with atomic_folder(dest / run.name) as tmp:
                kept = _kept_files(run)
                for rel in kept:
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(run / rel, tmp / rel)
                files = {rel: (tmp / rel).stat().st_size for rel in kept if rel in listed or not listed}
                atomic_write_json(tmp / MANIFEST, {**manifest, "files": files, "record": True}, sort_keys=True)
        written.append(dest / run.name)
    return written


def _folders(root: Path, match: str = "*") -> list[Path]:
    """The run folders (or records) of ``root`` whose name matches ``match``, sorted; hidden ones (locks) left out."""
    return sorted(p for p in root.glob(match) if p.is_dir() and not p.name.startswith("."))


def import_runs(src, *, root=None) -> tuple[list[Path], list[Path]]:
    """Copy every record (or finished run) in ``src`` into ``root`` (default the runs root), each atomically under
    its run's lock and under the name the current code gives it (:func:`mass_dpo.runs.name_of`). A run already
    finished there is kept as it is (it may hold weights a record lacks). Returns (imported, already there)."""
    src, root = Path(src), Path(root or runs_root())
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such folder; give the folder that `mass-dpo runs export` wrote")
    if is_finished(src):
        raise ValueError(f"{src} is itself a record; give the folder holding it ({src.parent})")
    candidates = _folders(src)
    unfinished = [p.name for p in candidates if not is_finished(p)]
    if unfinished:
        raise ValueError(f"{src}: {len(unfinished)} folder(s) are not finished runs or records (e.g. "
                         f"{unfinished[0]}); give the folder that `mass-dpo runs export` wrote")
    for rec in candidates:  # every record readable before any is copied
        _check_readable(rec, "export that record again")
    check_writable(root, "runs root", "give --root a folder you can write (or set $MASS_DPO_RUNS)")
    imported, present = [], []
    for rec in candidates:
        target = root / name_of(rec)  # the current code's name (older records hashed their checkout's path)
        with locked(target, f"the run {target.name}"):
            if is_finished(target):
                present.append(target)
                continue
            with atomic_folder(target) as tmp:
                shutil.copytree(rec, tmp, dirs_exist_ok=True)
        imported.append(target)
    return imported, present


def rename_runs(root=None) -> list[tuple[Path, Path]]:
    """File every finished run of ``root`` (default the runs root) under the name the current code gives it
    (:func:`mass_dpo.runs.name_of`), so that runs made before the run hash changed are found again instead of
    trained again; a run whose new name is already a finished run is left where it is. Returns (old, new) pairs."""
    root = Path(root or runs_root())
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no runs root here; give --root (or set $MASS_DPO_RUNS) to the folder of "
                                "the runs to rename")
    moved = []
    for run in _folders(root):
        if not is_finished(run):
            continue
        target = root / name_of(run)
        if target == run:
            continue
        with locked(run, f"the run {run.name}"), locked(target, f"the run {target.name}"):
            if is_finished(target) or not is_finished(run):
                continue
            if target.exists():  # an unfinished attempt at the same run: the finished one replaces it
                shutil.rmtree(target)
            run.rename(target)
        moved.append((run, target))
    return moved


def dtype_mismatches(runs) -> list[str]:
    """One line per (model, dtype) of ``runs`` whose features were extracted in another dtype than this machine
    would use (:func:`mass_dpo.runs.hash_payload` covers it, so such runs are not read here but trained again),
    naming the fix. Runs written before ``config.json`` said it were extracted in fp32."""
    from .runs import extraction_dtype

    found: dict[tuple[str, str], int] = {}
    for run in runs:
        meta = _read_json(Path(run) / "config.json", "export that record again")
        key = (str(meta["config"].get("model")), meta.get("extraction_dtype") or "float32")
        found[key] = found.get(key, 0) + 1
    lines = []
    for (model, dtype), count in sorted(found.items()):
        here = extraction_dtype(model)
        if here != dtype:
            lines.append(f"note: {count} record(s) of {model} were made from {dtype} features, and this machine "
                         f"extracts in {here} (dtype auto, $MASS_DPO_DTYPE or params/models/{model}.yaml): runs look "
                         f"them up only with MASS_DPO_DTYPE={dtype}; without it they train again in {here}")
    return lines


def timings(src) -> list[dict]:
    """One row per finished run (or record) in ``src``: its ``dataset``, ``kind`` (``reference``, ``tuning`` (scored
    on the validation split) or ``seed``), ``method`` and the seconds it measured of itself (``metrics.json``'s
    ``seconds``: ``data``, the preparation of its splits with any extraction it did first; ``train``; ``test``)."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such folder; give a runs root or a folder that `mass-dpo runs export` "
                                "wrote")
    rows = []
    for run in _folders(src):
        if not is_finished(run):
            continue
        metrics = _read_json(run / "metrics.json", "export that record again, or retrain the run")
        cfg = _read_json(run / "config.json", "export that record again, or retrain the run")["config"]
        kind = ("reference" if run.name.startswith("reference_")
                else "tuning" if cfg.get("test_split") == "valid" else "seed")
        seconds = metrics.get("seconds") or {}
        rows.append({"run": run.name, "dataset": cfg["dataset"], "kind": kind, "method": cfg.get("method"),
                     **{part: float(seconds.get(part, 0.0)) for part in ("data", "train", "test")}})
    return rows


def timings_markdown(src) -> str:
    """The table of :func:`timings` summed per dataset and kind, in hours, with the total: what training ``src``'s
    runs one after another cost on the machines that ran them."""
    rows = timings(src)
    if not rows:
        raise ValueError(f"{src}: holds no finished runs or records; nothing to time")
    kinds = ("tuning", "seed", "reference")
    sums: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    for r in rows:
        per = sums.setdefault(r["dataset"], dict.fromkeys(kinds + ("data", "train", "test"), 0.0))
        total = r["data"] + r["train"] + r["test"]
        per[r["kind"]] += total
        for part in ("data", "train", "test"):
            per[part] += r[part]
        counts[r["dataset"]] = counts.get(r["dataset"], 0) + 1
    lines = ["| dataset | runs | tuning h | seeds h | reference h | of which data / train / test h | total h |",
             "|---|---:|---:|---:|---:|---|---:|"]
    grand = 0.0
    for ds, per in sums.items():
        total = sum(per[k] for k in kinds)
        grand += total
        lines.append(f"| {ds} | {counts[ds]} | " + " | ".join(f"{per[k] / 3600:.2f}" for k in kinds)
                     + f" | {per['data'] / 3600:.2f} / {per['train'] / 3600:.2f} / {per['test'] / 3600:.2f}"
                     + f" | {total / 3600:.2f} |")
    lines.append(f"| all | {len(rows)} | | | | | **{grand / 3600:.2f}** |")
    return (f"Each run's own measurement (`metrics.json`'s `seconds`: its splits' preparation, with the extraction "
            f"where it was the first to need it; training; test evaluation), summed: {len(rows)} runs, "
            f"{grand / 3600:.2f} h one after another. A run resumed from a checkpoint counts only its last part.\n\n"
            + "\n".join(lines) + "\n")


# ---------------------------------------------------------------- mass-dpo runs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import path_text

    sub = parser.add_subparsers(dest="action", required=True, metavar="{export,import,rename,timings}")
    ex = sub.add_parser("export", help="write records (finished runs without weights) of the runs root into a folder",
                        description="Write a record (the run without its weights: config, metrics, per-prompt "
                        "results, log, tens of kB) of every finished run of the runs root into DEST/<run name>/, "
                        "atomically; an older record of the same run is replaced. Runs still training or "
                        "interrupted are left out.")
    ex.add_argument("dest", type=path_text, help="the folder to write the records into")
    ex.add_argument("--match", default="*", help="only runs whose folder name matches this glob, e.g. 'medmcqa_*'")
    ex.add_argument("--root", type=path_text, default=None,
                    help="the runs root to export from (default: $MASS_DPO_RUNS, else <cache>/runs)")
    im = sub.add_parser("import", help="copy the records of a folder into the runs root",
                        description="Copy every record (or finished run) of SRC into the runs root, under the name "
                        "this version gives it; a run already finished there is kept (it may hold weights a record "
                        "lacks). A grid run afterwards loads the imported runs instead of training them.")
    im.add_argument("src", type=path_text, help="a folder written by `mass-dpo runs export`")
    im.add_argument("--root", type=path_text, default=None,
                    help="the runs root to import into (default: $MASS_DPO_RUNS, else <cache>/runs)")
    rn = sub.add_parser("rename", help="file the runs of a runs root under the current code's names",
                        description="File every finished run of the runs root under the name this version gives "
                        "it, so that runs made before a change of the run hash are found again instead of trained "
                        "again.")
    rn.add_argument("--root", type=path_text, default=None,
                    help="the runs root (default: $MASS_DPO_RUNS, else <cache>/runs)")
    ti = sub.add_parser("timings", help="the measured seconds of the finished runs (or records) of a folder, "
                                        "summed per dataset",
                        description="Each run's own measured seconds (data preparation, training, test "
                        "evaluation) summed per dataset and kind (tuning or seed runs), in hours, with the total: "
                        "what training SRC's runs one after another cost on the machines that ran them.")
    ti.add_argument("src", type=path_text, help="a runs root or a folder written by `mass-dpo runs export`")
    ti.add_argument("--out", type=path_text, default=None,
                    help="also write the table to this markdown file (atomically)")


def run(args: argparse.Namespace) -> int:
    if args.action == "export":
        written = export_runs(args.dest, root=args.root, match=args.match)
        print(f"exported {len(written)} finished run(s) as records into {args.dest}")
    elif args.action == "timings":
        text = timings_markdown(args.src)
        print(text, end="")
        if args.out is not None:
            from .files import atomic_write_text

            if args.out.is_dir():
                raise ValueError(f"--out {args.out} is a folder; give a markdown file path")
            check_writable(args.out.parent, "--out folder", "give --out a file in a folder you can write")
            atomic_write_text(args.out, f"# Measured time of the runs in `{args.src}`\n\n{text}")
    elif args.action == "rename":
        moved = rename_runs(args.root)
        print(f"renamed {len(moved)} run(s) in {args.root or runs_root()} to the current code's names")
    else:
        imported, present = import_runs(args.src, root=args.root)
        root = args.root or runs_root()
        print(f"imported {len(imported)} record(s) into {root}; {len(present)} already finished there (kept)")
        for line in dtype_mismatches(imported + present):
            print(line)
    return 0
