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
    for model in ([values["model"]] if values.get("model") else []) + list(values.get("models") or []):
        check_model(model)
    return Resolved(name, profile, values, sources)


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
