"""The validation tuning rule (mass_dpo.tuning): the best point, ties, the edge rule, bounds, and one run tuned."""

import math
from types import SimpleNamespace

import pandas as pd
import pytest

from mass_dpo import tuning


def fake_train(values, seen=None):
    """A grid point's "run": its validation MRR from ``values`` (a function of the point's options)."""

    def train(options):
        if seen is not None:
            seen.append(dict(options))
        return SimpleNamespace(metrics={"mrr": values(options), "mrr_se": 0.01, "prompts": 20})

    return train


def rule(grid, bounds=None):
    return {"metric": "mrr", "seed": 3, "grid": {"loglinear": grid}, "bounds": bounds or {}}


def peak_at(best_log10):
    """MRR rising towards ridge = 10**best_log10 and falling after: a single interior maximum."""
    return lambda o: 0.5 - abs(math.log10(o["ridge"]) - best_log10) * 0.01


def test_best_inside_the_grid_is_chosen_and_nothing_is_added():
    seen = []
    out = tuning.tune(fake_train(peak_at(-2), seen), "loglinear", rule=rule({"ridge": [1e-1, 1e-2, 1e-3]}))
    assert out.options == {"ridge": 1e-2}
    assert [s["ridge"] for s in seen] == [1e-1, 1e-2, 1e-3]
    assert all(s["seed"] == 3 and s["test_split"] == "valid" for s in seen)  # the rule's seed, never the test split
    assert not out.table["extended"].any() and out.table["chosen"].sum() == 1 and out.table["edge"].eq("").all()


def test_ties_go_to_the_first_point_in_grid_order():
    out = tuning.tune(fake_train(lambda o: 0.4), "loglinear", rule=rule({"ridge": [1e-1, 1e-2, 1e-3]},
                                                                         {"ridge": [1e-1, 1e-3]}))
    # every point ties: the first (the most regularised) wins; the bounds stop the edge rule at once
    assert out.options == {"ridge": 1e-1}


def test_a_best_value_at_the_weak_edge_extends_the_axis_until_it_is_inside():
    seen = []
    out = tuning.tune(fake_train(peak_at(-6), seen), "loglinear", rule=rule({"ridge": [1e-1, 1e-2, 1e-3, 1e-4]}))
    assert out.options == {"ridge": pytest.approx(1e-6)}
    assert [s["ridge"] for s in seen] == pytest.approx([1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7])
    table = out.table
    assert table["ridge"].tolist() == pytest.approx([1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7])  # grid order kept
    assert table["extended"].tolist() == [False] * 4 + [True] * 3
    assert table.loc[table["chosen"], "edge"].item() == ""  # inside the extended axis


def test_a_best_value_at_the_strong_edge_extends_the_other_side():
    out = tuning.tune(fake_train(peak_at(1)), "loglinear", rule=rule({"ridge": [1e-1, 1e-2, 1e-3]}))
    assert out.options == {"ridge": pytest.approx(10.0)}
    assert out.table["ridge"].tolist() == pytest.approx([1e2, 1e1, 1.0, 1e-1, 1e-2, 1e-3])  # prepended: strong to weak


def test_the_bound_written_in_params_stops_the_extension_and_the_table_says_so():
    out = tuning.tune(fake_train(peak_at(-9)), "loglinear",
                      rule=rule({"ridge": [1e-1, 1e-2, 1e-3]}, {"ridge": [1e-5, 10]}))
    assert out.options == {"ridge": pytest.approx(1e-5)}
    assert out.table.loc[out.table["chosen"], "edge"].item() == "ridge"
    assert "at the bound of ridge" in out.sentence()


def test_a_non_numeric_axis_is_not_extended_and_new_values_pair_with_every_other_value():
    values = lambda o: (0.3 if o["pooling"] == "all" else 0.5) - abs(math.log10(o["ridge"]) + 4) * 0.01
    out = tuning.tune(fake_train(values), "loglinear",
                      rule=rule({"pooling": ["response", "all"], "ridge": [1e-1, 1e-2, 1e-3]}))
    assert out.options == {"pooling": "response", "ridge": pytest.approx(1e-4)}
    t = out.table
    assert set(t["pooling"]) == {"response", "all"}
    # the added ridges were scored under both poolings (the product of the extended axes)
    assert len(t) == 2 * 5 and (t.groupby("pooling")["ridge"].count() == 5).all()


def test_next_step_is_geometric_for_positive_values_and_arithmetic_otherwise():
    assert tuning.next_step([1e-1, 1e-2, 1e-3], "last") == pytest.approx(1e-4)
    assert tuning.next_step([1e-1, 1e-2, 1e-3], "first") == pytest.approx(1.0)
    assert tuning.next_step([0, 1, 2], "last") == 3 and tuning.next_step([0, 1, 2], "first") == -1
    assert tuning.next_step([1, 2, 3], "last") == 4  # positive but evenly spaced: arithmetic
    assert tuning.next_step([3e-4, 1e-4], "last") == pytest.approx(1e-4 / 3)


def test_no_grid_means_nothing_to_tune():
    out = tuning.tune(fake_train(lambda o: pytest.fail("trained")), "full", rule=rule({"ridge": [1e-1]}))
    assert out.options == {} and out.table.empty


def test_the_written_rule_has_bounds_for_its_numeric_axes():
    r = tuning.tuning_rule()
    for regime, axes in r["grid"].items():
        for name, values in axes.items():
            if all(isinstance(v, (int, float)) for v in values):
                assert name in r["bounds"], f"{regime}.{name} has no bound for the edge rule"


@pytest.mark.slow
def test_train_run_tune_chooses_on_validation_and_holds_given_options(tmp_path, monkeypatch, capsys):
    """One run tuned end to end (tiny model, real fits): the winner is the grid point with the best validation MRR,
    the trained run carries it, its folder keeps the grid, and an option given explicitly is not tuned."""
    from mass_dpo.cli import main
    from mass_dpo.runs import train_run

    monkeypatch.setenv("MASS_DPO_CACHE", str(tmp_path / "cache"))
    small = {"metric": "mrr", "seed": 0, "grid": {"loglinear": {"pooling": ["response", "all"], "ridge": [1e-1, 1e-2]}},
             "bounds": {"ridge": [1e-2, 1e-1]}}
    monkeypatch.setattr(tuning, "tuning_rule", lambda: small)
    opts = dict(dataset="qasc", model="tiny", method="sdpo", n=2, profile="smoke", data_dir="samples", limit=12,
                eval_limit=8, test_limit=8, root=tmp_path / "runs")
    result = train_run(tune=True, **opts)
    grid = pd.read_csv(result.run_dir / "tuning.csv")
    assert len(grid) == 4 and grid["chosen"].sum() == 1
    best = grid[grid["chosen"]].iloc[0]
    assert best["value"] == grid["value"].max()
    assert (result.config.pooling, result.config.ridge) == (best["pooling"], pytest.approx(best["ridge"]))
    assert result.info["tuning"] == {"pooling": best["pooling"], "ridge": pytest.approx(best["ridge"])}
    assert result.config.test_split == "test"  # the tuned run is scored on test; its grid points were not
    # pooling given explicitly: only the ridge is tuned
    fixed = train_run(tune=True, pooling="all", **opts)
    grid = pd.read_csv(fixed.run_dir / "tuning.csv")
    assert list(grid.columns[:1]) == ["ridge"] and len(grid) == 2 and fixed.config.pooling == "all"
    # the command line says which setting won
    assert main(["train", "--dataset", "qasc", "--model", "tiny", "--method", "sdpo", "--n", "2", "--profile", "smoke",
                 "--data-dir", "samples", "--limit", "12", "--eval-limit", "8", "--test-limit", "8", "--tune",
                 "--out", str(tmp_path / "runs"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "tuned on the validation split (mrr, 4 points)" in out and "tuned options" in out


def test_tuning_runs_skip_online_evaluation_where_it_costs():
    """LM-regime tuning runs train without online evaluation (it costs about as much as their steps); log-linear ones
    keep it, so that the tuning fit at the chosen point is the final fit of the rule's seed (one memoised fit)."""
    from mass_dpo.tuning import scored_on

    assert scored_on("freeze") == {"test_split": "valid", "online_eval": False, "pool_eval": False}
    assert scored_on("full")["online_eval"] is False
    assert scored_on("loglinear") == {"test_split": "valid", "pool_eval": False}
