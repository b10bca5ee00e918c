"""The package's layers (README, "The shape"): each module imports only its own layer and those before it, found
statically from every import statement, the ones inside functions included; the core math imports torch and numpy
and nothing heavier."""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mass_dpo"

#: Layer of every module, lowest first. Utilities with no package imports (files, params, _checks) sit in the core.
LAYERS = {
    0: ["_checks", "files", "params", "selection", "losses", "metrics", "theory", "loglinear"],
    1: ["data", "data.benchmarks", "data.formatting", "data.lastfm", "data.medmcqa", "data.movielens",
        "data.preferences", "data.qasc", "data.records", "models", "generation", "tuning", "plotting"],
    2: ["forward", "extraction", "config", "stability", "preprocess", "diagnostics"],
    3: ["training", "frozen", "evaluation", "runs", "records"],
    4: ["", "cli", "train", "reproduce", "notebook_params", "toy", "experiments", "experiments.__main__",
        "experiments.ablations", "experiments.core", "experiments.cost", "experiments.gallery",
        "experiments.main_comparison", "experiments.quickstart", "experiments.quotes", "experiments.runner",
        "experiments.stability"],
}
LAYER = {name: level for level, names in LAYERS.items() for name in names}
#: The subcommands (`select` in preprocess, `runs` in records) parse their options beside their library function,
#: with the CLI's argument types and error class, imported inside those functions.
CLI_HELPERS = {"UsageError", "positive_int", "positive_float", "check_model", "path_text"}
#: The core math, and what it may import besides the standard library and the package's core.
CORE_MATH = {"_checks", "selection", "losses", "metrics", "theory", "loglinear"}
CORE_THIRD_PARTY = {"torch", "numpy"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path):
    """``(imported module relative to mass_dpo or None, top-level third-party name or None, names, line)``."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            target = ".".join([p for p in base if p] + ([node.module] if node.module else []))
            names = [a.name for a in node.names]
            if node.module is None or target in ("", "data", "experiments"):  # `from . import x`: x may be a module
                for a in names:
                    sub = f"{target}.{a}" if target else a
                    yield (sub if sub in _modules() else target), None, [a], node.lineno
            else:
                yield target, None, names, node.lineno
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for mod in mods:
                if mod == "mass_dpo" or mod.startswith("mass_dpo."):
                    yield mod.removeprefix("mass_dpo").lstrip("."), None, [], node.lineno
                else:
                    yield None, mod.split(".")[0], [], node.lineno


def test_every_module_has_a_layer():
    assert set(_modules()) == set(LAYER), set(_modules()) ^ set(LAYER)


@pytest.mark.parametrize("name", sorted(LAYER))
def test_a_module_imports_only_its_layer_and_those_before_it(name):
    path = _modules()[name]
    wrong = []
    for target, third_party, names, line in _imports(name, path):
        if target is None:
            if name in CORE_MATH and third_party not in CORE_THIRD_PARTY | set(sys.stdlib_module_names):
                wrong.append(f"line {line}: core math imports {third_party}")
            continue
        if target == "cli" and set(names) <= CLI_HELPERS:
            continue
        if LAYER.get(target, -1) > LAYER[name]:
            wrong.append(f"line {line}: {target or 'mass_dpo'} (layer {LAYER[target]}) from layer {LAYER[name]}")
    assert not wrong, f"{name}: " + "; ".join(wrong)


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The rule can fail: a core module that imports the training layer, or transformers, is named."""
    bad = tmp_path / "selection.py"
    bad.write_text("import transformers\n\ndef f():\n    from .training import PreferenceDataset\n")
    monkeypatch.setitem(globals(), "_modules", lambda: {**_modules_real(), "selection": bad})
    with pytest.raises(AssertionError, match=r"line 1: core math imports transformers; line 4: training \(layer 3\)"):
        test_a_module_imports_only_its_layer_and_those_before_it("selection")


_modules_real = _modules
