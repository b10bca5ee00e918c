"""The claims table is written from the notebooks' paired-difference tables."""

import pandas as pd
import pytest

from mass_dpo.experiments.gallery import claims_markdown, write_claims


def test_claims_from_saved_tables(tmp_path):
    (tmp_path / "table1").mkdir()
    pd.DataFrame([{"model": "m", "dataset": "qasc", "metric": "mrr", "method": "S-DPO-all", "diff": 0.06, "se": 0.01,
                   "lo": 0.04, "hi": 0.08, "z_score": 6.0, "significant": True, "seeds": 3, "prompts": 500,
                   "learned": True}]).to_csv(tmp_path / "table1" / "learning.csv", index=False)
    pd.DataFrame([
        {"model": "m", "dataset": "qasc", "metric": "accuracy", "a": "MASS-DPO", "b": "S-DPO", "diff": -0.03,
         "se": 0.01, "lo": -0.05, "hi": -0.01, "z_score": -3.0, "significant": True, "seeds": 3, "prompts": 500},
        {"model": "m", "dataset": "lastfm", "metric": "accuracy", "a": "MASS-DPO", "b": "S-DPO", "diff": 0.004,
         "se": 0.01, "lo": -0.016, "hi": 0.024, "z_score": 0.4, "significant": False, "seeds": 3, "prompts": 500},
    ]).to_csv(tmp_path / "table1" / "mass_dpo_minus_sdpo.csv", index=False)
    text = claims_markdown(tmp_path)
    assert "| qasc | S-DPO-all | +6.0 | +4.0 to +8.0 | 6.00 | yes |" in text
    assert "| qasc | accuracy | MASS-DPO - S-DPO | -3.0 | -5.0 to -1.0 | a below b |" in text
    assert "| lastfm | accuracy | MASS-DPO - S-DPO | +0.4 | -1.6 to +2.4 | inside the noise |" in text
    assert "0 above, 1 below, 1 inside the noise, of 2." in text
    assert write_claims(tmp_path).read_text() == text


@pytest.mark.parametrize("lm_source", ["table1", "training_dynamics"])
def test_the_claim_is_answered_once_per_regime(tmp_path, lm_source):
    """A regime's folder (the LM regime's profile writes into lm/) gets its own line per dataset and metric, named
    by the regime its runs.csv says; a regime whose Table 1 has not run answers from its Figures 2-3 runs."""
    for sub, regime, diff in (("", "loglinear", -0.05), ("lm", "freeze", 0.01)):
        folder = tmp_path / sub / ("table1" if not sub else lm_source)
        folder.mkdir(parents=True)
        pd.DataFrame([{"model": "smollm2", "regime": regime, "dataset": "qasc", "label": "S-DPO"}]).to_csv(
            folder / "runs.csv", index=False)
        pd.DataFrame([{"model": "smollm2", "dataset": "qasc", "metric": "mrr", "a": "MASS-DPO", "b": "S-DPO",
                       "diff": diff, "se": 0.01, "lo": diff - 0.02, "hi": diff + 0.02, "z_score": diff / 0.01,
                       "significant": abs(diff) > 0.02, "seeds": 2, "prompts": 300}]).to_csv(
            folder / "mass_dpo_minus_sdpo.csv", index=False)
        pd.DataFrame([{"model": "smollm2", "dataset": "qasc", "metric": "mrr", "method": "MASS-DPO", "diff": 0.05,
                       "lo": 0.02, "hi": 0.08, "z_score": 3.3, "learned": True}]).to_csv(folder / "learning.csv",
                                                                                           index=False)
    text = claims_markdown(tmp_path)
    what = "Table 1" if lm_source == "table1" else "Figures 2-3"
    assert f"## [smollm2 freeze] Learning first ({what} runs)" in text
    assert "## [smollm2 loglinear] Learning first (Table 1 runs)" in text
    assert text.count("| qasc | MASS-DPO | +5.0 | +2.0 to +8.0 | 3.30 | yes |") == 2
    assert "| smollm2 loglinear | table1 | qasc | mrr | -5.0 | -7.0 to -3.0 | 2 | 300 | below |" in text
    assert f"| smollm2 freeze | lm/{lm_source} | qasc | mrr | +1.0 | -1.0 to +3.0 | 2 | 300 | inside the noise |" in text
    assert f"## [smollm2 freeze] `{lm_source}/mass_dpo_minus_sdpo`" in text


def test_the_claim_says_which_accuracy_each_regime_measured(tmp_path):
    """``accuracy`` is the ranking's top-1 in the log-linear regime and greedy generation's HitRatio@1 in the LM
    regimes (``runs.csv`` ``accuracy_kind``): the claims table names which, per regime."""
    for sub, regime, kind in (("", "loglinear", "top1"), ("lm", "freeze", "hit_ratio@1")):
        folder = tmp_path / sub / "table1"
        folder.mkdir(parents=True)
        pd.DataFrame([{"model": "smollm2", "regime": regime, "dataset": "qasc", "label": "S-DPO",
                       "accuracy_kind": kind}]).to_csv(folder / "runs.csv", index=False)
        pd.DataFrame([{"model": "smollm2", "dataset": "qasc", "metric": m, "a": "MASS-DPO", "b": "S-DPO",
                       "diff": 0.01, "se": 0.01, "lo": -0.01, "hi": 0.03, "z_score": 1.0, "significant": False,
                       "seeds": 2, "prompts": 300} for m in ("accuracy", "mrr")]).to_csv(
            folder / "mass_dpo_minus_sdpo.csv", index=False)
    text = claims_markdown(tmp_path)
    assert "| smollm2 loglinear | table1 | qasc | accuracy (top-1 of the pool) | +1.0 |" in text
    assert "| smollm2 freeze | lm/table1 | qasc | accuracy (generation HitRatio@1) | +1.0 |" in text
    assert "| smollm2 freeze | lm/table1 | qasc | mrr | +1.0 |" in text


def test_learning_check_merges_the_tables_that_ran_until_table1_has(tmp_path):
    """Without Table 1, a regime's learning check lists every method of the tables that ran, once each (Table 2's
    S-DPO row wins over the same runs in Figures 2-3), by dataset then method; a dataset Table 1 ran comes from
    Table 1 alone, the others still from the tables that ran (Table 1 run a dataset at a time)."""
    def learning(name, rows):
        (tmp_path / name).mkdir(exist_ok=True)
        pd.DataFrame([{"model": "m", "dataset": d, "metric": "mrr", "method": m, "diff": g, "lo": g - 0.02,
                       "hi": g + 0.02, "z_score": g / 0.01, "learned": g >= 0.03} for d, m, g in rows]).to_csv(
            tmp_path / name / "learning.csv", index=False)

    learning("training_dynamics", [("qasc", "S-DPO", 0.01), ("lastfm", "S-DPO", 0.07)])
    learning("table2", [("lastfm", "DPO", 0.04), ("lastfm", "S-DPO", 0.07)])
    text = claims_markdown(tmp_path)
    assert "## Learning first (Table 2, Figures 2-3 runs)" in text
    for line in ("| lastfm | DPO | +4.0 | +2.0 to +6.0 | 4.00 | yes |", "| lastfm | S-DPO | +7.0 | +5.0 to +9.0 | 7.00 | yes |",
                 "| qasc | S-DPO | +1.0 | -1.0 to +3.0 | 1.00 | no |"):
        assert text.count(line) == 1
    # by dataset, then method, in the paper's order (not in the order the tables were read)
    assert text.index("| qasc | S-DPO |") < text.index("| lastfm | DPO |") < text.index("| lastfm | S-DPO |")
    learning("table1", [("qasc", "DMPO", 0.05)])
    text = claims_markdown(tmp_path)
    assert "Learning first (Table 1, Table 2 runs)" in text
    assert "| qasc | DMPO | +5.0 |" in text and "| qasc | S-DPO |" not in text  # qasc: Table 1's rows only
    assert text.count("| lastfm | DPO | +4.0 |") == 1 and text.count("| lastfm | S-DPO | +7.0 |") == 1
    learning("table1", [("qasc", "DMPO", 0.05), ("lastfm", "DMPO", 0.06)])
    text = claims_markdown(tmp_path)
    assert "Learning first (Table 1 runs)" in text and "| lastfm | DPO |" not in text


def test_the_claim_comes_per_dataset_from_table1_where_it_ran(tmp_path):
    """A regime whose Table 1 ran some datasets answers the claim for those from Table 1 and for the others from
    its Figures 2-3 runs, one line per (dataset, metric)."""
    for source, rows in (("table1", [("lastfm", 0.02)]), ("training_dynamics", [("lastfm", -0.09), ("qasc", 0.01)])):
        folder = tmp_path / "lm" / source
        folder.mkdir(parents=True)
        pd.DataFrame([{"model": "smollm2", "regime": "freeze", "dataset": "lastfm", "label": "S-DPO"}]).to_csv(
            folder / "runs.csv", index=False)
        pd.DataFrame([{"model": "smollm2", "dataset": d, "metric": "mrr", "a": "MASS-DPO", "b": "S-DPO", "diff": g,
                       "se": 0.01, "lo": g - 0.02, "hi": g + 0.02, "z_score": g / 0.01, "significant": abs(g) > 0.02,
                       "seeds": 2, "prompts": 300} for d, g in rows]).to_csv(folder / "mass_dpo_minus_sdpo.csv",
                                                                             index=False)
    text = claims_markdown(tmp_path).split("## The method tables")[0].split("## [")[0]
    assert "| smollm2 freeze | lm/table1 | lastfm | mrr | +2.0 | +0.0 to +4.0 | 2 | 300 | inside the noise |" in text
    assert "| smollm2 freeze | lm/training_dynamics | qasc | mrr | +1.0 |" in text
    assert "-9.0" not in text  # lastfm's Figures 2-3 line is not a second answer


def test_method_tables_side_by_side_per_regime(tmp_path):
    """MRR per (dataset, method) in each regime that ran it, mean over seeds, from the tables' own runs.csv; a cell
    only one regime ran is left out; each regime is named with the score it ranks by."""
    def runs(folder, regime, score, rows):
        folder.mkdir(parents=True)
        pd.DataFrame([{"model": "smollm2", "regime": regime, "dataset": d, "label": m, "seed": s, "score": score,
                       "mrr": v} for d, m, s, v in rows]).to_csv(folder / "runs.csv", index=False)

    runs(tmp_path / "table1", "loglinear", "reward",
         [("qasc", "S-DPO", 0, 0.30), ("qasc", "S-DPO", 1, 0.40), ("lastfm", "DPO", 0, 0.2)])
    runs(tmp_path / "lm" / "table6", "freeze", "logp", [("qasc", "S-DPO", 0, 0.50), ("qasc", "S-DPO", 1, 0.54)])
    text = claims_markdown(tmp_path)
    assert "| dataset | method | smollm2 loglinear (reward) | smollm2 freeze (logp) |" in text
    assert "| qasc | S-DPO | 35.0 | 52.0 |" in text and "| lastfm | DPO |" not in text


def test_a_round_drawn_on_its_own_answers_for_its_dataset(tmp_path):
    """A Table 1 round drawn into a folder of its own (lm/table1_medmcqa: its dataset's runs are records while the
    other datasets' are not) answers the claim and the learning check for its dataset, after table1/ itself and
    before the Figures 2-3 runs; its paired tables get a section named by its folder."""
    def tables(name, dataset, gain):
        folder = tmp_path / "lm" / name
        folder.mkdir(parents=True)
        pd.DataFrame([{"model": "smollm2", "regime": "freeze", "dataset": dataset, "label": "S-DPO", "seed": 0,
                       "score": "logp", "mrr": 0.3}]).to_csv(folder / "runs.csv", index=False)
        pd.DataFrame([{"model": "smollm2", "dataset": dataset, "metric": "mrr", "a": "MASS-DPO", "b": "S-DPO",
                       "diff": gain, "se": 0.01, "lo": gain - 0.02, "hi": gain + 0.02, "z_score": gain / 0.01,
                       "significant": abs(gain) > 0.02, "seeds": 2, "prompts": 300}]).to_csv(
            folder / "mass_dpo_minus_sdpo.csv", index=False)
        pd.DataFrame([{"model": "smollm2", "dataset": dataset, "metric": "mrr", "method": "DMPO", "diff": gain + 0.1,
                       "lo": gain + 0.08, "hi": gain + 0.12, "z_score": 9.0, "learned": True}]).to_csv(
            folder / "learning.csv", index=False)

    tables("table1", "lastfm", 0.02)
    tables("training_dynamics", "medmcqa", -0.09)
    tables("table1_medmcqa", "medmcqa", -0.04)
    text = claims_markdown(tmp_path)
    claim = text.split("## The method tables")[0].split("## [")[0]
    assert "| smollm2 freeze | lm/table1_medmcqa | medmcqa | mrr | -4.0 | -6.0 to -2.0 | 2 | 300 | below |" in claim
    assert "| smollm2 freeze | lm/table1 | lastfm | mrr | +2.0 |" in claim and "-9.0" not in claim
    assert "## [smollm2 freeze] Learning first (Table 1 runs)" in text
    assert "| medmcqa | DMPO | +6.0 | +4.0 to +8.0 | 9.00 | yes |" in text and "| medmcqa | DMPO | +1.0 |" not in text
    assert "## [smollm2 freeze] `table1_medmcqa/mass_dpo_minus_sdpo`" in text
    assert "## [smollm2 freeze] `table1/mass_dpo_minus_sdpo`" in text


def test_the_learning_summary_counts_each_methods_datasets_against_the_quorum(tmp_path):
    """Per method: the datasets it learned on, those it fell short on with their z, and whether every method learns
    on at least 3 of 4 (:data:`LEARNING_QUORUM`)."""
    (tmp_path / "table1").mkdir()
    z = {("qasc", "S-DPO"): 4.0, ("lastfm", "S-DPO"): 3.5, ("medmcqa", "S-DPO"): 2.0, ("movielens", "S-DPO"): 5.0,
         ("qasc", "MASS-DPO"): 2.2, ("lastfm", "MASS-DPO"): 3.1, ("medmcqa", "MASS-DPO"): 2.9,
         ("movielens", "MASS-DPO"): 3.0}
    pd.DataFrame([{"model": "m", "dataset": d, "metric": "mrr", "method": m, "diff": v / 100, "lo": 0.0, "hi": 0.1,
                   "z_score": v, "learned": v >= 3} for (d, m), v in z.items()]).to_csv(
        tmp_path / "table1" / "learning.csv", index=False)
    text = claims_markdown(tmp_path)
    assert "- S-DPO: learned on 3 of 4 dataset(s); short on medmcqa (z 2.00)." in text
    assert "- MASS-DPO: learned on 2 of 4 dataset(s); short on medmcqa (z 2.90), qasc (z 2.20)." in text
    assert "at least 3 of the 4 datasets (75%): **not met** by MASS-DPO (2 of 4)." in text
    z[("qasc", "MASS-DPO")] = 3.0  # now 3 of 4
    pd.DataFrame([{"model": "m", "dataset": d, "metric": "mrr", "method": m, "diff": v / 100, "lo": 0.0, "hi": 0.1,
                   "z_score": v, "learned": v >= 3} for (d, m), v in z.items()]).to_csv(
        tmp_path / "table1" / "learning.csv", index=False)
    assert "at least 3 of the 4 datasets (75%): met by every method." in claims_markdown(tmp_path)
