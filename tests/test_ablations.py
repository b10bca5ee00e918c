"""Tables 3 and 4 (mass_dpo.experiments.ablations, .stability): the run grid, arms, MASS-DPO minus S-DPO at the same
(n, beta) on hand-built per-prompt results, the readings panel, the design sentence, trivial budgets, conclusions."""

import importlib

import pandas as pd
import pytest
import torch

from mass_dpo import experiments as E
from mass_dpo.extraction import Extracted

ST = importlib.import_module("mass_dpo.experiments.stability")  # the module (the package exports its function)


# ---------------------------------------------------------------- the run grid


def test_table3_specs_pair_every_mass_dpo_setting_with_sdpo_and_add_the_other_readings():
    specs = E.table3_specs(["qasc"], [0, 1], betas=(0.1, 0.5, 1.0), ns=(1, 3, 5), n=3, beta=0.1)
    mass = [s for s in specs if s["method"] == "mass_dpo" and "selection_score" not in s]
    sdpo = [s for s in specs if s["method"] == "sdpo"]
    panel = [s for s in specs if "selection_score" in s]
    settings = {(s["n"], s["beta"], s["seed"]) for s in mass}
    assert len(mass) == 5 * 2 and {(s["n"], s["beta"], s["seed"]) for s in sdpo} == settings
    assert not any("selection_score" in s for s in sdpo)  # random negatives: no reading, so one S-DPO run each
    # the default reading's panel runs are the beta axis (same hash): only delta and offset are added
    assert {s["selection_score"] for s in panel} == {"delta", "offset"}
    assert sorted((s["selection_score"], s["beta"], s["seed"]) for s in panel) == sorted(
        (r, b, seed) for r in ("delta", "offset") for b in (0.1, 0.5, 1.0) for seed in (0, 1))
    assert all(s["n"] == 3 and s["method"] == "mass_dpo" for s in panel)
    assert len(specs) == len({tuple(sorted(s.items())) for s in specs})  # no run twice


def test_arm_labels_name_method_reading_n_and_beta():
    assert E.arm_label("MASS-DPO", 3, 0.5, "delta") == "MASS-DPO[delta] n=3 beta=0.5"
    assert E.arm_label("S-DPO", 1, 1.0, "reference") == "S-DPO n=1 beta=1"
    assert E.arm_label("reference", 0, 0.1, "reference") == "reference"


# ---------------------------------------------------------------- paired differences on hand-built runs


def _run(tmp_path, label, n, beta, reading, seed, values, dataset="qasc"):
    """A run row whose test_per_prompt.csv holds ``values`` (accuracy and mrr per prompt p0, p1, ...)."""
    folder = tmp_path / f"{label}-{n}-{beta}-{reading}-{seed}-{dataset}"
    folder.mkdir()
    pd.DataFrame({"id": [f"p{i}" for i in range(len(values))], "accuracy": values,
                  "mrr": [0.5 * v for v in values]}).to_csv(folder / "test_per_prompt.csv", index=False)
    return {"model": "tiny", "dataset": dataset, "label": label, "n": n, "beta": beta, "selection_score": reading,
            "seed": seed, "run_dir": str(folder), "accuracy": sum(values) / len(values), "accuracy_se": 0.1}


def test_sdpo_pairs_take_sdpo_at_the_same_n_and_beta_and_the_same_seed(tmp_path):
    rows = [
        _run(tmp_path, "MASS-DPO", 3, 0.1, "reference", 0, [1, 1, 0, 0]),
        _run(tmp_path, "MASS-DPO", 3, 0.1, "reference", 1, [1, 1, 1, 0]),
        _run(tmp_path, "S-DPO", 3, 0.1, "reference", 0, [0, 1, 0, 0]),
        _run(tmp_path, "S-DPO", 3, 0.1, "reference", 1, [0, 0, 1, 0]),
        _run(tmp_path, "MASS-DPO", 3, 0.5, "delta", 0, [0, 0, 0, 0]),
        _run(tmp_path, "S-DPO", 3, 0.5, "reference", 0, [1, 1, 1, 1]),  # a mis-pairing with beta 0.1 would show
    ]
    pairs = E.sdpo_pairs(pd.DataFrame(rows), ["accuracy", "mrr"])
    assert len(pairs) == 4
    main = pairs[(pairs["beta"] == 0.1) & (pairs["metric"] == "accuracy")].iloc[0]
    # seed 0: [1, 0, 0, 0]; seed 1: [1, 1, 0, 0]; mean over seeds per prompt [1, 0.5, 0, 0]
    assert main["a"] == "MASS-DPO[reference] n=3 beta=0.1" and main["b"] == "S-DPO n=3 beta=0.1"
    assert main["diff"] == pytest.approx(0.375) and main["seeds"] == 2 and main["prompts"] == 4
    se = pd.Series([1, 0.5, 0, 0]).std(ddof=1) / 2
    assert main["se"] == pytest.approx(se) and main["lo"] == pytest.approx(0.375 - 1.96 * se)
    other = pairs[(pairs["beta"] == 0.5) & (pairs["metric"] == "mrr")].iloc[0]
    assert other["selection_score"] == "delta" and other["diff"] == pytest.approx(-0.5)
    assert bool(other["significant"]) is False  # every prompt differs by the same amount: se 0, no interval

    axes = E.ablation_pairs(pairs, betas=[0.1, 0.5], ns=[3], n=3, beta=0.1, selection_score="reference")
    assert set(axes["selection_score"]) == {"reference"}  # the delta pair belongs to the panel only
    assert sorted(set(axes["ablation"])) == ["beta", "n"]  # (n=3, beta=0.1) lies on both axes

    panel = E.readings_panel(pairs, n=3, betas=[0.1, 0.5], metric="accuracy").set_index("selection_score")
    assert panel.loc["reference", "beta=0.1"] == (f"+37.5 [{100 * (0.375 - 1.96 * se):+.1f}, "
                                                  f"{100 * (0.375 + 1.96 * se):+.1f}]")
    assert panel.loc["delta", "beta=0.5"] == "-100.0 [-100.0, -100.0]"
    assert "below in 0" in E.pairs_sentence(pairs, "accuracy") and "of 2" in E.pairs_sentence(pairs, "accuracy")


def test_arm_learning_compares_each_setting_with_the_reference(tmp_path):
    rows = [_run(tmp_path, "reference", 0, 0.1, "reference", 0, [0] * 6),
            _run(tmp_path, "MASS-DPO", 3, 0.1, "reference", 0, [1, 1, 1, 1, 1, 0]),
            _run(tmp_path, "MASS-DPO", 3, 0.5, "reference", 0, [0, 0, 0, 0, 0, 1])]
    learned = E.arm_learning(pd.DataFrame(rows), ["accuracy"])
    got = learned.set_index("method")["diff"]
    assert got["MASS-DPO[reference] n=3 beta=0.1"] == pytest.approx(5 / 6)
    assert got["MASS-DPO[reference] n=3 beta=0.5"] == pytest.approx(1 / 6)  # not mixed with the other beta
    summary = E.learning_summary(learned, "accuracy").set_index("arm")
    assert summary.loc["MASS-DPO[reference] n=3 beta=0.1", "learned"] == 1
    assert summary.loc["MASS-DPO[reference] n=3 beta=0.5", "learned"] == 0


def test_ablation_table_keeps_the_reading_and_puts_the_paper_beside_mass_dpo_only():
    rows = []
    for label, reading, acc in (("MASS-DPO", "reference", 0.5), ("MASS-DPO", "delta", 0.9), ("S-DPO", "reference", 0.4),
                                ("reference", "reference", 0.25)):
        for beta in (0.1, 0.5, 1.0):
            rows.append({"model": "smollm2", "dataset": "qasc", "label": label, "method": label.lower(), "n": 3,
                         "beta": beta, "seed": 0, "selection_score": reading, "accuracy": acc, "accuracy_se": 0.01})
    runs = pd.DataFrame(rows)
    assert set(E.ablation_table(runs, model="smollm2", ns=(3,))["method"]) == {"MASS-DPO"}  # the paper's table
    t = E.ablation_table(runs, model="smollm2", ns=(3,), methods=("reference", "MASS-DPO", "S-DPO"))
    assert list(dict.fromkeys(t["method"])) == ["reference", "MASS-DPO", "S-DPO"]
    ref = t[t["method"] == "reference"]
    assert len(ref) == 1 and ref["value"].iloc[0] == pytest.approx(25.0) and ref["ablation"].iloc[0] == "reference"
    mass = t[t["method"] == "MASS-DPO"]["value"].tolist()
    assert mass == pytest.approx([50.0] * len(mass)) and len(mass) == 4  # the delta runs are not here
    assert t[t["method"] == "MASS-DPO"]["paper"].notna().all() and t[t["method"] != "MASS-DPO"]["paper"].isna().all()
    best = E.best_setting(t)
    assert set(best["method"]) == {"MASS-DPO", "S-DPO"}  # the reference has no setting to choose
    line = E.axis_sentence(t, "qasc")
    assert line.startswith("accuracy (%) on qasc: reference 25.0; MASS-DPO beta 0.1/0.5/1: 50.0/50.0/50.0 (paper ")
    assert "S-DPO beta 0.1/0.5/1: 40.0/40.0/40.0;" in line and "S-DPO n 3: 40.0." in line


# ---------------------------------------------------------------- design sentence


def _design_row(reading, beta, share, **kw):
    row = {"model": "tiny", "dataset": "lastfm", "selection_score": reading, "n": 3, "beta": beta, "gamma": 0.1,
           "prompts": 64, "g_diag_median": 1e-3, "g_diag_max": 1e-2, "g_offdiag_median": 1e-4, "g_offdiag_max": 2e-3,
           "alpha0_median": 0.1, "greedy_is_top_diag": share, "overlap_random": 0.2, "overlap_hardest": 0.3,
           "overlap_longest": 0.7, "length_chosen": 5.0, "length_dopt": 7.1, "length_random": 4.6,
           "length_negatives": 4.5}
    row.update(kw)
    row["degenerate"] = share >= 0.95
    return row


def test_design_sentence_says_whether_the_design_degenerates():
    rows = [_design_row(r, 0.1, 1.0) for r in ("delta", "reference", "offset")]
    rows += [_design_row("delta", 1.0, 1.0), _design_row("reference", 1.0, 0.5, overlap_longest=0.4)]
    table = pd.DataFrame(rows)
    text = E.design_sentence(table, "lastfm", beta=0.1)
    assert "degenerates to \"top-n by G_ii\" under every reading" in text
    assert "100% (delta), 100% (reference), 100% (offset)" in text
    assert "longest negatives by 0.70" in text and "are 7.1 tokens" in text and "4.6 for random" in text
    assert "At beta = 1: 50-100% of the prompts, degenerate under 1 of 2 readings." in text
    mixed = E.design_sentence(table, "lastfm", beta=1.0)
    assert "degenerates under delta only" in mixed and "0.40-0.70" in mixed
    table.loc[:, "degenerate"] = False
    assert "does not degenerate under any reading" in E.design_sentence(table, "lastfm", beta=1.0)


# ---------------------------------------------------------------- Table 4: trivial budgets and conclusions


def test_budget_table_marks_n_at_least_every_pools_negatives(monkeypatch):
    import mass_dpo.data

    # pools of 8, 5, 8 and 8 candidates: at most 7 negatives (QASC)
    fake = [{"id": f"p{i}", "candidates": ["x"] * c, "target": 0} for i, c in enumerate((8, 5, 8, 8))]
    seen = []

    def load(name, split, *, data_dir=None, limit=None, seed=0):
        seen.append((name, split, limit, seed))
        return fake

    monkeypatch.setattr(mass_dpo.data, "load_benchmark", load)
    monkeypatch.setattr(ST, "load_split", lambda *a: pytest.fail("the budgets need no extraction"))
    setup = E.Setup(model="tiny", profile="smoke", data_dir="samples", seeds=[0], train_limit=16)
    budgets = ST.budget_table(setup, ["qasc"], [5, 7, 10], echo=None)
    assert seen == [("qasc", "train", 16, 0)]  # the training prompts the runs take
    assert budgets.set_index("n")["trivial"].to_dict() == {5: False, 7: True, 10: True}
    assert (budgets["negatives_max"] == 7).all()
    text = E.budget_sentence(budgets)
    assert "qasc n = 7 (at most 7 negatives per pool); qasc n = 10" in text and "n = 5" not in text
    assert "no row is dropped" in E.budget_sentence(budgets[~budgets["trivial"]])


def _stab(retention, exact, reading="reference"):
    return pd.DataFrame([{"model": "m", "dataset": "movielens", "n": 5, "seed": 0, "selection_score": reading,
                          "checkpoint": c, "step": 3, "theta_norm": 2.0, "exact_match": exact, "jaccard": exact,
                          "top1_match": 1.0, "top3_exact_match": exact, "objective_retention": retention}
                         for c in ("mid", "final")])


def test_stability_sentences_follow_the_numbers():
    good = _stab(0.999, 0.99)
    lines = E.stability_sentences(E.stability_table(good, model="llama3"), good)
    text = " ".join(lines)
    assert "re-selecting during training would gain little" in text and "stay nearly identical" in text
    assert "exact match 0.990" in text and "reference" in text
    bad = _stab(0.9, 0.5, reading="offset")
    text = " ".join(E.stability_sentences(E.stability_table(bad, model="llama3"), bad))
    assert "does not hold here" in text and "change more than in the paper" in text
    assert "by construction" in text  # offset: the logits do not move with theta
