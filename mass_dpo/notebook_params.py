"""Notebook parameters that take effect: a parameter left at ``None`` comes from the profile, one given wins.

Each notebook declares its parameters in its one cell tagged ``parameters`` (papermill's). The profile-driven ones
(model, models, regime, datasets, data_dir, seeds, train/eval/test_limit and any notebook-specific key a profile
sets) default to ``None`` there; the setup cell calls :func:`resolve`, which fills every ``None`` from the profile
and keeps every value given with ``papermill -p`` (or edited in the cell):

    P = resolve("table1", globals())     # only the names the parameters cell declares are read
    print(P.describe())                  # one line: every effective value and where it came from
    setup = E.setup_from(P.values)

The values of notebook ``name`` under profile ``p`` (:func:`profile_values`), later layers winning:

1. ``params/<name>.yaml`` ``profiles.<p>``, where the notebook has such a file (``toy_loglinear``);
2. ``params/profiles/<p>.yaml`` ``common``;
3. ``params/profiles/<p>.yaml`` ``notebooks.<name>``.

``profile="auto"`` (the notebooks' default) is ``paper`` where CUDA is available, else ``cpu``: on a GPU node
``papermill notebooks/table1.ipynb out.ipynb -p model llama3`` runs the paper's setting. A ``model`` given while
``models`` is left at ``None`` runs that one model (not the profile's list).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .params import check_model, load_params, params_dir

#: The ``profile`` value that picks ``paper`` where CUDA is available, else ``cpu``.
AUTO = "auto"
GIVEN = "-p / given"
DEFAULT = "notebook default"


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def auto_profile() -> str:
    """``"paper"`` where ``torch.cuda.is_available()``, else ``"cpu"``."""
    import torch

    return "paper" if torch.cuda.is_available() else "cpu"


def notebook_path(name: str | Path) -> Path:
    """``notebooks/<name>.ipynb`` of the repository, or ``name`` itself when it is a path to an ``.ipynb`` file."""
    path = Path(name)
    return path if path.suffix == ".ipynb" else repo_root() / "notebooks" / f"{name}.ipynb"


def notebook_defaults(name: str | Path) -> dict[str, Any]:
    """The parameters cell of a notebook as ``{name: default}`` (``{}`` when there is no such notebook)."""
    import ast

    path = notebook_path(name)
    if not path.is_file():
        return {}
    nb = json.loads(path.read_text())
    cells = [c for c in nb.get("cells", []) if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{path}: {len(cells)} cells tagged 'parameters' (a notebook needs exactly one)")
    source = cells[0]["source"]
    source = "".join(source) if isinstance(source, list) else source
    out = {}
    for stmt in ast.parse(source).body:
        target = stmt.target if isinstance(stmt, ast.AnnAssign) else (stmt.targets[0] if isinstance(stmt, ast.Assign)
                                                                         else None)
        if target is None or stmt.value is None:
            raise ValueError(f"{path}: parameters cell line {stmt.lineno} is not 'name: type = value  # comment'")
        out[target.id] = ast.literal_eval(stmt.value)
    return out


def profile_values(profile: str, name: str) -> dict[str, Any]:
    """Every value profile ``profile`` sets for notebook ``name`` (the three layers of the module docstring).

    The ``profile`` key of a profile file is not a value (the profile's name is)."""
    out: dict[str, Any] = {}
    own = params_dir() / f"{name}.yaml"
    if own.is_file():
        out.update(((load_params(name).get("profiles") or {}).get(profile)) or {})
    spec = load_params(f"profiles/{profile}")
    out.update(spec.get("common") or {})
    out.update((spec.get("notebooks") or {}).get(name) or {})
    out.pop("profile", None)
    return out


@dataclass
class Resolved:
    """The effective parameters of a notebook: ``values[k]`` and where each came from, ``sources[k]``
    (``"-p / given"``, ``"profile <name>"``, ``"notebook default"``; for ``profile``: ``"auto: ..."`` too)."""

    name: str
    profile: str
    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """One line: the notebook, its profile, then every value grouped by where it came from."""
        groups: dict[str, list[str]] = {}
        for key, value in self.values.items():
            if key != "profile":
                groups.setdefault(self.sources[key], []).append(f"{key}={value!r}")
        parts = [f"{self.name}: profile {self.profile} ({self.sources.get('profile', DEFAULT)})"]
        parts += [f"{source}: {', '.join(items)}" for source, items in sorted(groups.items(), key=_source_order)]
        return " | ".join(parts)


def _source_order(item) -> int:
    source = item[0]
    return 0 if source.startswith(GIVEN) else 2 if source == DEFAULT else 1


def resolve(name: str, given: dict[str, Any], *, defaults: dict[str, Any] | None = None) -> Resolved:
    """The effective parameters of notebook ``name``.

    Args:
        name: the notebook (``table1``, ``toy_loglinear``, ...); its parameters cell gives the names and defaults.
        given: the values the notebook runs with (``globals()`` is fine: names the cell does not declare are
            ignored). ``None`` means "the profile's value"; anything else wins (``-p``). A value equal to the
            cell's default is reported as the notebook default.
        defaults: the parameters cell as ``{name: default}`` (default: read from ``notebooks/<name>.ipynb``; where
            there is no such notebook, every key of ``given`` is a parameter).

    Returns:
        :class:`Resolved` with every declared parameter; ``values["profile"]`` is the profile actually used.
    """
    defaults = notebook_defaults(name) if defaults is None else dict(defaults)
    declared = list(defaults) or list(given)
    if "profile" not in declared:
        declared.insert(0, "profile")
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in declared:
        value = given[key] if key in given else defaults.get(key)
        values[key] = value
        sources[key] = DEFAULT if (key not in given or (key in defaults and value == defaults[key])) else GIVEN

    requested = values["profile"] or AUTO
    if requested == AUTO:
        import torch

        profile = auto_profile()
        sources["profile"] = "auto: " + ("CUDA available" if torch.cuda.is_available() else "no CUDA")
    else:
        profile = str(requested)
    values["profile"] = profile
    if "models" in declared and values["models"] is None and sources.get("model") == GIVEN:
        values["models"], sources["models"] = [values["model"]], f"{GIVEN} (model)"  # not the profile's list
    from_profile = profile_values(profile, name)
    for key in declared:
        expects_list = isinstance(defaults.get(key), list) or isinstance(from_profile.get(key), list)
        if expects_list and isinstance(values[key], str):
            text = values[key].strip()
            shown = text if text.startswith("[") else f"[{text}]"
            raise ValueError(
                f"parameter {key} of {name} is a list, got the string {values[key]!r} (papermill's -p passes text): "
                f"give it with -y, e.g. papermill notebooks/{name}.ipynb out.ipynb -y '{key}: {shown}'")
        if values[key] is None and key in from_profile:
            values[key], sources[key] = from_profile[key], f"profile {profile}"
    expected = {k: defaults[k] if defaults.get(k) is not None else from_profile.get(k) for k in declared}
    check_parameters(name, values, expected, given if defaults else None)
    for model in ([values["model"]] if values.get("model") else []) + list(values.get("models") or []):
        check_model(model)
    return Resolved(name, profile, values, sources)


#: Integer parameters that may be 0 (seeds, a count where 0 means none, an index); every other integer is >= 1.
MAY_BE_ZERO = {"seed", "seeds", "eval_limit", "example"}
#: Number parameters that must be > 0 (every other number: finite and >= 0).
POSITIVE = {"beta", "betas", "gamma", "tol", "sweep_gram_scales"}
#: The first line of the cell papermill injects after the parameters cell (its ``PythonTranslator``).
INJECTED_HEADER = "# Parameters\n"


def _injected_names(given: dict[str, Any]) -> list[str]:
    """The names papermill assigned in its injected cell, read from the kernel's input history (``In``): a name
    there that the parameters cell does not declare was a typo on the command line (papermill only warns)."""
    import ast

    names: list[str] = []
    for source in given.get("In") or []:
        if isinstance(source, str) and source.startswith(INJECTED_HEADER):
            for stmt in ast.parse(source).body:
                if isinstance(stmt, ast.Assign):
                    names += [t.id for t in stmt.targets if isinstance(t, ast.Name)]
    return list(dict.fromkeys(names))


def _choices() -> dict[str, tuple[str, ...]]:
    """The values a parameter of names (or a list of them) may hold."""
    from .config import REGIMES
    from .experiments.ablations import LABEL_BLIND
    from .extraction import SELECTION_SCORES
    from .losses import METHODS

    return {"methods": METHODS, "readings": SELECTION_SCORES, "label_blind": LABEL_BLIND, "regime": REGIMES}


def _kind_error(key: str, value: Any, like: Any, name: str) -> str | None:
    """Why ``value`` cannot be parameter ``key`` whose values look like ``like`` (its default or the profile's),
    or ``None`` when it can."""
    if isinstance(like, bool):
        return None if isinstance(value, bool) else f"must be True or False, got {value!r}"
    if isinstance(like, int):
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be an integer, got {value!r}"
        low = 0 if key in MAY_BE_ZERO else 1
        return None if value >= low else f"must be >= {low}, got {value}"
    if isinstance(like, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        if key in POSITIVE:
            return None if value > 0 else f"must be > 0, got {value}"
        return None if value >= 0 else f"must be >= 0, got {value}"
    if isinstance(like, str):
        if not (isinstance(value, str) and value.strip()):
            return f"must be a non-empty name or path, got {value!r}"
        choices = _choices().get(key)
        return None if not choices or value in choices else f"must be one of {', '.join(choices)}, got {value!r}"
    if isinstance(like, list):
        if not isinstance(value, (list, tuple)):
            return (f"is a list, got {value!r}: give it with -y, e.g. papermill notebooks/{name}.ipynb out.ipynb "
                    f"-y '{key}: [{value}]'")
        if not value:
            return "is an empty list: give at least one value, or leave it out for the default"
        choices = _choices().get(key)
        for item in value:
            if choices and item not in choices:
                return f"holds {item!r}, not one of {', '.join(choices)}"
            why = None if choices or not like else _kind_error(key, item, like[0], name)
            if why:
                return f"holds {item!r}: each {why}"
    return None


def check_parameters(name: str, values: dict[str, Any], expected: dict[str, Any],
                     given: dict[str, Any] | None = None) -> None:
    """A ``ValueError`` of one line naming the first bad parameter of notebook ``name`` and the fix, before any
    work: a value of another kind than ``expected[key]`` (the parameters cell's default, else the profile's value:
    an integer, a finite number, a name, a non-empty list of those), a count < 1 (a seed or a count in
    :data:`MAY_BE_ZERO` < 0), a number < 0 (one in :data:`POSITIVE` <= 0), a method, reading or label-blind strategy
    that does not exist, a ``data_dir`` that is not a folder; and, with ``given`` (the notebook's ``globals()``), a
    name papermill injected that the parameters cell does not declare (:func:`_injected_names`; papermill only
    warns). Other globals are never read: a setup cell run again in JupyterLab sees the later cells' variables."""
    for key, value in values.items():
        like = expected.get(key)
        if value is None or like is None:
            continue
        why = _kind_error(key, value, like, name)
        if why:
            raise ValueError(f"parameter {key} of {name} {why}")
    folder = values.get("data_dir")
    if isinstance(folder, str) and folder != "samples" and not Path(folder).expanduser().is_dir():
        raise ValueError(f"parameter data_dir of {name}: no folder {folder}; give a folder holding the benchmarks "
                         "(docs/data.md), or 'samples' for the shipped samples")
    if given is not None:
        unknown = [k for k in _injected_names(given) if k not in values]
        if unknown:
            raise ValueError(f"{name} has no parameter {unknown[0]!r} (its parameters: {', '.join(values)}); "
                             "check the name given with -p / -y")


def check_notebook(name: str, given: dict[str, Any]) -> None:
    """:func:`check_parameters` for a notebook that does not :func:`resolve` (its parameters cell holds every
    value): ``check_notebook("toy_loglinear", globals())`` first thing in its setup cell."""
    defaults = notebook_defaults(name)
    check_parameters(name, {k: given.get(k, v) for k, v in defaults.items()}, defaults, given)


def papermill_parameters(name: str | Path, profile: str) -> dict[str, Any]:
    """What ``mass-dpo reproduce --profile <profile>`` passes to a notebook: ``profile`` (the notebook resolves the
    rest itself), plus the profile's value of any parameter the notebook declares with a default other than
    ``None`` (a notebook that does not resolve that parameter; none of the paper notebooks has one)."""
    defaults = notebook_defaults(name)
    params = {"profile": profile} if "profile" in defaults else {}
    for key, value in profile_values(profile, Path(name).stem).items():
        if key in defaults and defaults[key] is not None:
            params[key] = value
    return params
