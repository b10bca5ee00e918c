"""The logic the notebooks call instead of computing it in a cell (Tables 3, 7 and 8, Figures 2-3, the toy model):
each function on a small hand-built DataFrame, against values computed by hand."""

import importlib
import math
from types import SimpleNamespace

import matplotlib
import pandas as pd
import pytest

from mass_dpo import experiments as E, plotting, toy

matplotlib.use("Agg")
COST = importlib.import_module("mass_dpo.experiments.cost")  # the module (the package exports its functions)
T975_1 = 12.706  # Student's t, 97.5% quantile, 1 degree of freedom (two seeds)


# ---------------------------------------------------------------- Table 7


def _clock():
    """QASC: S-DPO asked for 19 negatives trained on the 7 its pools hold, MASS-DPO on 5; two seeds."""
    rows = []
    for seed, (sa, ia, sb, ib) in enumerate([(6.0, 12, 3.0, 10), (8.0, 16, 2.0, 10)]):
        rows += [{"model": "m", "dataset": "qasc", "seed": seed, "component": "fit_sdpo_7", "seconds": sa,
                  "iterations": ia, "seconds_per_iteration": sa / ia},
                 {"model": "m", "dataset": "qasc", "seed": seed, "component": "fit_mass_dpo_5", "seconds": sb,
                  "iterations": ib, "seconds_per_iteration": sb / ib}]
    rows += [{"model": "m", "dataset": "qasc", "seed": None, "component": c, "seconds": v}
             for c, v in (("extraction", 40.0), ("selection", 0.5), ("selection_total", 40.5))]
    return pd.DataFrame(rows)


def test_component_parts_invert_the_component_names():
    assert E.component_parts("fit_sdpo_7") == {"kind": "fit", "method": "sdpo", "n": 7}
    assert E.component_parts("refit_mass_dpo_5") == {"kind": "refit", "method": "mass_dpo", "n": 5}
    assert E.component_parts("train_epoch_sdpo_19") == {"kind": "train_epoch", "method": "sdpo", "n": 19}
    for other in ("extraction", "selection_total", "ratio_fit_sdpo_7_over_mass_dpo_5"):
        assert E.component_parts(other) is None


def test_wallclock_table_names_the_ratio_by_the_negatives_the_runs_trained_on():
    t = E.wallclock_table(_clock()).set_index("component")
    assert not any("19" in c for c in t.index)  # nothing is named after what S-DPO was asked for
    # per seed 6 / 3 = 2 and 8 / 2 = 4: mean 3, SE std([2, 4]) / sqrt(2) = 1
    assert t.loc["ratio_fit_sdpo_7_over_mass_dpo_5", "seconds"] == pytest.approx(3.0)
    assert t.loc["ratio_fit_sdpo_7_over_mass_dpo_5", "se"] == pytest.approx(1.0)
    # per iteration: 0.5 / 0.3 and 0.5 / 0.2 -> mean (5/3 + 5/2) / 2 = 25/12
    assert t.loc["ratio_fit_per_iteration_sdpo_7_over_mass_dpo_5", "seconds"] == pytest.approx(25 / 12)
    assert t.loc["fit_sdpo_7", "seconds"] == pytest.approx(7.0) and t.loc["fit_sdpo_7", "se"] == pytest.approx(1.0)
    # the paper's minutes by method (its rows are named after its own 19 and 5), and the paper's ratio beside ours
    assert t.loc["fit_sdpo_7", "paper_minutes"] == 612.6 and t.loc["fit_mass_dpo_5", "paper_minutes"] == 331.2
    assert t.loc["ratio_fit_sdpo_7_over_mass_dpo_5", "paper_minutes"] == pytest.approx(612.6 / 331.2)
    assert t.loc["selection", "paper_minutes"] == 3.5 and t.loc["selection_total", "paper_minutes"] == 45.5


def test_wallclock_table_keeps_its_columns_when_no_dataset_ran():
    t = E.wallclock_table(pd.DataFrame())
    assert list(t.columns) == E.TABLE7_COLUMNS and t.empty
    assert E.wallclock_parts(t).empty and E.wallclock_sentences(t) == []
    assert E.wallclock_negatives(t) == "No wall-clock rows: no dataset ran."


def test_wallclock_parts_drop_the_ratios_and_the_total():
    parts = E.wallclock_parts(E.wallclock_table(_clock()))
    assert list(parts["component"]) == ["fit_sdpo_7", "fit_mass_dpo_5", "extraction", "selection"]


def test_wallclock_sentences_name_the_trained_negatives_and_read_the_paper_from_its_table():
    t = E.wallclock_table(_clock())
    line, = E.wallclock_sentences(t)
    # 100 * 0.5 / 40.5 = 1.23% of the one-time cost; the paper: 3.5 of 45.5 minutes
    assert "extraction 40.0 s and Algorithm 1 0.500 s (selection is 1.23% of the one-time cost; paper 3.5 of 45.5 min)" in line
    assert ("recorded fit: S-DPO-7 7.00 s, MASS-DPO-5 2.50 s after 14 and 10 L-BFGS iterations, ratio 3.00, "
            "per iteration 2.08 (the paper's per-epoch GPU ratio 1.85 is not comparable)") in line
    exact = E.wallclock_sentences(t, exact=True)
    assert len(exact) == 2 and "their ratio 1.85 are not comparable" in exact[-1]
    assert E.wallclock_sentences(t, exact=False)[-1] == "Training rows are seconds per Trainer epoch, the paper's unit."
    assert E.paper_epochs() == {"mass_dpo": 331.2, "sdpo": 612.6, "ratio": pytest.approx(612.6 / 331.2)}
    assert E.wallclock_negatives(t) == ("Negatives per prompt each method trained on (its resolved n, capped at the "
                                        "pools): qasc: S-DPO 7, MASS-DPO 5.")


def test_trained_negatives_caps_the_resolved_n_at_the_largest_pool(monkeypatch):
    import mass_dpo.data

    pools = [{"candidates": list(range(8))}, {"candidates": list(range(5))}]  # 7 and 4 negatives
    monkeypatch.setattr(mass_dpo.data, "load_benchmark", lambda *a, **k: pools)

    def config(method, n, strategy="random"):
        return SimpleNamespace(method=method, n=n, strategy=strategy, dataset="qasc", data_dir="samples", limit=2,
                               subsample_seed=0)

    for cfg, expected in ((config("sdpo", 19), 7), (config("mass_dpo", 5, "dopt"), 5), (config("dpo", 3), 1),
                          (config("sdpo", 3, "all"), 7)):
        monkeypatch.setattr(COST, "config_of", lambda run, cfg=cfg: cfg)
        assert E.trained_negatives("run") == expected


def test_refit_timings_kept_under_the_configuration_n_are_renamed_by_the_trained_negatives(monkeypatch):
    import mass_dpo.files

    runs = pd.DataFrame([{"model": "m", "dataset": "qasc", "seed": 0, "run_dir": "/runs/a", "method": "sdpo", "n": 19},
                         {"model": "m", "dataset": "qasc", "seed": 0, "run_dir": "/runs/b", "method": "mass_dpo",
                          "n": 5}])
    kept = [{"model": "m", "dataset": "qasc", "seed": 0, "component": "refit_sdpo_19", "seconds": 2.0},
            {"model": "m", "dataset": "qasc", "seed": 0, "component": "refit_mass_dpo_5", "seconds": 1.0}]
    monkeypatch.setattr(COST, "trained_negatives", lambda r: 7 if r.method == "sdpo" else int(r.n))
    monkeypatch.setattr(mass_dpo.files, "compute_once", lambda *a, **k: kept)  # a timing kept by an earlier run
    rows = E.refit_timing(runs, repeats=1)
    assert [(r["component"], r["seconds"]) for r in rows] == [("refit_sdpo_7", 2.0), ("refit_mass_dpo_5", 1.0)]
    assert E.refit_timing(pd.DataFrame(), repeats=1) == []  # no dataset ran


# ---------------------------------------------------------------- Table 8


def _pairs():
    return pd.DataFrame({"setting": ["converged", "converged", "iterations 10/5"], "dataset": ["qasc"] * 3,
                         "metric": ["mrr", "accuracy", "mrr"], "diff": [0.1, -0.2, 0.05],
                         "significant": [True, True, False]})


def test_significance_sentence_counts_each_side():
    assert E.significance_sentence(_pairs()) == ("2 of 3 (setting, dataset, metric) differences exclude 0 "
                                                 "(1 for MASS-DPO, 1 for S-DPO-all).")
    assert E.significance_sentence(pd.DataFrame()) == "No MASS-DPO / S-DPO-all pairs."
    # matched_sentences closes with it, also without a summary
    assert E.matched_sentences(pd.DataFrame(), _pairs()) == [E.significance_sentence(_pairs())]
    assert E.matched_sentences(pd.DataFrame(), pd.DataFrame()) == []


def test_matched_learning_sentences_per_setting_and_method():
    learned = pd.DataFrame({"setting": ["converged", "converged", "iterations 10/5", "iterations 10/5"],
                            "model": "m", "dataset": "qasc", "method": ["MASS-DPO", "S-DPO-all"] * 2,
                            "metric": "mrr", "diff": [0.05, 0.02, 0.04, 0.0], "z_score": [4.0, 1.0, 3.5, 0.0],
                            "learned": [True, False, True, False]})
    lines = E.matched_learning_sentences(learned)
    assert [line.split(":")[0] for line in lines] == ["converged"] * 2 + ["iterations 10/5"] * 2
    assert lines[0] == ("converged: MASS-DPO beats the untrained reference by at least 3 standard errors on mrr on 1 "
                        "of 1 dataset(s): qasc +5.0 (4.00 SE).")
    assert lines[1].startswith("converged: S-DPO-all beats") and "on 0 of 1 dataset(s)" in lines[1]
    assert E.matched_learning_sentences(pd.DataFrame()) == ["MASS-DPO: no runs to compare with the reference.",
                                                            "S-DPO-all: no runs to compare with the reference."]


# ---------------------------------------------------------------- Table 3


def _rows(spec):
    return pd.DataFrame([dict(zip(["label", "n", "beta", "selection_score", "seed", "accuracy"], r), model="tiny",
                              dataset="qasc") for r in spec])


def test_ablation_reading_is_the_reading_the_axes_runs_carry():
    runs = _rows([("MASS-DPO", 3, 0.1, "reference", 0, 0.5), ("MASS-DPO", 3, 0.5, "reference", 0, 0.5),
                  ("MASS-DPO", 1, 0.1, "reference", 0, 0.5), ("MASS-DPO", 5, 0.1, "reference", 0, 0.5),
                  ("MASS-DPO", 3, 0.1, "delta", 0, 0.5), ("MASS-DPO", 3, 0.5, "delta", 0, 0.5),
                  ("S-DPO", 3, 0.1, "reference", 0, 0.5)])
    axes = dict(n=3, beta=0.1, ns=[1, 3, 5], betas=[0.1, 0.5])
    assert E.ablation_reading(runs, **axes) == "reference"  # delta is the panel's: it has no n = 1 or 5
    # a setup whose default reading is offset: the runs say so, whatever the package's default
    offset = runs.assign(selection_score=runs["selection_score"].replace({"reference": "offset"}))
    assert E.ablation_reading(offset, **axes) == "offset"


def test_ablation_reading_falls_back_to_the_runs_that_set_no_reading_of_their_own():
    runs = _rows([("MASS-DPO", 3, 0.1, "reference", 0, 0.5), ("MASS-DPO", 3, 0.1, "delta", 0, 0.5),
                  ("S-DPO", 3, 0.1, "delta", 0, 0.5), ("reference", 0, 0.1, "delta", 0, 0.1)])
    axes = dict(n=3, beta=0.1, ns=[3], betas=[0.1])  # the n axis is the panel's point: both readings cover it
    assert E.ablation_reading(runs, **axes) == "delta"
    with pytest.raises(ValueError, match="do not say which reading"):
        E.ablation_reading(runs[runs["label"] == "MASS-DPO"], **axes)
    assert E.ablation_reading(pd.DataFrame(), **axes) is None


def test_ablation_curves_are_the_plotted_numbers_ours_and_the_papers():
    runs = _rows([("MASS-DPO", 3, 0.1, "reference", 0, 0.5), ("MASS-DPO", 3, 0.1, "reference", 1, 0.7),
                  ("MASS-DPO", 3, 0.5, "reference", 0, 0.4), ("MASS-DPO", 1, 0.1, "reference", 0, 0.3),
                  ("MASS-DPO", 3, 0.1, "delta", 0, 0.9),  # another reading: the readings panel's
                  ("S-DPO", 3, 0.1, "reference", 0, 0.2), ("S-DPO", 3, 0.1, "reference", 1, 0.4),
                  ("S-DPO[hardest]", 3, 0.1, "reference", 0, 0.99), ("reference", 0, 0.1, "reference", 0, 0.1)])
    table3 = pd.DataFrame({"method": ["MASS-DPO", "MASS-DPO", "S-DPO", "reference"], "ablation": ["beta", "n", "beta", "reference"],
                           "setting": ["0.1", "1", "0.1", "theta=0"], "dataset": "qasc", "metric": "accuracy",
                           "paper": [55.0, 50.0, math.nan, math.nan]})
    curves = E.ablation_curves(runs, table3, n=3, beta=0.1, selection_score="reference")
    assert list(curves.columns) == ["ablation", "source", "label", "dataset", "setting", "mean", "lo", "hi", "count"]
    got = [(r.ablation, r.source, r.label, r.setting, r.mean, r.count) for r in curves.itertuples()]
    expected = [("beta", "ours", "MASS-DPO", 0.1, 60.0, 2), ("beta", "ours", "MASS-DPO", 0.5, 40.0, 1),
                ("beta", "ours", "S-DPO", 0.1, 30.0, 2), ("beta", "paper", "MASS-DPO", 0.1, 55.0, None),
                ("n", "ours", "MASS-DPO", 1.0, 30.0, 1), ("n", "ours", "MASS-DPO", 3.0, 60.0, 2),
                ("n", "ours", "S-DPO", 3.0, 30.0, 2), ("n", "paper", "MASS-DPO", 1.0, 50.0, None)]
    assert len(got) == len(expected)
    for (ax, src, lab, x, mean, count), want in zip(got, expected):
        assert (ax, src, lab, x) == want[:4] and mean == pytest.approx(want[4])
        assert (math.isnan(count) if want[5] is None else count == want[5])
    # two seeds, 50 and 70: mean 60, half-width t(1) * std / sqrt(2) = 12.706 * 10
    two = curves[(curves["ablation"] == "beta") & (curves["label"] == "MASS-DPO") & (curves["setting"] == 0.1)
                 & (curves["source"] == "ours")].iloc[0]
    assert two["lo"] == pytest.approx(60 - 10 * T975_1) and two["hi"] == pytest.approx(60 + 10 * T975_1)
    one = curves[(curves["ablation"] == "n") & (curves["setting"] == 1.0) & (curves["source"] == "ours")].iloc[0]
    assert one["lo"] == one["hi"] == pytest.approx(30.0)
    assert curves[curves["source"] == "paper"][["lo", "hi"]].isna().all().all()
    assert E.ablation_curves(pd.DataFrame(), pd.DataFrame(), n=3, beta=0.1, selection_score=None).empty


def _pair(a, b, diff, lo, hi, reading="reference", ablation="beta", metric="accuracy"):
    return {"model": "tiny", "dataset": "qasc", "metric": metric, "a": a, "b": b, "diff": diff, "lo": lo, "hi": hi,
            "significant": lo > 0 or hi < 0, "prompts": 10, "seeds": 2, "n": 3, "beta": 0.1,
            "selection_score": reading, "ablation": ablation}


def test_table3_sentences_print_every_table_once():
    mass, sdpo = "MASS-DPO[reference] n=3 beta=0.1", "S-DPO n=3 beta=0.1"
    learning = pd.DataFrame({"arm": [mass], "metric": ["mrr"], "learned": [1], "datasets": [2], "z_min": [2.5],
                             "z_max": [4.31]})
    best = pd.DataFrame({"model": "tiny", "method": ["MASS-DPO", "S-DPO"], "ablation": "beta", "dataset": "qasc",
                         "ours_best": ["0.5", "0.1"], "paper_best": ["0.1", None]})
    # (n, beta) = (3, 0.1) lies on both axes: one pair, listed under each
    axis_pairs = pd.DataFrame([_pair(mass, sdpo, 0.05, 0.01, 0.09, ablation="beta"),
                               _pair(mass, sdpo, 0.05, 0.01, 0.09, ablation="n")])
    pairs = pd.DataFrame([_pair(mass, sdpo, 0.05, 0.01, 0.09),
                          _pair("MASS-DPO[delta] n=3 beta=0.1", sdpo, -0.03, -0.05, -0.01, reading="delta")])
    blind = pd.DataFrame([_pair(mass, "S-DPO[hardest] n=3 beta=0.1", 0.0, -0.02, 0.02),
                          _pair(mass, "S-DPO[hardest] n=3 beta=0.1", 0.0, -0.02, 0.02, metric="mrr")])
    lines = E.table3_sentences(learning=learning, methods_table=pd.DataFrame(), best=best, axis_pairs=axis_pairs,
                               pairs=pairs, design=pd.DataFrame(), blind=blind, n=3, beta=0.1)
    paired = (f"{mass} minus {sdpo} on qasc (accuracy): +5.0 points, 95% interval +1.0 to +9.0 over 10 paired test "
              f"prompts and 2 seed(s): above.")
    assert lines == [
        f"learning: {mass} beats the reference by >= 3 SE on MRR on 1 of 2 dataset(s) (2.5 to 4.3 SE)",
        "MASS-DPO, beta axis, qasc: best setting 0.5 (paper: 0.1)",
        "S-DPO, beta axis, qasc: best setting 0.1",
        paired,
        "MASS-DPO minus S-DPO at the same (n, beta) on accuracy: significantly above in 2, below in 0, inside the "
        "noise in 0 of 2 (dataset, setting) comparisons; differences range from +5.0 to +5.0 points.",
        "readings panel, reference: MASS-DPO minus S-DPO at the same (n, beta) on accuracy: significantly above in 1, "
        "below in 0, inside the noise in 0 of 1 (dataset, setting) comparisons; differences range from +5.0 to +5.0 "
        "points.",
        "readings panel, delta: MASS-DPO minus S-DPO at the same (n, beta) on accuracy: significantly above in 0, "
        "below in 1, inside the noise in 0 of 1 (dataset, setting) comparisons; differences range from -3.0 to -3.0 "
        "points.",
        f"label-blind: {mass} minus S-DPO[hardest] n=3 beta=0.1 on qasc (accuracy): +0.0 points, 95% interval -2.0 "
        f"to +2.0 over 10 paired test prompts and 2 seed(s): inside the noise.",
    ]
    empty = E.table3_sentences(learning=pd.DataFrame(), methods_table=pd.DataFrame(), best=pd.DataFrame(),
                               axis_pairs=pd.DataFrame(), pairs=pd.DataFrame(), design=pd.DataFrame(),
                               blind=pd.DataFrame(), n=3, beta=0.1)
    assert empty == ["No MASS-DPO / S-DPO pairs on accuracy."]


def test_arms_sentence_lists_what_ran():
    runs = _rows([("MASS-DPO", 3, 0.1, "reference", 0, 0.5), ("MASS-DPO", 3, 0.1, "reference", 1, 0.6),
                  ("S-DPO", 3, 0.1, "reference", 0, 0.4), ("reference", 0, 0.1, "reference", 0, 0.1)])
    assert E.arms_sentence(runs) == ("4 runs on qasc; arms: MASS-DPO[reference] n=3 beta=0.1 (2 seeds), "
                                     "S-DPO n=3 beta=0.1 (1 seed), reference (1 seed).")
    assert E.arms_sentence(pd.DataFrame()) == "No runs: no dataset ran."


# ---------------------------------------------------------------- Figures 2-3


def test_length_bias_summary_averages_over_seeds():
    lengths = pd.DataFrame({"dataset": "qasc", "label": ["MASS-DPO", "MASS-DPO", "S-DPO"], "seed": [0, 1, 0],
                            "share": [0.5, 0.7, 0.2], "chance": [0.3, 0.3, 0.3]})
    got = E.length_bias_summary(lengths).set_index("label")
    assert got.loc["MASS-DPO", "share"] == pytest.approx(0.6) and got.loc["MASS-DPO", "seeds"] == 2
    assert got.loc["S-DPO", "share"] == pytest.approx(0.2) and got.loc["S-DPO", "chance"] == pytest.approx(0.3)
    assert list(E.length_bias_summary(pd.DataFrame()).columns) == ["dataset", "label", "share", "chance", "seeds"]


# ---------------------------------------------------------------- the toy model


def test_bound_holds_sentence_and_the_greedys_worst_prompt():
    assert toy.bound_holds_sentence(pd.DataFrame({"bound_holds": [True, True, False, True]})) == (
        "bound holds on 75.0000% of (prompt, subset) pairs")
    erec = pd.DataFrame({"criterion": ["centred"] * 3 + ["uncentred"], "method": ["A", "A", "B", "A"],
                         "fraction_min": [0.9, 0.7, 0.8, 0.95]})
    worst = toy.greedy_worst(erec)
    assert worst.to_dict("records") == [{"criterion": "centred", "method": "A", "fraction_min": 0.7},
                                        {"criterion": "centred", "method": "B", "fraction_min": 0.8},
                                        {"criterion": "uncentred", "method": "A", "fraction_min": 0.95}]


def _regime_records():
    rows = []
    for seed, (share, gii) in enumerate([(0.2, 0.09), (0.6, 0.11)]):
        rows.append(dict(shape="isotropic", gram_scale=0.1, d=8, n=2, seed=seed, method=toy.DOPT,
                         same_as_top_gii=share, feature_scale=3.0, gii_median=gii, test_accuracy=0.6 + 0.1 * seed,
                         erel_true=1.0))
        rows.append(dict(shape="isotropic", gram_scale=0.1, d=8, n=2, seed=seed, method="random",
                         same_as_top_gii=0.0, feature_scale=3.0, gii_median=gii, test_accuracy=0.5, erel_true=1.0))
        rows.append(dict(shape="isotropic", gram_scale=0.1, d=8, n=2, seed=seed, method=toy.BLIND,
                         same_as_top_gii=0.5, feature_scale=3.0, gii_median=gii, test_accuracy=0.5, erel_true=1.0))
    return pd.DataFrame(rows)


def test_top_gii_curves_and_the_cell_table():
    rrec = _regime_records()
    top = toy.top_gii_curves(rrec)
    assert len(top) == 1 and top.loc[0, "dim"] == "d = 8" and top.loc[0, "d"] == 8
    # D-optimal only: seeds 0.2 and 0.6 -> mean 0.4, half-width 12.706 * 0.2
    assert top.loc[0, "mean"] == pytest.approx(0.4) and top.loc[0, "hi"] == pytest.approx(0.4 + 0.2 * T975_1)
    cells = toy.gii_table(rrec)
    assert cells.to_dict("records") == [{"shape": "isotropic", "gram_scale": 0.1, "d": 8, "feature_scale": 3.0,
                                         "gii_median": 0.09, "share_top_gii": pytest.approx(0.4)}]


def _cmp():
    """Two panels' worth of regime_comparison rows: D-optimal and label-blind on isotropic pools, d 8 and 64, G_ii
    0.1 and 10; label-blind lacks the (d 64, G_ii 10) accuracy cell."""
    rows = []
    for method in (toy.DOPT, toy.BLIND):
        for d in (8, 64):
            for g in (0.1, 10.0):
                for value in ("test_accuracy", "erel_true"):
                    if method == toy.BLIND and (d, g, value) == (64, 10.0, "test_accuracy"):
                        continue
                    gain = 0.0 if value == "erel_true" else {(8, 0.1): 0.123456, (8, 10.0): -0.2}.get((d, g), 0.05)
                    rows.append(dict(shape="isotropic", method=method, value=value, d=d, gram_scale=g, gain=gain,
                                     significant=(d, g) == (8, 0.1) and value == "test_accuracy"))
    return pd.DataFrame(rows)


def test_regime_map_cells_place_every_cell_and_star_the_clear_ones():
    cells = toy.regime_map_cells(_cmp(), shapes=["isotropic"])
    assert len(cells) == 2 * 2 * 4  # value rows x panels x (d, G_ii) cells, the missing one included
    acc = cells[cells["value"] == "test_accuracy"].set_index(["method", "d", "gram_scale"])
    first = acc.loc[(toy.DOPT, 8, 0.1)]
    assert (first["i"], first["j"], first["y"], first["x"]) == (0, 0, 0, 0)
    assert first["text"] == "0.12*" and bool(first["significant"])
    assert acc.loc[(toy.DOPT, 8, 10.0), "text"] == "-0.2" and acc.loc[(toy.DOPT, 8, 10.0), "x"] == 1
    assert acc.loc[(toy.DOPT, 64, 0.1), "y"] == 1
    missing = acc.loc[(toy.BLIND, 64, 10.0)]
    assert missing["text"] == "" and math.isnan(missing["gain"]) and missing["j"] == 1
    assert (acc["vmax"] == 0.2).all()  # the largest |gain| of the row
    assert (cells.loc[cells["value"] == "erel_true", "vmax"] == 1.0).all()  # every gain 0: the limit is 1
    assert set(cells["title"]) == {"D-optimal − random | isotropic", "label-blind − random | isotropic"}


def test_annotated_heatmaps_write_each_cell_once():
    cells = toy.regime_map_cells(_cmp(), shapes=["isotropic"])
    fig, axes = plotting.annotated_heatmaps(cells, xtick="gram_scale", ytick="d", xlabel="G_ii", ylabel="d")
    try:
        assert axes.shape == (2, 2) and len(fig.axes) == 4 + 2  # a colour bar per row
        texts = {t.get_text(): t for t in axes[0, 0].texts}
        assert set(texts) == {"0.12*", "-0.2", "0.05"} and texts["0.12*"].get_fontweight() == "bold"
        assert [t.get_text() for t in axes[0, 0].get_xticklabels()] == ["0.1", "10"]
        assert axes[0, 1].get_title() == "label-blind − random | isotropic"
        assert axes[1, 0].get_ylabel().startswith("d\n")
    finally:
        matplotlib.pyplot.close(fig)


def test_conclusion_lines_are_numbered_in_one_place():
    rrec = _regime_records()
    cmp = toy.regime_comparison(rrec)
    lines = toy.conclusion_lines("Label-blind selection closes the gap.", cmp, rrec, elapsed=1.25,
                                 regime_elapsed=0.5, cache=True)
    assert [line.split(" ", 1)[0] for line in lines] == ["1.", "2.", "3.", "4.", "5.", "6.", "7."]
    assert lines[0] == "1. Label-blind selection closes the gap."
    # seeds 0.2 and 0.6 -> 40% at the only G_ii; random 0%
    assert lines[1] == ("2. Top-n by G_ii: the D-optimal subset equals it on 40% of prompts at G_ii ~ 0.1 and on 40% "
                        "at G_ii ~ 0.1 (all shapes and d; random: 0%).")
    # the cells, n and seeds come from the records: 1 cell, n = 2, 2 seeds
    assert lines[2].startswith("3. D-optimal (centred) vs random on test accuracy, 1 (shape, G_ii, d) cells at n = 2, "
                               "2 seeds:")
    assert lines[-1] == "7. Run time: the sweeps of sections 1-7 took 1.2 s and the regime sweep 0.5 s (cache on)."
    counts = toy.verdict_counts(cmp)
    assert int(counts.values.sum()) == len(cmp) == 4
