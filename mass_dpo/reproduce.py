"""``mass-dpo reproduce``: execute the paper's notebooks headless with papermill.

Each notebook runs under a profile (``params/profiles/<profile>.yaml``: ``common`` parameters for every notebook,
then per-notebook overrides): papermill passes it ``profile`` and ``out_dir``, and the notebook's setup cell takes
every parameter left at ``None`` from that profile (:mod:`mass_dpo.notebook_params`). It runs into
``papers_figures/executed/<name>.ipynb`` with its log beside it. A failing notebook is reported (notebook, cell,
error) and the remaining notebooks still run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from .notebook_params import AUTO, auto_profile, papermill_parameters, profile_values
from .params import available, params_dir

#: Notebooks in the order they run (each one a paper section); missing ones are skipped with a note.
NOTEBOOKS = (
    "toy_loglinear",
    "quickstart",
    "training_dynamics",
    "table1",
    "table2",
    "table5",
    "table6",
    "table3",
    "table4",
    "table7",
    "table8",
)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


@dataclass
class NotebookResult:
    name: str
    ok: bool
    seconds: float
    output: Path | None = None
    log: Path | None = None
    error: str = ""


@dataclass
class ReproduceReport:
    results: list[NotebookResult] = field(default_factory=list)

    @property
    def failed(self) -> list[NotebookResult]:
        return [r for r in self.results if not r.ok]


def profile_parameters(profile: str, name: str) -> dict:
    """Every value ``profile`` sets for notebook ``name`` (:func:`mass_dpo.notebook_params.profile_values`), and
    ``profile`` itself."""
    return dict(profile_values(profile, name), profile=profile)


def _describe_failure(err: BaseException) -> str:
    """One readable line naming the cell and the error (papermill's execution errors carry both)."""
    cell = getattr(err, "exec_count", None)
    ename, evalue = getattr(err, "ename", None), getattr(err, "evalue", None)
    if ename is not None:
        where = f"cell [{cell}]" if cell is not None else "a cell"
        return f"{where} raised {ename}: {evalue}"
    return f"{type(err).__name__}: {err}"


@contextlib.contextmanager
def _stderr_to(file):
    """Send this process's file descriptor 2 (and so the kernel's, which inherits it) into ``file``, so the console
    keeps only the progress lines and the kernel's warnings land in the notebook's log."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(file.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def run_notebook(name: str, parameters: dict, *, notebooks_dir: Path, out_dir: Path, kernel: str = "python3"
                 ) -> NotebookResult:
    """Execute ``notebooks_dir/<name>.ipynb`` into ``out_dir/executed/`` (never over itself), with the ``parameters``
    it declares and ``out_dir=out_dir/<name>``."""
    import papermill as pm

    from .notebook_params import notebook_defaults

    source = notebooks_dir / f"{name}.ipynb"
    executed = out_dir / "executed"
    executed.mkdir(parents=True, exist_ok=True)
    output = executed / f"{name}.ipynb"
    log = executed / f"{name}.log"
    declared = set(notebook_defaults(source))  # the parameters cell, read as `mass-dpo reproduce` resolves it
    params = {k: v for k, v in parameters.items() if k in declared}
    if "out_dir" in declared:
        params["out_dir"] = str(out_dir / name)
    start = time.perf_counter()
    # papermill rewrites its output after every cell: it writes a temporary sibling, renamed over the executed copy
    # when it ends (a failed run's too, which shows the failing cell), so a reader never finds half a notebook
    partial = output.with_name(f".{output.stem}.partial~{os.getpid()}.ipynb")
    with open(log, "w") as log_file, _stderr_to(log_file):
        try:
            pm.execute_notebook(
                str(source),
                str(partial),
                parameters=params,
                kernel_name=kernel,
                cwd=str(repo_root()),
                progress_bar=False,
                log_output=True,
                stdout_file=log_file,
                stderr_file=log_file,
                # the kernel's own log at ERROR: ipykernel 7 warns on every start that its local TCP sockets are not
                # encrypted (papermill's usual transport); the notebook's Python warnings are not affected
                extra_arguments=["--IPKernelApp.log_level=ERROR"],
            )
        except Exception as err:  # noqa: BLE001 - reported, then the next notebook runs
            log_file.write("\n" + "".join(traceback.format_exception(err)))
            _keep(partial, output)
            return NotebookResult(name, False, time.perf_counter() - start, output, log, _describe_failure(err))
        except BaseException:  # interrupted: the executed copy of the last whole run stays
            partial.unlink(missing_ok=True)
            raise
    _keep(partial, output)
    return NotebookResult(name, True, time.perf_counter() - start, output, log)


def _keep(partial: Path, output: Path) -> None:
    """``partial`` renamed over ``output`` (when papermill got as far as writing it)."""
    if partial.is_file():
        os.replace(partial, output)


def reproduce(profile: str = "cpu", only: list[str] | None = None, *, out_dir: Path | None = None,
              notebooks_dir: Path | None = None, echo=print) -> ReproduceReport:
    """Run the notebooks of a profile in order; returns a report (nothing raises for a failing notebook).

    ``profile="auto"``: ``paper`` where CUDA is available, else ``cpu``. Each notebook gets
    :func:`mass_dpo.notebook_params.papermill_parameters` (its ``profile``) and its ``out_dir``."""
    notebooks_dir = Path(notebooks_dir or repo_root() / "notebooks")
    if not notebooks_dir.is_dir():
        raise FileNotFoundError(f"no notebooks folder at {notebooks_dir}: mass-dpo reproduce runs the notebooks of a "
                                "checkout; clone the repository and install it there (pip install -e .)")
    profile = auto_profile() if profile == AUTO else profile
    if profile not in available("profiles"):  # a name of params/profiles/, never a path ("../models/tiny")
        known = ", ".join(available("profiles"))
        raise FileNotFoundError(f"no profile {profile!r} in {params_dir() / 'profiles'}; choose one of {known}")
    plan = reproduce_plan(profile)
    gallery = Path(out_dir or repo_root() / "papers_figures")
    out_dir = gallery / plan["out_dir"] if plan["out_dir"] else gallery
    names = list(only) if only else [n for n in plan["notebooks"] if (notebooks_dir / f"{n}.ipynb").is_file()]
    unknown = [n for n in names if not (notebooks_dir / f"{n}.ipynb").is_file()]
    if unknown:
        known = ", ".join(sorted(p.stem for p in notebooks_dir.glob("*.ipynb"))) or "none"
        raise FileNotFoundError(f"no notebook {', '.join(unknown)} in {notebooks_dir}; the notebooks there: {known}")
    from .files import check_writable

    check_writable(out_dir, "gallery folder", "give --out-dir a folder you can write")  # before any data or notebook
    if profile != "paper":  # the offline profiles never reach for the hub (MovieLens from GroupLens still downloads)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sources = data_sources(profile, names, echo=echo)
    if sources and not any(sources.values()):  # every table would be empty, written over the gallery's
        raise FileNotFoundError(
            f"no benchmark data for --profile {profile} ({', '.join(sources)} all missing, above); set "
            f"MASS_DPO_DATA to a folder holding them (docs/data.md) or name the profile's data folder, or run "
            "--profile cpu on the shipped samples")
    report = ReproduceReport()
    caches = _cache_state(profile)
    ledger = None if only else _open_ledger(profile, caches)  # a whole run's timings, across interruptions
    start = time.perf_counter()
    for i, name in enumerate(names, 1):
        echo(f"[{i}/{len(names)}] {name}: running (log: {out_dir / 'executed' / (name + '.log')})")
        params = papermill_parameters(notebooks_dir / f"{name}.ipynb", profile)
        began = time.perf_counter()
        try:
            with _heartbeat(ledger, name, began, start):
                result = run_notebook(name, params, notebooks_dir=notebooks_dir, out_dir=out_dir)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM from the CLI (a cluster's time limit): keep its time
            if ledger is not None:
                seconds = time.perf_counter() - began
                _record(ledger, name, "interrupted", seconds, time.perf_counter() - start, ended="interrupted")
                echo(f"[{i}/{len(names)}] {name}: interrupted after {seconds:.1f} s; "
                     f"`mass-dpo reproduce --profile {profile}` again resumes (finished runs and extractions are "
                     f"cached) and its timings add this part ({ledger_path(profile)})")
            raise
        report.results.append(result)
        if ledger is not None:
            _record(ledger, name, "ok" if result.ok else "FAILED", result.seconds, time.perf_counter() - start)
        status = "ok" if result.ok else "FAILED"
        echo(f"[{i}/{len(names)}] {name}: {status} in {result.seconds:.1f} s -> {result.output}")
        if not result.ok:
            echo(f"    {name}: {result.error}\n    log: {result.log}")
    if report.failed:
        echo(f"{len(report.failed)} of {len(names)} notebooks failed:")
        for r in report.failed:
            echo(f"  - {r.name}: {r.error} (log: {r.log})")
    else:
        echo(f"all {len(names)} notebooks ran; figures and tables are in {out_dir}")
    total = time.perf_counter() - start
    from .experiments.gallery import write_claims

    # the claims are read from every table now in the gallery, so a partial run (--only) rewrites them too
    echo(f"claims with paired intervals: {write_claims(gallery)}")
    own = gallery.resolve() == (repo_root() / "papers_figures").resolve()  # the project's gallery: its README too
    for readme in [gallery / "README.md"] + ([repo_root() / "README.md"] if own else []):
        check_quotes(readme, echo=echo)
    if only:
        echo(f"{total / 60:.1f} min in all ({caches} caches)")
    else:
        _record(ledger, None, None, 0.0, total, ended="finished")
        path = write_timings(ledger, out_dir)
        pieces = len(ledger["pieces"])
        whole = f", {_ledger_total(ledger) / 60:.1f} min over its {pieces} pieces" if pieces > 1 else ""
        echo(f"{total / 60:.1f} min in all ({ledger['caches']} caches{whole}); timings in {path}")
    return report


def check_quotes(readme: Path, *, echo=print) -> list:
    """Name every number the gallery's hand-written ``README.md`` quotes that the tables it links no longer hold
    (:func:`mass_dpo.experiments.quotes.unsourced_quotes`): after a rerun on other data, settings or hardware, the
    sentences to rewrite. Nothing when there is no such README (a gallery of one's own)."""
    from .experiments.quotes import unsourced_quotes

    if not readme.is_file():
        return []
    stale = unsourced_quotes(readme)
    if stale:
        echo(f"{readme}: {len(stale)} passage(s) quote numbers that the tables they link no longer hold; "
             "rewrite them from the new tables (python -m mass_dpo.experiments.quotes lists them again):")
        for u in stale:
            echo(f"  - {u}")
    return stale


def data_sources(profile: str, names, *, echo=print) -> dict[str, str | None]:
    """Where each benchmark of the notebooks ``names`` under ``profile`` comes from, found (and MovieLens downloaded
    from GroupLens into the cache when the machine is online and no data folder holds it) before any notebook runs:
    ``{dataset: folder, or None when missing}``, one line each through ``echo``. A missing dataset is reported here
    and skipped by the notebooks with the same note."""
    from .data.benchmarks import BENCHMARKS, locate
    from .experiments.core import dataset_location

    wanted: dict[str, str | None] = {}
    for name in names:
        values = profile_values(profile, name)
        for ds in values.get("datasets") or []:
            if ds in BENCHMARKS:
                wanted.setdefault(ds, values.get("data_dir"))
    out = {}
    for ds, data_dir in wanted.items():
        where, why = dataset_location(ds, data_dir)
        out[ds] = None if why else str(locate(ds, "test", where))
        if echo:
            echo(f"data {ds}: {out[ds]}" if not why else f"data {ds}: MISSING, the notebooks skip it ({why})")
    return out


def reproduce_plan(profile: str) -> dict:
    """What ``mass-dpo reproduce --profile <profile>`` runs: the profile file's ``reproduce`` section,
    ``notebooks`` (default: every notebook of :data:`NOTEBOOKS`, in that order) and ``out_dir`` (a folder of the
    gallery, e.g. ``lm`` for the LM regime's profile; default: the gallery itself)."""
    from .params import load_params

    section = load_params(f"profiles/{profile}").get("reproduce") or {}
    names = list(section.get("notebooks") or NOTEBOOKS)
    unknown = [n for n in names if n not in NOTEBOOKS]
    if unknown:
        raise ValueError(f"params/profiles/{profile}.yaml: reproduce.notebooks names unknown notebook(s) "
                         f"{', '.join(unknown)}; choose among {', '.join(NOTEBOOKS)}")
    return {"notebooks": names, "out_dir": section.get("out_dir") or ""}


def _cache_state(profile: str = "cpu") -> str:
    """``cold`` when no extraction is cached yet (``<cache>/extraction`` empty) or no finished run of the profile's
    regime exists under the runs root, else ``warm``."""
    from .params import cache_root
    from .runs import runs_root

    folder = cache_root() / "extraction"
    if not (folder.is_dir() and any(folder.iterdir())):
        return "cold"
    regime = profile_values(profile, "table1").get("regime")
    root = runs_root()
    runs = root.glob(f"*_{regime}_s*") if regime and root.is_dir() else iter(())
    return "warm" if any((r / "metrics.json").is_file() for r in runs) else "cold"


# ---------------------------------------------------------------- timings of a whole run, across interruptions
#
# A whole run (no --only) keeps a ledger in the cache, <cache>/reproduce/timings_<profile>.json: one piece per
# invocation, each finished or interrupted notebook with its seconds, saved after every notebook and every minute
# while one runs (the heartbeat). A cold run cut short (Ctrl-C, a cluster job's time limit: SIGTERM) and started
# again on the same caches continues the unfinished ledger, so the timings file of the run that completes it sums
# every piece and keeps the word cold.


def ledger_path(profile: str) -> Path:
    from .params import cache_root

    return cache_root() / "reproduce" / f"timings_{profile}.json"


def _open_ledger(profile: str, caches: str) -> dict:
    """The ledger this whole run adds a piece to: the profile's unfinished one (a whole run interrupted before:
    this one resumes it; a cold run stopped before its first finished run is still cold), else a new one that starts
    with these ``caches`` (also when a warm run was interrupted and the caches have been emptied since)."""
    import datetime
    import uuid

    from .files import locked

    path = ledger_path(profile)
    # read, decide and save under the ledger's lock: two runs starting together join one ledger, not two that would
    # overwrite each other (the lock is re-entrant, so _save_ledger takes it again here)
    with locked(path, f"the timings of mass-dpo reproduce --profile {profile}"):
        ledger = _read_ledger(profile)
        if ledger and (ledger.get("complete") or (caches == "cold" and ledger.get("caches") == "warm")):
            ledger = None
        if ledger is None:
            ledger = {"id": uuid.uuid4().hex, "profile": profile, "caches": caches, "complete": False, "pieces": []}
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        ledger["piece"] = uuid.uuid4().hex  # this run's piece
        ledger["pieces"].append({"id": ledger["piece"], "started": started, "seconds": 0.0, "notebooks": [],
                                 "ended": None})
        _save_ledger(ledger, new=True)
    return ledger


def _read_ledger(profile: str) -> dict | None:
    import json

    try:
        ledger = json.loads(ledger_path(profile).read_text())
    except (OSError, ValueError):  # none yet, or unreadable: a new ledger is started
        return None
    return ledger if isinstance(ledger, dict) and ledger.get("profile") == profile and "id" in ledger else None


def _piece(ledger: dict) -> dict:
    """This run's piece of ``ledger``."""
    return next(p for p in ledger["pieces"] if p["id"] == ledger["piece"])


def _record(ledger: dict, name: str | None, status: str | None, seconds: float, elapsed: float, *,
            ended: str | None = None) -> None:
    """Add notebook ``name``'s ``seconds`` (and ``status``) to this run's piece, set the piece's wall time to
    ``elapsed``, mark it ``ended`` (finished / interrupted; a finished piece completes the ledger), and save."""
    piece = _piece(ledger)
    piece.pop("running", None)
    if name is not None:
        piece["notebooks"].append({"name": name, "status": status, "seconds": round(seconds, 3)})
    piece["seconds"] = round(elapsed, 3)
    if ended:
        piece["ended"] = ended
        ledger["complete"] = ended == "finished"
    _save_ledger(ledger)


#: Seconds between two saves of the running notebook's time: a piece killed without warning loses at most this.
HEARTBEAT_SECONDS = 60.0


@contextlib.contextmanager
def _heartbeat(ledger: dict | None, name: str, began: float, start: float):
    """While notebook ``name`` runs, save its elapsed time in this run's piece every :data:`HEARTBEAT_SECONDS`
    (``running``), so that a piece killed without a record (SIGKILL, a lost node) still counts all but the last
    interval of it. Cleared by the next :func:`_record`."""
    if ledger is None:
        yield
        return
    stop = threading.Event()

    def beat():
        while not stop.wait(HEARTBEAT_SECONDS):
            piece = _piece(ledger)
            now = time.perf_counter()
            piece["running"] = {"name": name, "seconds": round(now - began, 3)}
            piece["seconds"] = round(now - start, 3)
            _save_ledger(ledger)

    thread = threading.Thread(target=beat, name="mass-dpo-reproduce-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _save_ledger(ledger: dict, *, new: bool = False) -> None:
    """Write this run's piece into the ledger file under its lock, keeping the pieces another process wrote to the
    same ledger meanwhile (two whole runs over one cache lose nothing of each other's record), and a ``complete``
    another run set. A ledger on disk with another id is a newer run's (a run that began after this one's ledger
    was completed): it is left as it is. ``new``: this run starts the ledger (:func:`_open_ledger`)."""
    from .files import atomic_write_json, locked

    path = ledger_path(ledger["profile"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path, f"the timings of mass-dpo reproduce --profile {ledger['profile']}"):
        on_disk = _read_ledger(ledger["profile"])
        if on_disk and on_disk["id"] != ledger["id"] and not new:
            return
        if on_disk and on_disk["id"] == ledger["id"]:
            mine = _piece(ledger)
            others = [p for p in on_disk["pieces"] if p["id"] != mine["id"]]
            ledger["pieces"] = sorted(others + [mine], key=lambda p: p["started"])
            ledger["complete"] = bool(ledger["complete"] or on_disk.get("complete"))
        atomic_write_json(path, {k: v for k, v in ledger.items() if k != "piece"})


def _ledger_total(ledger: dict) -> float:
    return sum(p["seconds"] for p in ledger["pieces"])


def write_timings(ledger: dict, out_dir: Path) -> Path:
    """``<out_dir>/timings_<profile>_<cold|warm>.md`` from a whole run's ledger: seconds per notebook, the total,
    the machine's core count and whether the caches started empty. A run resumed after interruptions sums its
    pieces (a notebook cut short counts its part in each piece) and says so; a piece that was killed without a
    record counts its unfinished notebook up to the last heartbeat, and the file says the total is a lower bound."""
    import platform

    seconds: dict[str, float] = {}
    status: dict[str, str] = {}
    for piece in ledger["pieces"]:
        killed = [dict(piece["running"], status="killed")] if piece["ended"] is None and piece.get("running") else []
        for nb in piece["notebooks"] + killed:
            seconds[nb["name"]] = seconds.get(nb["name"], 0.0) + nb["seconds"]
            status[nb["name"]] = nb["status"]
    total = _ledger_total(ledger)
    rows = "\n".join(f"| {name} | {status[name]} | {seconds[name]:.1f} |" for name in seconds)
    pieces = ledger["pieces"]
    how = ""
    if len(pieces) > 1:
        parts = ", ".join(f"{p['seconds']:.0f} s ({p['ended'] or 'killed without a record'})" for p in pieces)
        how = (f" One whole run in {len(pieces)} pieces: it was stopped and resumed on the same caches "
               f"(`mass-dpo reproduce --profile {ledger['profile']}` again), and the pieces add up: {parts}; a "
               "notebook stopped mid-way counts its part in each piece.")
        if any(p["ended"] is None for p in pieces):
            how += (" A piece killed without a record counts the time of the notebook it was running up to its last "
                    f"save (every {HEARTBEAT_SECONDS:.0f} s): the total is a lower bound.")
    text = (f"# `mass-dpo reproduce --profile {ledger['profile']}`, {ledger['caches']} caches\n\n"
            f"Measured by the run itself on {os.cpu_count()} CPU core(s) ({platform.machine()}); total "
            f"**{total:.0f} s ({total / 60:.1f} min)**.{how}\n\n| notebook | status | seconds |\n|---|---|---|\n"
            f"{rows}\n")
    from .files import atomic_write_text

    return atomic_write_text(Path(out_dir) / f"timings_{ledger['profile']}_{ledger['caches']}.md", text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import path_text

    parser.add_argument("--profile", default="cpu",
                        help=f"params/profiles/<profile>.yaml: {', '.join(available('profiles'))}, or auto (paper "
                             "with CUDA, else cpu)")
    parser.add_argument("--only", nargs="+", metavar="NOTEBOOK", help="run only these notebooks")
    parser.add_argument("--out-dir", type=path_text, default=None,
                        help="the gallery folder (default: papers_figures/); a profile may write into a folder of it "
                             "(cpu-lm: lm/)")


def _interrupt_on_sigterm() -> None:
    """SIGTERM (a cluster job's time limit, ``kill``) stops a reproduction as Ctrl-C does, so the notebook it was
    running keeps its time in the ledger."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def run(args: argparse.Namespace) -> int:
    _interrupt_on_sigterm()
    report = reproduce(args.profile, args.only, out_dir=args.out_dir)
    return 1 if report.failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
