"""The notebook runner: executes notebooks into the output folder, reports failures by cell, carries on."""

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
              "Path(out_dir, 'done.txt').write_text(str(value))")
    lines = []
    report = reproduce("smoke", ["first", "second"], out_dir=tmp_path / "figs", notebooks_dir=nbs, echo=lines.append)
    assert [r.ok for r in report.results] == [False, True]
    failure = report.results[0]
    assert "ZeroDivisionError" in failure.error and "cell" in failure.error
    assert "ZeroDivisionError" in failure.log.read_text()
    assert (tmp_path / "figs" / "second" / "done.txt").read_text() == "1"
    assert (tmp_path / "figs" / "executed" / "second.ipynb").is_file()
    assert (tmp_path / "figs" / "claims.md").is_file()  # rewritten by a partial (--only) run too
    assert any("first" in line and "ZeroDivisionError" in line for line in lines)
    assert not (nbs / "first.ipynb").read_text().count("ZeroDivisionError")  # never executed over itself


def test_profiles_merge_common_and_per_notebook_parameters():
    params = profile_parameters("cpu", "toy_loglinear")
    assert params["model"] == "smollm2" and params["profile"] == "cpu"


def test_unknown_notebook_or_profile(tmp_path):
    with pytest.raises(FileNotFoundError, match="no notebook"):
        reproduce("smoke", ["nope"], notebooks_dir=tmp_path, echo=lambda s: None)
    with pytest.raises(FileNotFoundError, match="no profile"):
        reproduce("nope", notebooks_dir=tmp_path, echo=lambda s: None)


def test_timings_file_of_a_whole_run(tmp_path):
    from mass_dpo.reproduce import NotebookResult, ReproduceReport, write_timings

    report = ReproduceReport([NotebookResult("table1", True, 12.5), NotebookResult("table3", False, 3.0)])
    path = write_timings(report, tmp_path, profile="cpu", caches="cold", total=15.5)
    text = path.read_text()
    assert path.name == "timings_cpu_cold.md"
    assert "| table1 | ok | 12.5 |" in text and "| table3 | FAILED | 3.0 |" in text and "**16 s (0.3 min)**" in text
