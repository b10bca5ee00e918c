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


# ---------------------------------------------------------------- select_extracted on hand-built pools (no model)


def _pools_with_lengths(P=7, C=6, d=4, seed=0):
    """Random pools with a chosen response anywhere, one shorter pool (padding), log-probs at theta0 away from the
    reference, and token lengths with ties."""
    from mass_dpo.extraction import Extracted

    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(P, C, dtype=torch.bool)
    mask[P - 2, C - 2:] = False
    target = torch.randint(0, C - 2, (P,), generator=g)
    ref = torch.randn(P, C, generator=g) * 2
    return Extracted([str(i) for i in range(P)], torch.randn(P, C, d, generator=g), ref,
                     ref + torch.randn(P, C, generator=g), mask, target,
                     lengths=torch.randint(1, 6, (P, C), generator=g) * mask)


@pytest.mark.parametrize("selection_score", ["reference", "delta"])
@pytest.mark.parametrize("strategy", STRATEGIES + ("longest",))
def test_select_extracted_in_chunks_equals_one_chunk(monkeypatch, strategy, selection_score):
    """``select_extracted`` selects SELECT_CHUNK prompts at a time (and the selector splits those again,
    ``_chunk_size``): chunks of 3 prompts, split into 2, give what one chunk gives. ``random`` included: one
    generator serves the whole split, its stream read chunk after chunk, so the same seed draws the same negatives
    however the prompts are chunked (a generator seeded again per chunk would repeat its draws)."""
    from mass_dpo import preprocess, selection

    ex = _pools_with_lengths()
    kw = dict(strategy=strategy, beta=0.5, gamma=0.1, selection_score=selection_score, seed=3)
    whole = preprocess.select_extracted(ex, 3, **kw)
    assert preprocess.SELECT_CHUNK >= len(ex)  # one chunk above
    monkeypatch.setattr(preprocess, "SELECT_CHUNK", 3)
    monkeypatch.setattr(selection, "_chunk_size", lambda *a, **k: 2)
    chunked = preprocess.select_extracted(ex, 3, **kw)
    assert chunked.keys() == whole.keys()
    assert torch.equal(chunked["indices"], whole["indices"]) and torch.equal(chunked["uniform"], whole["uniform"])
    for key in ("gains", "logdet", "alpha"):
        torch.testing.assert_close(chunked[key], whole[key], rtol=1e-12, atol=1e-14, equal_nan=True)
    if strategy == "random":  # the draws do move with the seed
        assert not torch.equal(preprocess.select_extracted(ex, 3, **{**kw, "seed": 4})["indices"], whole["indices"])


def test_a_bad_feature_in_a_later_select_chunk_names_its_prompt_and_pool_candidate(monkeypatch):
    """With chunks of 3 prompts, a NaN in prompt 4 (the second chunk) is reported as prompt 4, with its id and the
    candidate's index in its pool (not its place among the negatives); a NaN log-prob likewise."""
    from mass_dpo import preprocess

    ex = _pools_with_lengths()
    bad = int(ex.target[4]) + 1
    ex.features[4, bad, 2] = float("nan")
    monkeypatch.setattr(preprocess, "SELECT_CHUNK", 3)
    says = rf"phi has NaN or inf values .*prompt 4 \(id {ex.ids[4]!r}\), candidate {bad} "
    with pytest.raises(ValueError, match=says):
        preprocess.select_extracted(ex, 2)
    ex = _pools_with_lengths()
    ex.theta0_logps[4, bad] = float("inf")
    with pytest.raises(ValueError, match=rf"logits have NaN or inf values .*prompt 4 .*candidate {bad} "):
        preprocess.select_extracted(ex, 2)


def _hand_pools():
    """Two pools of 6 candidates, d = 3. Prompt 0: the chosen one is candidate 2 (the longest, 50 tokens); its
    negatives 0, 1, 3, 4, 5 have 5, 9, 9, 3, 7 tokens and log pi_theta0 -5, -1, -3, -0.5, -4. Prompt 1: chosen 0,
    candidate 5 is padding (99 tokens and log-prob 5 that must never count); negatives 1..4 have 2, 6, 6, 6 tokens and
    log pi_theta0 -1, -1, -3, -0.2."""
    from mass_dpo.extraction import Extracted

    theta0 = torch.tensor([[-5.0, -1.0, -2.0, -3.0, -0.5, -4.0], [-2.0, -1.0, -1.0, -3.0, -0.2, 5.0]])
    mask = torch.tensor([[True] * 6, [True] * 5 + [False]])
    feats = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(0))
    return Extracted(["a", "b"], feats, theta0 - 0.3, theta0, mask, torch.tensor([2, 0]),
                     lengths=torch.tensor([[5, 9, 50, 9, 3, 7], [4, 2, 6, 6, 6, 99]]))


def _hand_logdet(ex, p, picks, beta=0.1, gamma=0.1):
    """log det H(S) of candidates ``picks`` by the reference, the pool's negatives and logits built by hand (the
    default reading: l_i = log pi_theta0(y_i) - log pi_theta0(y*))."""
    from reference_selection import subset_logdet

    t = int(ex.target[p])
    negs = [c for c in range(ex.mask.shape[1]) if c != t and bool(ex.mask[p, c])]
    phi = (ex.features[p, negs] - ex.features[p, t]).double()
    logits = (ex.theta0_logps[p, negs] - ex.theta0_logps[p, t]).double()
    return subset_logdet(phi, logits, [negs.index(c) for c in picks], beta, gamma)


def test_longest_takes_the_most_tokens_ties_to_the_lowest_index():
    """Top-n by response tokens among the valid negatives (never the chosen one, never padding), ties to the lowest
    candidate index, -1 past the pool; the subset scored under the reading's q like every strategy."""
    from dataclasses import replace

    from mass_dpo.preprocess import select_extracted

    ex = _hand_pools()
    got = select_extracted(ex, 3, strategy="longest")
    assert got["indices"].tolist() == [[1, 3, 5], [2, 3, 4]]
    for p, picks in enumerate(got["indices"].tolist()):
        assert float(got["logdet"][p]) == pytest.approx(_hand_logdet(ex, p, picks), rel=1e-9)
    assert select_extracted(ex, 5, strategy="longest")["indices"].tolist() == [[1, 3, 5, 0, 4], [2, 3, 4, 1, -1]]
    with pytest.raises(ValueError, match="needs the candidates' token lengths"):
        select_extracted(replace(ex, lengths=None), 3, strategy="longest")


def test_the_runs_negatives_option_overrides_the_methods_strategy():
    """``TrainConfig.negatives`` names the strategy of a run's fixed negatives (``config.strategy``, passed to
    ``select_training_negatives``): ``longest`` and ``hardest`` replace MASS-DPO's D-optimal picks; ``dpo`` still
    keeps one negative."""
    from reference_selection import algorithm1

    from mass_dpo.training import TrainConfig, select_training_negatives

    assert TrainConfig(method="mass_dpo", negatives="longest").strategy == "longest"
    assert TrainConfig(method="mass_dpo").strategy == "dopt" and TrainConfig(method="sdpo").strategy == "random"
    with pytest.raises(ValueError, match="unknown negatives"):
        TrainConfig(negatives="all")
    ex = _hand_pools()
    assert select_training_negatives(ex, "mass_dpo", 3, strategy="longest").tolist() == [[1, 3, 5], [2, 3, 4]]
    # hardest: the most plausible under theta0, ties to the lowest index
    assert select_training_negatives(ex, "mass_dpo", 3, strategy="hardest").tolist() == [[4, 1, 3], [4, 1, 2]]
    assert select_training_negatives(ex, "dpo", 3, strategy="longest").tolist() == [[1], [2]]
    # no strategy: the method's own, Algorithm 1 for MASS-DPO (the reference on the negatives built by hand)
    default = select_training_negatives(ex, "mass_dpo", 3).tolist()
    for p, t in enumerate(ex.target.tolist()):
        negs = [c for c in range(6) if c != t and bool(ex.mask[p, c])]
        phi = (ex.features[p, negs] - ex.features[p, t]).double()
        logits = (ex.theta0_logps[p, negs] - ex.theta0_logps[p, t]).double()
        assert default[p] == [negs[i] for i in algorithm1(phi, logits, 3, 0.1, 0.1)[0]]
    assert default != [[1, 3, 5], [2, 3, 4]] and default != [[4, 1, 3], [4, 1, 2]]  # the options changed the picks
