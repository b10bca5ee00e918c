"""Execute notebooks/toy_loglinear.ipynb with papermill at the tiny "smoke" parameters and check its CSVs."""

import ast
import math
import os
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from mass_dpo import toy
from mass_dpo.params import load_params

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "toy_loglinear.ipynb"
FIGURES = ("erel_vs_n", "leverage_vs_n", "sigma_error_vs_k", "greedy_vs_exact", "cluster_coverage",
           "erel_true_vs_n", "test_accuracy_vs_n", "regime_top_gii", "regime_map")
TABLES = ("erel_slopes", "leverage_constants", "toy_summary", "dopt_paired_differences", "label_blind_vs_random",
          "regime_paired_differences")
METHODS = [toy.method_label(s, c) for s, c in toy.METHODS]


def _defaults() -> dict:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    return {s.target.id: ast.literal_eval(s.value) for s in ast.parse(cell.source).body}


def test_cpu_profile_matches_the_notebook_defaults():
    assert load_params("toy_loglinear")["profiles"]["cpu"] == _defaults()


def _execute(tmp: Path, name: str, params: dict) -> None:
    """Run the notebook with its fit cache in ``tmp/cache`` (the kernel inherits the environment)."""
    import papermill
    previous = os.environ.get("MASS_DPO_CACHE")
    os.environ["MASS_DPO_CACHE"] = str(tmp / "cache")
    try:
        papermill.execute_notebook(str(NOTEBOOK), str(tmp / f"{name}.ipynb"), parameters=params,
                                   kernel_name="python3", cwd=str(tmp), progress_bar=False)
    finally:
        if previous is None:
            os.environ.pop("MASS_DPO_CACHE")
        else:
            os.environ["MASS_DPO_CACHE"] = previous


def _printed(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toy")
    params = dict(load_params("toy_loglinear")["profiles"]["smoke"], out_dir=str(tmp / "out"))
    _execute(tmp, "executed", params)
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
    assert sorted(erel["method"].unique()) == sorted(METHODS)  # label-blind on every per-method figure
    for name in ("erel_true_vs_n", "test_accuracy_vs_n", "leverage_vs_n", "sigma_error_vs_k", "greedy_vs_exact"):
        assert set(METHODS) <= set(pd.read_csv(out / f"{name}.csv")["method"]), name
    frac = pd.read_csv(out / "greedy_vs_exact.csv")
    assert (frac["mean"] <= 1 + 1e-9).all()


@pytest.mark.slow
def test_every_strategy_has_zero_erel_once_the_subset_is_the_pool(executed):
    tmp, params = executed
    erel = pd.read_csv(tmp / "out" / "erel_vs_n.csv")
    full = erel[erel["n"] == params["pool_size"]]
    assert len(full) == len(METHODS) * len(params["shapes"]) * len(params["theta0_kinds"])
    assert (full["mean"].abs() < 1e-6).all() and (full["hi"].abs() < 1e-6).all()
    below = erel[erel["n"] < params["pool_size"]]
    assert (below["mean"] > 1e-6).all()  # and not everywhere: the subsets do differ from the pool
    fits = pd.read_csv(tmp / "out" / "records_fits.csv")
    assert fits["converged"].all()


@pytest.mark.slow
def test_regime_sweep_covers_every_cell_and_the_map_marks_significance(executed):
    tmp, params = executed
    out = tmp / "out"
    rec = pd.read_csv(out / "records_regime.csv")
    cells = len(params["sweep_shapes"]) * len(params["sweep_gram_scales"]) * len(params["sweep_dims"])
    assert len(rec) == cells * params["sweep_num_seeds"] * 3
    assert set(rec["method"]) == {"D-optimal (centred)", "label-blind D-optimal", "random"}
    assert set(rec["d"]) == set(params["sweep_dims"]) and set(rec["gram_scale"]) == set(params["sweep_gram_scales"])
    assert rec["same_as_top_gii"].between(0, 1).all() and rec["converged"].all()
    # on isotropic pools the measured median G_ii follows the requested expectation (the median of a chi-square
    # with d degrees of freedom lies a little below its mean)
    iso = rec[rec["shape"] == "isotropic"]
    ratio = iso["gii_median"] / iso["gram_scale"]
    assert ratio.between(0.5, 1.5).all(), ratio.describe()
    cmp = pd.read_csv(out / "regime_map.csv")
    assert len(cmp) == cells * 2 * 2  # (D-optimal, label-blind) x (test accuracy, E_rel vs theta_true)
    sig = (cmp["lo"] > 0) | (cmp["hi"] < 0)
    assert (cmp["significant"] == sig).all()
    text = _printed(tmp / "executed.ipynb")
    assert "Label-blind selection" in text and "close" in text and "Top-n by G_ii" in text


@pytest.mark.slow
def test_a_second_run_reads_the_cache_and_gives_the_same_records(executed):
    tmp, params = executed
    files = sorted((tmp / "cache" / "toy").glob("*.json"))
    assert files and not list((tmp / "cache" / "toy").glob("*.tmp"))
    stamps = {f: f.stat().st_mtime_ns for f in files}
    names = ("records_n", "records_k", "records_exact", "records_regime", "regime_map", "toy_summary")
    cold = {name: (tmp / "out" / f"{name}.csv").read_bytes() for name in names}
    _execute(tmp, "warm", params)  # into the same out_dir, as a warm `mass-dpo reproduce` (no figure redrawn)
    assert {f: f.stat().st_mtime_ns for f in files} == stamps  # read, never rewritten
    assert sorted((tmp / "cache" / "toy").glob("*.json")) == files
    for name in names:
        assert (tmp / "out" / f"{name}.csv").read_bytes() == cold[name], name
