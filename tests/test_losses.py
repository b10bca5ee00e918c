"""The preference losses against direct formulas, autograd, and the log-linear lemmas."""

import math

import pytest
import torch

from mass_dpo.losses import (
    METHODS,
    loglinear_grad,
    loglinear_hessian,
    loglinear_loss,
    preference_loss,
)


def _logps(B=5, K=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    pc, rc = (torch.randn(B, generator=g, dtype=dtype) * 5 - 20 for _ in range(2))
    pr, rr = (torch.randn(B, K, generator=g, dtype=dtype) * 5 - 20 for _ in range(2))
    return pc, pr, rc, rr


def _direct(method, pc, pr, rc, rr, beta):
    """Straight from the definitions, one example and one negative at a time."""
    out = []
    for b in range(pc.shape[0]):
        rch = beta * (float(pc[b]) - float(rc[b]))
        rks = [beta * (float(pr[b, k]) - float(rr[b, k])) for k in range(pr.shape[1])]
        sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
        if method == "dpo":
            out.append(-math.log(sig(rch - rks[0])))
        elif method == "dpo_k":
            out.append(sum(-math.log(sig(rch - r)) for r in rks) / len(rks))
        elif method == "dmpo":
            out.append(-math.log(sig(rch - sum(rks) / len(rks))))
        else:  # eq. 5: -log sigmoid(-log sum_k exp(beta Delta_k)), Delta_k = log-ratio_k - log-ratio_chosen
            deltas = [(r - rch) for r in rks]  # beta * Delta_k
            out.append(-math.log(sig(-math.log(sum(math.exp(x) for x in deltas)))))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_matches_direct_formula(method, beta):
    K = 1 if method == "dpo" else 4
    pc, pr, rc, rr = _logps(K=K)
    out = preference_loss(method, pc, pr, rc, rr, beta=beta)
    torch.testing.assert_close(out.loss, _direct(method, pc, pr, rc, rr, beta), rtol=1e-10, atol=1e-12)


def test_sdpo_with_one_negative_is_dpo():
    pc, pr, rc, rr = _logps(K=1, seed=3)
    a = preference_loss("sdpo", pc, pr, rc, rr, beta=0.5).loss
    b = preference_loss("dpo", pc, pr, rc, rr, beta=0.5).loss
    torch.testing.assert_close(a, b)
    c = preference_loss("dpo_k", pc, pr, rc, rr, beta=0.5).loss
    d = preference_loss("dmpo", pc, pr, rc, rr, beta=0.5).loss
    torch.testing.assert_close(a, c)
    torch.testing.assert_close(a, d)


@pytest.mark.parametrize("method", ["dpo_k", "dmpo", "sdpo", "mass_dpo"])
def test_masked_negatives_change_nothing(method):
    pc, pr, rc, rr = _logps(K=3, seed=4)
    ref = preference_loss(method, pc, pr, rc, rr, beta=0.3)
    pad = torch.full((pr.shape[0], 2), float("nan"), dtype=pr.dtype)
    pr2, rr2 = torch.cat([pr, pad], 1).requires_grad_(), torch.cat([rr, pad], 1)
    mask = torch.tensor([[True] * 3 + [False] * 2] * pr.shape[0])
    out = preference_loss(method, pc, pr2, rc, rr2, beta=0.3, mask=mask)
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(out.margins, ref.margins)
    torch.testing.assert_close(out.accuracy, ref.accuracy)
    out.loss.sum().backward()
    assert torch.isfinite(pr2.grad).all() and (pr2.grad[:, 3:] == 0).all()


@pytest.mark.parametrize("method", METHODS)
def test_gradients_against_autograd_and_finite_differences(method):
    K = 1 if method == "dpo" else 3
    pc, pr, rc, rr = _logps(B=3, K=K, seed=5)
    inputs = (pc.requires_grad_(), pr.requires_grad_(), rc, rr)
    assert torch.autograd.gradcheck(
        lambda a, b: preference_loss(method, a, b, rc, rr, beta=0.7).loss, (inputs[0], inputs[1])
    )


def test_sdpo_gradient_closed_form():
    """d L / d policy_rejected_k = beta * softmax_k(beta Delta) * sigmoid(logsumexp(beta Delta))."""
    pc, pr, rc, rr = _logps(B=4, K=5, seed=6)
    pr.requires_grad_()
    beta = 0.4
    preference_loss("sdpo", pc, pr, rc, rr, beta=beta).loss.sum().backward()
    bd = beta * ((pr - rr) - (pc - rc)[:, None]).detach()
    expected = beta * torch.softmax(bd, -1) * torch.sigmoid(torch.logsumexp(bd, -1))[:, None]
    torch.testing.assert_close(pr.grad, expected)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stable_for_huge_margins(method, dtype):
    K = 1 if method == "dpo" else 4
    pc = torch.tensor([0.0, 0.0, 0.0], dtype=dtype)
    pr = torch.tensor([[1e5] * K, [-1e5] * K, [1e5 if k % 2 else -1e5 for k in range(K)]], dtype=dtype)
    rc, rr = torch.zeros_like(pc), torch.zeros_like(pr)
    pc.requires_grad_()
    pr.requires_grad_()
    out = preference_loss(method, pc, pr, rc, rr, beta=0.1)  # |beta Delta| = 1e4
    assert out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss).all()
    out.loss.sum().backward()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    out.loss = out.loss.detach()
    big = 0.1 * float(pr[0, 0].detach())  # |beta Delta| = 1e4 up to the input's rounding
    assert float(out.loss[0]) == pytest.approx(big, rel=1e-3)  # every negative far ahead: loss ~ |beta Delta|
    assert float(out.loss[1]) == pytest.approx(0.0, abs=1e-6)


def test_rewards_margins_accuracy():
    pc = torch.tensor([-1.0, -1.0])
    rc = torch.tensor([-2.0, -2.0])
    pr = torch.tensor([[-3.0, -1.0], [-3.0, 5.0]])
    rr = torch.tensor([[-2.0, -2.0], [-2.0, -2.0]])
    out = preference_loss("sdpo", pc, pr, rc, rr, beta=1.0, mask=torch.tensor([[True, True], [True, False]]))
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([[-1.0, 1.0], [-1.0, 0.0]]))
    torch.testing.assert_close(out.margins, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(out.accuracy, torch.tensor([0.0, 1.0]))  # a tie is not a win


def test_bad_inputs():
    pc, pr, rc, rr = _logps(K=2)
    with pytest.raises(ValueError, match="exactly one negative"):
        preference_loss("dpo", pc, pr, rc, rr)
    with pytest.raises(ValueError, match="unknown method"):
        preference_loss("ipo", pc, pr, rc, rr)
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        preference_loss("sdpo", pc, pr[:, 0], rc, rr)
    with pytest.raises(ValueError, match="at least one unmasked"):
        preference_loss("sdpo", pc, pr, rc, rr, mask=torch.zeros(pr.shape, dtype=torch.bool))
    for method in ("sdpo", "dpo_k", "dmpo"):  # K = 0 gave a loss of 0 (sdpo) or NaN (dpo_k, dmpo) unchecked
        with pytest.raises(ValueError, match=r"no negative \(K = 0\)"):
            preference_loss(method, pc, pr[:, :0], rc, rr[:, :0])
    with pytest.raises(TypeError, match="policy_rejected_logps must be a torch.Tensor, got ndarray; wrap it"):
        preference_loss("sdpo", pc, pr.numpy(), rc, rr)


# ------------------------------------------------------------------ log-linear model, eq. 7-10


def _loglinear_problem(n=6, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(d, generator=g, dtype=torch.float64)
    phi = torch.randn(3, n, d, generator=g, dtype=torch.float64)
    b = torch.randn(3, n, generator=g, dtype=torch.float64)
    return theta, phi, b


def test_loglinear_loss_is_sdpo_on_loglinear_logps():
    theta, phi, b = _loglinear_problem()
    beta = 0.5
    # log pi(y_i) - log ref(y_i) - [log pi(y*) - log ref(y*)] = phi_i . theta + b_i with b_i = log ref* - log ref_i
    delta = phi @ theta + b
    out = preference_loss("sdpo", torch.zeros(3, dtype=torch.float64), delta, torch.zeros(3, dtype=torch.float64),
                          torch.zeros_like(delta), beta=beta)
    torch.testing.assert_close(loglinear_loss(theta, phi, b, beta), out.loss)


@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_lemma_4_2_gradient(beta):
    """Eq. 9 against autograd, one prompt at a time and batched over the 3 prompts (row p = prompt p's gradient;
    the batched loss likewise)."""
    theta, phi, b = _loglinear_problem(seed=1)
    theta.requires_grad_()
    batched = loglinear_grad(theta.detach(), phi, b, beta)
    losses = loglinear_loss(theta.detach(), phi, b, beta)
    assert batched.shape == (3, 4) and losses.shape == (3,)
    for p in range(3):
        loss = loglinear_loss(theta, phi[p], b[p], beta)
        (auto,) = torch.autograd.grad(loss, theta)
        torch.testing.assert_close(loglinear_grad(theta.detach(), phi[p], b[p], beta), auto)
        torch.testing.assert_close(batched[p], auto)
        torch.testing.assert_close(losses[p], loss.detach())


@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_lemma_4_3_hessian(beta):
    theta, phi, b = _loglinear_problem(seed=2)
    batched = loglinear_hessian(theta, phi, b, beta)
    assert batched.shape == (3, 4, 4)
    for p in range(3):
        auto = torch.autograd.functional.hessian(lambda t: loglinear_loss(t, phi[p], b[p], beta), theta)
        closed = loglinear_hessian(theta, phi[p], b[p], beta)
        torch.testing.assert_close(closed, auto)
        torch.testing.assert_close(batched[p], auto)  # row p of the batched call is prompt p's Hessian
        # the Loewner lower bound of eq. 10 keeps only the dispersion term
        s = beta * (phi[p] @ theta + b[p])
        q = torch.softmax(s, 0)
        centred = phi[p] - q @ phi[p]
        lower = beta**2 * torch.sigmoid(torch.logsumexp(s, 0)) * (centred.T * q) @ centred
        assert torch.linalg.eigvalsh(closed - lower).min() >= -1e-12


def test_loglinear_mask():
    theta, phi, b = _loglinear_problem(seed=3)
    mask = torch.tensor([True, True, False, True, False, True])
    keep = mask.nonzero().flatten()
    torch.testing.assert_close(
        loglinear_loss(theta, phi, b, 0.3, mask=mask.expand(3, -1)), loglinear_loss(theta, phi[:, keep], b[:, keep], 0.3)
    )
    torch.testing.assert_close(
        loglinear_hessian(theta, phi[0], b[0], 0.3, mask=mask), loglinear_hessian(theta, phi[0, keep], b[0, keep], 0.3)
    )


def test_loglinear_functions_name_bad_shapes_and_empty_rows():
    theta, phi, b = _loglinear_problem(seed=4)  # theta [4], phi [3, 6, 4], b [3, 6]
    empty = torch.ones(3, 6, dtype=torch.bool)
    empty[1] = False  # unchecked: loss 0 and a NaN gradient for that row
    for fn in (loglinear_loss, loglinear_grad, loglinear_hessian):
        with pytest.raises(ValueError, match=r"theta \[d\] and phi \[..., n, d\] with the same d, got \(3,\)"):
            fn(theta[:3], phi, b, 0.1)
        with pytest.raises(ValueError, match=r"b must be \[..., n\] = \(3, 6\)"):
            fn(theta, phi, b[:, :5], 0.1)
        with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(3, 6\)"):
            fn(theta, phi, b, 0.1, mask=empty.float())
        with pytest.raises(ValueError, match="every mask row needs at least one candidate"):
            fn(theta, phi, b, 0.1, mask=empty)
        for beta in (-1.0, float("inf"), "0.1"):
            with pytest.raises(ValueError, match="beta must be a finite number > 0"):
                fn(theta, phi, b, beta)
