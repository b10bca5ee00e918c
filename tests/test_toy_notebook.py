"""Execute notebooks/toy_loglinear.ipynb with papermill at the tiny "smoke" parameters and check its CSVs."""

import ast
import math
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from mass_dpo.params import load_params

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "toy_loglinear.ipynb"
FIGURES = ("erel_vs_n", "leverage_vs_n", "sigma_error_vs_k", "greedy_vs_exact", "cluster_coverage",
           "erel_true_vs_n", "test_accuracy_vs_n")
TABLES = ("erel_slopes", "leverage_constants", "toy_summary", "dopt_paired_differences")


def _defaults() -> dict:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    return {s.target.id: ast.literal_eval(s.value) for s in ast.parse(cell.source).body}


def test_cpu_profile_matches_the_notebook_defaults():
    assert load_params("toy_loglinear")["profiles"]["cpu"] == _defaults()


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    papermill = pytest.importorskip("papermill")
    tmp = tmp_path_factory.mktemp("toy")
    params = dict(load_params("toy_loglinear")["profiles"]["smoke"], out_dir=str(tmp / "out"))
    papermill.execute_notebook(str(NOTEBOOK), str(tmp / "executed.ipynb"), parameters=params,
                               kernel_name="python3", cwd=str(tmp), progress_bar=False)
    return tmp, params


@pytest.mark.slow
def test_notebook_writes_every_figure_and_table(executed):
    tmp, _ = executed
    out = tmp / "out"
    for name in FIGURES:
        for ext in ("pdf", "png", "csv"):
            assert (out / f"{name}.{ext}").stat().st_size > 0, f"{name}.{ext}"
    for name in TABLES:
        for ext in ("csv", "md", "tex"):
            assert (out / f"{name}.{ext}").is_file(), f"{name}.{ext}"
    nb = nbformat.read(tmp / "executed.ipynb", as_version=4)
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= len(FIGURES), "figures must also display inline"


@pytest.mark.slow
def test_figure_csvs_have_finite_values_and_expected_columns(executed):
    tmp, params = executed
    out = tmp / "out"
    summary_cols = {"mean", "lo", "hi", "count"}
    expected = {
        "erel_vs_n": {"theta0", "shape", "method", "n"},
        "erel_true_vs_n": {"theta0", "shape", "method", "n"},
        "test_accuracy_vs_n": {"theta0", "shape", "method", "n"},
        "leverage_vs_n": {"theta0", "shape", "method", "n", "quantity"},
        "sigma_error_vs_k": {"panel", "method", "k", "target"},
        "greedy_vs_exact": {"criterion", "panel", "method", "n"},
        "cluster_coverage": {"theta0", "method", "n"},
    }
    for name, cols in expected.items():
        df = pd.read_csv(out / f"{name}.csv")
        assert (cols | summary_cols) <= set(df.columns), name
        assert len(df) > 0 and df[["mean", "lo", "hi"]].notna().all().all(), name
        assert all(math.isfinite(v) for v in df[["mean", "lo", "hi"]].to_numpy().ravel()), name
    erel = pd.read_csv(out / "erel_vs_n.csv")
    assert set(erel["theta0"]) == set(params["theta0_kinds"]) and set(erel["shape"]) == set(params["shapes"])
    assert erel["method"].nunique() == 4
    frac = pd.read_csv(out / "greedy_vs_exact.csv")
    assert (frac["mean"] <= 1 + 1e-9).all()


@pytest.mark.slow
def test_every_strategy_has_zero_erel_once_the_subset_is_the_pool(executed):
    tmp, params = executed
    erel = pd.read_csv(tmp / "out" / "erel_vs_n.csv")
    full = erel[erel["n"] == params["pool_size"]]
    assert len(full) == 4 * len(params["shapes"]) * len(params["theta0_kinds"])
    assert (full["mean"].abs() < 1e-6).all() and (full["hi"].abs() < 1e-6).all()
    below = erel[erel["n"] < params["pool_size"]]
    assert (below["mean"] > 1e-6).all()  # and not everywhere: the subsets do differ from the pool
    fits = pd.read_csv(tmp / "out" / "records_fits.csv")
    assert fits["converged"].all()
