"""Where the YAML parameter files live and how to read them.

``params/`` (top level of the repository) says *what* to run: datasets, models, training defaults, profiles,
the paper's published numbers. Code says *how*. Set ``MASS_DPO_PARAMS`` to use another folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml


def params_dir() -> Path:
    """The params folder: ``$MASS_DPO_PARAMS``, else ``params/`` beside the package (an editable install)."""
    env = os.environ.get("MASS_DPO_PARAMS")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "params"
    if not path.is_dir():
        raise FileNotFoundError(
            f"params folder not found at {path}; install the package editable from a checkout (pip install -e .) "
            "or point MASS_DPO_PARAMS at a copy of the repository's params/ folder"
        )
    return path


def load_params(relative: str) -> dict[str, Any]:
    """Read ``params/<relative>`` (``.yaml`` added when missing), e.g. ``load_params("models/smollm2")``."""
    path = params_dir() / relative
    if path.suffix not in (".yaml", ".yml"):
        path = path.with_suffix(".yaml")
    if not path.is_file():
        choices = sorted(p.stem for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        raise FileNotFoundError(f"no params file {path}" + (f"; available: {', '.join(choices)}" if choices else ""))
    with open(path) as f:
        return yaml.safe_load(f) or {}


def available(kind: str) -> list[str]:
    """Names of the YAML files in ``params/<kind>/`` (e.g. ``available("models")``)."""
    folder = params_dir() / kind
    return sorted(p.stem for p in folder.glob("*.yaml"))


def saved_model_folder(name) -> Path | None:
    """``name`` as a folder saved with ``save_pretrained`` (it holds ``config.json``), else ``None``."""
    path = Path(str(name)).expanduser()
    return path if path.is_dir() and (path / "config.json").is_file() else None


def has_weights(folder: Path) -> bool:
    """True when a saved model folder holds weights: ``*.safetensors`` / ``*.bin`` files or a shard index."""
    return any(f.suffix in (".safetensors", ".bin") or f.name.endswith(".index.json") for f in folder.iterdir())


def check_model(name) -> None:
    """Raise a ``ValueError`` naming the choices unless ``name`` is a ``params/models/*.yaml`` name or a folder saved
    with ``save_pretrained``: the one check of the CLI, the notebooks' parameters and :func:`mass_dpo.models.load_model`."""
    if name in available("models"):
        return
    folder = saved_model_folder(name)
    if folder is not None:
        if not has_weights(folder):
            raise ValueError(f"model folder {folder} has a config.json but no weights (model.safetensors or "
                             "pytorch_model.bin, possibly sharded): give a folder saved with save_pretrained")
        return
    raise ValueError(f"unknown model {name!r}: choose one of {', '.join(available('models'))} (params/models/*.yaml) "
                     "or give a folder saved with save_pretrained (a folder holding config.json)")


def cache_root() -> Path:
    """Where models, features, data and runs are cached: ``$MASS_DPO_CACHE``, else ``$XDG_CACHE_HOME/mass_dpo``,
    else ``~/.cache/mass_dpo``."""
    env = os.environ.get("MASS_DPO_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mass_dpo"
