"""The experiments runner: stability metrics, summaries over seeds, tables beside the paper, data fallbacks."""

import ast
import math
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch

from mass_dpo import experiments as E
from mass_dpo import stability as S
from mass_dpo.extraction import Extracted
from mass_dpo.reproduce import profile_parameters, repo_root

# ---------------------------------------------------------------- stability (pure math)


def test_subset_agreement_counts_sets_first_picks_and_top3():
    old = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3], [4, 5, -1, -1]])
    new = torch.tensor([[3, 2, 1, 0], [0, 1, 2, 5], [1, 0, 2, 4], [4, 5, -1, -1]])
    got = S.subset_agreement(old, new)
    assert got["exact_match"].tolist() == [1.0, 0.0, 0.0, 1.0]  # sets, order ignored; -1 is no pick
    assert got["jaccard"].tolist() == pytest.approx([1.0, 3 / 5, 3 / 5, 1.0])
    assert got["top1_match"].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert got["top3_exact_match"].tolist() == [0.0, 1.0, 1.0, 1.0]  # {0,1,2} == {1,0,2}


def _extracted(P=6, C=8, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(P, C, d, generator=g)
    ref = torch.randn(P, C, generator=g)
    mask = torch.ones(P, C, dtype=torch.bool)
    mask[0, -2:] = False  # a smaller pool
    return Extracted([f"p{i}" for i in range(P)], feats, ref, ref.clone(), mask,
                     torch.randint(0, C - 2, (P,), generator=g))


def test_at_checkpoint_gives_delta_equal_to_phi_dot_theta():
    from mass_dpo.extraction import selection_inputs

    ex = _extracted()
    theta = torch.randn(5)
    phi, delta, mask, _ = selection_inputs(S.at_checkpoint(ex, theta), "delta")
    assert torch.allclose(delta, (phi @ theta) * mask, atol=1e-4)
    _, zero, _, _ = selection_inputs(S.at_checkpoint(ex, torch.zeros(5)), "delta")
    assert torch.count_nonzero(zero) == 0  # initialisation: every Delta_i is 0


# ---------------------------------------------------------------- summaries and tables


def _runs():
    rows = []
    for method, base in (("sdpo", 0.5), ("mass_dpo", 0.6)):
        for dataset in E.DATASETS:
            for seed in (0, 1, 2):
                rows.append({"model": "smollm2", "method": method, "dataset": dataset, "seed": seed, "n": 3,
                             "beta": 0.1, "accuracy": base + 0.01 * seed, "accuracy_se": 0.05,
                             "margin": 2.0 + seed, "margin_se": 0.1})
    return pd.DataFrame(rows)


def test_summarize_mean_and_se_over_seeds_in_percent():
    s = E.summarize(_runs(), ["model", "method", "dataset"], ["accuracy", "margin"])
    row = s[(s["method"] == "sdpo") & (s["dataset"] == "qasc") & (s["metric"] == "accuracy")].iloc[0]
    assert row["value"] == pytest.approx(51.0)
    assert row["se"] == pytest.approx(100 * np.std([0.5, 0.51, 0.52], ddof=1) / math.sqrt(3))
    assert row["se_over"] == "seeds" and row["seeds"] == 3
    margin = s[(s["method"] == "sdpo") & (s["dataset"] == "qasc") & (s["metric"] == "margin")].iloc[0]
    assert margin["value"] == pytest.approx(3.0)  # not a percentage


def test_summarize_one_seed_falls_back_to_the_test_set_se():
    runs = _runs()
    s = E.summarize(runs[runs["seed"] == 0], ["method", "dataset"], ["accuracy"])
    assert set(s["se_over"]) == {"prompts"} and s["se"].iloc[0] == pytest.approx(5.0)


def test_table1_beside_the_paper_with_difference_and_average():
    runs = _runs()
    t = E.method_table(runs, "table1", ["accuracy"], model="smollm2", average=True)
    assert set(t["dataset"]) == set(E.DATASETS) | {"avg"}
    ref = E.paper_reference("table1")
    want = ref[(ref["model"] == "Qwen3") & (ref["method"] == "S-DPO") & (ref["dataset"] == "qasc")]["value"].iloc[0]
    row = t[(t["method"] == "S-DPO") & (t["dataset"] == "qasc")].iloc[0]
    assert row["paper_Qwen3"] == pytest.approx(want)
    # smollm2 is not a paper model: the reference is the mean of the paper's three models
    assert row["paper"] == pytest.approx(np.mean([row["paper_Qwen3"], row["paper_SmolLM3"], row["paper_Llama3"]]))
    assert row["diff"] == pytest.approx(row["value"] - row["paper"])
    llama = E.method_table(runs.assign(model="llama3"), "table1", ["accuracy"], model="llama3")
    r = llama[(llama["method"] == "MASS-DPO") & (llama["dataset"] == "lastfm")].iloc[0]
    assert r["paper"] == pytest.approx(r["paper_Llama3"])


def test_average_only_when_every_dataset_ran():
    runs = _runs()
    t = E.method_table(runs[runs["dataset"] != "movielens"], "table1", ["accuracy"], model="smollm2", average=True)
    assert "avg" not in set(t["dataset"])


def test_ablation_specs_and_table_join_numeric_settings():
    specs = E.ablation_specs(["qasc"], [0])
    assert sorted((s["beta"], s["n"]) for s in specs) == [(0.1, 1), (0.1, 3), (0.1, 5), (0.5, 3), (1.0, 3)]
    runs = pd.DataFrame([{"model": "smollm2", "dataset": "qasc", "seed": 0, "n": s["n"], "beta": s["beta"],
                          "accuracy": 0.5 + s["n"] / 100 - s["beta"] / 10, "accuracy_se": 0.01} for s in specs])
    t = E.ablation_table(runs, model="smollm2")
    assert t["paper"].notna().all()  # "1" meets the paper's 1.0, "0.1" its 0.1
    best = E.best_setting(t).set_index("ablation")
    assert best.loc["beta", "ours_best"] == "0.1" and best.loc["n", "ours_best"] == "5"


def test_wide_table_cells_carry_se_and_paper():
    long = pd.DataFrame({"method": ["A", "A"], "dataset": ["x", "y"], "value": [1.234, 2.0], "se": [0.1, np.nan],
                         "paper": [3.0, np.nan]})
    w = E.wide_table(long, "method", "dataset")
    assert w.loc[0, "x"] == "1.23 ± 0.10 [paper 3.00]" and w.loc[0, "y"] == "2.00"


def test_stability_table_compares_final_checkpoint_with_the_paper():
    stab = pd.DataFrame([{"model": "llama3", "dataset": "movielens", "n": 5, "seed": 0, "checkpoint": c,
                          "exact_match": 1.0, "jaccard": 1.0, "top1_match": 1.0, "top3_exact_match": 1.0,
                          "objective_retention": 1.0} for c in ("mid", "final")])
    t = E.stability_table(stab, model="llama3")
    final = t[(t["checkpoint"] == "final") & (t["metric"] == "exact_match")].iloc[0]
    assert final["paper"] == pytest.approx(0.992) and final["diff"] == pytest.approx(0.008)
    assert t[t["checkpoint"] == "mid"]["paper"].isna().all()


def test_stability_sentences_set_the_agreement_beside_chance():
    row = {"model": "smollm2", "dataset": "movielens", "n": 5, "seed": 0, "selection_score": "reference",
           "regime": "freeze", "exact_match": 0.0, "top1_match": 0.03, "top3_exact_match": 0.0,
           "objective_retention": 0.43, "chance_jaccard": 0.15, "chance_top1_match": 1 / 19, "random_retention": 0.4}
    stab = pd.DataFrame([{**row, "checkpoint": "mid", "jaccard": 0.3},
                         {**row, "checkpoint": "final", "jaccard": 0.1, "weight_change": 0.04}])
    t = E.stability_table(stab, model="smollm2")
    assert set(t["metric"]) >= {"chance_jaccard", "chance_top1_match", "random_retention"}
    first = E.stability_sentences(t, stab)[0]
    assert "Jaccard 0.150" in first and "below chance" in first and "retains 0.4000" in first
    stab.loc[stab["checkpoint"] == "final", "jaccard"] = 0.155
    assert "about chance" in E.stability_sentences(E.stability_table(stab, model="smollm2"), stab)[0]


def test_grid_crosses_every_axis():
    import itertools

    g = E.grid(["a", "b"], ["sdpo", "mass_dpo"], [0, 1], n=[1, 3], beta=0.1)
    assert len(g) == 16 and all(s["beta"] == 0.1 for s in g)
    got = {(s["dataset"], s["method"], s["seed"], s["n"]) for s in g}
    assert got == set(itertools.product(["a", "b"], ["sdpo", "mass_dpo"], [0, 1], [1, 3]))  # each combination once


def test_train_limit_per_dataset_reaches_each_runs_configuration():
    """A profile may give the QA datasets more training prompts than the others: ``train_limit`` as a mapping."""
    setup = E.Setup(model="tiny", profile="smoke", tune=False, train_limit={"default": 8, "qasc": 12})
    got = {d: E.planned_config(setup, {"dataset": d, "method": "sdpo", "seed": 0}).limit for d in ("qasc", "lastfm")}
    assert got == {"qasc": 12, "lastfm": 8}
    assert E.planned_config(E.Setup(model="tiny", profile="smoke", tune=False, train_limit=5),
                            {"dataset": "qasc", "method": "sdpo", "seed": 0}).limit == 5
    with pytest.raises(ValueError, match="train_limit names qsac: not a dataset"):
        E.Setup(train_limit={"qsac": 1000})


# ---------------------------------------------------------------- data that is missing


def test_missing_dataset_is_reported_not_raised(monkeypatch):
    monkeypatch.delenv("MASS_DPO_DATA", raising=False)
    lines = []
    got = E.available(["qasc", "movielens"], "samples", echo=lines.append)
    assert list(got) == ["qasc"]
    assert len(lines) == 1 and "movielens" in lines[0] and "SKIPPED" in lines[0]


def test_movielens_comes_from_mass_dpo_data_when_samples_lack_it(monkeypatch, shared_data):
    """No MovieLens sample ships: with data_dir "samples" every split is read from $MASS_DPO_DATA (offline, so
    nothing can come from a download), QASC from the shipped samples."""
    from mass_dpo.data.benchmarks import SAMPLES_DIR, locate

    monkeypatch.setenv("MASS_DPO_DATA", str(shared_data))
    monkeypatch.setenv("MASS_DPO_OFFLINE", "1")
    where, why = E.dataset_location("movielens", "samples")
    assert why == ""
    for split in ("train", "valid", "test"):
        assert locate("movielens", split, where).resolve() == shared_data.resolve()
    assert E.dataset_location("qasc", "samples") == ("samples", "")
    assert locate("qasc", "train", "samples").resolve() == SAMPLES_DIR.resolve() != shared_data.resolve()


# ---------------------------------------------------------------- notebooks and profiles agree

PAPER_NOTEBOOKS = ["quickstart", "training_dynamics", "table1", "table2", "table3", "table4", "table5", "table6",
                   "table7", "table8"]


def _defaults(name):
    nb = nbformat.read(repo_root() / "notebooks" / f"{name}.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    return {s.target.id: ast.literal_eval(s.value) for s in ast.parse(cell.source).body}


@pytest.mark.parametrize("name", PAPER_NOTEBOOKS)
def test_cpu_profile_takes_effect_in_every_notebook(name):
    from mass_dpo.notebook_params import resolve

    defaults = _defaults(name)
    resolved = resolve(name, dict(defaults, profile="cpu")).values
    for key, value in profile_parameters("cpu", name).items():
        if key in defaults:
            assert resolved[key] == value, f"{name}: {key} resolves to {resolved[key]!r}, the cpu profile has {value!r}"
    for key in ("model", "regime", "profile", "out_dir", "seeds" if name != "quickstart" else "seed"):
        assert key in defaults, f"{name} lacks the {key} parameter"
    if name != "quickstart":
        for key in ("datasets", "data_dir", "beta", "train_limit", "eval_limit", "test_limit"):
            assert key in defaults, f"{name} lacks the {key} parameter"
        assert {"n", "ns", "n_selected"} & set(defaults), f"{name} has no budget of negatives (n, ns or n_selected)"
    assert defaults["out_dir"] == f"papers_figures/{name}"


def test_every_paper_notebook_runs_in_the_reproduce_order():
    from mass_dpo.reproduce import NOTEBOOKS

    assert set(PAPER_NOTEBOOKS) <= set(NOTEBOOKS)


# ---------------------------------------------------------------- runs trained beforehand (multi-GPU)


def test_table4_runner_grid_is_the_notebooks(tmp_path, monkeypatch):
    # the runner trains what stability() asks for: an LM regime is refused before any extraction or training
    paper = {**E.notebook_parameters("table4", "paper"), "regime": "full"}  # the paper profile itself: freeze
    from mass_dpo.experiments import runner

    monkeypatch.setattr(runner, "budget_table", lambda *a, **k: pytest.fail("budget_table read before the regime check"))
    with pytest.raises(NotImplementedError, match="loglinear"):
        E.notebook_specs("table4", paper)
    # and trivial budgets are dropped, as stability() drops them
    setup = E.Setup(model="tiny", profile="smoke", seeds=[0, 1])
    budgets = pd.DataFrame([{"dataset": "qasc", "n": 5, "negatives_max": 7, "trivial": False},
                            {"dataset": "qasc", "n": 10, "negatives_max": 7, "trivial": True}])
    specs = E.stability_specs(setup, ["qasc"], ns=(5, 10), beta=0.1, budgets=budgets)
    assert sorted((s["n"], s["seed"]) for s in specs) == [(5, 0), (5, 1)]


def test_notebook_specs_match_the_notebook_parameters():
    p = E.notebook_parameters("table1", "smoke")
    assert p["model"] == "tiny" and p["datasets"] == ["qasc", "lastfm", "movielens"]
    assert len(E.notebook_specs("table1", p)) == 6 * 3  # five methods and S-DPO-all
    p3 = E.notebook_parameters("table3", "cpu")
    # MASS-DPO at 5 (n, beta) settings, S-DPO at the same, the readings panel's 6 other (reading, beta) runs and
    # S-DPO on the 2 label-blind picks
    assert len(E.notebook_specs("table3", p3)) == 18 * len(p3["datasets"]) * len(p3["seeds"])
    p8 = E.notebook_parameters("table8", "cpu")
    # the cpu profile fits exactly: both converged, and a 2:1 L-BFGS iteration budget (the paper's 2:1 epochs)
    budgets = {(s["method"], s.get("fit_max_iter")) for s in E.notebook_specs("table8", p8)}
    per_epoch = p8["iterations_per_epoch"]
    assert budgets == {("mass_dpo", None), ("sdpo", None), ("mass_dpo", 2 * per_epoch), ("sdpo", per_epoch)}
    smoke8 = dict(p8, regime="lora")  # an LM regime keeps the paper's epochs
    epochs = {(s["method"], s["num_train_epochs"]) for s in E.notebook_specs("table8", smoke8)}
    assert epochs == {("mass_dpo", 2.0), ("sdpo", 1.0)}


def test_runs_trained_under_several_processes_are_loaded_not_retrained(tmp_path):
    import json

    from mass_dpo.runs import run_dir
    from mass_dpo.training import resolve_config

    setup = E.Setup(model="tiny", profile="smoke", seeds=[0], root=str(tmp_path), trained_world_size=8)
    spec = {"dataset": "qasc", "method": "sdpo", "seed": 0, "n": 3}
    cfg = resolve_config(E._config(setup, spec, "samples"))
    path = run_dir(cfg, root=tmp_path, world=8)
    assert path != run_dir(cfg, root=tmp_path, world=1)  # the hash covers the world size
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"config": cfg.to_dict()}))
    (path / "metrics.json").write_text(json.dumps({"test": {"accuracy": 0.75}, "seconds": {"train": 1.0}}))
    result = E.run_one(setup, spec, data_dir="samples")
    assert result.run_dir == path and result.metrics["accuracy"] == 0.75 and result.cached


@pytest.mark.slow
def test_load_split_reads_the_extraction_the_run_made(tmp_path, monkeypatch):
    monkeypatch.setenv("MASS_DPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MASS_DPO_RUNS", str(tmp_path / "runs"))
    setup = E.Setup(model="tiny", profile="smoke", seeds=[0], train_limit=6, eval_limit=0, test_limit=4)
    result = E.run_one(setup, {"dataset": "qasc", "method": "mass_dpo", "seed": 0, "n": 2}, data_dir="samples")
    ex = E.load_split(result, "train")
    assert ex.meta["cache_hit"] and len(ex) == 6  # no second extraction for Tables 4 and 7
    assert len(E.load_split(result.run_dir, "train")) == 6  # a run folder works too
    with pytest.raises(TypeError, match="finished run"):
        E.load_split(result.config, "train")  # a configuration of its own: refused
    assert E.has_snapshots(result.run_dir)  # the loglinear run saved theta at mid-training and at the end
    mid = torch.load(result.run_dir / "snapshots" / "mid.pt")
    final = torch.load(result.run_dir / "snapshots" / "final.pt")
    assert 0 < mid["step"] < final["step"] and final["theta"].shape == (64,)


def test_best_setting_reports_ties():
    t = pd.DataFrame({"model": "m", "ablation": "beta", "dataset": "d", "setting": ["0.1", "0.5", "1"],
                      "value": [20.0, 20.0, 10.0], "paper": [3.0, 2.0, 1.0]})
    best = E.best_setting(t).iloc[0]
    assert best["ours_best"] == "tie 0.1/0.5" and best["paper_best"] == "0.1"


# ---------------------------------------------------------------- Figures 2-3: own and common negatives


def test_pool_curve_point_on_a_hand_built_pool():
    # prompt 0: phi . theta = [2, 1, 0], target 0; prompt 1: [1, 3, (padding)], target 0; beta 0.5
    feats = torch.tensor([[[2.0, 5.0], [1.0, 5.0], [0.0, 5.0]], [[1.0, 0.0], [3.0, 0.0], [9.0, 0.0]]])  # [2, 3, 2]
    mask = torch.tensor([[True, True, True], [True, True, False]])
    target = torch.tensor([0, 0])
    p = E.pool_curve_point(torch.tensor([1.0, 0.0]), feats, mask, target, beta=0.5)
    # rewards [1, .5, 0] and [.5, 1.5]: margins 1 - .25 = .75 and .5 - 1.5 = -1; ranks 1 and 2
    assert p["margin"] == pytest.approx((0.75 - 1.0) / 2)
    assert p["accuracy"] == pytest.approx(0.5) and p["mrr"] == pytest.approx(0.75)
    assert p["chosen_rewards"] == pytest.approx(0.75)
    zero = E.pool_curve_point(torch.zeros(2), feats, mask, target, beta=0.5)
    # theta = 0 (the reference): every reward ties, the chosen one is first with chance 1 / pool size
    assert zero["accuracy"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert zero["mrr"] == pytest.approx(((1 + 1 / 2 + 1 / 3) / 3 + (1 + 1 / 2) / 2) / 2)
    assert zero["margin"] == 0 and zero["chosen_rewards"] == 0


def test_hold_last_and_final_gap_by_kind_of_negatives():
    rows = []
    for label, last in (("MASS-DPO", 3), ("S-DPO", 1)):
        for neg, value in (("own", 1.0), ("common", 0.5)):
            for step in range(last + 1):
                rows.append({"dataset": "d", "label": label, "seed": 0, "negatives": neg, "metric": "accuracy",
                             "step": step, "value": value * step / last if label == "MASS-DPO" else 0.2 * step})
    df = pd.DataFrame(rows)
    held = E.hold_last(df)
    sdpo = held[(held["label"] == "S-DPO") & (held["negatives"] == "own")].sort_values("step")
    assert list(sdpo["step"]) == [0, 1, 2, 3] and list(sdpo["value"]) == pytest.approx([0, 0.2, 0.2, 0.2])
    # only logged steps: a run evaluated at 0 and 4 is interpolated at a step another run logged (2), held after
    sparse = pd.DataFrame({"dataset": "d", "label": ["A", "A", "B", "B", "B", "B"], "seed": 0, "metric": "m",
                           "step": [0, 4, 0, 2, 4, 6], "value": [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]})
    a = E.hold_last(sparse).query("label == 'A'").sort_values("step")
    assert list(a["step"]) == [0, 2, 4, 6] and list(a["value"]) == pytest.approx([0, 0.5, 1.0, 1.0])
    gap = E.final_gap(df).set_index("negatives")
    assert gap.loc["own", "diff"] == pytest.approx(1.0 - 0.2) and gap.loc["common", "diff"] == pytest.approx(0.5 - 0.2)
    summary = E.curve_summary(df)
    assert set(summary["negatives"]) == {"own", "common"} and summary["step"].max() == 3


def test_dynamics_sentences_are_computed_from_the_tables():
    """Figures 2-3's closing lines: every number comes from the tables passed in (a change there changes the text)."""
    trained = pd.DataFrame({"dataset": "qasc", "label": ["S-DPO", "S-DPO", "MASS-DPO"], "steps": [10, 12, 7]})
    gap = pd.DataFrame([
        {"dataset": "qasc", "negatives": n, "metric": m, "MASS-DPO": a, "S-DPO": b, "diff": a - b}
        for n, m, a, b in [("own", "accuracy", 0.6, 0.4), ("common", "accuracy", 0.1, 0.15),
                           ("own", "margin", 1.5, 0.5), ("common", "mrr", 0.3, 0.31)]])
    lengths = pd.DataFrame({"dataset": "qasc", "label": ["MASS-DPO", "MASS-DPO"], "seed": [0, 1],
                            "share": [0.5, 0.7], "chance": [0.43, 0.43]})
    learned = pd.DataFrame({"dataset": "qasc", "method": ["S-DPO", "MASS-DPO"], "metric": "mrr",
                            "diff": [0.05, 0.02], "z_score": [4.0, 1.5], "learned": [True, False]})
    pairs = pd.DataFrame([{"a": "MASS-DPO", "b": "S-DPO", "dataset": "qasc", "metric": "mrr", "diff": -0.01,
                           "lo": -0.03, "hi": 0.01, "significant": False, "prompts": 200, "seeds": 2}])
    lines = E.dynamics_sentences(trained, "optimizer step", gap, lengths, learned, pd.DataFrame(columns=["dataset"]),
                                 pairs)
    assert lines[0] == "The x axis is the optimizer step; step 0 is the untrained policy (the reference)."
    assert lines[1] == "Optimizer steps (mean over seeds): qasc MASS-DPO 7, qasc S-DPO 11"
    assert "MASS-DPO beats the untrained reference by at least 3 standard errors on mrr on 0 of 1" in lines[3]
    assert "last iterate, own negatives, qasc, accuracy: MASS-DPO 0.600, S-DPO 0.400 (difference +0.200)" in lines
    assert "last iterate, own negatives, qasc, margin: MASS-DPO 1.500, S-DPO 0.500 (difference +1.000)" in lines
    assert not any("mrr: MASS-DPO 0.300" in line for line in lines)  # accuracy and margin only
    assert "qasc: 60% of MASS-DPO's training negatives are among the 3 longest of their pool (uniform draw: 43%)" in lines
    assert any(line.startswith("test: MASS-DPO minus S-DPO on qasc (mrr): -1.0 points") for line in lines)
    assert lines[-1].startswith("qasc: MASS-DPO minus S-DPO in accuracy is +0.200 on each run's own negatives and "
                                "-0.050 on the common whole pools")


def test_common_curves_skip_runs_without_a_path_to_retrace(tmp_path):
    # Adam or LM-regime runs (run_row leaves ridge empty) have no deterministic path: never refitted; without
    # whole-pool log rows (pool_eval) they are skipped (a freeze run's pool rows: tests/test_frozen.py)
    runs = pd.DataFrame([{"label": "S-DPO", "ridge": None, "run_dir": str(tmp_path / "missing"), "dataset": "qasc",
                          "method": "sdpo", "seed": 0}])
    assert E.common_curves(runs).empty


@pytest.mark.slow
def test_common_curves_retrace_each_fit_from_the_reference_to_its_test_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("MASS_DPO_CACHE", str(tmp_path / "cache"))
    # a weak ridge: theta moves far enough that the run's float32 test scores (log ref + phi . theta, then minus
    # log ref) rank like the exact ones
    setup = E.Setup(model="tiny", profile="smoke", seeds=[0], train_limit=12, eval_limit=6, test_limit=6,
                    root=str(tmp_path / "runs"), options={"ridge": 1e-4}, tune=False)
    runs = pd.concat([E.reference_rows(setup, ["qasc"], echo=None),
                      E.run_grid(setup, E.grid(["qasc"], ["sdpo", "mass_dpo"], [0], n=3), echo=None)],
                     ignore_index=True)
    assert E.curve_axis(runs[runs["label"] != "reference"]) == "L-BFGS iteration"
    own = E.curves(runs)
    from mass_dpo import files

    locks, compute_once = [], files.compute_once  # each curve under its run's own lock (training's), outside it
    monkeypatch.setattr(files, "compute_once", lambda target, *a, **k: (locks.append(Path(target)),
                                                                        compute_once(target, *a, **k))[1])
    common = E.common_curves(runs, split="test")  # scored on the test pools: its last iterate is the run's test
    assert sorted(locks) == sorted(Path(d) for d in runs[runs["label"] != "reference"]["run_dir"])
    ref = runs[runs["label"] == "reference"].iloc[0]
    for _, row in runs[runs["label"] != "reference"].iterrows():
        mine = common[common["label"] == row["label"]].pivot_table(index="step", columns="metric", values="value")
        assert list(mine.index) == sorted(own[own["label"] == row["label"]]["step"].unique())  # the same iterates
        assert mine.index[-1] == row["steps"]
        assert mine.iloc[0]["accuracy"] == pytest.approx(ref["recall@1"])  # iteration 0 = the reference
        assert mine.iloc[0]["mrr"] == pytest.approx(ref["mrr"])
        assert mine.iloc[-1]["accuracy"] == pytest.approx(row["recall@1"], abs=1e-6)
        assert mine.iloc[-1]["mrr"] == pytest.approx(row["mrr"], abs=1e-6)
    assert set(common["negatives"]) == {"common"} and set(own["negatives"]) == {"own"}
    pd.testing.assert_frame_equal(E.common_curves(runs, split="test"), common)  # kept in the run folders
    # a run whose saved theta the refit does not reach is refused, not silently replaced

    run = Path(runs[runs["label"] == "S-DPO"].iloc[0]["run_dir"])
    snap = torch.load(run / "snapshots" / "final.pt")
    torch.save({**snap, "theta": snap["theta"] + 1.0}, run / "snapshots" / "final.pt")
    with pytest.raises(RuntimeError, match="retrain"):
        E.refit(run)


def test_longest_share_counts_picks_among_the_longest_negatives():
    # pool of 5, chosen = 0; negative lengths 1..4 at candidates 1..4: the 2 longest negatives are 3 and 4
    lengths = torch.tensor([[9, 1, 2, 3, 4], [9, 1, 2, 3, 4]])
    mask = torch.tensor([[True] * 5, [True, True, True, True, False]])  # prompt 1: candidate 4 is padding
    cand = torch.tensor([[0, 4, 1], [0, 3, -1]])  # prompt 0 picks 4 (long) and 1 (short); prompt 1 picks 3 (long)
    share, chance = E.longest_share(cand, lengths, mask, k=2)
    assert share == pytest.approx(2 / 3)
    # chance: prompt 0: 2 of 4 negatives per pick (2 picks), prompt 1: 2 of 3 (1 pick)
    assert chance == pytest.approx((2 * 0.5 + 1 * 2 / 3) / 3)



def test_comparison_sentences_list_each_dataset_and_count_clear_gaps():
    summary = pd.DataFrame([
        {"dataset": "qasc", "method": "S-DPO", "metric": "mrr", "value": 40.0, "paper": float("nan")},
        {"dataset": "qasc", "method": "MASS-DPO", "metric": "mrr", "value": 42.5, "paper": 71.0},
        {"dataset": "qasc", "method": "S-DPO", "metric": "accuracy", "value": 9.0, "paper": 1.0}])
    pairs = pd.DataFrame([
        {"a": "MASS-DPO", "b": "S-DPO", "dataset": "qasc", "metric": "mrr", "diff": 0.025, "lo": 0.01, "hi": 0.04,
         "significant": True, "prompts": 10, "seeds": 3},
        {"a": "MASS-DPO", "b": "S-DPO", "dataset": "qasc", "metric": "margin", "diff": -0.5, "lo": -1.0, "hi": 0.1,
         "significant": False, "prompts": 10, "seeds": 3}])
    lines = E.comparison_sentences(summary, pairs, "mrr")
    assert lines[0] == "mrr (%) on qasc: S-DPO 40.0, MASS-DPO 42.5 [paper 71.0]"
    assert "+2.5 points" in lines[1] and lines[1].endswith("above.")  # mrr in points
    assert "points" not in lines[2] and lines[2].endswith("inside the noise.")  # margin as is
    assert lines[3].startswith("MASS-DPO is significantly above S-DPO in 1 and below it in 0 of 2")


def test_generation_table_reports_hit_ratio_and_valid_ratio_per_label():
    rows = [{"dataset": "qasc", "label": lb, "seed": s, "accuracy_kind": "hit_ratio@1", "accuracy": a,
             "accuracy_se": 0.01, "valid_ratio": v, "valid_ratio_se": 0.02}
            for lb, s, a, v in [("S-DPO", 0, 0.08, 0.5), ("S-DPO", 1, 0.10, 0.3), ("reference", 0, 0.05, 0.6)]]
    t = E.generation_table(pd.DataFrame(rows)).set_index("label")
    assert t.loc["S-DPO", "hit_ratio@1"] == pytest.approx(9.0) and t.loc["S-DPO", "valid_ratio"] == pytest.approx(40.0)
    assert t.loc["S-DPO", "seeds"] == 2 and t.loc["reference", "hit_ratio@1_se"] == pytest.approx(1.0)
    line = E.generation_sentences(t.reset_index())[0]
    assert line.index("reference 5.0 ± 1.0 (valid 60)") < line.index("S-DPO 9.0 ± 1.0 (valid 40)")
    ranked = pd.DataFrame(rows).assign(accuracy_kind="top1")  # the log-linear regime: accuracy is not generated
    assert E.generation_table(ranked).empty and E.generation_sentences(E.generation_table(ranked)) == []


def test_runner_trains_some_datasets_of_a_grid(monkeypatch, capsys):
    """``python -m mass_dpo.experiments table2 --datasets lastfm``: that dataset's runs of the notebook's grid, the
    same specs as the notebook's; a dataset the notebook does not run is one clear error before any training."""
    from mass_dpo.experiments import runner

    seen = []
    monkeypatch.setattr(runner, "run_grid", lambda setup, specs, **k: seen.append(specs))
    assert runner.main(["table2", "--profile", "cpu", "--datasets", "lastfm"]) == 0
    full = runner.notebook_specs("table2", runner.notebook_parameters("table2", "cpu"))  # lastfm and movielens
    assert seen[0] == [s for s in full if s["dataset"] == "lastfm"] and len(seen[0]) == len(full) // 2
    seen.clear()
    with pytest.raises(SystemExit):
        runner.main(["table2", "table5", "--profile", "cpu", "--datasets", "qasc"])
    assert "table2 under profile cpu has no dataset qasc" in capsys.readouterr().err and not seen


def test_quickstart_information_summary_and_sentences():
    picks = pd.DataFrame({"prompt": [0, 0, 1, 1, 2], "info_dopt": [2.0, 2.0, 1.0, 1.0, 3.0],
                          "info_random": [1.0, 1.0, 1.5, 1.5, 1.0]})  # one row per candidate: the first per prompt
    table, sentence = E.information_summary(picks)
    table = table.set_index("strategy")
    assert table.loc["D-optimal", "mean information added"] == pytest.approx(2.0)
    assert table.loc["random", "mean information added"] == pytest.approx(3.5 / 3)
    assert table.loc["D-optimal", "share of prompts where it is larger"] == pytest.approx(2 / 3)
    assert sentence == ("D-optimal subsets add more information to the design than random ones on 67% of the 3 "
                        "prompts (mean log det(I + G_S) 2.000 against 1.167).")
    results = pd.DataFrame({"method": ["MASS-DPO"], "accuracy": [0.25], "recall@1": [0.25], "mrr": [0.5],
                            "train_prompts": [38], "test_prompts": [5]})
    assert E.results_sentence(results, "loglinear") == (
        "Trained on 38 prompts (loglinear), tested on 5: MASS-DPO accuracy 0.25, recall@1 0.25, MRR 0.50.")
