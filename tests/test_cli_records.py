"""Bad input to `mass-dpo runs`, `mass-dpo reproduce` and `python -m mass_dpo.experiments`: one line naming the
problem and the fix, before any work (found by an audit of these commands, 2026-12-05: a corrupt record imported
and then reported as a failure, an empty path meaning the current folder, a profile given as a path, a typo'd
--root reporting success, notebooks without a run grid ending in a KeyError)."""

import json
import shutil

import pytest

from mass_dpo.cli import main


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("MASS_DPO_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("MASS_DPO_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _record(folder, name="qasc_tiny_sdpo_n3_loglinear_s0_0123456789ab", metrics='{"mrr": 0.5}'):
    """A minimal finished record: config, metrics, manifest."""
    run = folder / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"config": {"dataset": "qasc", "model": "tiny", "method": "sdpo"}}))
    (run / "metrics.json").write_text(metrics)
    files = {n: (run / n).stat().st_size for n in ("config.json", "metrics.json")}
    (run / "manifest.json").write_text(json.dumps({"files": files, "record": True}))
    return run


def _error(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("argv", [["runs", "export", ""], ["runs", "import", ""], ["runs", "timings", ""],
                                  ["runs", "rename", "--root", ""], ["reproduce", "--out-dir="]])
def test_an_empty_path_is_refused(isolated, capsys, argv):
    with pytest.raises(SystemExit) as exit_:  # argparse's own one-line error
        main(argv)
    assert exit_.value.code == 2 and "is empty; give a folder or file path" in _error(capsys)


def test_a_record_that_does_not_parse_is_named_before_anything_is_copied(isolated, capsys):
    src = isolated / "records"
    _record(src, metrics='{"mrr": 0.5')  # cut short, with the size its manifest lists
    assert main(["runs", "import", str(src)]) == 2
    err = _error(capsys)
    assert "metrics.json: not valid JSON" in err and "export that record again" in err
    assert not (isolated / "runs").exists() or not any((isolated / "runs").iterdir())
    assert main(["runs", "timings", str(src)]) == 2
    assert "metrics.json: not valid JSON" in _error(capsys)


def test_a_single_record_given_as_the_folder_of_records(isolated, capsys):
    run = _record(isolated / "records")
    assert main(["runs", "import", str(run)]) == 2
    assert f"{run} is itself a record; give the folder holding it ({run.parent})" in _error(capsys)
    assert main(["runs", "import", str(run.parent)]) == 0  # its parent imports it


def test_rename_on_a_missing_runs_root_is_an_error_not_a_success(isolated, capsys):
    assert main(["runs", "rename", "--root", str(isolated / "typo")]) == 2
    assert "no runs root here; give --root" in _error(capsys)


def test_timings_out_into_a_folder_is_refused(isolated, capsys):
    _record(isolated / "records")
    (isolated / "table").mkdir()
    assert main(["runs", "timings", str(isolated / "records"), "--out", str(isolated / "table")]) == 2
    assert "is a folder; give a markdown file path" in _error(capsys)


def test_reproduce_takes_profile_names_not_paths(isolated, capsys):
    assert main(["reproduce", "--profile", "../models/tiny", "--out-dir", str(isolated / "g")]) == 2
    assert "no profile '../models/tiny'" in _error(capsys)
    assert not (isolated / "cache" / "reproduce").exists()


def test_reproduce_checks_its_gallery_folder_before_any_work(isolated, capsys):
    (isolated / "file").write_text("")
    assert main(["reproduce", "--profile", "smoke", "--only", "quickstart", "--out-dir", str(isolated / "file")]) == 2
    assert "gallery folder" in _error(capsys)


@pytest.mark.parametrize("argv, says", [
    (["quickstart"], "quickstart: no run grid to train; choose among training_dynamics, table1"),
    (["table1", "--profile="], "no profile '' in params/profiles; choose one of cpu, cpu-lm, paper, smoke or auto"),
    (["table1", "--profile", "bogus"], "no profile 'bogus' in params/profiles; choose one of"),
])
def test_the_experiments_runner_says_bad_input_in_one_line(capsys, argv, says):
    from mass_dpo.experiments.runner import main as runner

    with pytest.raises(SystemExit) as exit_:
        runner(argv)
    assert exit_.value.code == 2 and says in capsys.readouterr().err


def test_every_grid_notebook_has_a_grid():
    from mass_dpo.experiments.runner import GRID_NOTEBOOKS, notebook_specs
    from mass_dpo.reproduce import NOTEBOOKS

    assert set(GRID_NOTEBOOKS) == set(NOTEBOOKS) - {"quickstart", "toy_loglinear"}
    with pytest.raises(ValueError, match="has no run grid"):
        notebook_specs("quickstart", {"datasets": [], "seeds": []})


@pytest.mark.parametrize("match", ["", "/tmp/*", "../*", "a/b*"])
def test_export_match_is_a_name_glob_not_a_path(isolated, capsys, match):
    _record(isolated / "runs")
    assert main(["runs", "export", str(isolated / "out"), "--match", match]) == 2
    assert "give a glob of run folder names" in _error(capsys)
