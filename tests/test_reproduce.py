"""The notebook runner: executes notebooks into the output folder, reports failures by cell, carries on."""

from pathlib import Path

import nbformat
import pytest

from mass_dpo.reproduce import profile_parameters, reproduce


def _notebook(path, *cells, parameters="out_dir = ''\nvalue = 1"):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    param_cell = nbformat.v4.new_code_cell(parameters)
    param_cell.metadata["tags"] = ["parameters"]
    nb.cells = [param_cell] + [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, path)


@pytest.mark.slow
def test_failure_is_reported_and_the_rest_still_runs(tmp_path):
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    _notebook(nbs / "first.ipynb", "x = 1 / 0")
    _notebook(nbs / "second.ipynb", "from pathlib import Path\nPath(out_dir).mkdir(parents=True)\n"
              "Path(out_dir, 'done.txt').write_text(str(value))\nPath(out_dir, 'result.csv').write_text('x\\n0.25\\n')")
    (tmp_path / "figs").mkdir()
    (tmp_path / "figs" / "README.md").write_text("# Gallery\n\nThe result is 0.25 ([result](second/result.csv)).\n\n"
                                                 "It was 0.31 ([result](second/result.csv)).\n")
    lines = []
    report = reproduce("smoke", ["first", "second"], out_dir=tmp_path / "figs", notebooks_dir=nbs, echo=lines.append)
    assert [r.ok for r in report.results] == [False, True]
    failure = report.results[0]
    assert "ZeroDivisionError" in failure.error and "cell" in failure.error
    assert "ZeroDivisionError" in failure.log.read_text()
    assert (tmp_path / "figs" / "second" / "done.txt").read_text() == "1"
    assert (tmp_path / "figs" / "executed" / "second.ipynb").is_file()
    assert "without encryption" not in (tmp_path / "figs" / "executed" / "second.log").read_text()  # kernel noise
    assert (tmp_path / "figs" / "claims.md").is_file()  # rewritten by a partial (--only) run too
    assert any("first" in line and "ZeroDivisionError" in line for line in lines)
    assert not (nbs / "first.ipynb").read_text().count("ZeroDivisionError")  # never executed over itself
    stale = [line for line in lines if "0.31 not in second/result.csv" in line]  # the gallery's prose, checked
    assert len(stale) == 1 and not any("0.25 not in" in line for line in lines)


def test_profiles_merge_common_and_per_notebook_parameters():
    params = profile_parameters("cpu", "toy_loglinear")
    assert params["model"] == "smollm2" and params["profile"] == "cpu"


def test_unknown_notebook_or_profile(tmp_path):
    (tmp_path / "table1.ipynb").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no notebook nope in .*; the notebooks there: table1$"):
        reproduce("smoke", ["nope"], notebooks_dir=tmp_path, echo=lambda s: None)
    with pytest.raises(FileNotFoundError, match="no profile 'nope' in .*; choose one of cpu, cpu-lm, paper, smoke$"):
        reproduce("nope", notebooks_dir=tmp_path, echo=lambda s: None)


def test_help_names_every_profile(tmp_path, monkeypatch):
    """``mass-dpo reproduce --help`` lists the profiles params/ holds (a new profile file shows up there)."""
    import argparse
    import shutil

    from mass_dpo.params import params_dir
    from mass_dpo.reproduce import add_arguments

    def profile_help():
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        return next(a.help for a in parser._actions if a.dest == "profile")

    assert "cpu, cpu-lm, paper, smoke, or auto" in profile_help()
    copy = tmp_path / "params"
    shutil.copytree(params_dir(), copy)
    (copy / "profiles" / "cluster.yaml").write_text((copy / "profiles" / "cpu.yaml").read_text())
    monkeypatch.setenv("MASS_DPO_PARAMS", str(copy))
    assert "cluster, cpu, cpu-lm, paper, smoke, or auto" in profile_help()


def _ledger(*pieces, caches="cold"):
    return {"id": "l", "profile": "cpu", "caches": caches, "complete": True,
            "pieces": [{"id": str(i), "started": f"t{i}", "seconds": total, "ended": ended,
                        "notebooks": [{"name": n, "status": st, "seconds": sec} for n, st, sec in nbs]}
                       for i, (total, ended, nbs) in enumerate(pieces)]}


def test_timings_file_of_a_whole_run(tmp_path):
    from mass_dpo.reproduce import write_timings

    ledger = _ledger((15.5, "finished", [("table1", "ok", 12.5), ("table3", "FAILED", 3.0)]))
    path = write_timings(ledger, tmp_path)
    text = path.read_text()
    assert path.name == "timings_cpu_cold.md"
    assert "| table1 | ok | 12.5 |" in text and "| table3 | FAILED | 3.0 |" in text and "**16 s (0.3 min)**" in text
    assert "pieces" not in text


def test_timings_of_a_run_killed_without_a_record_say_the_total_is_a_lower_bound(tmp_path):
    from mass_dpo.reproduce import write_timings

    ledger = _ledger((100.0, None, [("table1", "ok", 90.0)]), (30.0, "finished", [("table1", "ok", 1.0),
                                                                                   ("table3", "ok", 29.0)]))
    ledger["pieces"][0]["running"] = {"name": "table3", "seconds": 8.0}  # its last heartbeat
    text = write_timings(ledger, tmp_path).read_text()
    assert "**130 s (2.2 min)**" in text and "2 pieces" in text and "lower bound" in text
    assert "| table1 | ok | 91.0 |" in text and "| table3 | ok | 37.0 |" in text


def test_the_running_notebooks_time_is_saved_while_it_runs(tmp_path, monkeypatch):
    import json
    import time

    import mass_dpo.reproduce as rp

    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    _notebook(nbs / "toy_loglinear.ipynb", "pass")
    monkeypatch.setattr(rp, "HEARTBEAT_SECONDS", 0.05)
    monkeypatch.setattr(rp, "_cache_state", lambda profile: "cold")
    seen = []

    def fake_run(name, parameters, *, notebooks_dir, out_dir):  # what a hard kill now would leave on disk
        time.sleep(0.5)
        seen.append(json.loads(rp.ledger_path("smoke").read_text())["pieces"][-1])
        return rp.NotebookResult(name, True, 0.5)

    monkeypatch.setattr(rp, "run_notebook", fake_run)
    rp.reproduce("smoke", out_dir=tmp_path / "figs", notebooks_dir=nbs, echo=lambda s: None)
    (piece,) = seen
    assert piece["ended"] is None and piece["running"]["name"] == "toy_loglinear"
    # at least one beat's worth (saves fsync the ledger, slow on a loaded disk: no tighter lower bound)
    assert 0.05 <= piece["running"]["seconds"] <= 0.5 and piece["seconds"] >= piece["running"]["seconds"]
    done = json.loads(rp.ledger_path("smoke").read_text())["pieces"][-1]
    assert "running" not in done and done["ended"] == "finished"


class _Clock:
    """A fake ``time.perf_counter`` that the fake notebooks advance."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_an_interrupted_whole_run_resumed_sums_its_pieces_into_one_cold_timings_file(tmp_path, monkeypatch):
    import mass_dpo.reproduce as rp

    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    for name in ("toy_loglinear", "quickstart"):
        _notebook(nbs / f"{name}.ipynb", "pass")
    clock, plan = _Clock(), {}
    monkeypatch.setattr(rp.time, "perf_counter", clock)

    def fake_run(name, parameters, *, notebooks_dir, out_dir):  # each notebook takes plan[name] seconds
        seconds, interrupt = plan[name]
        clock.now += seconds
        if interrupt:
            raise KeyboardInterrupt
        return rp.NotebookResult(name, True, seconds)

    monkeypatch.setattr(rp, "run_notebook", fake_run)
    figs = tmp_path / "figs"

    def piece(caches, toy, quick):
        monkeypatch.setattr(rp, "_cache_state", lambda profile: caches)
        plan.update(toy_loglinear=toy, quickstart=quick)
        return rp.reproduce("smoke", out_dir=figs, notebooks_dir=nbs, echo=lambda s: None)

    with pytest.raises(KeyboardInterrupt):  # cold, stopped during its second notebook
        piece("cold", (100.0, False), (50.0, True))
    with pytest.raises(KeyboardInterrupt):  # stopped again before any run finished: the caches still look cold
        piece("cold", (20.0, False), (40.0, True))
    assert not list(figs.glob("timings_*"))
    piece("warm", (1.0, False), (30.0, False))  # resumed on warm caches: completes the cold run's ledger
    text = (figs / "timings_smoke_cold.md").read_text()
    assert "**241 s (4.0 min)**" in text and "3 pieces" in text and "lower bound" not in text
    assert "| toy_loglinear | ok | 121.0 |" in text and "| quickstart | ok | 120.0 |" in text
    assert not (figs / "timings_smoke_warm.md").exists()

    piece("warm", (2.0, False), (3.0, False))  # the next whole run is warm and on its own
    warm = (figs / "timings_smoke_warm.md").read_text()
    assert "**5 s (0.1 min)**" in warm and "pieces" not in warm
    assert (figs / "timings_smoke_cold.md").read_text() == text


def test_two_runs_resuming_one_ledger_keep_each_others_pieces(tmp_path):
    import json

    from mass_dpo.reproduce import _open_ledger, _record, ledger_path

    first = _open_ledger("smoke", "cold")
    _record(first, "toy_loglinear", "interrupted", 5.0, 5.0, ended="interrupted")
    a, b = _open_ledger("smoke", "warm"), _open_ledger("smoke", "warm")  # two jobs resume it at once
    _record(a, "toy_loglinear", "ok", 7.0, 7.0)
    _record(b, "quickstart", "ok", 11.0, 11.0)
    _record(a, None, None, 0.0, 8.0, ended="interrupted")
    on_disk = json.loads(ledger_path("smoke").read_text())
    assert on_disk["caches"] == "cold" and len(on_disk["pieces"]) == 3
    assert sorted(p["seconds"] for p in on_disk["pieces"]) == [5.0, 8.0, 11.0]
    assert sorted(nb["name"] for p in on_disk["pieces"] for nb in p["notebooks"]) == [
        "quickstart", "toy_loglinear", "toy_loglinear"]



def test_a_run_on_a_ledger_that_was_completed_leaves_the_next_ledger_alone(tmp_path, monkeypatch):
    """Found by a concurrency audit: a run still beating on a completed ledger overwrote the ledger a newer run had
    started (losing its piece), and an interrupted run reset another's ``complete``."""
    import json

    from mass_dpo.reproduce import _open_ledger, _record, ledger_path

    monkeypatch.setenv("MASS_DPO_CACHE", str(tmp_path))  # a ledger of its own
    a, b = _open_ledger("smoke", "cold"), _open_ledger("smoke", "cold")  # two runs share ledger L1
    _record(a, None, None, 0.0, 9.0, ended="finished")  # A completes L1
    _record(b, "quickstart", "ok", 4.0, 4.0)  # B goes on: L1 stays complete
    assert json.loads(ledger_path("smoke").read_text())["complete"] is True
    c = _open_ledger("smoke", "cold")  # a new run starts ledger L2
    assert c["id"] != a["id"]
    _record(c, "toy_loglinear", "interrupted", 3.0, 3.0, ended="interrupted")
    _record(b, None, None, 0.0, 6.0, ended="interrupted")  # B's last save must not bring L1 back over L2
    on_disk = json.loads(ledger_path("smoke").read_text())
    assert on_disk["id"] == c["id"] and not on_disk["complete"]
    assert [nb["name"] for p in on_disk["pieces"] for nb in p["notebooks"]] == ["toy_loglinear"]
    assert _open_ledger("smoke", "cold")["id"] == c["id"]  # the next run resumes L2, C's piece in it

_SIGTERM_DRIVER = """
import sys
from pathlib import Path
import mass_dpo.reproduce as rp
rp._interrupt_on_sigterm()
try:
    rp.reproduce("smoke", notebooks_dir=Path(sys.argv[1]), out_dir=Path(sys.argv[2]))
except KeyboardInterrupt:
    sys.exit(130)
"""


@pytest.mark.slow
def test_sigterm_stops_the_notebook_keeps_its_time_and_leaves_no_kernel(tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    pid_file = tmp_path / "kernel.pid"
    _notebook(nbs / "toy_loglinear.ipynb", "pass")
    _notebook(nbs / "quickstart.ipynb", f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
              "time.sleep(600)")
    env = dict(os.environ, MASS_DPO_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen([sys.executable, "-c", _SIGTERM_DRIVER, str(nbs), str(tmp_path / "figs")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert pid_file.is_file(), proc.communicate(timeout=60)[0]
    kernel = int(pid_file.read_text())
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, out
    assert "quickstart: interrupted after" in out
    ledger = json.loads((tmp_path / "cache" / "reproduce" / "timings_smoke.json").read_text())
    (piece,) = ledger["pieces"]
    assert piece["ended"] == "interrupted" and not ledger["complete"]
    assert [nb["name"] for nb in piece["notebooks"]] == ["toy_loglinear", "quickstart"]
    assert piece["notebooks"][1]["status"] == "interrupted" and piece["notebooks"][1]["seconds"] >= 2.0
    for _ in range(40):  # the kernel is shut down with its notebook
        try:
            os.kill(kernel, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        os.kill(kernel, signal.SIGKILL)
        pytest.fail(f"the kernel {kernel} outlived the interrupted reproduction")


def test_the_executed_copy_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """papermill rewrites its output after every cell; the executed copy is a renamed temporary, so a reader never
    finds half a notebook, and an interrupted run leaves the last whole one."""
    import papermill as pm

    from mass_dpo.reproduce import run_notebook

    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _notebook(nbs / "one.ipynb", "x = 1")
    executed = tmp_path / "figs" / "executed"
    calls = []

    def fake(source, output, **kwargs):
        calls.append(output)
        Path(output).write_text(f"run {len(calls)}")
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(pm, "execute_notebook", fake)
    result = run_notebook("one", {}, notebooks_dir=nbs, out_dir=tmp_path / "figs")
    assert result.ok and (executed / "one.ipynb").read_text() == "run 1"
    assert Path(calls[0]) != executed / "one.ipynb" and Path(calls[0]).parent == executed  # a sibling, renamed
    with pytest.raises(KeyboardInterrupt):
        run_notebook("one", {}, notebooks_dir=nbs, out_dir=tmp_path / "figs")
    assert (executed / "one.ipynb").read_text() == "run 1"  # the last whole run stays
    assert sorted(p.name for p in executed.iterdir()) == ["one.ipynb", "one.log"]  # no temporary left
