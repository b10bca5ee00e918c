"""One source of truth: every analysis reads the features and selection settings of the runs it reports.

The tuning rule is made to choose a pooling that is not the params default, and the runs get a non-default gamma;
then every analysis of the notebooks (reference rows, design diagnostics, Table 4's stability, Table 7's wall clock,
the training-dynamics curves and the length bias) is run while every split extraction and every selection is recorded.
Each must carry exactly the settings of a run of the table: a config resolved anywhere else (the profile's default
pooling, a gamma of its own) fails here.
"""

import pytest

from mass_dpo import experiments as E
from mass_dpo import preprocess, runs as R, stability as stability_module, tuning
from mass_dpo.config import resolve_config

#: What makes the features of a split (the extraction cache's key and the in-process memo's), beside its size.
FEATURES = ("model", "dataset", "data_dir", "subsample_seed", "pooling")
SIZE = {"train": "limit", "valid": "eval_limit", "test": "test_limit"}
#: What makes a selection of negatives (beyond the features).
SELECTION = ("n", "beta", "gamma", "selection_score")


def features_key(cfg, split):
    return (split, getattr(cfg, SIZE[split]), *(getattr(cfg, k) for k in FEATURES))


def all_keys(configs):
    return {features_key(c, split) for c in configs for split in SIZE}


@pytest.mark.slow
def test_every_analysis_reads_the_configuration_of_the_runs_it_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("MASS_DPO_CACHE", str(tmp_path / "cache"))
    default = resolve_config(regime="loglinear", profile="smoke").pooling
    tuned = "all" if default == "response" else "response"
    rule = {"metric": "mrr", "seed": 0, "grid": {"loglinear": {"pooling": [tuned], "ridge": [1e-2]}},
            "bounds": {"ridge": [1e-2, 1e-2]}}
    monkeypatch.setattr(tuning, "tuning_rule", lambda: rule)

    extracted, selected = [], []
    real_split, real_select = R.extracted_split, preprocess.select_extracted

    def spy_split(config, split, **kw):
        extracted.append((split, config))
        return real_split(config, split, **kw)

    def spy_select(ex, n, **kw):
        selected.append((n, kw.get("beta", 0.1), kw.get("gamma", 0.1), kw.get("selection_score", "reference")))
        return real_select(ex, n, **kw)

    def spy_recompute(ex, n, **kw):  # Table 4's Algorithm 1 at a checkpoint (mass_dpo.stability.select)
        selected.append((n, kw.get("beta", 0.1), kw.get("gamma", 0.1), kw.get("selection_score", "reference")))
        return real_recompute(ex, n, **kw)

    real_recompute = stability_module.select
    monkeypatch.setattr(R, "extracted_split", spy_split)
    monkeypatch.setattr(preprocess, "select_extracted", spy_select)
    monkeypatch.setattr(stability_module, "select", spy_recompute)

    setup = E.Setup(model="tiny", profile="smoke", seeds=[0], train_limit=12, eval_limit=8, test_limit=8,
                    root=str(tmp_path / "runs"), options={"gamma": 0.3})
    specs = E.grid(["qasc"], ["sdpo", "mass_dpo"], [0], n=2, beta=0.1)
    runs = E.run_grid(setup, specs, echo=None)
    runs = runs.assign(label=runs["label"])
    configs = [E.config_of(r) for r in runs.itertuples()]
    assert {c.pooling for c in configs} == {tuned} and {c.gamma for c in configs} == {0.3}
    allowed_features = all_keys(configs)
    allowed_selection = {tuple(getattr(c, k) for k in SELECTION) for c in configs}

    def check(what, splits=tuple(SIZE), selections=True):
        """Every features read of ``splits`` and every selection since the last check carries a run's settings;
        there must be some of each (an analysis that read nothing here would pass the loops below vacuously)."""
        read = [(split, cfg) for split, cfg in extracted if split in splits]
        assert read, f"{what} read no {'/'.join(splits)} features: nothing to check"
        for split, cfg in read:
            assert features_key(cfg, split) in allowed_features, \
                f"{what} read {split} features of another configuration: {cfg}"
        if selections:
            assert selected, f"{what} selected no negatives: nothing to check"
        for sel in selected if selections else ():
            assert sel in allowed_selection, f"{what} selected negatives with settings no run used: {sel}"
        extracted.clear()
        selected.clear()

    extracted.clear()  # training and tuning (grid points at the method's default n) are not analyses
    selected.clear()
    ref = E.reference_rows(setup, ["qasc"], echo=None)
    assert ref.iloc[0]["pooling"] == tuned
    # (the reference's training split is a one-prompt placeholder whose negatives are never used: only its test split)
    check("reference_rows", splits=("test",), selections=False)

    design = E.design_table(runs, echo=None)
    assert len(design) == 1 and design.iloc[0]["pooling"] == tuned and design.iloc[0]["gamma"] == 0.3
    check("design_table")

    E.length_bias(runs)
    E.common_curves(runs, cache=False)
    check("training dynamics")

    stab = E.stability(setup, ["qasc"], ns=(2,), seeds=[0], echo=None)
    assert set(stab["pooling"]) == {tuned} and set(stab["gamma"]) == {0.3}
    # the stability runs are new MASS-DPO runs: their own configs are the allowed ones
    stab_cfgs = [E.config_of(p) for p in set(stab["run_dir"])]
    allowed_features |= all_keys(stab_cfgs)
    allowed_selection |= {tuple(getattr(c, k) for k in SELECTION) for c in stab_cfgs}
    check("stability")

    clock = E.wallclock(setup, ["qasc"], n=2, full=7, seeds=[0], echo=None)
    assert {"extraction", "selection"} <= set(clock["component"])
    cost_runs = E.run_grid(setup, E.cost_specs(["qasc"], [0], n=2, full=7), echo=None)
    cost_cfgs = [E.config_of(r) for r in cost_runs.itertuples()]
    allowed_features |= all_keys(cost_cfgs)
    allowed_selection |= {tuple(getattr(c, k) for k in SELECTION) for c in cost_cfgs}
    check("wallclock")


def test_a_configuration_of_its_own_is_refused():
    cfg = resolve_config(regime="loglinear", profile="smoke", dataset="qasc")
    with pytest.raises(TypeError, match="finished run"):
        E.load_split(cfg, "train")
    with pytest.raises(TypeError, match="finished run"):
        E.config_of(cfg)
