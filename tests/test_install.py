"""A non-editable install works: a wheel built from the checkout, installed into a fresh virtual environment, runs
``mass-dpo select`` on the quickstart file with its own copy of ``params/`` (package data, ``mass_dpo/_params``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from mass_dpo.params import checkout_params, packaged_params, params_dir

REPO = Path(__file__).resolve().parents[1]
#: What a build reads from the checkout (copied, so that building leaves nothing in the repository).
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "mass_dpo", "params")


def _run(argv, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, argv))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_checkout_params_preferred_and_a_bad_override_named(monkeypatch, tmp_path):
    monkeypatch.delenv("MASS_DPO_PARAMS", raising=False)
    assert params_dir() == checkout_params() == REPO / "params"
    assert packaged_params() is None  # an editable install carries no copy: the checkout's folder is the one read
    monkeypatch.setenv("MASS_DPO_PARAMS", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="MASS_DPO_PARAMS=.*absent is not a folder"):
        params_dir()


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_runs_select(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy2)(
            REPO / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if (REPO / name).is_dir() else {}))
    # the build backend of this environment (setuptools comes with torch), so that no index is needed
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist", src])
    wheel = next((tmp_path / "dist").glob("mass_dpo-*.whl"))

    # a fresh venv that sees this environment's dependencies (torch, transformers, ...) but not the checkout
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv])
    py = venv / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "_test_deps.pth").write_text("".join(f"{p}\n" for p in deps))
    _run([py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel])

    work = tmp_path / "work"  # run outside the checkout
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("MASS_DPO_PARAMS", "PYTHONPATH")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    where = _run([py, "-c", "import mass_dpo, mass_dpo.params as p; print(mass_dpo.__file__); print(p.params_dir())"],
                 cwd=work, env=env).stdout.split()
    assert Path(where[0]).is_relative_to(venv) and Path(where[1]) == Path(where[0]).parent / "_params"
    assert sorted(p.relative_to(where[1]).as_posix() for p in Path(where[1]).rglob("*") if p.is_file()) == sorted(
        p.relative_to(REPO / "params").as_posix() for p in (REPO / "params").rglob("*") if p.is_file())

    data = shutil.copy(REPO / "notebooks" / "data" / "quickstart_preferences.jsonl", work / "prefs.jsonl")
    out = work / "picked.jsonl"
    proc = _run([venv / "bin" / "mass-dpo", "select", "--data", data, "--model", "tiny", "--n", "2", "--out", out,
                 "--no-cache", "--no-progress"], cwd=work, env=env)
    assert f"wrote {out} (96 pairs)" in proc.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    source = [json.loads(line) for line in Path(data).read_text().splitlines()]
    assert len(rows) == 2 * len(source) == 96
    by_id = {r["id"]: r for r in source}
    for row in rows:
        assert row["prompt"] == by_id[row["id"]]["prompt"] and row["rejected"] in by_id[row["id"]]["rejected"]

    # reproduce needs the notebooks of a checkout: one line saying so, status 2
    proc = subprocess.run([venv / "bin" / "mass-dpo", "reproduce", "--only", "table1"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "runs the notebooks of a checkout" in proc.stderr, proc.stderr[-2000:]


def test_reproduce_without_notebooks_says_it_needs_a_checkout(tmp_path):
    from mass_dpo.reproduce import reproduce

    with pytest.raises(FileNotFoundError, match="runs the notebooks of a checkout"):
        reproduce("smoke", notebooks_dir=tmp_path / "notebooks", out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written
