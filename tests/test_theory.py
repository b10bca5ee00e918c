"""mass_dpo.theory against straightforward references."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from mass_dpo import select_negatives, theory, toy
from mass_dpo.params import load_params

DT = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    with toy.torch_threads(1):
        yield


def _pools(shape="isotropic", P=40, N=8, d=4, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    theta_true = theory.make_theta_true(d, beta=0.1, signal=2.0, feature_scale=10.0, generator=g)
    pools = theory.make_pools(P, N, d, theta_true=theta_true, beta=0.1, shape=shape, feature_scale=10.0,
                              num_clusters=3, generator=g, **kw)
    return theta_true, pools


def _smoke_config(**overrides) -> toy.ToyConfig:
    p = load_params("toy_loglinear")["profiles"]["smoke"]
    fields = {f for f in toy.ToyConfig.__dataclass_fields__ if f != "methods"}
    kw = {k: v for k, v in p.items() if k in fields}
    kw.update(theta0=p["theta0_kinds"][0])
    kw.update(overrides)
    return toy.ToyConfig(**kw)


# ---------------------------------------------------------------- data


def test_pools_shapes_and_feature_differences():
    theta_true, pools = _pools("clustered", P=30, N=7, d=5)
    assert pools.phi.shape == (30, 7, 5) and pools.b.shape == (30, 7)
    assert torch.all(pools.b == 0)
    assert pools.clusters.shape == (30, 7) and int(pools.clusters.min()) >= 0
    assert torch.all((pools.clusters_present >= 1) & (pools.clusters_present <= 3))
    # near-duplicates: two candidates of the same cluster differ by far less than two of different clusters
    same = pools.clusters[:, :, None] == pools.clusters[:, None, :]
    dist = torch.cdist(pools.phi, pools.phi)
    off = ~torch.eye(7, dtype=torch.bool)
    assert dist[same & off].mean() < 0.2 * dist[~same].mean()


def test_preferred_response_is_a_plackett_luce_draw_at_theta_true():
    # y* ~ softmax(beta phi . theta_true) over the N + 1 responses, so the full-pool loss (eq. 7) is the Plackett-Luce
    # likelihood of the draws and its (nearly unregularised) minimiser recovers theta_true
    g = torch.Generator().manual_seed(1)
    theta_true = torch.tensor([5.0, -2.5], dtype=DT)
    pools = theory.make_pools(20000, 3, 2, theta_true=theta_true, beta=0.1, feature_scale=2.0, generator=g)
    fit = theory.fit_ridge(pools.phi, pools.b, 0.1, 1e-8)
    assert fit.converged
    assert torch.allclose(fit.theta, theta_true, atol=0.25)
    # and y* is better than a uniform pick: it beats a given negative more often than half the time
    assert float((pools.phi @ theta_true < 0).double().mean()) > 0.6


# ---------------------------------------------------------------- fits


def test_newton_fit_reaches_the_minimiser_and_matches_lbfgs():
    _, pools = _pools(P=60, N=10, d=5, seed=3)
    beta, gamma = 0.1, 0.1
    mask = torch.rand(60, 10, generator=torch.Generator().manual_seed(0)) < 0.5
    mask[:, 0] = True
    fit = theory.fit_ridge(pools.phi, pools.b, beta, gamma, mask, tol=1e-10)
    assert fit.converged and fit.grad_norm < 1e-10
    # the gradient by autograd is ~0 there
    theta = fit.theta.clone().requires_grad_(True)
    theory.ridge_objective(theta, pools.phi, pools.b, beta, gamma, mask).backward()
    assert float(theta.grad.norm()) < 1e-9
    # an independent solver finds the same point
    x = torch.zeros(5, dtype=DT, requires_grad=True)
    opt = torch.optim.LBFGS([x], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        f = theory.ridge_objective(x, pools.phi, pools.b, beta, gamma, mask)
        f.backward()
        return f

    for _ in range(5):
        opt.step(closure)
    assert torch.allclose(x.detach(), fit.theta, atol=1e-6)


def test_closed_form_gradient_and_hessian_match_autograd():
    _, pools = _pools(P=10, N=6, d=3, seed=4)
    theta = torch.randn(3, dtype=DT, generator=torch.Generator().manual_seed(2))
    f = lambda t: theory.ridge_objective(t, pools.phi, pools.b, 0.1, 0.3)
    g = torch.autograd.functional.jacobian(f, theta)
    H = torch.autograd.functional.hessian(f, theta)
    assert torch.allclose(theory.ridge_gradient(theta, pools.phi, pools.b, 0.1, 0.3), g, atol=1e-10)
    assert torch.allclose(theory.ridge_hessian(theta, pools.phi, pools.b, 0.1, 0.3), H, atol=1e-10)


def test_fit_reports_failure_instead_of_pretending():
    _, pools = _pools(P=20, N=5, d=3)
    fit = theory.fit_ridge(pools.phi, pools.b, 0.1, 0.1, max_iter=1)
    assert not fit.converged and "no convergence" in fit.message
    assert fit.grad_norm > 1e-10


def test_full_subset_gives_the_full_pool_fit():
    _, pools = _pools(P=30, N=6, d=3)
    star = theory.fit_ridge(pools.phi, pools.b, 0.1, 0.1)
    order = select_negatives(pools.phi, pools.phi @ star.theta, 6, strategy="dopt").indices
    mask = theory.prefix_mask(order, 6, 6)
    assert mask.all()
    cold = theory.fit_ridge(pools.phi, pools.b, 0.1, 0.1, mask)  # not warm-started
    assert float(theory.relative_logit_error(pools.phi, cold.theta - star.theta).max()) < 1e-6


def test_a_subset_mask_fits_the_pools_cut_down_to_the_subset():
    """A random prefix of 3 of 6 candidates per prompt: the masked fit equals the fit on pools physically cut down
    to those 3 candidates (gathered tensors, no mask), and differs from the full-pool fit."""
    _, pools = _pools(P=30, N=6, d=3, seed=9)
    b = torch.randn(30, 6, dtype=DT, generator=torch.Generator().manual_seed(4))  # non-zero offsets: gathered too
    order = torch.argsort(torch.rand(30, 6, generator=torch.Generator().manual_seed(5)), dim=1)
    mask = theory.prefix_mask(order, 3, 6)
    assert mask.sum(-1).tolist() == [3] * 30 and mask.gather(1, order[:, :3]).all()
    keep = order[:, :3]
    sliced = theory.fit_ridge(torch.gather(pools.phi, 1, keep[..., None].expand(-1, -1, 3)), b.gather(1, keep),
                              0.1, 0.1, tol=1e-12)
    masked = theory.fit_ridge(pools.phi, b, 0.1, 0.1, mask, tol=1e-12)
    assert sliced.converged and masked.converged
    torch.testing.assert_close(masked.theta, sliced.theta, rtol=1e-9, atol=1e-10)
    full = theory.fit_ridge(pools.phi, b, 0.1, 0.1)
    assert float((full.theta - masked.theta).norm()) > 1e-3


# ---------------------------------------------------------------- Section 5 quantities


def test_relative_logit_error_hand_case():
    phi = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]]], dtype=DT)
    delta = torch.tensor([0.5, -0.25], dtype=DT)
    # phi . delta = [0.5, -0.5, -0.25]; the largest pairwise gap is 0.5 - (-0.5) = 1.0
    assert float(theory.relative_logit_error(phi, delta)[0]) == pytest.approx(1.0)
    # eq. 15 by brute force over every pair (i, j), on random pools
    g = torch.Generator().manual_seed(0)
    phi, delta = torch.randn(4, 5, 3, dtype=DT, generator=g), torch.randn(3, dtype=DT, generator=g)
    brute = [max(abs(float((phi[p, i] - phi[p, j]) @ delta)) for i in range(5) for j in range(5)) for p in range(4)]
    assert theory.relative_logit_error(phi, delta).tolist() == pytest.approx(brute, rel=1e-12)


def test_leverage_formula_on_a_tiny_case():
    # one prompt, d = 2, N = 3, theta0 = 0 so q0 is uniform; compare with explicit matrices
    phi = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]], dtype=DT)
    b = torch.zeros(1, 3, dtype=DT)
    logits = torch.zeros(1, 3, dtype=DT)
    beta, gamma = 0.5, 0.2
    theta_star = torch.tensor([0.3, -0.1], dtype=DT)
    order = torch.tensor([[2, 0, 1]])
    lb = theory.leverage_bound(phi, b, logits, order, [1, 2], theta_star, beta, gamma)

    q0 = torch.full((3,), 1 / 3, dtype=DT)
    phibar0 = (q0[:, None] * phi[0]).sum(0)
    tilde = phi[0] - phibar0
    v = q0.sqrt()[:, None] * tilde
    alpha0 = beta**2 * torch.sigmoid(torch.logsumexp(torch.zeros(3, dtype=DT), 0))
    for j, n in enumerate([1, 2]):
        S = order[0, :n]
        s = beta * (phi[0, S] @ theta_star)
        q = torch.softmax(s, 0)
        z = -torch.logsumexp(s, 0)
        pbar = q @ phi[0, S]
        cov = sum(q[a] * torch.outer(phi[0, S][a] - pbar, phi[0, S][a] - pbar) for a in range(n))
        hess = beta**2 * (1 - torch.sigmoid(z)) * (torch.sigmoid(z) * torch.outer(pbar, pbar) + cov)
        sigma = gamma * torch.eye(2, dtype=DT) + hess
        expected = max(float(t @ torch.linalg.solve(sigma, t)) for t in tilde)
        assert float(lb.leverage[0, j]) == pytest.approx(expected, rel=1e-10)
        H = gamma * torch.eye(2, dtype=DT) + alpha0 * sum(torch.outer(v[i], v[i]) for i in S)
        rho = min(1.0, float(torch.linalg.eigvals(torch.linalg.solve(H, sigma)).real.min()))
        assert float(lb.rho[0, j]) == pytest.approx(rho, rel=1e-8)
    # kappa at n = 1: largest leverage under H_0 = gamma I over the picked candidate's
    lev0 = (v * v).sum(-1) / gamma
    assert float(lb.kappa[0, 0]) == pytest.approx(float(lev0.max() / lev0[2]))
    assert float(lb.alpha0[0]) == pytest.approx(float(alpha0))


def test_leverage_bound_holds_with_measured_constants():
    _, pools = _pools("clustered", P=25, N=10, d=4, seed=5)
    star = theory.fit_ridge(pools.phi, pools.b, 0.1, 0.1)
    logits = pools.phi @ star.theta
    for strategy in ("dopt", "random"):
        order = select_negatives(pools.phi, logits, 10, strategy=strategy,
                                 generator=torch.Generator().manual_seed(0)).indices
        lb = theory.leverage_bound(pools.phi, pools.b, logits, order, [1, 3, 6, 10], star.theta, 0.1, 0.1)
        assert torch.all(lb.leverage <= lb.bound * (1 + 1e-9))
        assert torch.all(lb.kappa >= 1 - 1e-12) and torch.all((lb.rho > 0) & (lb.rho <= 1))
        if strategy == "dopt":  # Algorithm 1 picks the max-leverage candidate: kappa = 1 until the pool thins out
            assert torch.allclose(lb.kappa[:, 0], torch.ones(25, dtype=DT))


def test_brute_force_logdet_on_n5_and_greedy_guarantee():
    """exact_best_logdet_gain against the reference's brute force (d x d slogdet of every subset, q from random
    non-zero logits); the greedy's gain against Algorithm 1 as written and within the 1 - 1/e guarantee."""
    from reference_selection import algorithm1, brute_force

    _, pools = _pools("clustered", P=6, N=5, d=3, seed=6)
    logits = 10 * torch.randn(6, 5, dtype=DT, generator=torch.Generator().manual_seed(7))  # q far from uniform
    beta, gamma = 0.1, 0.1
    for n in range(1, 6):
        best = theory.exact_best_logdet_gain(pools.phi, logits, n, beta, gamma)
        sel = select_negatives(pools.phi, logits, n, beta=beta, gamma=gamma, strategy="dopt")
        greedy = theory.logdet_gain(pools.phi, logits, sel.indices, beta, gamma)
        for p in range(6):
            _, ref = brute_force(pools.phi[p], logits[p], n, beta, gamma)
            assert float(best[p]) == pytest.approx(ref - 3 * math.log(gamma), rel=1e-9, abs=1e-12)
            _, _, ref_greedy = algorithm1(pools.phi[p], logits[p], n, beta, gamma)
            assert float(greedy[p]) == pytest.approx(ref_greedy - 3 * math.log(gamma), rel=1e-9, abs=1e-12)
        assert torch.all(greedy >= (1 - 1 / math.e) * best - 1e-12) and torch.all(greedy <= best + 1e-9)


def test_theory_helpers_refuse_padding_and_out_of_range_sizes():
    """select_negatives pads with -1; indexed as a candidate it was silently the last one."""
    _, pools = _pools("clustered", P=3, N=5, d=3, seed=6)
    logits = torch.zeros(3, 5, dtype=DT)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 5\), got -1 to 2 \(a -1 pad"):
        theory.logdet_gain(pools.phi, logits, torch.tensor([[0, -1], [1, 2], [2, 0]]), 0.1, 0.1)
    with pytest.raises(ValueError, match=r"n must lie in \[0, N\] = \[0, 5\], got 7"):
        theory.exact_best_logdet_gain(pools.phi, logits, 7, 0.1, 0.1)
    order = torch.tensor([[0, 1, -1]] * 3)
    for n_values in ([0, 1], [3], [4]):
        with pytest.raises(ValueError, match=r"n_values must lie in \[1, 3\]"):
            theory.leverage_bound(pools.phi, pools.b, logits, order, n_values, torch.zeros(3, dtype=DT), 0.1, 0.1)
    with pytest.raises(ValueError, match="n must be >= 0"):
        theory.prefix_mask(order, -1, 5)


def test_selection_is_nested_so_prefixes_are_the_n_subsets():
    _, pools = _pools(P=10, N=9, d=4, seed=7)
    logits = pools.phi @ torch.ones(4, dtype=DT)
    for strategy, center in toy.METHODS:
        if strategy == "random":
            continue
        full = select_negatives(pools.phi, logits, 9, strategy=strategy, center=center).indices
        for n in (1, 4, 7):
            part = select_negatives(pools.phi, logits, n, strategy=strategy, center=center).indices
            assert torch.equal(part, full[:, :n])


def test_cluster_coverage_and_accuracy():
    clusters = torch.tensor([[0, 0, 1, 2, 2], [1, 1, 1, 1, 0]])
    idx = torch.tensor([[0, 1, 3], [0, 2, 4]])
    assert theory.cluster_coverage(idx, clusters).tolist() == [2, 2]
    assert theory.cluster_coverage(idx[:, :1], clusters).tolist() == [1, 1]
    phi = torch.tensor([[[-1.0], [-2.0]], [[1.0], [-1.0]]], dtype=DT)
    assert theory.preference_accuracy(torch.tensor([1.0], dtype=DT), phi) == 0.5
    assert theory.preference_accuracy(torch.tensor([0.0], dtype=DT), phi) == 0.0  # ties are not wins


def test_batch_error_bound_and_slope():
    assert math.isnan(theory.batch_error_bound(100, 4, c_min=0.01, gamma=0.1))  # c_min k >= gamma
    val = theory.batch_error_bound(5, 4, c_min=0.01, gamma=0.1, delta=0.05)
    inner = (1 / 0.05 + 5 * 0.01 / 0.1) / ((1 - 0.5) ** 0.25 * 0.05)
    assert val == pytest.approx(math.sqrt(1.0 * math.log(inner)) + 2 * math.sqrt(0.1))
    n = np.array([1, 2, 4, 8])
    assert toy.loglog_slope(n, 3.0 * n**-0.5) == pytest.approx(-0.5)
    assert math.isnan(toy.loglog_slope(n, [1.0, 0.0, 0.0, 0.0]))  # one positive point: no slope
    # a zero is dropped, not logged: the points (log 1, 0), (2 log 2, -2 log 2), (3 log 2, -2 log 2) have the
    # least-squares slope Sxy / Sxx = (-30/9) / (42/9) = -5/7
    assert toy.loglog_slope(n, [1.0, 0.0, 0.25, 0.25]) == pytest.approx(-5 / 7)


# ---------------------------------------------------------------- drivers


def test_n_sweep_records_are_finite_and_zero_at_the_full_pool():
    cfg = _smoke_config(theta0="pilot")
    out = toy.n_sweep(cfg, "clustered", 0)
    assert all(r["converged"] for r in out["fits"])
    methods = {toy.method_label(s, c) for s, c in toy.METHODS}
    assert {r["method"] for r in out["n"]} == methods
    for r in out["n"]:
        for key in ("erel_star", "erel_true", "leverage", "bound", "kappa", "rho", "test_accuracy"):
            assert math.isfinite(r[key]), (key, r)
        assert r["bound_holds"] == 1.0
        if r["n"] == cfg.pool_size:
            assert r["erel_star"] < 1e-6
    assert {r["n"] for r in out["coverage"]} == set(range(1, cfg.coverage_max_n + 1))


def test_run_all_is_deterministic():
    cfg = _smoke_config(num_prompts=8, k_grid=[4], num_test_prompts=10, exact_prompts=2)
    a = toy.run_all(cfg, ["isotropic"], [0], ["zero", "pilot"], cache=False)
    b = toy.run_all(cfg, ["isotropic"], [0], ["zero", "pilot"], cache=False)
    assert a == b
    assert {r["theta0"] for r in a["n"]} == {"zero", "pilot"}


def test_theory_stays_in_the_core_layer():
    import subprocess
    import sys

    code = ("import sys, mass_dpo.theory; "
            "print(sorted(m for m in ('matplotlib', 'transformers', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_ridge_hessian_with_a_mask_matches_eq10_per_prompt():
    _, pools = _pools(P=12, N=7, d=4, seed=8)
    mask = torch.rand(12, 7, generator=torch.Generator().manual_seed(1)) < 0.6
    mask[:, 0] = True
    theta = torch.randn(4, dtype=DT, generator=torch.Generator().manual_seed(3))
    from mass_dpo.losses import loglinear_hessian

    expected = loglinear_hessian(theta, pools.phi, pools.b, 0.2, mask).mean(0) + 0.3 * torch.eye(4, dtype=DT)
    torch.testing.assert_close(theory.ridge_hessian(theta, pools.phi, pools.b, 0.2, 0.3, mask), expected)


# ---------------------------------------------------------------- cache


def test_cached_records_reads_back_what_it_wrote(tmp_path, monkeypatch):
    monkeypatch.setenv("MASS_DPO_CACHE", str(tmp_path))
    calls = []

    def compute():
        calls.append(1)
        return {"n": [{"x": 0.1 + 0.2, "nan": float("nan"), "flag": True, "name": "a"}]}

    first = toy.cached_records("unit", {"a": 1, "grid": [1, 2]}, compute)
    again = toy.cached_records("unit", {"grid": [1, 2], "a": 1}, compute)  # key order does not matter
    assert len(calls) == 1
    assert again["n"][0]["x"] == 0.1 + 0.2 and math.isnan(again["n"][0]["nan"]) and again["n"][0]["flag"] is True
    assert first["n"][0]["x"] == again["n"][0]["x"]
    files = [f for f in (tmp_path / "toy").iterdir() if f.name != ".locks"]  # .locks: the entries' file locks
    assert len(files) == 1 and files[0].name.startswith("unit-") and files[0].suffix == ".json"
    toy.cached_records("unit", {"a": 2, "grid": [1, 2]}, compute)  # other parameters: another entry
    assert len(calls) == 2
    monkeypatch.setattr(toy, "CACHE_VERSION", toy.CACHE_VERSION + 1)  # a version bump invalidates
    toy.cached_records("unit", {"a": 1, "grid": [1, 2]}, compute)
    assert len(calls) == 3
    toy.cached_records("unit", {"a": 1, "grid": [1, 2]}, compute, cache=False)
    left = [f for f in (tmp_path / "toy").iterdir() if f.name != ".locks"]
    assert len(calls) == 4 and len(left) == 3  # nothing half-written is left


def test_run_all_from_the_cache_equals_a_fresh_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MASS_DPO_CACHE", str(tmp_path))
    cfg = _smoke_config(num_prompts=8, k_grid=[4], num_test_prompts=10, exact_prompts=2)
    fresh = toy.run_all(cfg, ["clustered"], [0], cache=False)
    cold = toy.run_all(cfg, ["clustered"], [0])
    warm = toy.run_all(cfg, ["clustered"], [0])
    same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN == NaN here
    assert same(fresh, cold) and same(cold, warm)
    assert len(list((tmp_path / "toy").glob("*.json"))) == 3  # n, k and exact sweeps of one (theta0, shape, seed)
    other = toy.run_all(replace(cfg, gamma=0.2), ["clustered"], [0])
    assert not same(other, warm) and len(list((tmp_path / "toy").glob("*.json"))) == 6


def test_a_warm_run_reads_the_cache_without_importing_torch(tmp_path, monkeypatch):
    # the notebook's warm run costs what its imports cost: reading cached records must not pull in torch
    import subprocess
    import sys

    monkeypatch.setenv("MASS_DPO_CACHE", str(tmp_path))
    cfg = _smoke_config(num_prompts=8, k_grid=[4], num_test_prompts=10, exact_prompts=2)
    cold = toy.run_all(cfg, ["isotropic"], [0])
    regime = toy.run_regime_sweep(cfg, ["isotropic"], [0], [0.1], [4], 2)
    script = (
        "import json, sys\n"
        "from mass_dpo import toy\n"
        f"cfg = toy.ToyConfig(**json.loads({json.dumps(json.dumps(cfg.as_dict(), default=list))}))\n"
        "out = toy.run_all(cfg, ['isotropic'], [0]), toy.run_regime_sweep(cfg, ['isotropic'], [0], [0.1], [4], 2)\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'out': out}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    assert result["torch"] is False
    assert json.dumps(result["out"], sort_keys=True) == json.dumps([cold, regime], sort_keys=True)


# ---------------------------------------------------------------- regime sweep


def test_feature_scale_for_gram_gives_the_requested_gram_diagonal():
    N, d, beta, gamma = 10, 16, 0.1, 0.1
    for g in (1e-3, 10.0):
        s = toy.feature_scale_for_gram(g, d, N, beta, gamma)
        theta_true = torch.zeros(d, dtype=DT)
        pools = theory.make_pools(3000, N, d, theta_true=theta_true, beta=beta, feature_scale=s,
                                  generator=torch.Generator().manual_seed(0))
        v, alpha0, _, _ = theory.design_vectors(pools.phi, torch.zeros(3000, N, dtype=DT), beta)
        gii = (alpha0 / gamma)[:, None] * (v * v).sum(-1)
        assert float(gii.mean()) == pytest.approx(g, rel=0.02)


def test_top_gram_diagonal_and_same_subset():
    phi = torch.tensor([[[3.0, 0.0], [0.0, 1.0], [-2.0, 0.0], [0.0, 0.5]]], dtype=DT)
    top = theory.top_gram_diagonal(phi, torch.zeros(1, 4, dtype=DT), 2, 0.1, 0.1)
    # uniform q: phibar = (0.25, 0.375); squared distances 7.703, 0.453, 5.203, 0.078 -> candidates 0 and 2
    assert top.tolist() == [[0, 2]]
    assert theory.same_subset(torch.tensor([[2, 0], [1, 3]]), torch.tensor([[0, 2], [1, 2]])).tolist() == [True, False]


def test_regime_sweep_dopt_is_top_gii_when_the_gram_is_small():
    cfg = _smoke_config(theta0="zero", pool_size=10, n_grid=[3], num_prompts=60, num_test_prompts=20)
    share = {}
    for g in (1e-4, 1e3):
        out = toy.regime_sweep(cfg, "isotropic", 0, g, 16, 3)
        rec = {r["method"]: r for r in out["regime"]}
        assert set(rec) == {"D-optimal (centred)", "label-blind D-optimal", "random"}
        assert all(f["converged"] for f in out["fits"])
        share[g] = rec["D-optimal (centred)"]["same_as_top_gii"]
        assert rec["random"]["same_as_top_gii"] < 0.2
        assert rec["D-optimal (centred)"]["gii_median"] == pytest.approx(g, rel=0.5)
    # log det(I + G_SS) ~ trace G_SS for small G: the greedy is top-n by G_ii; not so once G_ii >> 1
    assert share[1e-4] >= 0.95 and share[1e3] < 0.8


def test_label_blind_kept_marks_the_prompts_whose_winner_was_picked():
    _, pools = _pools("clustered", P=30, N=8, d=4, seed=9)
    logits = pools.phi @ torch.ones(4, dtype=DT)
    order, kept = theory.label_blind_kept(pools.phi, logits, 3, 0.1, 0.1)
    assert torch.equal(order, select_negatives(pools.phi, logits, 3, strategy="label_blind").indices)
    for p in range(30):  # reference: the greedy over the 8 + 1 responses, y* (index 8) among its first 4 picks?
        full = torch.cat([pools.phi[p], torch.zeros(1, 4, dtype=DT)])
        full_logits = torch.cat([logits[p], torch.zeros(1, dtype=DT)])
        top = select_negatives(full - full.mean(0), full_logits - full_logits.mean(), 4).indices.tolist()
        assert bool(kept[p]) == (8 in top)
        if kept[p]:  # then the subset is exactly the other three of those four
            assert sorted(order[p].tolist()) == sorted(i for i in top if i != 8)
    assert 0 < int(kept.sum()) < 30


def test_k_sweep_fits_the_kept_prompts_only():
    cfg = _smoke_config(theta0="zero")
    out = toy.k_sweep(cfg, "isotropic", 0)
    kept = out["k_kept"]
    assert [r["k"] for r in kept] == sorted(cfg.k_grid)
    for r in kept:
        assert 0 <= r["kept"] <= r["k"] and r["method"] == toy.KEPT_LABEL
        assert math.isnan(r["sigma_err_star"]) == (r["kept"] == 0)
    assert any(r["kept"] > 0 for r in kept)


# ---------------------------------------------------------------- the notebook's comparisons


def test_regime_comparison_signs_gains_and_marks_only_clear_gaps():
    import pandas as pd

    rows = []
    for seed in range(4):
        for method, acc, err in ((toy.DOPT, 0.60 + 0.01 * seed, 1.0), (toy.BLIND, 0.50 + 0.01 * seed, 0.5 + seed),
                                 ("random", 0.50, 1.0 + 0.01 * (seed % 2))):
            rows.append(dict(shape="isotropic", gram_scale=0.1, d=8, n=2, seed=seed, method=method, test_accuracy=acc,
                             erel_true=err, same_as_top_gii=1.0 if method == toy.DOPT else 0.0))
    rrec = pd.DataFrame(rows)
    cmp = toy.regime_comparison(rrec).set_index(["method", "value"])
    # D-optimal: +0.115 accuracy every seed (a clear gain); E_rel 1 vs 1.005: lower is better, gain = -(1 - 1.005)
    assert cmp.loc[(toy.DOPT, "test_accuracy"), "gain"] == pytest.approx(0.115)
    assert cmp.loc[(toy.DOPT, "test_accuracy"), "verdict"] == "better"
    assert cmp.loc[(toy.DOPT, "erel_true"), "gain"] == pytest.approx(0.005)
    # label-blind: accuracy +0.015 on average but 0.00..0.03 by seed; its E_rel is far noisier than its mean gap
    assert cmp.loc[(toy.BLIND, "erel_true"), "verdict"] == "no clear gap"
    assert cmp.loc[(toy.BLIND, "erel_true"), "gain"] == pytest.approx(-(2.0 - 1.005))
    lines = toy.regime_findings(toy.regime_comparison(rrec), rrec)
    assert lines[0].startswith("Top-n by G_ii: the D-optimal subset equals it on 100% of prompts")
    assert "better in 1, worse in 0, no clear gap in 0" in lines[1]


def test_paired_differences_pair_by_seed_and_name_the_direction():
    import pandas as pd

    methods = [toy.DOPT, toy.BLIND, toy.method_label("dopt", False), "random", "hardest"]
    rows = [dict(theta0="zero", shape="isotropic", n=n, seed=seed, method=m,
                 erel_star=(2.0 if m == toy.DOPT else 1.0) + 0.01 * seed, erel_true=1.0 + 0.1 * ((seed + n) % 3),
                 test_accuracy=0.5)
            for n in (1, 2, 4) for seed in range(3) for m in methods]
    paired = toy.paired_differences(pd.DataFrame(rows), pool_size=4).set_index(["method", "versus", "value", "n"])
    assert set(paired.index.get_level_values("n")) == {1, 2}  # n = N takes the whole pool: not compared
    row = paired.loc[(toy.DOPT, "random", "erel_star", 1)]
    assert row["mean"] == pytest.approx(1.0) and row["verdict"] == "higher"
    assert paired.loc[(toy.BLIND, "random", "erel_star", 2), "verdict"] == "no clear gap"  # identical: 0 +- 0


def test_toy_tables_from_hand_made_records():
    """The notebook's tables, computed in mass_dpo.toy: a known n^-1/2 and n^-1 law gives slopes -0.5 and -1
    (mean over seeds), the summary sits at the largest n <= N/4, eq. 16 is drawn only where every run defines it."""
    import pandas as pd

    rows = [{"theta0": "zero", "shape": "isotropic", "method": m, "seed": s, "n": n,
             "erel_star": (1 + s) * n ** rate, "erel_true": 0.1, "test_accuracy": 0.5, "logdet_gain": 1.0}
            for m, rate in (("random", -0.5), ("dopt", -1.0)) for s in (0, 1) for n in (1, 2, 4, 8)]
    nrec = pd.DataFrame(rows)
    slopes = toy.erel_slopes(nrec, pool_size=8).set_index("method")
    assert slopes.loc["random", "slope_n_le_N/2"] == pytest.approx(-0.5)
    assert slopes.loc["dopt", "slope_n_lt_N"] == pytest.approx(-1.0)
    krec = pd.DataFrame([{"theta0": "zero", "shape": "isotropic", "method": m, "seed": s, "k": k,
                          "sigma_err_star": 1.0 / k, "sigma_err_true": 2.0 / k, "c_min": 0.5,
                          "bound": None if (k == 10 and s == 1) else 3.0 / k}
                         for m in ("random", "dopt") for s in (0, 1) for k in (10, 100)])
    curves, c_min = toy.sigma_error_curves(krec, krec.iloc[:0])
    bound = curves[curves["method"] == "eq. 16 bound"]
    assert list(bound["k"]) == [100] and bound["mean"].iloc[0] == pytest.approx(0.03)
    assert list(c_min["bound_defined"]) == [0.5, 1.0]  # seed 1 of both methods lacks it at k = 10
    table, n_mid = toy.summary_table(nrec, krec, pd.DataFrame(), slopes.reset_index(), n_grid=[1, 2, 4, 8],
                                     k_grid=[10, 100], pool_size=8, coverage_max_n=4)
    assert n_mid == 2 and set(table["n"]) == {2}
    assert table.set_index("method").loc["dopt", "sigma_err_true_k100"] == pytest.approx(0.02)
