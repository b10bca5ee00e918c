"""Learning first: the reference row, both test scores, paired differences, the validation tuning rule."""

import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from mass_dpo import experiments as E
from mass_dpo.evaluation import evaluate, reference_policy
from mass_dpo.loglinear import LogLinearPolicy
from mass_dpo.metrics import ranking_metrics


def _data(P=12, C=5, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(ids=[f"p{i}" for i in range(P)], features=torch.randn(P, C, d, generator=g),
                           ref_logps=torch.randn(P, C, generator=g) * 3, mask=torch.ones(P, C, dtype=torch.bool),
                           target=torch.randint(0, C, (P,), generator=g))


def test_reference_row_is_theta_zero_scored_both_ways():
    data = _data()
    trained = LogLinearPolicy(4)
    with torch.no_grad():
        trained.theta.fill_(0.7)
    ref = evaluate(reference_policy(trained), data, score="reward", beta=0.5)
    assert float(reference_policy(trained).theta.detach().abs().max()) == 0.0
    # implicit reward of theta = 0 is 0 everywhere: exactly chance with ties broken in expectation
    assert ref["recall@1"] == pytest.approx(1 / 5)
    # its log-prob is the reference model's: the same ranking as ranking by ref_logps
    by_ref = ranking_metrics(data.ref_logps, data.target)
    assert ref["logp_recall@1"] == pytest.approx(by_ref["recall@1"]) and ref["logp_mrr"] == pytest.approx(by_ref["mrr"])
    assert ref["accuracy"] == ref["recall@1"] and ref["accuracy_kind"] == "top1"
    # the trained policy is scored by phi . theta (reward) and ref + phi . theta (logp)
    out = evaluate(trained, data, score="reward", beta=0.5, return_scores=True)
    reward = 0.5 * (data.features @ trained.theta.detach())
    assert torch.allclose(out["scores"].float(), reward, atol=1e-5)
    assert out["mrr"] == pytest.approx(ranking_metrics(reward, data.target)["mrr"])
    assert out["logp_mrr"] == pytest.approx(ranking_metrics(data.ref_logps + reward / 0.5, data.target)["mrr"])


def test_per_prompt_file_holds_what_the_means_average(tmp_path):
    data = _data()
    policy = LogLinearPolicy(4)
    with torch.no_grad():
        policy.theta.normal_()
    out = evaluate(policy, data, per_prompt=tmp_path / "pp.csv")
    table = pd.read_csv(tmp_path / "pp.csv")
    assert list(table["id"]) == data.ids
    for key in ("recall@1", "mrr", "pairwise_accuracy", "logp_mrr", "accuracy"):
        assert table[key].mean() == pytest.approx(out[key])


def _run(tmp_path, name, label, seed, values):
    folder = tmp_path / name
    folder.mkdir()
    pd.DataFrame({"id": [f"p{i}" for i in range(len(values))], "mrr": values}).to_csv(folder / "test_per_prompt.csv",
                                                                                       index=False)
    return {"model": "m", "dataset": "d", "label": label, "seed": seed, "run_dir": str(folder)}


def test_paired_difference_by_hand(tmp_path):
    rows = [_run(tmp_path, "a0", "A", 0, [1.0, 0.5, 0.0, 1.0]), _run(tmp_path, "a1", "A", 1, [1.0, 1.0, 0.0, 0.5]),
            _run(tmp_path, "b0", "B", 0, [0.5, 0.5, 0.0, 0.0]), _run(tmp_path, "b1", "B", 1, [0.0, 0.5, 0.5, 0.5]),
            _run(tmp_path, "r", "reference", 0, [0.25, 0.25, 0.25, 0.25])]
    runs = pd.DataFrame(rows)
    out = E.paired_difference(runs, "A", "B", "mrr").iloc[0]
    d = [(0.5 + 1.0) / 2, (0.0 + 0.5) / 2, (0.0 - 0.5) / 2, (1.0 + 0.0) / 2]  # per prompt, averaged over seeds
    mean = sum(d) / 4
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / 3) / 2
    assert out["diff"] == pytest.approx(mean) and out["se"] == pytest.approx(se)
    assert out["lo"] == pytest.approx(mean - 1.96 * se) and out["seeds"] == 2 and out["prompts"] == 4
    assert bool(out["significant"]) == (abs(mean) > 1.96 * se)
    # against the single reference run, each seed of A is paired with it
    ref = E.paired_difference(runs, "A", "reference", "mrr").iloc[0]
    assert ref["diff"] == pytest.approx((0.625 + 0.625) / 2 - 0.25)
    learned = E.learning_table(runs, ["mrr"], threshold=3.0)
    assert set(learned["method"]) == {"A", "B"}
    assert "A minus B on d (mrr)" in E.paired_sentence(out)


def test_learning_sentence_does_not_round_a_miss_up_to_the_threshold():
    learned = pd.DataFrame([{"method": "M", "metric": "mrr", "dataset": "d", "diff": 0.061, "z_score": 2.954,
                             "learned": False}])
    text = E.learning_sentence(learned, "M", threshold=3.0)
    assert "on 0 of 1 dataset(s)" in text and "(2.95 SE)" in text


def test_tuning_picks_the_best_validation_value_ties_to_the_first(monkeypatch):
    seen = []

    def fake_run_one(setup, spec, data_dir=None, snapshots=False):
        seen.append(spec)
        value = {0.1: 0.30, 0.01: 0.40, 0.001: 0.40, 0.0001: 0.20}[spec["ridge"]]
        return SimpleNamespace(metrics={"mrr": value, "mrr_se": 0.01, "prompts": 10})

    monkeypatch.setattr(E.core, "run_one", fake_run_one)
    monkeypatch.setattr(E.core, "tuning_rule", lambda: {"metric": "mrr", "seed": 0,
                                                        "grid": {"loglinear": {"ridge": [0.1, 0.01, 0.001, 0.0001]}}})
    chosen, table = E.core.tune(E.Setup(model="tiny"), "qasc", "sdpo")
    assert chosen == {"ridge": 0.01}
    assert all(s["test_split"] == "valid" and s["seed"] == 0 for s in seen)  # never the test split
    assert table["chosen"].tolist() == [False, True, False, False]
    assert not table["extended"].any()  # the best is inside the grid: nothing added


def test_the_tuning_rule_is_written_in_params():
    """The rule the notebooks apply is params/training.yaml's, read back: its metric and every grid combination."""
    import itertools

    from mass_dpo.params import load_params

    written = load_params("training")["tuning"]
    rule = E.tuning_rule()
    assert rule["metric"] == written["metric"] == "mrr"
    for regime, axes in written["grid"].items():
        expected = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
        assert sorted(map(str, E.tuning_grid(regime))) == sorted(map(str, expected)), regime
        assert len(E.tuning_grid(regime)) == len(expected) > 1


def test_a_preference_file_runs_as_a_dataset_of_the_notebooks(tmp_path, monkeypatch):
    """A user's TRL-style file given in a notebook's `datasets`: carved splits, a reference row, a run."""
    monkeypatch.setenv("MASS_DPO_CACHE", str(tmp_path / "cache"))
    data = "notebooks/data/quickstart_preferences.jsonl"
    setup = E.Setup(model="tiny", regime="loglinear", profile="smoke", data_dir="samples", seeds=[0],
                    root=str(tmp_path / "runs"), tune=False)
    runs = E.run_grid(setup, E.grid([data], ["sdpo"], [0], n=2), echo=None)
    ref = E.reference_rows(setup, [data], echo=None)
    assert len(runs) == 1 and len(ref) == 1
    assert runs.iloc[0]["test_prompts"] == ref.iloc[0]["test_prompts"] > 0
    missing = E.available(["no/such/file.jsonl"], "samples", echo=None)
    assert missing == {}


@pytest.mark.slow
def test_lm_regime_accuracy_is_the_generation_hit_ratio(tmp_path, monkeypatch):
    """In an LM regime the reference row's accuracy is HitRatio@1 by greedy decoding, with its valid ratio."""
    monkeypatch.setenv("MASS_DPO_CACHE", str(tmp_path / "cache"))
    from mass_dpo.runs import reference_run

    ref = reference_run(dataset="qasc", model="tiny", regime="lora", profile="smoke", data_dir="samples", test_limit=4,
                        root=str(tmp_path / "runs"))
    m = ref.metrics
    assert m["accuracy_kind"] == "hit_ratio@1" and 0 <= m["accuracy"] <= m["valid_ratio"] <= 1
    assert m["score"] == "logp" and m["prompts"] == 4
    table = pd.read_csv(ref.run_dir / "test_per_prompt.csv")
    assert set(table["accuracy"]) <= {0.0, 1.0} and table["valid"].mean() == pytest.approx(m["valid_ratio"])
    assert table["accuracy"].mean() == pytest.approx(m["accuracy"])  # the reported accuracy is the hits' mean
    assert ((table["accuracy"] == 1) <= (table["valid"] == 1)).all()  # a hit names exactly the target: it is valid


def test_disk_memo_reuses_an_analysis_by_its_inputs(tmp_path, monkeypatch):
    monkeypatch.setenv("MASS_DPO_RUNS", str(tmp_path))
    monkeypatch.delenv("MASS_DPO_NO_MEMO", raising=False)  # conftest turns the memo off for every other test
    calls = []

    @E.core.disk_memo("probe")
    def analysis(runs, *, k=3, echo=print):
        calls.append(k)
        return pd.DataFrame({"k": [k], "n": [len(runs)]})

    runs = pd.DataFrame({"run_dir": ["/a", "/b"]})
    first = analysis(runs, k=3)
    assert analysis(runs, k=3, echo=None).equals(first) and calls == [3]  # read back; echo does not count
    analysis(runs, k=4)
    analysis(pd.DataFrame({"run_dir": ["/a"]}), k=3)
    assert calls == [3, 4, 3]
    monkeypatch.setenv("MASS_DPO_NO_MEMO", "1")
    analysis(runs, k=3)
    assert calls == [3, 4, 3, 3]


_TWICE = """
import sys, time
from pathlib import Path
import pandas as pd
from mass_dpo import experiments as E
from mass_dpo import toy

log = Path(sys.argv[1])

def slow(tag):
    with open(log, "a") as f:
        f.write(tag + "\\n")
    time.sleep(1.5)

@E.core.disk_memo("probe-two")
def analysis(runs):
    slow("analysis")
    return pd.DataFrame({"n": [len(runs)]})

def records():
    slow("toy")
    return {"n": [{"x": 1.0}]}

print(int(analysis(pd.DataFrame({"run_dir": ["/a"]}))["n"].iloc[0]), toy.cached_records("probe", {"a": 1}, records))
"""


def test_two_processes_compute_a_memoised_analysis_and_toy_records_once(tmp_path):
    """Parallel notebooks or array jobs over one cache: the second waits for the first's lock, then reads."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MASS_DPO_RUNS": str(tmp_path / "runs"), "MASS_DPO_CACHE": str(tmp_path / "cache")}
    env.pop("MASS_DPO_NO_MEMO", None)
    log = tmp_path / "computed.txt"
    procs = [subprocess.Popen([sys.executable, "-c", _TWICE, str(log)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sorted(log.read_text().split()) == ["analysis", "toy"]  # each computed once
    assert outs[0][0] == outs[1][0] == "1 {'n': [{'x': 1.0}]}\n"
