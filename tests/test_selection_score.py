"""The three readings of appendix C.4's preprocessing score (``selection_score``) on hand-built pools."""

import math

import pytest
import torch

from mass_dpo.extraction import (
    DEFAULT_SELECTION_SCORE, SELECTION_SCORES, Extracted, reference_offsets, selection_inputs,
)
from mass_dpo.preprocess import select_extracted
from mass_dpo.selection import fisher_weights
from reference_selection import algorithm1, subset_logdet

BETA = 0.5

# One prompt, 4 candidates, the chosen one is candidate 0 (log pi_ref = -2). Negatives 1, 2, 3:
# candidate 1 is more plausible than the chosen one (-1), candidate 2 a little less (-3), candidate 3 far less (-6).
REF = [-2.0, -1.0, -3.0, -6.0]


def _pool(theta0=None, features=None) -> Extracted:
    ref = torch.tensor([REF])
    th = ref.clone() if theta0 is None else torch.tensor([theta0])
    feats = torch.eye(4)[None] if features is None else torch.as_tensor(features, dtype=torch.float32)[None]
    return Extracted(["p"], feats, ref, th, torch.ones(1, 4, dtype=torch.bool), torch.tensor([0]))


def _q(ex, reading):
    _, lg, mask, _ = selection_inputs(ex, reading)
    return fisher_weights(lg.double(), mask, BETA)[0][0]


def _softmax(xs):
    e = [math.exp(BETA * x) for x in xs]
    return torch.tensor([v / sum(e) for v in e], dtype=torch.float64)


def test_readings_by_hand_at_theta0_equal_ref():
    ex = _pool()
    # delta: Delta_i(theta0) = 0 at theta0 = ref: q uniform, nothing up-weighted
    torch.testing.assert_close(_q(ex, "delta"), torch.full((3,), 1 / 3, dtype=torch.float64))
    # reference: l_i = log pi_ref(y_i) - log pi_ref(y*) = 1, -1, -4: the plausible negative 1 gets most weight
    q = _q(ex, "reference")
    torch.testing.assert_close(q, _softmax([1.0, -1.0, -4.0]))
    assert int(q.argmax()) == 0 and int(q.argmin()) == 2  # negative 0 is candidate 1, negative 2 is candidate 3
    # offset: l_i = b_i = log pi_ref(y*) - log pi_ref(y_i) = -1, 1, 4: the negative the reference rejects most wins
    q = _q(ex, "offset")
    torch.testing.assert_close(q, _softmax([-1.0, 1.0, 4.0]))
    assert int(q.argmax()) == 2 and int(q.argmin()) == 0
    # alpha0 = beta^2 sigmoid(logsumexp(s)), per reading
    for reading, logits in (("delta", [0.0, 0.0, 0.0]), ("reference", [1.0, -1.0, -4.0]), ("offset", [-1.0, 1.0, 4.0])):
        _, lg, mask, _ = selection_inputs(ex, reading)
        lse = math.log(sum(math.exp(BETA * x) for x in logits))
        assert float(fisher_weights(lg.double(), mask, BETA)[1][0]) == pytest.approx(BETA**2 / (1 + math.exp(-lse)))


def test_readings_at_a_later_checkpoint():
    # theta0 moved: log pi_theta0 = ref + (0, 2, 0, 1): reference follows theta0, offset stays on the reference
    ex = _pool(theta0=[-2.0, 1.0, -3.0, -5.0])
    b = torch.tensor([[-1.0, 1.0, 4.0]])
    _, ref_l, _, _ = selection_inputs(ex, "reference")
    _, off_l, _, _ = selection_inputs(ex, "offset")
    _, delta_l, _, _ = selection_inputs(ex, "delta")
    torch.testing.assert_close(ref_l, torch.tensor([[3.0, -1.0, -3.0]]))  # log pi_theta0(y_i) - log pi_theta0(y*)
    torch.testing.assert_close(off_l, b)
    torch.testing.assert_close(reference_offsets(ex), b)
    torch.testing.assert_close(delta_l, torch.tensor([[2.0, 0.0, 1.0]]))  # Delta_i = (theta0 - ref)_i - (theta0 - ref)_*
    torch.testing.assert_close(delta_l, ref_l + off_l)  # appendix C.4: phi_i^T theta0 + b_i


def test_padding_and_target_in_the_middle():
    ref = torch.tensor([[-1.0, -2.0, -3.0, 0.0]])
    mask = torch.tensor([[True, True, True, False]])
    ex = Extracted(["p"], torch.zeros(1, 4, 2), ref, ref.clone(), mask, torch.tensor([1]))
    for reading, want in (("reference", [1.0, -1.0, 0.0]), ("offset", [-1.0, 1.0, 0.0]), ("delta", [0.0, 0.0, 0.0])):
        _, lg, m, cand = selection_inputs(ex, reading)
        assert cand.tolist() == [[0, 2, -1]] and m.tolist() == [[True, True, False]]
        torch.testing.assert_close(lg, torch.tensor([want]))


def test_dopt_picks_follow_the_reading():
    ex = _orthogonal_pool()
    phi, _, _, cand = selection_inputs(ex, "delta")
    rel = [-2.0, 1.0, -4.0, -0.5, -1.5, -1.0]  # log pi_ref(y_i) - log pi_ref(y*), by hand
    hand = {"delta": [0.0] * 6, "reference": rel, "offset": [-x for x in rel]}
    picks = {}
    for reading, logits in hand.items():
        want, _, _ = algorithm1(phi[0].double(), torch.tensor(logits, dtype=torch.float64), 3, BETA, 0.1)
        got = select_extracted(ex, 3, strategy="dopt", beta=BETA, gamma=0.1, selection_score=reading)
        assert got["indices"][0].tolist() == [int(cand[0, j]) for j in want]
        assert bool(got["uniform"][0]) == (reading == "delta")
        picks[reading] = got["indices"][0].tolist()
    assert picks["delta"] == [1, 2, 3]  # uniform q, equal geometry: ties go to the lowest index
    assert picks["reference"] == [2, 4, 6]  # the three most plausible negatives, most plausible first
    assert picks["offset"] == [3, 1, 5]  # the three the reference rejects most


def test_hardest_ranks_by_plausibility_under_every_reading():
    ex = _pool()
    for reading in SELECTION_SCORES:
        got = select_extracted(ex, 2, strategy="hardest", beta=BETA, selection_score=reading)
        assert got["indices"][0].tolist() == [1, 2]  # log pi_ref: -1, -3 (then -6)
        # and the subset is scored under the reading's q: log det H(S) of Algorithm 1 as written
        phi, lg, _, _ = selection_inputs(ex, reading)
        want = subset_logdet(phi[0].double(), lg[0].double(), [0, 1], BETA, 0.1)
        assert float(got["logdet"][0]) == pytest.approx(want, abs=1e-9)


def test_default_and_bad_reading():
    assert DEFAULT_SELECTION_SCORE == "reference" and DEFAULT_SELECTION_SCORE in SELECTION_SCORES
    ex = _pool()
    _, default, _, _ = selection_inputs(ex)
    _, ref, _, _ = selection_inputs(ex, "reference")
    torch.testing.assert_close(default, ref)
    with pytest.raises(ValueError, match="selection_score"):
        selection_inputs(ex, "policy")
    with pytest.raises(ValueError, match="delta, reference, offset"):
        select_extracted(ex, 1, selection_score="sharp")
    with pytest.warns(DeprecationWarning, match="selection_score='reference'"):
        _, old, _, _ = selection_inputs(ex, logits="policy")
    torch.testing.assert_close(old, ref)


def test_option_reaches_config_cli_and_run_key():
    import argparse

    from mass_dpo import preprocess, train
    from mass_dpo.runs import config_hash
    from mass_dpo.training import TrainConfig, resolve_config

    assert TrainConfig().selection_score == DEFAULT_SELECTION_SCORE
    assert resolve_config().selection_score == DEFAULT_SELECTION_SCORE  # params/training.yaml agrees
    with pytest.raises(ValueError, match="selection_score"):
        TrainConfig(selection_score="policy")
    p = argparse.ArgumentParser()
    train.add_arguments(p)
    args = p.parse_args(["--selection-score", "offset"])
    assert resolve_config(**train._config_args(args)).selection_score == "offset"
    p = argparse.ArgumentParser()
    preprocess.add_arguments(p)
    assert p.parse_args(["--dataset", "x"]).selection_score == DEFAULT_SELECTION_SCORE
    assert p.parse_args(["--dataset", "x", "--selection-score", "delta"]).selection_score == "delta"
    with pytest.raises(SystemExit):
        p.parse_args(["--dataset", "x", "--selection-score", "policy"])
    keys = {config_hash(TrainConfig(selection_score=r), world=1) for r in SELECTION_SCORES}
    assert len(keys) == 3  # each reading is its own run


def _orthogonal_pool() -> Extracted:
    """Six negatives in orthogonal directions of equal norm (phi_i = e_i - e_0): the geometry ties, so q decides.
    log pi_ref: chosen -2; negatives (candidates 1..6) -4, -1, -6, -2.5, -3.5, -3."""
    ref = torch.tensor([[-2.0, -4.0, -1.0, -6.0, -2.5, -3.5, -3.0]])
    return Extracted(["p"], torch.eye(7)[None], ref, ref.clone(), torch.ones(1, 7, dtype=torch.bool), torch.tensor([0]))


def test_training_negatives_follow_the_reading():
    from mass_dpo.training import select_training_negatives

    ex = _orthogonal_pool()
    assert select_training_negatives(ex, "mass_dpo", 2, beta=BETA, selection_score="reference").tolist() == [[2, 4]]
    assert select_training_negatives(ex, "mass_dpo", 2, beta=BETA, selection_score="offset").tolist() == [[3, 1]]
    assert select_training_negatives(ex, "mass_dpo", 2, beta=BETA, selection_score="delta").tolist() == [[1, 2]]
