"""Static checks over every notebook in notebooks/ (the conventions of docs/notebooks.md)."""

import ast
import io
import tokenize
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def _parameters_cells(nb):
    return [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]


@pytest.fixture(params=NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def notebook(request):
    return request.param, nbformat.read(request.param, as_version=4)


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found in notebooks/"


def test_valid_and_kernelspec_python3(notebook):
    path, nb = notebook
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", path.name


def test_no_outputs_or_execution_counts(notebook):
    path, nb = notebook
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: cell {i} has outputs"
            assert cell.execution_count is None, f"{path.name}: cell {i} has an execution count"


def test_exactly_one_typed_commented_parameters_cell(notebook):
    path, nb = notebook
    cells = _parameters_cells(nb)
    assert len(cells) == 1, f"{path.name}: {len(cells)} cells tagged 'parameters'"
    source = cells[0].source
    assert cells[0].cell_type == "code"
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells[0] is cells[0], f"{path.name}: the parameters cell must be the first code cell"
    tree = ast.parse(source)
    comments = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    names = []
    for stmt in tree.body:
        assert isinstance(stmt, ast.AnnAssign) and stmt.value is not None, (
            f"{path.name}: parameters cell line {stmt.lineno} is not 'name: type = value  # comment'")
        ast.literal_eval(stmt.value)  # a literal papermill can override
        assert stmt.lineno in comments, f"{path.name}: parameter {stmt.target.id} has no comment"
        names.append(stmt.target.id)
    assert "out_dir" in names, f"{path.name}: every notebook takes an out_dir parameter"


def test_papermill_parses_every_parameter(notebook):
    import papermill
    path, nb = notebook
    source = _parameters_cells(nb)[0].source
    names = [s.target.id for s in ast.parse(source).body]
    assert list(papermill.inspect_notebook(str(path)).keys()) == names
