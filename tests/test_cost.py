"""Tables 7-8 (mass_dpo.experiments.cost): fit seconds and their ratio under the exact fit, the matched-compute plan
(converged fits and an iteration budget), and the budget actually stopping a fit."""

import math

import pandas as pd
import pytest

from mass_dpo import experiments as E


def _clock(kind):
    rows = []
    for seed, (sa, ia, sb, ib) in enumerate([(3.0, 10, 2.0, 10), (10.0, 10, 4.0, 20)]):
        rows += [{"model": "m", "dataset": "d", "seed": seed, "component": f"{kind}_sdpo_19", "seconds": sa,
                  "iterations": ia, "seconds_per_iteration": sa / ia},
                 {"model": "m", "dataset": "d", "seed": seed, "component": f"{kind}_mass_dpo_5", "seconds": sb,
                  "iterations": ib, "seconds_per_iteration": sb / ib}]
    rows.append({"model": "m", "dataset": "d", "seed": None, "component": "extraction", "seconds": 10.0})
    return pd.DataFrame(rows)


def test_wallclock_table_ratio_per_fit_and_per_iteration_paired_by_seed():
    t = E.wallclock_table(_clock("fit")).set_index("component")
    # per seed: 3 / 2 = 1.5 and 10 / 4 = 2.5 -> mean 2.0, SE std([1.5, 2.5]) / sqrt(2) = 0.5
    assert t.loc["ratio_fit_sdpo_19_over_mass_dpo_5", "seconds"] == pytest.approx(2.0)
    assert t.loc["ratio_fit_sdpo_19_over_mass_dpo_5", "se"] == pytest.approx(0.5)
    # per iteration: (0.3 / 0.2, 1.0 / 0.2) = (1.5, 5.0)
    assert t.loc["ratio_fit_per_iteration_sdpo_19_over_mass_dpo_5", "seconds"] == pytest.approx(3.25)
    assert t.loc["fit_mass_dpo_5", "iterations"] == pytest.approx(15)
    assert t.loc["fit_sdpo_19", "seconds"] == pytest.approx(6.5) and t.loc["fit_sdpo_19", "se"] == pytest.approx(3.5)
    # the paper's per-epoch minutes, printed for the record only
    assert t.loc["ratio_fit_sdpo_19_over_mass_dpo_5", "paper_minutes"] == pytest.approx(612.6 / 331.2)
    assert t.loc["fit_sdpo_19", "paper_minutes"] == 612.6 and t.loc["extraction", "paper_minutes"] == 42.0
    lines = E.wallclock_sentences(t.reset_index())
    assert len(lines) == 1 and "ratio 2.00" in lines[0] and "not comparable" in lines[0]


def test_wallclock_table_trainer_epochs_keep_their_ratio():
    t = E.wallclock_table(_clock("train_epoch")).set_index("component")
    assert t.loc["ratio_train_epoch_sdpo_19_over_mass_dpo_5", "seconds"] == pytest.approx(2.0)
    assert "ratio_fit_sdpo_19_over_mass_dpo_5" not in t.index


def test_matched_plan_exact_fit_has_converged_fits_and_a_two_to_one_iteration_budget():
    plan = E.matched_plan(["qasc"], [0, 1], n=5, full=19, epochs=[2, 1], exact=True, iterations_per_epoch=7)
    assert list(plan) == ["converged", "iterations 14/7"]
    assert all("fit_max_iter" not in s and "num_train_epochs" not in s for s in plan["converged"])
    budget = {(s["method"], s["n"], s["seed"]): s["fit_max_iter"] for s in plan["iterations 14/7"]}
    assert budget == {("mass_dpo", 5, 0): 14, ("mass_dpo", 5, 1): 14, ("sdpo", 19, 0): 7, ("sdpo", 19, 1): 7}
    trainer = E.matched_plan(["qasc"], [0], epochs=[2, 1], exact=False)
    assert list(trainer) == ["epochs 2/1"]
    assert {(s["method"], s["num_train_epochs"]) for s in trainer["epochs 2/1"]} == {("mass_dpo", 2.0), ("sdpo", 1.0)}
    # every run at the defaults (n = 5, the full pool of 19, 5 iterations per epoch), the settings one after the other
    q = dict(dataset="qasc", seed=0, beta=0.1)
    assert E.matched_specs(["qasc"], [0], exact=True) == [
        dict(q, method="mass_dpo", n=5), dict(q, method="sdpo", n=19),  # converged
        dict(q, method="mass_dpo", n=5, fit_max_iter=10), dict(q, method="sdpo", n=19, fit_max_iter=5)]  # 10/5


def test_exact_fit_follows_the_regime():
    assert E.exact_fit(E.Setup(regime="loglinear", profile="smoke"))
    assert not E.exact_fit(E.Setup(regime="loglinear", profile="smoke", options={"fit": "adam"}))
    assert not E.exact_fit(E.Setup(regime="lora", profile="smoke"))


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cost")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MASS_DPO_CACHE", str(root / "cache"))
        yield E.Setup(model="tiny", profile="smoke", seeds=[0], train_limit=12, eval_limit=6, test_limit=6,
                      root=str(root / "runs"))


@pytest.mark.slow
def test_iteration_budget_stops_the_fit_and_every_setting_has_its_reference(tiny_setup):
    runs = E.matched_runs(tiny_setup, ["qasc"], [0], n=3, full=19, epochs=[2, 1], iterations_per_epoch=1, echo=None)
    assert set(runs["setting"]) == {"converged", "iterations 2/1"}
    budgeted = runs[(runs["setting"] == "iterations 2/1") & (runs["label"] != "reference")].set_index("label")
    converged = runs[(runs["setting"] == "converged") & (runs["label"] != "reference")].set_index("label")
    assert budgeted.loc["S-DPO-all", "steps"] == 1 and budgeted.loc["MASS-DPO", "steps"] <= 2
    assert budgeted.loc["S-DPO-all", "hit_budget"]
    assert converged["budget"].isna().all() and not converged["hit_budget"].any()
    assert converged.loc["S-DPO-all", "steps"] > 1  # the tolerance needs more than the budget gave
    assert (runs.groupby("setting")["label"].apply(lambda s: (s == "reference").sum()) == 1).all()
    pairs = E.paired_difference(runs, "MASS-DPO", "S-DPO-all", ["mrr"], by=("model", "dataset", "setting"))
    assert set(pairs["setting"]) == {"converged", "iterations 2/1"} and (pairs["prompts"] == 6).all()
    summary = E.matched_table(runs, model="tiny")
    lines = E.matched_sentences(summary, pairs, runs=runs)
    assert any("iterations 2/1" in line and "budget" in line for line in lines)


@pytest.mark.slow
def test_wallclock_reports_fit_seconds_and_retimes_both_methods(tiny_setup):
    clock = E.wallclock(tiny_setup, ["qasc"], n=3, full=19, seeds=[0], repeats=2, echo=None)
    comps = set(clock["component"])
    # named by the negatives each run trained on: S-DPO's "full pool" of 19 is QASC's 7
    assert {"fit_mass_dpo_3", "fit_sdpo_7", "refit_mass_dpo_3", "refit_sdpo_7", "extraction", "selection"} <= comps
    fits = clock[clock["component"].str.startswith("fit_")]
    assert (fits["iterations"] >= 1).all() and (fits["seconds"] > 0).all()
    refits = clock[clock["component"].str.startswith("refit_")].set_index("component")
    # the re-run fit retraces the run: same number of L-BFGS iterations
    assert refits.loc["refit_sdpo_7", "iterations"] == fits.set_index("component").loc["fit_sdpo_7", "iterations"]
    t = E.wallclock_table(clock).set_index("component")
    assert math.isfinite(t.loc["ratio_refit_sdpo_7_over_mass_dpo_3", "seconds"])
    # a warm rerun reports the timing measured together the first time, and fits nothing
    runs = E.run_grid(tiny_setup, E.cost_specs(["qasc"], [0], n=3, full=19), echo=None)
    again = pd.DataFrame(E.refit_timing(runs, repeats=2))
    assert again["seconds"].tolist() == refits.loc[again["component"], "seconds"].tolist()
