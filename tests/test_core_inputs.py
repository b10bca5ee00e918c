"""The core functions with the inputs a library user gets wrong (found by an audit of their robustness,
2026-12-05): NaN log-probs that made a NaN loss in silence, float32 features with a large shared offset that
changed the D-optimal picks, a generator of cut-offs read twice."""

import numpy as np
import pytest
import torch

from mass_dpo.losses import preference_loss
from mass_dpo.metrics import ranking_metrics
from mass_dpo.selection import select_negatives


def _logps(B=3, K=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [-torch.rand(B, generator=g) * 5, -torch.rand(B, K, generator=g) * 5,
            -torch.rand(B, generator=g) * 5, -torch.rand(B, K, generator=g) * 5]


@pytest.mark.parametrize("which, where", [(3, (1, 1)), (2, (2,)), (1, (0, 0)), (0, (1,))])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_log_prob_is_one_line_naming_it(which, where, value):
    args = _logps()
    args[which][where] = value
    names = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    with pytest.raises(ValueError, match=rf"{names[which]} is {value} at example {where[0]}"):
        preference_loss("sdpo", *args)
    mask = torch.ones(3, 2, dtype=torch.bool)
    if len(where) == 2:  # a masked negative may hold anything
        mask[where] = False
        assert torch.isfinite(preference_loss("sdpo", *args, mask=mask.tolist()).loss).all()


def test_the_training_loop_turns_the_check_off_and_checks_its_references_once():
    from mass_dpo.training import PreferenceDataset

    args = _logps()
    args[1][0, 0] = float("nan")  # a diverging policy: NaN metrics, not an error mid-run
    assert torch.isnan(preference_loss("sdpo", *args, check_finite=False).loss[0])
    ref = torch.zeros(2, 4)
    ref[1, 2] = float("-inf")
    candidates = torch.tensor([[0, 1, 3], [0, 1, 2]])
    with pytest.raises(ValueError, match=r"ref_logps is -inf for prompt '1', candidate 2"):
        PreferenceDataset(candidates, ref, features=torch.zeros(2, 4, 3))
    candidates[1, 2] = -1  # not a scored candidate: fine, and its -inf is never read
    ref[1, :2] = torch.tensor([-0.25, -0.5])
    features = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    ds = PreferenceDataset(candidates, ref, features=features)
    item = ds[1]
    assert item["mask"].tolist() == [True, True, False]
    assert item["ref_logps"].tolist() == [-0.25, -0.5, 0.0]  # candidates 0, 1, then the absent slot as 0
    assert torch.equal(item["features"], torch.stack([features[1, 0], features[1, 1], torch.zeros(3)]))
    values, refs, mask = ds.columns(torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]))
    assert values.tolist() == [[1.0, 2.0, 4.0], [5.0, 6.0, 0.0]] and mask[1].tolist() == [True, True, False]
    assert torch.isfinite(refs).all()


def test_log_probs_must_be_float_and_are_promoted_together():
    pc, pr, rc, rr = _logps()
    with pytest.raises(TypeError, match="policy_chosen_logps must hold float log-probabilities, got torch.int64"):
        preference_loss("sdpo", pc.long(), pr, rc, rr)
    with pytest.raises(TypeError, match="ref_rejected_logps must hold float"):
        preference_loss("sdpo", pc, pr, rc, rr.bool())
    assert preference_loss("sdpo", pc, pr.double(), rc, rr).loss.dtype == torch.float64  # not cut to float32


def test_a_large_shared_feature_offset_leaves_the_d_optimal_picks_alone():
    g = torch.Generator().manual_seed(0)
    phi = torch.randn(100, 20, 8, generator=g, dtype=torch.float64)
    logits = torch.randn(100, 20, generator=g, dtype=torch.float64)
    offset = torch.randn(100, 1, 8, generator=g, dtype=torch.float64) * 2000  # the pool's common part
    exact = select_negatives(phi, logits, 5, beta=1.0)
    shifted = (phi + offset).float()  # the same design (v_i is invariant to a shift of the pool), in float32
    assert torch.equal(select_negatives(shifted, logits.float(), 5, beta=1.0).indices, exact.indices)


def test_a_selection_keeps_no_graph():
    phi = torch.randn(4, 6, 3, requires_grad=True)
    out = select_negatives(phi, torch.randn(4, 6), 2)
    assert not out.gains.requires_grad and not out.logdet.requires_grad and not out.alpha.requires_grad


def test_cut_offs_may_be_any_iterable_of_integers():
    scores, target = torch.randn(6, 5), torch.arange(6) % 5
    want = ranking_metrics(scores, target, ks=(1, 3))
    assert ranking_metrics(scores, target, ks=(k for k in (1, 3))) == want
    assert ranking_metrics(scores, target, ks=np.array([1, 3])) == want
