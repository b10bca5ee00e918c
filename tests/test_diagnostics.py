"""Design diagnostics (mass_dpo.diagnostics) on hand-built extractions whose answers are known."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from mass_dpo.diagnostics import candidate_lengths, degenerate, design_diagnostics
from mass_dpo.extraction import Extracted
from mass_dpo.preprocess import select_extracted


def _symmetric(gamma_scale=(1.0, 0.1)) -> Extracted:
    """Two prompts, chosen = candidate 0 at the origin, six negatives symmetric about it (so phibar = 0 under a uniform
    q): 3 e1 twice, -3 e1 twice, e2, -e2. The second prompt is the first scaled by 0.1."""
    f = torch.zeros(7, 3)
    f[1, 0] = f[2, 0] = 3.0
    f[3, 0] = f[4, 0] = -3.0
    f[5, 1], f[6, 1] = 1.0, -1.0
    feats = torch.stack([f * s for s in gamma_scale])
    ref = torch.tensor([[0.0, -1.0, -5.0, -4.0, -2.0, -3.0, -6.0]] * 2)
    lengths = torch.tensor([[10, 2, 2, 2, 8, 9, 1], [20, 7, 5, 3, 2, 2, 2]])
    return Extracted(["a", "b"], feats, ref, ref.clone(), torch.ones(2, 7, dtype=torch.bool), torch.tensor([0, 0]),
                     lengths=lengths)


def test_symmetric_pools_by_hand():
    ex = _symmetric()
    beta, gamma = 1.0, 0.01
    d = design_diagnostics(ex, 2, beta=beta, gamma=gamma, selection_score="delta", seed=3)
    # delta at theta0 = ref: q = 1/6, phibar = 0, alpha0 = beta^2 sigmoid(log 6) = 6/7, G = (alpha0 / gamma) phi phi^T / 6
    k0 = (6 / 7) / (6 * gamma)  # G of a unit direction, first prompt
    k1 = k0 / 100  # second prompt: features x 0.1
    assert d["alpha0_median"] == pytest.approx(6 / 7)
    assert d["g_diag_max"] == pytest.approx(9 * k0)
    assert d["g_diag_median"] == pytest.approx((9 * k1 + k0) / 2)  # 12 values: k1 k1 9k1 x4 | k0 k0 9k0 x4
    assert d["g_offdiag_max"] == pytest.approx(9 * k0)
    assert d["g_offdiag_median"] == 0.0  # 32 of the 60 pairs are orthogonal
    # greedy: first 3 e1 (ties: lowest index), then e2 when k > 8/9 (prompt 1: k0 = 14.3), else the twin (prompt 2)
    picks = select_extracted(ex, 2, beta=beta, gamma=gamma, selection_score="delta")["indices"].tolist()
    assert picks == [[1, 5], [1, 2]]
    assert d["greedy_is_top_diag"] == 0.5  # top-2 by G_ii is {1, 2} in both prompts
    assert d["overlap_hardest"] == 0.5  # top-2 by log pi_ref: {1, 4}
    assert d["overlap_longest"] == 0.75  # top-2 by length: {5, 4} and {1, 2}
    assert d["length_chosen"] == 15.0
    assert d["length_dopt"] == pytest.approx((2 + 9 + 7 + 5) / 4)
    assert d["length_negatives"] == pytest.approx(45 / 12)
    rand = select_extracted(ex, 2, strategy="random", selection_score="delta", seed=3)["indices"]
    sets = [set(r.tolist()) for r in rand]
    want = np.mean([len(s & set(p)) / 2 for s, p in zip(sets, picks)])
    assert d["overlap_random"] == pytest.approx(want)
    assert d["length_random"] == pytest.approx(np.mean([int(ex.lengths[p, i]) for p, s in enumerate(sets) for i in s]))
    assert not degenerate(d) and degenerate({**d, "greedy_is_top_diag": 1.0})
    assert d["selection_score"] == "delta" and d["n"] == 2 and d["prompts"] == 2


def test_tiny_gram_means_top_diag():
    # at a small scale every |G_ij| is tiny: the Woodbury term changes no pick, greedy = top-n by G_ii everywhere
    ex = _symmetric(gamma_scale=(0.1, 0.05))
    d = design_diagnostics(ex, 2, beta=1.0, gamma=0.01, selection_score="delta")
    assert d["greedy_is_top_diag"] == 1.0 and degenerate(d)


def _algorithm1_gram(phi, logits, beta, gamma):
    """Lines 3-5 of Algorithm 1 as written, one prompt (valid negatives only): G = (alpha0 / gamma) V V^T, alpha0."""
    s = beta * logits
    q = np.exp(s - s.max())
    q /= q.sum()
    v = np.sqrt(q)[:, None] * (phi - q @ phi)
    alpha0 = beta**2 * (1 - 1 / (1 + np.exp(np.log(np.exp(s).sum()))))
    return alpha0 / gamma * v @ v.T, alpha0


@pytest.mark.parametrize("reading", ["delta", "reference", "offset"])
def test_gram_statistics_match_algorithm_1_with_padding(reading):
    g = torch.Generator().manual_seed(0)
    P, C, d = 5, 6, 4
    feats = torch.randn(P, C, d, generator=g)
    ref = torch.randn(P, C, generator=g) * 3
    th = ref + torch.randn(P, C, generator=g)
    mask = torch.ones(P, C, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3, 5] = False
    target = torch.tensor([0, 2, 5, 1, 3])
    ex = Extracted([str(i) for i in range(P)], feats * mask[..., None], ref * mask, th * mask, mask, target,
                   lengths=mask.long() * torch.arange(1, C + 1))
    beta, gamma = 0.5, 0.1
    out = design_diagnostics(ex, 2, beta=beta, gamma=gamma, selection_score=reading)
    diag, off, alphas = [], [], []
    for p in range(P):
        neg = [c for c in range(C) if mask[p, c] and c != target[p]]
        phi = (feats[p, neg] - feats[p, target[p]]).double().numpy()
        t, r = th[p].double().numpy(), ref[p].double().numpy()
        tgt = int(target[p])
        logits = {"delta": (t[neg] - t[tgt]) - (r[neg] - r[tgt]), "reference": t[neg] - t[tgt],
                  "offset": r[tgt] - r[neg]}[reading]
        G, a0 = _algorithm1_gram(phi, logits, beta, gamma)
        diag += list(np.diag(G))
        off += list(np.abs(G[~np.eye(len(neg), dtype=bool)]))
        alphas.append(a0)
    assert out["g_diag_median"] == pytest.approx(np.median(diag))
    assert out["g_diag_max"] == pytest.approx(max(diag))
    assert out["g_offdiag_median"] == pytest.approx(np.median(off))
    assert out["g_offdiag_max"] == pytest.approx(max(off))
    assert out["alpha0_median"] == pytest.approx(np.median(alphas))


def test_lengths_from_records_when_not_stored():
    from mass_dpo.extraction import extract
    from mass_dpo.models import load_model

    records = [
        {"id": "a", "prompt": "Pick one artist.", "candidates": ["Queen", "The Rolling Stones Live", "ABBA"], "target": 1},
        {"id": "b", "prompt": "Pick another.", "candidates": ["Miles Davis", "Nina Simone"], "target": 0},
    ]
    tiny = load_model("tiny", device="cpu")
    ex = extract(records, tiny, use_cache=False, progress=False)
    bare = replace(ex, lengths=None)
    with pytest.raises(ValueError, match="records= and tokenizer="):
        candidate_lengths(bare)
    counted = candidate_lengths(bare, records, tiny.tokenizer)
    assert counted.shape == ex.mask.shape and counted[1, 2] == 0 and (counted[ex.mask] > 0).all()
    assert torch.equal(counted, ex.lengths * ex.mask)  # the extraction stores them: the two counts agree
    with pytest.raises(ValueError, match="order"):
        candidate_lengths(bare, records[::-1], tiny.tokenizer)
    d = design_diagnostics(bare, 1, records=records, tokenizer=tiny.tokenizer)
    assert d["length_chosen"] == pytest.approx(float((counted[0, 1] + counted[1, 0]) / 2))
    assert math.isfinite(d["g_diag_max"])
