"""The fast selector against Algorithm 1 as the paper writes it (tests/reference_selection.py)."""

import math

import numpy as np
import pytest
import torch

from mass_dpo import select_negatives
from mass_dpo.selection import score_subset
from reference_selection import algorithm1, brute_force, subset_logdet

CASES = [  # (N, d, n, beta, gamma)
    (20, 8, 5, 0.1, 0.1),
    (20, 64, 5, 1.0, 0.1),
    (12, 3, 12, 0.5, 1.0),  # n = N, N > d
    (7, 30, 4, 2.0, 0.01),  # d > N
    (30, 16, 10, 0.1, 10.0),
    (5, 5, 1, 0.3, 0.5),
]


def _random_pools(B, N, d, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(B, N, d, generator=g, dtype=torch.float64) * scale
    logits = torch.randn(B, N, generator=g, dtype=torch.float64) * 10
    return phi, logits


def _check_against_reference(phi, logits, n, beta, gamma, mask=None, center=True):
    sel = select_negatives(phi, logits, n, beta=beta, gamma=gamma, mask=mask, center=center)
    B, N, d = phi.shape
    for b in range(B):
        valid = torch.arange(N) if mask is None else torch.nonzero(mask[b]).flatten()
        idx, gains, logdet = algorithm1(phi[b, valid], logits[b, valid], n, beta, gamma, center)
        expected = [int(valid[i]) for i in idx]
        got = [int(i) for i in sel.indices[b] if i >= 0]
        assert got == expected, f"prompt {b}: fast {got} != Algorithm 1 {expected}"
        assert (sel.indices[b] == -1).sum() == sel.indices.shape[-1] - len(expected)
        np.testing.assert_allclose(sel.gains[b, : len(gains)].numpy(), gains, rtol=1e-8, atol=1e-12)
        # logdet of the d x d H(S), by slogdet on the selected set
        direct = subset_logdet(phi[b, valid], logits[b, valid], idx, beta, gamma, center)
        assert abs(float(sel.logdet[b]) - direct) <= 1e-8 * max(1.0, abs(direct))
        assert abs(float(sel.logdet[b]) - logdet) <= 1e-8 * max(1.0, abs(logdet))
    return sel


@pytest.mark.parametrize("N,d,n,beta,gamma", CASES)
def test_matches_algorithm1_on_random_pools(N, d, n, beta, gamma):
    phi, logits = _random_pools(4, N, d, seed=N * 100 + d)
    sel = _check_against_reference(phi, logits, n, beta, gamma)
    assert sel.indices.dtype == torch.int64 and sel.indices.shape == (4, min(n, N))


@pytest.mark.parametrize("center", [True, False])
def test_center_flag_matches_reference(center):
    phi, logits = _random_pools(3, 15, 10, seed=7)
    phi = phi + 3.0  # a common mean direction: centering matters
    _check_against_reference(phi, logits, 6, 0.5, 0.1, center=center)


def test_centering_changes_the_choice_when_a_mean_direction_dominates():
    phi, logits = _random_pools(8, 15, 10, seed=8)
    phi = phi * 0.1 + torch.linspace(0, 5, 15, dtype=torch.float64)[None, :, None]
    a = select_negatives(phi, logits, 4, beta=0.5, center=True).indices
    b = select_negatives(phi, logits, 4, beta=0.5, center=False).indices
    assert not torch.equal(a, b)


def test_near_degenerate_pools():
    # candidates in a 2-dimensional subspace of R^12, plus 1e-9 noise: gains collapse after two picks
    g = torch.Generator().manual_seed(3)
    basis = torch.randn(2, 12, generator=g, dtype=torch.float64)
    coef = torch.randn(5, 16, 2, generator=g, dtype=torch.float64)
    phi = coef @ basis + 1e-9 * torch.randn(5, 16, 12, generator=g, dtype=torch.float64)
    logits = torch.randn(5, 16, generator=g, dtype=torch.float64)
    sel = _check_against_reference(phi, logits, 6, 1.0, 0.1)
    # log det is submodular: greedy gains never grow
    assert (sel.gains.diff(dim=-1) <= 1e-12).all()


def test_duplicate_candidates():
    phi, logits = _random_pools(4, 6, 5, seed=11)
    phi = torch.cat([phi, phi, phi[:, :2]], dim=1)  # every candidate twice, two of them three times
    logits = torch.cat([logits, logits, logits[:, :2]], dim=1)
    sel = _check_against_reference(phi, logits, 9, 0.5, 0.1)
    # ties go to the lowest index: the first copy is always picked before its duplicates
    for row in sel.indices.tolist():
        for pos, i in enumerate(row):
            first_copy = i % 6 if i < 12 else i - 12
            assert first_copy in row[: pos + 1]


def test_exact_ties_go_to_lowest_index():
    phi = torch.zeros(1, 4, 3, dtype=torch.float64)  # every v_i = 0: all gains equal (0)
    sel = select_negatives(phi, torch.zeros(1, 4, dtype=torch.float64), 3)
    assert sel.indices.tolist() == [[0, 1, 2]]
    assert torch.allclose(sel.gains, torch.zeros(1, 3, dtype=torch.float64))


def test_ragged_masks():
    phi, logits = _random_pools(6, 12, 7, seed=5)
    mask = torch.ones(6, 12, dtype=torch.bool)
    for b, size in enumerate([12, 9, 5, 3, 1, 0]):
        mask[b, size:] = False
    mask[1] = mask[1][torch.randperm(12, generator=torch.Generator().manual_seed(0))]  # holes anywhere
    phi[~mask] = float("nan")  # masked entries may hold garbage
    logits[~mask] = float("inf")
    sel = _check_against_reference(phi, logits, 4, 0.5, 0.1, mask=mask)
    assert sel.indices[4].tolist() == [int(torch.nonzero(mask[4])[0]), -1, -1, -1]
    assert sel.indices[5].tolist() == [-1, -1, -1, -1]
    assert torch.isnan(sel.gains[3, 3]) and not torch.isnan(sel.gains[3, :3]).any()
    assert float(sel.logdet[5]) == pytest.approx(7 * math.log(0.1))


def test_greedy_against_brute_force():
    """Greedy is within the (1 - 1/e) guarantee of the exact optimum of eq. 12; report the gap."""
    phi, logits = _random_pools(6, 9, 6, seed=21)
    gamma = 0.1
    gaps = []
    for n in (2, 3, 4):
        sel = select_negatives(phi, logits, n, beta=1.0, gamma=gamma)
        for b in range(6):
            _, best = brute_force(phi[b], logits[b], n, 1.0, gamma)
            base = 6 * math.log(gamma)  # log det H(empty set)
            greedy = float(sel.logdet[b])
            assert greedy <= best + 1e-9
            ratio = (greedy - base) / (best - base)
            assert ratio >= 1 - 1 / math.e
            gaps.append(1 - ratio)
    print(f"greedy / optimum gain gap: mean {np.mean(gaps):.4f}, max {np.max(gaps):.4f}")


def test_single_prompt_and_numpy_io():
    phi, logits = _random_pools(1, 10, 4, seed=2)
    sel_t = select_negatives(phi[0], logits[0], 3, beta=0.5)
    assert sel_t.indices.shape == (3,) and sel_t.logdet.shape == ()
    sel_np = select_negatives(phi[0].numpy(), logits[0].numpy(), 3, beta=0.5)
    assert isinstance(sel_np.indices, np.ndarray) and sel_np.indices.dtype == np.int64
    assert sel_np.indices.tolist() == sel_t.indices.tolist()
    np.testing.assert_allclose(sel_np.logdet, sel_t.logdet.numpy())


def test_float32_input_agrees_with_float64():
    phi, logits = _random_pools(20, 20, 32, seed=9)
    a = select_negatives(phi, logits, 5).indices
    b = select_negatives(phi.float(), logits.float(), 5).indices
    assert (a == b).float().mean() > 0.99


def test_alpha0_uses_the_stable_form():
    """alpha0 = beta^2 (1 - sigmoid(Z)) rounds to 0 written literally when logsumexp(s) is very negative."""
    beta = 1.0
    logits = torch.full((1, 5), -50.0, dtype=torch.float64)
    phi, _ = _random_pools(1, 5, 3, seed=1)
    sel = select_negatives(phi, logits, 2, beta=beta)
    lse = float(torch.logsumexp(beta * logits[0], 0))
    literal = beta**2 * (1 - 1 / (1 + math.exp(lse)))  # 1 - sigmoid(Z), Z = -lse
    assert literal == 0.0
    assert float(sel.alpha[0]) == pytest.approx(beta**2 * math.exp(lse) / (1 + math.exp(lse)), rel=1e-12)


def test_n_larger_than_pool_returns_the_valid_candidates():
    phi, logits = _random_pools(2, 4, 3, seed=4)
    sel = select_negatives(phi, logits, 10)
    assert sel.indices.shape == (2, 4)
    assert sorted(sel.indices[0].tolist()) == [0, 1, 2, 3]
    assert select_negatives(phi, logits, 0).indices.shape == (2, 0)


def test_random_strategy_is_uniform_without_replacement():
    N, n, trials = 6, 2, 6000
    phi, logits = _random_pools(trials, N, 3, seed=6)
    mask = torch.ones(trials, N, dtype=torch.bool)
    mask[:, 5] = False
    sel = select_negatives(phi, logits, n, strategy="random", mask=mask, generator=torch.Generator().manual_seed(0))
    idx = sel.indices
    assert (idx[:, 0] != idx[:, 1]).all() and (idx != 5).all() and (idx >= 0).all()
    counts = torch.bincount(idx.flatten(), minlength=N).double() / idx.numel()
    assert torch.allclose(counts[:5], torch.full((5,), 0.2, dtype=torch.float64), atol=0.015)
    again = select_negatives(phi, logits, n, strategy="random", mask=mask, generator=torch.Generator().manual_seed(0))
    assert torch.equal(idx, again.indices)
    # gains and logdet score the random subset under the same criterion
    b = 0
    direct = subset_logdet(phi[b, :5], logits[b, :5], idx[b].tolist(), 0.1, 0.1)
    assert float(sel.logdet[b]) == pytest.approx(direct, rel=1e-8)


def test_hardest_and_all_strategies():
    logits = torch.tensor([[0.5, 3.0, -1.0, 3.0, 2.0]], dtype=torch.float64)
    phi, _ = _random_pools(1, 5, 3, seed=0)
    hard = select_negatives(phi, logits, 3, strategy="hardest")
    assert hard.indices.tolist() == [[1, 3, 4]]  # top logits, ties to the lowest index
    mask = torch.tensor([[True, False, True, True, True]])
    every = select_negatives(phi, logits, 2, strategy="all", mask=mask)
    assert every.indices.tolist() == [[0, 2, 3, 4, -1]]
    full = subset_logdet(phi[0][mask[0]], logits[0][mask[0]], [0, 1, 2, 3], 0.1, 0.1)
    assert float(every.logdet[0]) == pytest.approx(full, rel=1e-8)


def test_dopt_beats_random_on_logdet():
    phi, logits = _random_pools(50, 20, 16, seed=12)
    d = select_negatives(phi, logits, 5).logdet
    r = select_negatives(phi, logits, 5, strategy="random", generator=torch.Generator().manual_seed(1)).logdet
    assert (d >= r - 1e-9).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n=-1), "n must be >= 0"),
        (dict(n=2, gamma=0.0), "gamma must be a finite number > 0"),
        (dict(n=2, gamma=float("inf")), "gamma must be a finite number > 0"),
        (dict(n=2, beta=-0.1), "beta must be a finite number > 0"),
        (dict(n=2, beta=float("inf")), "beta must be a finite number > 0"),
        (dict(n=2, beta="0.1"), "beta must be a finite number > 0"),
        (dict(n=2, strategy="best"), "unknown strategy"),
    ],
)
def test_bad_arguments(kwargs, match):
    phi, logits = _random_pools(2, 4, 3, seed=0)
    with pytest.raises(ValueError, match=match):
        select_negatives(phi, logits, **kwargs)


def test_score_subset_refuses_an_order_it_cannot_score():
    """Repeats, indices below -1, masked-out candidates and float indices were scored as given."""
    phi, logits = _random_pools(2, 5, 3, seed=1)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 4] = False
    for order, says in [([[0, 1], [2, 2]], r"a repeated index \(prompt 1, entry 1: 2\)"),
                        ([[0, -2], [1, 2]], r"an index below -1 \(prompt 0, entry 1: -2\)"),
                        ([[0, 1], [4, 2]], r"a masked-out candidate \(prompt 1, entry 0: 4\)")]:
        with pytest.raises(ValueError, match=says):
            score_subset(phi, logits, torch.tensor(order), mask=mask)
    with pytest.raises(ValueError, match="order must hold integer candidate indices"):
        score_subset(phi, logits, torch.tensor([[0.0, 1.7], [2.0, 3.0]]), mask=mask)
    padded = score_subset(phi, logits, torch.tensor([[0, -1], [1, -1]]), mask=mask)  # -1 pads: fine
    assert torch.isnan(padded.gains[:, 1]).all() and torch.isfinite(padded.gains[:, 0]).all()


def test_empty_dimensions_and_label_blind_nan_are_named():
    phi, logits = _random_pools(2, 5, 3, seed=2)
    with pytest.raises(ValueError, match=r"has no features"):
        select_negatives(phi[:, :, :0], logits, 2)
    with pytest.raises(ValueError, match=r"has no prompts"):
        select_negatives(phi[:0], logits[:0], 2)
    bad = phi.clone()
    bad[0, 3, 1] = float("nan")  # named where it is, not where the re-centering spread it
    with pytest.raises(ValueError, match=r"phi has NaN or inf values \(1 candidates, first: prompt 0, candidate 3\)"):
        select_negatives(bad, logits, 2, strategy="label_blind")


def test_bad_inputs_name_the_problem():
    phi, logits = _random_pools(2, 4, 3, seed=0)
    bad = phi.clone()
    bad[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="phi has NaN or inf.*prompt 1, candidate 2"):
        select_negatives(bad, logits, 2)
    bad_l = logits.clone()
    bad_l[0, 3] = float("inf")
    with pytest.raises(ValueError, match="logits have NaN or inf.*prompt 0, candidate 3"):
        select_negatives(phi, bad_l, 2)
    with pytest.raises(ValueError, match="shapes disagree"):
        select_negatives(phi, logits[:, :3], 2)
    with pytest.raises(ValueError, match=r"\[N, d\] or \[B, N, d\]"):
        select_negatives(phi[0, 0], logits[0], 2)
    with pytest.raises(ValueError, match="mask"):
        select_negatives(phi, logits, 2, mask=torch.ones(2, 5, dtype=torch.bool))


def test_score_subset_scores_a_given_order():
    phi, logits = _random_pools(5, 10, 6, seed=13)
    sel = select_negatives(phi, logits, 4, beta=0.5)
    again = score_subset(phi, logits, sel.indices, beta=0.5)
    torch.testing.assert_close(again.gains, sel.gains)
    torch.testing.assert_close(again.logdet, sel.logdet)
    order = torch.tensor([[3, 0, -1]] * 5)
    scored = score_subset(phi, logits, order, beta=0.5)
    for b in range(5):
        assert float(scored.logdet[b]) == pytest.approx(subset_logdet(phi[b], logits[b], [3, 0], 0.5, 0.1), rel=1e-8)
    assert torch.isnan(scored.gains[:, 2]).all()
    with pytest.raises(ValueError, match="pool size"):
        score_subset(phi, logits, torch.tensor([[10]] * 5))


def _label_blind_reference(phi, logits, n, beta, gamma, center=True):
    """One prompt, straight from the definition: rebuild the N + 1 responses (y* at phi = 0, logit 0), move them
    to the pool mean, run Algorithm 1 (the slow reference) for n + 1 steps, drop y* (index N), keep n."""
    N, d = phi.shape
    full = torch.cat([phi, torch.zeros(1, d, dtype=phi.dtype)])
    full_logits = torch.cat([logits, torch.zeros(1, dtype=logits.dtype)])
    idx, _, _ = algorithm1(full - full.mean(0), full_logits - full_logits.mean(), n + 1, beta, gamma, center)
    return [i for i in idx if i != N][:n]


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("N,d,n,beta,gamma", CASES)
def test_label_blind_matches_its_definition(N, d, n, beta, gamma, center):
    phi, logits = _random_pools(4, N, d, seed=N + d)
    phi = phi + 2.0  # a common direction, so the reference point matters for center=False
    sel = select_negatives(phi, logits, n, beta=beta, gamma=gamma, strategy="label_blind", center=center)
    assert sel.indices.shape == (4, min(n, N))
    for b in range(4):
        assert sel.indices[b].tolist() == _label_blind_reference(phi[b], logits[b], n, beta, gamma, center), b
    # gains and logdet score the chosen subset under Algorithm 1's criterion on the given pool (not the re-centred
    # N + 1 responses), like every other strategy: the reference's log det H(S) of each prefix of the picks
    for b in range(4):
        picks = sel.indices[b].tolist()
        prefixes = [subset_logdet(phi[b], logits[b], picks[:j], beta, gamma, center) for j in range(len(picks) + 1)]
        assert float(sel.logdet[b]) == pytest.approx(prefixes[-1], rel=1e-8, abs=1e-10), b
        np.testing.assert_allclose(sel.gains[b].numpy(), np.diff(prefixes), rtol=1e-7, atol=1e-10)


def test_label_blind_picks_do_not_depend_on_which_response_won():
    g = torch.Generator().manual_seed(5)
    M, d, n = 9, 4, 3
    feats = torch.randn(M, d, generator=g, dtype=torch.float64) * 5  # the responses of one prompt
    theta0 = torch.randn(d, generator=g, dtype=torch.float64)
    glob = _global_order(feats, theta0, M)  # one order of the M responses, computed without any winner
    dopt_sets = set()
    for winner in range(M):
        others = [i for i in range(M) if i != winner]
        phi = feats[others] - feats[winner]
        logits = phi @ theta0
        sel = select_negatives(phi, logits, n, beta=0.5, gamma=0.1, strategy="label_blind")
        assert [others[i] for i in sel.indices.tolist()] == [i for i in glob if i != winner][:n], winner
        dopt = select_negatives(phi, logits, n, beta=0.5, gamma=0.1, strategy="dopt")
        dopt_sets.add(tuple(sorted(set(others[i] for i in dopt.indices.tolist()) | {winner})))
    assert len(dopt_sets) > 1  # Algorithm 1's picks (with y* added back) do move with the winner here


def _global_order(feats, theta0, k):
    logits = feats @ theta0
    idx, _, _ = algorithm1(feats - feats.mean(0), logits - logits.mean(), k, 0.5, 0.1, True)
    return idx


def test_label_blind_with_masks_and_numpy():
    phi, logits = _random_pools(3, 8, 5, seed=21)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2, 1] = False
    sel = select_negatives(phi, logits, 4, strategy="label_blind", mask=mask)
    for b in range(3):
        valid = torch.nonzero(mask[b]).flatten()
        ref = _label_blind_reference(phi[b, valid], logits[b, valid], 4, 0.1, 0.1)
        assert sel.indices[b].tolist() == [int(valid[i]) for i in ref]
    single = select_negatives(phi[0].numpy(), logits[0].numpy(), 4, strategy="label_blind")
    assert single.indices.tolist() == sel.indices[0].tolist()
    everything = select_negatives(phi, logits, 8, strategy="label_blind", mask=mask)
    assert (everything.indices[1] >= 0).sum() == 5 and (everything.indices[1, 5:] == -1).all()


@pytest.mark.parametrize("strategy", ["dopt", "hardest", "random", "all", "label_blind"])
@pytest.mark.parametrize("center", [True, False])
def test_chunks_of_prompts_give_the_unchunked_result(monkeypatch, strategy, center):
    """``_design`` splits the prompts into chunks (``_chunk_size``, a memory bound): with chunks of 2 prompts the
    picks, gains and log det equal those of one chunk, ragged masks included."""
    from mass_dpo import selection

    phi, logits = _random_pools(5, 9, 4, seed=31)
    mask = torch.ones(5, 9, dtype=torch.bool)
    mask[1, 6:] = False
    mask[3, [0, 4]] = False  # a later chunk's pool with holes
    kw = dict(beta=0.5, gamma=0.1, strategy=strategy, center=center, mask=mask)
    whole = select_negatives(phi, logits, 4, generator=torch.Generator().manual_seed(2), **kw)
    sizes = []  # what the real memory bound would have chosen

    def two_prompts(*args, **kwargs):
        sizes.append(real_chunk_size(*args, **kwargs))
        return 2

    real_chunk_size = selection._chunk_size
    monkeypatch.setattr(selection, "_chunk_size", two_prompts)
    chunked = select_negatives(phi, logits, 4, generator=torch.Generator().manual_seed(2), **kw)
    assert sizes and all(size >= 5 for size in sizes)  # unpatched, one chunk: the comparison means something
    assert torch.equal(chunked.indices, whole.indices)
    torch.testing.assert_close(chunked.gains, whole.gains, rtol=1e-12, atol=1e-14, equal_nan=True)
    torch.testing.assert_close(chunked.logdet, whole.logdet, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(chunked.alpha, whole.alpha, rtol=0, atol=0)


@pytest.mark.parametrize("center", [True, False])
def test_a_bad_feature_in_a_later_chunk_names_its_own_prompt(monkeypatch, center):
    """With chunks of 2 prompts, a NaN (or a float32 overflow) in prompt 3 is reported as prompt 3 (chunk offset
    added), candidate as given."""
    from mass_dpo import selection

    monkeypatch.setattr(selection, "_chunk_size", lambda *a, **k: 2)
    phi, logits = _random_pools(5, 6, 3, seed=32)
    bad = phi.clone()
    bad[3, 4, 1] = float("nan")
    with pytest.raises(ValueError, match=r"phi has NaN or inf values \(1 candidates in this chunk, first: prompt 3, "
                                         r"candidate 4\)"):
        select_negatives(bad, logits, 2, center=center)
    big = phi.float()
    big[3, 1, 0] = 1e20  # ||phi||^2 = 1e40 overflows float32
    with pytest.raises(ValueError, match=r"phi is too large for torch.float32 \(\|\|phi\|\|\^2 overflows; prompt 3, "
                                         r"candidate 1\)"):
        select_negatives(big, logits.float(), 2, center=center)
