"""The exact fit of the log-linear regime: L-BFGS to a gradient tolerance, against a direct Newton solve."""

import pytest
import torch

from mass_dpo.loglinear import fit_loglinear, loglinear_objective


def _problem(P=40, K=3, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(P, 1 + K, d, generator=g, dtype=torch.float64)
    X[:, 0] += 0.5  # the chosen responses lean one way: a non-trivial optimum
    M = torch.ones(P, 1 + K, dtype=torch.bool)
    if K > 1:
        M[: P // 4, K] = False  # ragged pools
    return X, M


def _newton(X, M, method, beta, ridge, steps=50):
    theta = torch.zeros(X.shape[-1], dtype=torch.float64)
    f = lambda t: loglinear_objective(t, X, M, method=method, beta=beta, ridge=ridge)  # noqa: E731
    for _ in range(steps):
        g = torch.autograd.functional.jacobian(f, theta)
        H = torch.autograd.functional.hessian(f, theta)
        theta = theta - torch.linalg.solve(H, g)
    return theta


@pytest.mark.parametrize("method", ["sdpo", "dpo_k", "dmpo"])
def test_exact_fit_matches_a_newton_solve(method):
    X, M = _problem()
    fit = fit_loglinear(X, M, method=method, beta=0.5, ridge=0.05, tol=1e-8)
    assert fit.converged and fit.grad_norm <= 1e-8
    ref = _newton(X, M, method, 0.5, 0.05)
    assert torch.allclose(fit.theta.double(), ref, atol=1e-6)
    # the objective at the fit is the minimum: any perturbation raises it
    f = lambda t: float(loglinear_objective(t, X, M, method=method, beta=0.5, ridge=0.05))  # noqa: E731
    assert f(fit.theta.double()) <= f(fit.theta.double() + 1e-3 * torch.randn(X.shape[-1], dtype=torch.float64))


def test_dpo_uses_one_negative_and_the_path_starts_at_zero():
    X, M = _problem(K=1)
    seen = []
    fit = fit_loglinear(X, M, method="dpo", beta=1.0, ridge=0.1, callback=lambda i, t: seen.append(i))
    assert fit.converged
    assert seen[0] == 0 and seen[-1] == fit.iterations == len(fit.path) - 1
    assert float(fit.path[0][1].abs().max()) == 0.0
    assert torch.allclose(fit.theta.double(), _newton(X, M, "dpo", 1.0, 0.1), atol=1e-5)


def test_a_larger_ridge_shrinks_theta():
    X, M = _problem()
    small = fit_loglinear(X, M, method="sdpo", beta=0.5, ridge=0.01).theta
    large = fit_loglinear(X, M, method="sdpo", beta=0.5, ridge=1.0).theta
    assert float(large.norm()) < float(small.norm())


def test_bad_input_is_refused():
    X, M = _problem()
    with pytest.raises(ValueError, match="ridge must be > 0"):
        fit_loglinear(X, M, method="sdpo", beta=0.5, ridge=0.0)
    X[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fit_loglinear(X, M, method="sdpo", beta=0.5, ridge=0.1)
    with pytest.raises(ValueError, match=r"\[P, 1\+K, d\]"):
        fit_loglinear(X[0], M[0], method="sdpo", beta=0.5, ridge=0.1)


def test_the_fit_evaluates_each_point_once(monkeypatch):
    # L-BFGS asks again for the point its line search accepted; the fit reads it back instead of recomputing
    import mass_dpo.loglinear as loglinear

    X, M = _problem()
    points = []

    def counted(theta, *a, **k):
        points.append(theta.detach().clone())
        return loglinear_objective(theta, *a, **k)

    monkeypatch.setattr(loglinear, "loglinear_objective", counted)
    fit = fit_loglinear(X, M, method="sdpo", beta=0.5, ridge=0.1, tol=1e-8)
    assert fit.converged and fit.iterations >= 3
    distinct = {p.numpy().tobytes() for p in points}
    assert len(distinct) == len(points)
