"""``mass-dpo select`` / ``select_dataset``: end to end on ``tiny`` with every strategy."""

import json

import numpy as np
import pytest
import torch

from mass_dpo.extraction import extract, selection_inputs
from mass_dpo.models import load_model
from mass_dpo.preprocess import select_dataset
from mass_dpo.selection import STRATEGIES


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("extraction-cache")


@pytest.fixture(scope="module")
def records():
    from mass_dpo.data import load_benchmark

    return load_benchmark("lastfm", "train", data_dir="samples", limit=6, seed=0).to_list()


def _run(records, tiny, cache, tmp_path, strategy, **kw):
    return select_dataset(records, tiny, n=3, strategy=strategy, cache_dir=cache, out=tmp_path / f"{strategy}.jsonl",
                          progress=False, grouped=True, **kw)


def _brute_force_dopt(phi, logits, mask, n, beta, gamma, order=None):
    """Algorithm 1 as written: d x d matrices, log det of each candidate update, float64 (``order``: score these
    positions, in this order, instead of choosing)."""
    idx = np.flatnonzero(mask)
    phi, s = phi[idx].astype(np.float64), beta * logits[idx].astype(np.float64)
    q = np.exp(s - s.max())
    q /= q.sum()
    v = np.sqrt(q)[:, None] * (phi - q @ phi)
    alpha = beta**2 * (1 - 1 / (1 + np.exp(np.log(np.exp(s).sum()))))  # beta^2 (1 - sigmoid(Z)), Z = -lse(s)
    H = gamma * np.eye(phi.shape[1])
    chosen = []
    for _ in range(min(n, len(idx)) if order is None else len(order)):
        scores = [
            -np.inf if i in chosen else np.linalg.slogdet(H + alpha * np.outer(v[i], v[i]))[1] for i in range(len(idx))
        ]
        i = int(np.argmax(scores)) if order is None else int(np.flatnonzero(idx == order[len(chosen)])[0])
        chosen.append(i)
        H = H + alpha * np.outer(v[i], v[i])
    return [int(idx[i]) for i in chosen], np.linalg.slogdet(H)[1]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_end_to_end(records, tiny, cache, tmp_path, strategy):
    res = _run(records, tiny, cache, tmp_path, strategy, selection_score="delta")
    lines = [json.loads(line) for line in res.out.read_text().splitlines()]
    assert lines == json.loads(json.dumps(res.rows))  # the file holds the rows
    assert [r["id"] for r in lines] == [r["id"] for r in records]
    k = 19 if strategy == "all" else 3
    for row, rec in zip(lines, records):
        assert row["target"] == rec["target"] and row["chosen"] == rec["chosen"]
        assert len(row["indices"]) == k == len(set(row["indices"])) == len(row["gains"])
        assert rec["target"] not in row["indices"]
        assert row["prompt"] == rec["prompt"]
        assert row["rejected"] == [rec["candidates"][i] for i in row["indices"]]  # TRL's name, selection order
        assert all(n in rec["rejected"] for n in row["rejected"])
        assert np.isfinite(row["logdet"]) and all(g >= 0 for g in row["gains"])
    s = json.loads(res.summary_path.read_text())
    assert res.summary_path.name == f"{strategy}.summary.json"
    assert s["prompts"] == 6 and s["negatives_total"] == 6 * k and s["strategy"] == strategy
    assert s["candidates_mean"] == 20 and s["feature_dim"] == 64
    assert s["selection_score"] == "delta"
    assert len(s["gains_mean_per_step"]) == k and s["uniform_q_prompts"] == 6  # theta0 = ref: every Delta_i = 0
    assert s["alpha_mean"] == pytest.approx(0.01 / (1 + 1 / 19))  # beta^2 sigmoid(log 19): q uniform over 19
    assert s["logdet_mean"] == pytest.approx(np.mean([r["logdet"] for r in lines]))


def test_dopt_matches_algorithm_1_as_written(records, tiny, cache, tmp_path):
    res = _run(records, tiny, cache, tmp_path, "dopt", beta=0.5, gamma=0.01)
    assert res.summary["cache_hit"]  # extraction reused from the module's cache
    ex = extract(records, tiny, cache_dir=cache, progress=False)
    phi, logits, mask, cand = selection_inputs(ex)
    for p, row in enumerate(res.rows):
        picks, logdet = _brute_force_dopt(phi[p].numpy(), logits[p].numpy(), mask[p].numpy(), 3, 0.5, 0.01)
        assert row["indices"] == [int(cand[p, j]) for j in picks]
        assert row["logdet"] == pytest.approx(logdet, abs=1e-6)


def test_random_is_seeded_and_hardest_is_top_logprob(records, tiny, cache, tmp_path):
    a = _run(records, tiny, cache, tmp_path, "random", seed=1).rows
    b = _run(records, tiny, cache, tmp_path, "random", seed=1).rows
    c = _run(records, tiny, cache, tmp_path, "random", seed=2).rows
    assert [r["indices"] for r in a] == [r["indices"] for r in b]
    assert [r["indices"] for r in a] != [r["indices"] for r in c]

    hard = _run(records, tiny, cache, tmp_path, "hardest").rows
    ex = extract(records, tiny, cache_dir=cache, progress=False)
    for p, row in enumerate(hard):
        lp = ex.theta0_logps[p].clone()
        lp[ex.target[p]] = -float("inf")
        assert row["indices"] == torch.topk(lp, 3).indices.tolist()

    # whatever picked them, the subsets are scored under Algorithm 1's q (the default reading's logits)
    phi, logits, mask, cand = selection_inputs(ex)
    for rows in (a, hard):
        for p, row in enumerate(rows):
            pos = [int(torch.nonzero(cand[p] == i)[0]) for i in row["indices"]]
            _, logdet = _brute_force_dopt(phi[p].numpy(), logits[p].numpy(), mask[p].numpy(), 3, 0.1, 0.1, pos)
            assert row["logdet"] == pytest.approx(logdet, abs=1e-6)


def test_small_pools_and_bad_arguments(tiny, tmp_path):
    recs = [
        {"id": "a", "prompt": "Pick one.", "candidates": ["x", "y", "z"], "target": 2},
        {"id": "b", "prompt": "Pick another.", "candidates": ["p", "q", "r", "s", "t"], "target": 0},
    ]
    res = select_dataset(recs, tiny, n=3, cache_dir=tmp_path, out=tmp_path / "s.jsonl", progress=False, grouped=True)
    assert [r["indices"] for r in res.rows][0] in ([0, 1], [1, 0])
    assert len(res.rows[1]["indices"]) == 3
    assert res.summary["prompts_with_fewer_than_n"] == 1 and res.summary["candidates_max"] == 5
    with pytest.raises(ValueError, match="strategy"):
        select_dataset(recs, tiny, strategy="best", write=False)
    with pytest.raises(ValueError, match="n must be"):
        select_dataset(recs, tiny, n=0, write=False)
    with pytest.raises(ValueError, match="pooling"):
        select_dataset(recs, tiny, pooling="max", write=False)


def test_cli_select_on_samples(tmp_path):
    from mass_dpo.cli import main

    out = tmp_path / "sel.jsonl"
    argv = ["select", "--dataset", "qasc", "--model", "tiny", "--split", "train", "--n", "2", "--strategy", "dopt",
            "--pooling", "response", "--limit", "4", "--data-dir", "samples", "--out", str(out),
            "--cache-dir", str(tmp_path / "extraction"), "--no-progress"]
    assert main([*argv, "--grouped"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["indices"]) == 2 for r in rows)
    s = json.loads((tmp_path / "sel.summary.json").read_text())
    assert s["dataset"] == "qasc" and s["pooling"] == "response" and s["candidates_max"] == 8 and not s["cache_hit"]
    assert main(argv) == 0
    assert json.loads((tmp_path / "sel.summary.json").read_text())["cache_hit"]
