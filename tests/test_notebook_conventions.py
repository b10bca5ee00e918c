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


def _read_keys(tree) -> set[str]:
    """Names a piece of code reads: variables, and string keys of subscripts and ``.get`` calls
    (``P.values["model"]``, ``p["ns"]``, ``params.get("models")``)."""
    keys = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            keys.add(node.id)
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            keys.add(node.slice.value)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and node.args and isinstance(node.args[0], ast.Constant)):
            keys.add(node.args[0].value)
    return keys


def test_every_parameter_is_read(notebook):
    """A parameter nothing reads is a setting a user changes to no effect: each one is read by a later cell (or,
    through ``E.setup_from(P.values)``, by the run setup)."""
    path, nb = notebook
    params = _parameters_cells(nb)[0]
    declared = [s.target.id for s in ast.parse(params.source).body]
    later = [c for c in nb.cells if c.cell_type == "code" and c is not params]
    used = set().union(*(_read_keys(ast.parse(_without_magics(c.source))) for c in later))
    if any("resolve(" in c.source for c in later):
        used.add("profile")  # resolve() reads the profile itself
    if any("setup_from(P.values)" in c.source for c in later):
        used |= _read_keys(_function("setup_from"))
    if any(f'notebook_specs("{path.stem}", P.values)' in c.source for c in later):
        used |= _specs_branch_keys(path.stem)
    unread = [name for name in declared if name not in used]
    assert not unread, f"{path.name}: parameter(s) {', '.join(unread)} declared but never read"


def _without_magics(source: str) -> str:
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())


def _function(name: str) -> ast.FunctionDef:
    import inspect

    from mass_dpo.experiments import runner

    return ast.parse(inspect.getsource(getattr(runner, name))).body[0]


def _specs_branch_keys(stem: str) -> set[str]:
    """The keys ``runner.notebook_specs`` reads for notebook ``stem``: its preamble and the branch that names it."""
    keys = set()
    for stmt in _function("notebook_specs").body:
        if not isinstance(stmt, ast.If):
            keys |= _read_keys(stmt)
            continue
        test = stmt.test  # name == "x" or name in ("x", "y")
        names = {n.value for n in ast.walk(test.comparators[0]) if isinstance(n, ast.Constant)}
        if stem in names:
            keys |= set().union(*(_read_keys(b) for b in stmt.body))
    return keys
