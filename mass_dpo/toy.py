"""The toy log-linear experiment of ``notebooks/toy_loglinear.ipynb``: its settings, sweeps and record cache.

The model, the fits and the quantities of Section 5 are in :mod:`mass_dpo.theory` (torch); this module holds what the
notebook runs over them: :class:`ToyConfig`, the per-(shape, seed) sweeps (:func:`n_sweep`, :func:`k_sweep`,
:func:`exact_sweep`, :func:`regime_sweep`) that turn a synthetic problem into records (plain dicts), and the drivers
:func:`run_all` / :func:`run_regime_sweep` that cache every sweep's records on disk by a hash of its parameters
(:func:`cached_records`). Importing it, and reading cached records, needs neither torch nor :mod:`mass_dpo.theory`:
they are imported inside the sweeps, only when a record has to be computed, so a warm run of the notebook starts
in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only
    import torch

    from . import theory as T

THETA0_KINDS = ("pilot", "zero", "true")
#: (strategy, center) pairs compared on every figure: Algorithm 1, its label-blind variant (the greedy over all
#: ``N + 1`` responses without knowing which won, ``y*`` dropped afterwards), its uncentred ablation, two baselines.
METHODS = (("dopt", True), ("label_blind", True), ("dopt", False), ("random", True), ("hardest", True))
#: The methods of the regime sweep (:func:`regime_sweep`).
REGIME_METHODS = (("dopt", True), ("label_blind", True), ("random", True))
#: The k sweep's extra estimator: label-blind subsets, fitted only on the prompts whose ``y*`` the greedy picked.
KEPT_LABEL = "label-blind, only prompts with y* picked"
#: Bump when a change to this module or to :mod:`mass_dpo.theory` changes any cached record
#: (:func:`cached_records`).
CACHE_VERSION = 2


def method_label(strategy: str, center: bool) -> str:
    """Human-readable name of a (strategy, center) pair, used as the ``method`` column of every record."""
    names = {"dopt": "D-optimal", "label_blind": "label-blind D-optimal", "random": "random", "hardest": "hardest"}
    label = names.get(strategy, strategy)
    if strategy == "dopt":
        label += " (centred)" if center else " (uncentred)"
    elif strategy == "label_blind" and not center:
        label += " (uncentred)"
    return label


def seed_for(*parts) -> int:
    """A stable 31-bit seed from any parts (e.g. ``seed_for("n_sweep", "clustered", 3)``)."""
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


def loglog_slope(x, y) -> float:
    """Least-squares slope of ``log y`` on ``log x`` over the points where both are positive and finite."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = (x > 0) & (y > 0) & np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(x[keep]), np.log(y[keep]), 1)[0])


@dataclass
class ToyConfig:
    """Every setting of the toy experiments (the notebook's parameters cell; see ``params/toy_loglinear.yaml``)."""

    d: int
    pool_size: int  # N, candidates per prompt
    n_grid: list  # subset sizes n for Theorems 5.1 / C.1
    num_prompts: int  # prompts per fit in the n sweep
    k_grid: list  # numbers of prompts k for Theorem 5.2
    k_sweep_n: int  # negatives per prompt in the k sweep
    beta: float
    gamma: float
    signal: float  # std of the true rewards beta phi . theta_true
    feature_scale: float  # std of each feature coordinate
    num_clusters: int
    cluster_noise: float  # near-duplicate spread, relative to feature_scale
    theta0: str  # "pilot" | "zero" | "true"
    pilot_prompts: int
    num_test_prompts: int
    exact_pool_size: int  # N for the brute-force comparison
    exact_prompts: int
    coverage_max_n: int
    tol: float = 1e-10
    max_iter: int = 100
    methods: tuple = field(default=METHODS)

    def __post_init__(self):
        if self.theta0 not in THETA0_KINDS:
            raise ValueError(f"theta0 must be one of {', '.join(THETA0_KINDS)}, got {self.theta0!r}")
        if max(self.n_grid) > self.pool_size or min(self.n_grid) < 1:
            raise ValueError(f"n_grid must lie in [1, pool_size={self.pool_size}], got {self.n_grid}")
        if not 1 <= self.k_sweep_n <= self.pool_size:
            raise ValueError(f"k_sweep_n must lie in [1, pool_size={self.pool_size}], got {self.k_sweep_n}")

    def as_dict(self) -> dict:
        return asdict(self)


def _problem(cfg: ToyConfig, shape: str, seed: int, tag: str, num_prompts: int, N: int):
    """theta_true, training pools, the preprocessing point theta0 and its fit report, for one (shape, seed)."""
    import torch

    from . import theory as T

    gen = torch.Generator().manual_seed(seed_for(tag, shape, seed))
    theta_true = T.make_theta_true(cfg.d, beta=cfg.beta, signal=cfg.signal, feature_scale=cfg.feature_scale,
                                 generator=gen)
    kw = dict(theta_true=theta_true, beta=cfg.beta, shape=shape, feature_scale=cfg.feature_scale,
              num_clusters=cfg.num_clusters, cluster_noise=cfg.cluster_noise, generator=gen)
    pools = T.make_pools(num_prompts, N, cfg.d, **kw)
    pilot_fit = None
    if cfg.theta0 == "pilot":
        pilot = T.make_pools(cfg.pilot_prompts, N, cfg.d, **kw)
        pilot_fit = T.fit_ridge(pilot.phi, pilot.b, cfg.beta, cfg.gamma, tol=cfg.tol, max_iter=cfg.max_iter)
        theta0 = pilot_fit.theta
    elif cfg.theta0 == "true":
        theta0 = theta_true.clone()
    else:
        theta0 = torch.zeros(cfg.d, dtype=T.DTYPE)
    return gen, theta_true, pools, theta0, pilot_fit, kw


def _fit_record(report: T.FitReport, **labels) -> dict:
    return dict(labels, converged=report.converged, grad_norm=report.grad_norm, iterations=report.iterations,
                message=report.message)


def _orders(cfg: ToyConfig, pools: T.Pools, logits, n_max: int, gen: torch.Generator) -> dict:
    """Selection order per method: every strategy is nested, so the first ``n`` of ``n_max`` is its ``n``-subset."""
    from .selection import select_negatives

    out = {}
    for strategy, center in cfg.methods:
        sel = select_negatives(pools.phi, logits, n_max, beta=cfg.beta, gamma=cfg.gamma, strategy=strategy,
                               center=center, generator=gen)
        out[(strategy, center)] = sel.indices
    return out


def n_sweep(cfg: ToyConfig, shape: str, seed: int) -> dict[str, list[dict]]:
    """Theorems 5.1 and C.1, redundancy and test accuracy against the subset size ``n`` for one (shape, seed).

    Returns ``{"n": records per (method, n), "coverage": records per (method, n <= coverage_max_n),
    "fits": one record per fit}``. Errors are measured against ``theta_*`` (the full-pool fit on the same prompts)
    and ``theta_true``; E_rel is averaged (``erel_*``) and maximised (``erel_*_max``) over prompts.
    """
    from . import theory as T

    N = cfg.pool_size
    gen, theta_true, pools, theta0, pilot_fit, kw = _problem(cfg, shape, seed, "n_sweep", cfg.num_prompts, N)
    test = T.make_pools(cfg.num_test_prompts, N, cfg.d, **kw)
    logits = pools.phi @ theta0 + pools.b
    base = dict(shape=shape, seed=seed, theta0=cfg.theta0)
    fits = [] if pilot_fit is None else [_fit_record(pilot_fit, **base, fit="pilot theta0", method="", n=N)]
    star = T.fit_ridge(pools.phi, pools.b, cfg.beta, cfg.gamma, tol=cfg.tol, max_iter=cfg.max_iter)
    fits.append(_fit_record(star, **base, fit="theta_*", method="", n=N))
    n_values = sorted(set(cfg.n_grid))
    n_max = max(max(n_values), min(cfg.coverage_max_n, N))
    orders = _orders(cfg, pools, logits, n_max, gen)
    acc_true, acc_star = T.preference_accuracy(theta_true, test.phi), T.preference_accuracy(star.theta, test.phi)
    records, coverage = [], []
    for (strategy, center), order in orders.items():
        label = dict(base, method=method_label(strategy, center), strategy=strategy, center=center)
        lb = T.leverage_bound(pools.phi, pools.b, logits, order, n_values, star.theta, cfg.beta, cfg.gamma)
        for j, n in enumerate(n_values):
            mask = T.prefix_mask(order, n, N)
            fit = T.fit_ridge(pools.phi, pools.b, cfg.beta, cfg.gamma, mask, theta_init=star.theta, tol=cfg.tol,
                            max_iter=cfg.max_iter)
            fits.append(_fit_record(fit, **base, fit="theta_hat_n", method=label["method"], n=n))
            sigma = T.sigma_matrix(star.theta, pools.phi, pools.b, cfg.beta, cfg.gamma, mask)
            e_star = T.relative_logit_error(pools.phi, fit.theta - star.theta)
            e_true = T.relative_logit_error(pools.phi, fit.theta - theta_true)
            lev, bound = lb.leverage[:, j], lb.bound[:, j]
            records.append(dict(
                label, n=n,
                erel_star=float(e_star.mean()), erel_star_max=float(e_star.max()),
                erel_true=float(e_true.mean()), erel_true_max=float(e_true.max()),
                sigma_err_star=float(T.sigma_norm(fit.theta - star.theta, sigma)),
                sigma_err_true=float(T.sigma_norm(fit.theta - theta_true, sigma)),
                leverage=float(lev.median()), leverage_max=float(lev.max()),
                bound=float(bound.median()), bound_holds=float((lev <= bound * (1 + 1e-9)).to(T.DTYPE).mean()),
                kappa=float(lb.kappa[:, j].median()), rho=float(lb.rho[:, j].median()),
                q_min=float(lb.q_min.median()), alpha0=float(lb.alpha0.median()), L_v=float(lb.L_v.median()),
                logdet_gain=float(T.logdet_gain(pools.phi, logits, order[:, :n], cfg.beta, cfg.gamma).mean()),
                test_accuracy=T.preference_accuracy(fit.theta, test.phi),
                test_accuracy_star=acc_star, test_accuracy_true=acc_true,
                converged=fit.converged,
            ))
        if shape == "clustered":
            for n in range(1, min(cfg.coverage_max_n, N) + 1):
                cov = T.cluster_coverage(order[:, :n], pools.clusters).to(T.DTYPE)
                coverage.append(dict(label, n=n, clusters_covered=float(cov.mean()),
                                     clusters_present=float(pools.clusters_present.to(T.DTYPE).mean())))
    return {"n": records, "coverage": coverage, "fits": fits}


def k_sweep(cfg: ToyConfig, shape: str, seed: int) -> dict[str, list[dict]]:
    """Theorem 5.2: ``||theta_hat_{k,n} - theta_*||_{Sigma_{k,n}}`` against the number of prompts ``k`` (``n`` fixed).

    ``theta_*`` is the full-pool fit on the same ``k`` prompts (``theta_{*,k}`` of Theorem A.2); the error against
    ``theta_true`` is measured in the same norm. ``c_min`` (Assumption C.2) is the smallest
    ``beta^2 (1 - sigmoid(Z_C(theta)))`` over the prompts at ``theta0``, ``theta_*`` and ``theta_hat``, and ``bound``
    is eq. 16 at ``delta = 0.05`` (``nan`` where ``c_min k >= gamma`` leaves it undefined).

    ``"k_kept"``: the label-blind subsets fitted only on the prompts among the first ``k`` whose ``y*`` the greedy
    picked (:func:`label_blind_kept`; ``kept`` of them, errors ``nan`` where none), with ``Sigma`` averaged over them.
    """
    from . import theory as T

    N, n = cfg.pool_size, cfg.k_sweep_n
    k_values = sorted(set(cfg.k_grid))
    gen, theta_true, pools, theta0, pilot_fit, _ = _problem(cfg, shape, seed, "k_sweep", max(k_values), N)
    logits = pools.phi @ theta0 + pools.b
    orders = _orders(cfg, pools, logits, n, gen)
    kept_order, kept_all = T.label_blind_kept(pools.phi, logits, n, cfg.beta, cfg.gamma)
    base = dict(shape=shape, seed=seed, theta0=cfg.theta0)
    records, kept_records, fits = [], [], []
    for k in k_values:
        phi, b = pools.phi[:k], pools.b[:k]
        star = T.fit_ridge(phi, b, cfg.beta, cfg.gamma, tol=cfg.tol, max_iter=cfg.max_iter)
        fits.append(_fit_record(star, **base, fit="theta_*,k", method="", n=N, k=k))
        for (strategy, center), order in orders.items():
            label = dict(base, method=method_label(strategy, center), strategy=strategy, center=center)
            mask = T.prefix_mask(order[:k], n, N)
            fit = T.fit_ridge(phi, b, cfg.beta, cfg.gamma, mask, theta_init=star.theta, tol=cfg.tol,
                            max_iter=cfg.max_iter)
            fits.append(_fit_record(fit, **base, fit="theta_hat_k,n", method=label["method"], n=n, k=k))
            sigma = T.sigma_matrix(star.theta, phi, b, cfg.beta, cfg.gamma, mask)
            c_min = min(float(T.curvature_scale(t, phi, b, cfg.beta).min()) for t in (theta0, star.theta, fit.theta))
            records.append(dict(
                label, k=k, n=n,
                sigma_err_star=float(T.sigma_norm(fit.theta - star.theta, sigma)),
                sigma_err_true=float(T.sigma_norm(fit.theta - theta_true, sigma)),
                c_min=c_min, bound=T.batch_error_bound(k, cfg.d, c_min, cfg.gamma),
                converged=fit.converged,
            ))
        keep = kept_all[:k]
        rec = dict(base, method=KEPT_LABEL, strategy="label_blind_kept", center=True, k=k, n=n, kept=int(keep.sum()),
                   sigma_err_star=float("nan"), sigma_err_true=float("nan"), converged=True)
        if keep.any():
            phi_k, b_k, mask = phi[keep], b[keep], T.prefix_mask(kept_order[:k][keep], n, N)
            fit = T.fit_ridge(phi_k, b_k, cfg.beta, cfg.gamma, mask, theta_init=star.theta, tol=cfg.tol,
                            max_iter=cfg.max_iter)
            fits.append(_fit_record(fit, **base, fit="theta_hat_k,n", method=KEPT_LABEL, n=n, k=k))
            sigma = T.sigma_matrix(star.theta, phi_k, b_k, cfg.beta, cfg.gamma, mask)
            rec.update(sigma_err_star=float(T.sigma_norm(fit.theta - star.theta, sigma)),
                       sigma_err_true=float(T.sigma_norm(fit.theta - theta_true, sigma)), converged=fit.converged)
        kept_records.append(rec)
    return {"k": records, "k_kept": kept_records, "fits": fits}


def exact_sweep(cfg: ToyConfig, shape: str, seed: int) -> dict[str, list[dict]]:
    """Greedy against exact (eq. 12): each method's log-det gain over the brute-force optimum, for every ``n``.

    Both criteria are reported: ``criterion="centred"`` is eq. 11 (Algorithm 1's objective) and
    ``criterion="uncentred"`` the ``center=False`` ablation's; each greedy is guaranteed ``>= 1 - 1/e`` of the
    optimum of its own criterion. ``fraction`` is the mean over prompts, ``fraction_min`` the worst prompt.
    """
    from . import theory as T

    N = cfg.exact_pool_size
    gen, _, pools, theta0, _, _ = _problem(cfg, shape, seed, "exact", cfg.exact_prompts, N)
    logits = pools.phi @ theta0 + pools.b
    orders = _orders(cfg, pools, logits, N, gen)
    records = []
    for n in range(1, N + 1):
        for criterion, center_crit in (("centred", True), ("uncentred", False)):
            best = T.exact_best_logdet_gain(pools.phi, logits, n, cfg.beta, cfg.gamma, center_crit)
            for (strategy, center), order in orders.items():
                gain = T.logdet_gain(pools.phi, logits, order[:, :n], cfg.beta, cfg.gamma, center_crit)
                frac = gain / best
                records.append(dict(shape=shape, seed=seed, theta0=cfg.theta0, method=method_label(strategy, center),
                                    strategy=strategy, center=center, criterion=criterion, n=n,
                                    fraction=float(frac.mean()), fraction_min=float(frac.min())))
    return {"exact": records}


@contextmanager
def torch_threads(n: int):
    """Run the block with ``torch.set_num_threads(n)``, restoring the previous setting afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _threaded(sweep, threads: int, *args):
    """``sweep(*args)`` under :func:`torch_threads` as a thunk for :func:`cached_records` (torch is imported only
    when a record is missing)."""

    def compute():
        with torch_threads(threads):
            return sweep(*args)

    return compute


def cache_dir() -> Path:
    """Where the toy's records are cached: ``mass_dpo.params.cache_root() / "toy"``."""
    from .params import cache_root

    return cache_root() / "toy"


def cache_key(name: str, **params) -> str:
    """A stable hex digest of ``name``, :data:`CACHE_VERSION` and ``params`` (JSON-serialisable values)."""
    blob = json.dumps(dict(params, _name=name, _version=CACHE_VERSION), sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cached_records(name: str, params: dict, compute, *, cache: bool = True):
    """``compute()`` (a dict of record lists), read from / written to ``cache_dir()/<name>-<hash>.json``.

    The file name hashes ``name``, every entry of ``params`` and :data:`CACHE_VERSION`; the write goes to a temporary
    file in the same folder, renamed into place, so a reader never sees half a file (strict JSON: a NaN is stored as
    ``null`` and read back as NaN). ``cache=False`` always computes.
    """
    if not cache:
        return compute()
    from .files import atomic_write_json, compute_once

    path = cache_dir() / f"{name}-{cache_key(name, **params)}.json"

    def cached():
        if not path.is_file():
            return None
        try:
            with open(path) as f:
                return _nan_for_null(json.load(f))
        except ValueError as err:  # a damaged file: said in one line, computed again
            import warnings

            warnings.warn(f"cached toy records {path} do not load ({err}); computing them again", stacklevel=3)
            return None

    def computed():
        out = compute()
        atomic_write_json(path, out, indent=None)  # strict JSON: NaN is written as null, read back as NaN
        return out

    return compute_once(path, f"the toy records {name}", cached, computed)  # parallel jobs: computed once


def _nan_for_null(records: dict) -> dict:
    """Cached records as computed: the ``null`` of a NaN (strict JSON) read back as NaN."""
    return {k: [{f: float("nan") if v is None else v for f, v in row.items()} if isinstance(row, dict) else row
                for row in rows] if isinstance(rows, list) else rows for k, rows in records.items()}


def run_all(cfg: ToyConfig, shapes, seeds, theta0_kinds=None, *, threads: int = 1,
            cache: bool = True) -> dict[str, list[dict]]:
    """Every sweep for every (theta0, shape, seed): ``{"n", "coverage", "k", "k_kept", "exact", "fits"}`` records.

    ``theta0_kinds`` (default ``[cfg.theta0]``) repeats everything at several preprocessing points. The tensors are
    tiny (``d x d`` solves over a few hundred prompts), so torch runs single-threaded by default: intra-op threads
    only add synchronisation, which made the sweeps 10x slower on a busy 2-core machine. Each (sweep, theta0, shape,
    seed) is cached by :func:`cached_records` unless ``cache=False``.
    """
    out: dict[str, list[dict]] = {key: [] for key in ("n", "coverage", "k", "k_kept", "exact", "fits")}
    for kind in theta0_kinds or [cfg.theta0]:
        c = replace(cfg, theta0=kind)
        for shape in shapes:
            for seed in seeds:
                for sweep in (n_sweep, k_sweep, exact_sweep):
                    params = dict(cfg=c.as_dict(), shape=shape, seed=seed)
                    rows = cached_records(sweep.__name__, params, _threaded(sweep, threads, c, shape, seed),
                                          cache=cache)
                    for key, recs in rows.items():
                        out[key].extend(recs)
    return out


def feature_scale_for_gram(gram_scale: float, d: int, N: int, beta: float, gamma: float) -> float:
    """The ``feature_scale`` at which the scaled Gram diagonal ``G_ii = (alpha0 / gamma) q_i ||phi_i - phibar||^2``
    of Algorithm 1 has expectation ``gram_scale`` on isotropic pools at ``theta0 = 0``.

    There ``q_i = 1/N``, ``alpha0 = beta^2 sigmoid(log N)`` and ``E ||phi_i - phibar||^2 = d s^2 (1 - 1/N)`` (``y*``'s
    features cancel in ``phi_i - phibar``), so ``s = sqrt(gram_scale N gamma / (alpha0 d (1 - 1/N)))``.
    """
    alpha0 = beta**2 / (1.0 + 1.0 / N)  # beta^2 sigmoid(log N)
    return math.sqrt(gram_scale * N * gamma / (alpha0 * d * (1.0 - 1.0 / N)))


def regime_sweep(cfg: ToyConfig, shape: str, seed: int, gram_scale: float, d: int, n: int) -> dict[str, list[dict]]:
    """D-optimal, label-blind D-optimal and random subsets of ``n`` negatives at one (``G_ii`` scale, ``d``).

    ``cfg`` gives ``N = pool_size``, ``beta``, ``gamma``, ``signal``, the pool shape settings, ``theta0``,
    ``num_prompts`` and ``num_test_prompts``; ``d`` and ``feature_scale`` (from ``gram_scale`` by
    :func:`feature_scale_for_gram`) are replaced. The rewards ``beta phi . theta_true`` keep std ``signal`` whatever
    the scale, so only how the data weigh against the ridge ``gamma`` changes. Records per method: ``erel_true``
    (eq. 15 against ``theta_true``, mean over prompts), ``test_accuracy``, ``same_as_top_gii`` (share of prompts whose
    subset is the top-``n`` by ``G_ii``) and the measured median ``G_ii``; fits start at 0.
    """
    import torch

    from . import theory as T
    from .selection import select_negatives

    N = cfg.pool_size
    scale = feature_scale_for_gram(gram_scale, d, N, cfg.beta, cfg.gamma)
    c = replace(cfg, d=d, feature_scale=scale)
    gen, theta_true, pools, theta0, _, kw = _problem(c, shape, seed, f"regime/{gram_scale}/{d}", c.num_prompts, N)
    test = T.make_pools(c.num_test_prompts, N, d, **kw)
    logits = pools.phi @ theta0 + pools.b
    top = T.top_gram_diagonal(pools.phi, logits, n, c.beta, c.gamma)
    v, alpha0, _, _ = T.design_vectors(pools.phi, logits, c.beta)
    gii = float(((alpha0 / c.gamma)[:, None] * (v * v).sum(-1)).median())
    base = dict(shape=shape, seed=seed, theta0=c.theta0, gram_scale=gram_scale, d=d, n=n, feature_scale=scale,
                gii_median=gii)
    records, fits = [], []
    for strategy, center in REGIME_METHODS:
        order = select_negatives(pools.phi, logits, n, beta=c.beta, gamma=c.gamma, strategy=strategy, center=center,
                                 generator=gen).indices
        # the subset loss only sees the picked rows: fit on them alone ([P, n, d], the same objective, N/n x cheaper)
        rows = torch.arange(pools.phi.shape[0])[:, None]
        fit = T.fit_ridge(pools.phi[rows, order], pools.b[rows, order], c.beta, c.gamma, tol=c.tol, max_iter=c.max_iter)
        label = method_label(strategy, center)
        fits.append(_fit_record(fit, **base, fit="theta_hat_n", method=label))
        records.append(dict(
            base, method=label, strategy=strategy, center=center,
            erel_true=float(T.relative_logit_error(pools.phi, fit.theta - theta_true).mean()),
            test_accuracy=T.preference_accuracy(fit.theta, test.phi),
            same_as_top_gii=float(T.same_subset(order, top).to(T.DTYPE).mean()),
            converged=fit.converged,
        ))
    return {"regime": records, "fits": fits}


def run_regime_sweep(cfg: ToyConfig, shapes, seeds, gram_scales, dims, n: int, *, threads: int = 1,
                     cache: bool = True) -> dict[str, list[dict]]:
    """:func:`regime_sweep` over every (shape, ``G_ii`` scale, ``d``, seed), cached like :func:`run_all`."""
    out: dict[str, list[dict]] = {"regime": [], "fits": []}
    for shape in shapes:
        for g in gram_scales:
            for d in dims:
                for seed in seeds:
                    params = dict(cfg=cfg.as_dict(), shape=shape, seed=seed, gram_scale=g, d=d, n=n)
                    rows = cached_records("regime_sweep", params,
                                          _threaded(regime_sweep, threads, cfg, shape, seed, g, d, n), cache=cache)
                    for key, recs in rows.items():
                        out[key].extend(recs)
    return out


# ---------------------------------------------------------------- the notebook's comparisons and sentences
# (records in, tables and printed sentences out; pandas, imported here only)

#: The two selections the notebook's conclusion is about.
DOPT, BLIND = method_label("dopt", True), method_label("label_blind", True)


def erel_slopes(nrec, pool_size: int):
    """Section 2: the log-log slope of ``erel_star`` against n per (theta0, shape, method) (mean and 95% interval
    over seeds, :func:`loglog_slope`), fitted over ``n <= N/2`` (``slope_n_le_N/2``, ``slope_lo``, ``slope_hi``) and
    over ``n < N`` (``slope_n_lt_N``); Theorem 5.1's rate is -1/2."""
    import pandas as pd

    from .plotting import mean_ci

    keys = ["theta0", "shape", "method", "seed"]

    def slopes(max_n):
        rows = [dict(zip(keys, key), slope=loglog_slope(g["n"], g["erel_star"]))
                for key, g in nrec[nrec["n"] <= max_n].groupby(keys)]
        return mean_ci(pd.DataFrame(rows), keys[:-1], "slope")

    half, full = slopes(pool_size // 2), slopes(pool_size - 1)
    table = half.rename(columns={"mean": "slope_n_le_N/2", "lo": "slope_lo", "hi": "slope_hi"}).drop(columns="count")
    table["slope_n_lt_N"] = full["mean"].to_numpy()
    return table


def leverage_constants(nrec):
    """Section 3: the measured constants of the leverage bound (kappa, rho, q_min, alpha0, L_v) and the share of
    (prompt, subset) pairs where it holds, mean per (theta0, shape, method, n)."""
    by = ["theta0", "shape", "method", "n"]
    return nrec.groupby(by, sort=True)[["kappa", "rho", "q_min", "alpha0", "L_v", "bound_holds"]].mean().reset_index()


def bound_holds_sentence(nrec) -> str:
    """Section 2's printed line: the share of (prompt, subset) pairs on which the leverage bound B_n holds."""
    return f"bound holds on {nrec['bound_holds'].mean():.4%} of (prompt, subset) pairs"


def greedy_worst(erec):
    """Section 4's table: the worst prompt's fraction of the brute-force optimum (``fraction_min``), lowest over
    every seed, shape, theta0 and n, per (criterion, method); the greedy of Algorithm 1 is guaranteed ``1 - 1/e``
    of its own criterion's optimum."""
    return erec.groupby(["criterion", "method"])["fraction_min"].min().reset_index()


def panel_label(frame):
    """``"<shape>, θ0 = <theta0>"`` per row: the panels of the k-sweep and exact-greedy figures."""
    return frame["shape"] + ", θ0 = " + frame["theta0"]


def sigma_error_curves(krec, kkept):
    """Section 4: the Sigma-norm error against k, ``vs θ_*`` and ``vs θ_true`` (mean and 95% interval over seeds, the
    label-blind subsets fitted on the kept prompts included), with eq. 16's bound where it is defined for every seed
    and method (``c_min k < gamma`` throughout). Returns ``(curves, c_min)``: the plotted rows and, per (panel, k),
    the median ``c_min`` and the share of runs where the bound is defined."""
    import pandas as pd

    from .plotting import mean_ci

    krec, kkept = krec.assign(panel=panel_label(krec)), kkept.assign(panel=panel_label(kkept))
    err = [mean_ci(pd.concat([krec, kkept]), ["panel", "method", "k"], column).assign(target=target)
           for target, column in (("vs θ_*", "sigma_err_star"), ("vs θ_true", "sigma_err_true"))]
    defined = krec.groupby(["panel", "k"])["bound"].apply(lambda b: b.notna().all()).rename("defined").reset_index()
    bound = mean_ci(krec, ["panel", "k"], "bound").merge(defined, on=["panel", "k"])
    bound = bound[bound["defined"]].drop(columns="defined").assign(method="eq. 16 bound", target="vs θ_*")
    c_min = krec.groupby(["panel", "k"]).agg(c_min_median=("c_min", "median"),
                                             bound_defined=("bound", lambda b: b.notna().mean())).reset_index()
    return pd.concat(err + [bound], ignore_index=True), c_min


def summary_table(nrec, krec, crec, slopes, *, n_grid, k_grid, pool_size: int, coverage_max_n: int):
    """The toy's one-table summary at ``n_mid`` (the largest n of the grid at most N/4): errors, test accuracy and
    log-det gain at ``n_mid``, the n-slope (:func:`erel_slopes`), the Sigma-norm errors at the largest k and, on
    clustered pools, the clusters covered. Returns ``(table, n_mid)``."""
    small = [m for m in n_grid if m <= pool_size // 4]
    n_mid, k_max = (max(small) if small else min(n_grid)), max(k_grid)
    keys = ["theta0", "shape", "method"]
    table = nrec[nrec["n"] == n_mid].groupby(keys)[["erel_star", "erel_true", "test_accuracy", "logdet_gain"]].mean()
    table = table.join(slopes.set_index(keys)["slope_n_le_N/2"])
    table = table.join(krec[krec["k"] == k_max].groupby(keys)[["sigma_err_star", "sigma_err_true"]].mean()
                       .rename(columns=lambda c: f"{c}_k{k_max}"))
    if not crec.empty:
        table = table.join(crec[(crec["n"] == min(n_mid, coverage_max_n)) & (crec["shape"] == "clustered")]
                           .groupby(keys)["clusters_covered"].mean())
    table = table.reset_index()
    table.insert(3, "n", n_mid)
    return table, n_mid


def paired_differences(nrec, pool_size: int):
    """Section 7: D-optimal against random, its uncentred ablation, hardest and label-blind, and label-blind against
    random, paired by seed in every (theta0, shape, n < N) cell, on ``erel_star``, ``erel_true`` and
    ``test_accuracy``; ``verdict`` is ``higher`` / ``lower`` where the 95% interval excludes 0."""
    import pandas as pd

    from .plotting import paired_difference

    pairs = [(DOPT, other) for other in ("random", method_label("dopt", False), "hardest", BLIND)] + [(BLIND, "random")]
    out = []
    for method, other in pairs:
        for value in ("erel_star", "erel_true", "test_accuracy"):
            diff = paired_difference(nrec[nrec["n"] < pool_size], ["theta0", "shape", "n"], "method", method, other,
                                     value)
            out.append(diff.assign(method=method, versus=other, value=value))
    out = pd.concat(out, ignore_index=True)
    out["verdict"] = np.where(out["hi"] < 0, "lower", np.where(out["lo"] > 0, "higher", "no clear gap"))
    return out


def label_blind_verdict(nrec, paired, krec, kkept, *, pool_size: int, k_grid, k_sweep_n: int):
    """Section 8: does the label explain D-optimal's loss? ``(table, sentence)``: per selection and value, the
    paired cells above / below random (:func:`paired_differences`), and the sentence printed from them, the median
    ratio to random and the k-slopes of the Sigma-norm error (closing the gap means at most half of D-optimal's
    significant cells and of its median excess over random are left)."""
    import pandas as pd

    def cells_vs(method, versus, value):
        # paired cells (theta0, shape, n < N) where method is significantly higher / lower than versus
        sub = paired[(paired["method"] == method) & (paired["versus"] == versus) & (paired["value"] == value)]
        return int((sub["verdict"] == "higher").sum()), int((sub["verdict"] == "lower").sum()), len(sub)

    def excess(method, value="erel_star"):
        # median over the (theta0, shape, n < N) cells of the mean ratio method / random
        m = nrec[nrec["n"] < pool_size].groupby(["theta0", "shape", "n", "method"])[value].mean().unstack("method")
        return float((m[method] / m["random"]).median())

    # slope of log(mean Sigma-norm error to theta_*) on log k, per method (over every theta0 and shape)
    kall = pd.concat([krec, kkept]).groupby(["method", "k"])["sigma_err_star"].mean().reset_index()
    kslope = {m: loglog_slope(g["k"], g["sigma_err_star"]) for m, g in kall.groupby("method")}
    kept_share = float((kkept["kept"] / kkept["k"]).mean())
    rows = []
    for m in (DOPT, BLIND):
        for value in ("erel_star", "erel_true", "test_accuracy"):
            hi, lo, total = cells_vs(m, "random", value)
            rows.append(dict(method=m, value=value, higher_than_random=hi, lower_than_random=lo, cells=total))
    table = pd.DataFrame(rows)

    d_hi, _, cells = cells_vs(DOPT, "random", "erel_star")
    b_hi, b_lo, _ = cells_vs(BLIND, "random", "erel_star")
    d_ex, b_ex = excess(DOPT), excess(BLIND)
    closes = b_hi <= d_hi / 2 and (b_ex - 1) <= (d_ex - 1) / 2
    k_max = max(k_grid)
    text = (
        f"Label-blind selection {'closes' if closes else 'does not close'} the gap to random: on E_rel against theta_* "
        f"it is higher than random in {b_hi} of {cells} paired cells (D-optimal: {d_hi}) and lower in {b_lo}; the "
        f"median ratio to random is {b_ex:.2f} (D-optimal: {d_ex:.2f}). The Sigma-norm error to theta_* falls with the "
        f"number of prompts k as k^{kslope[BLIND]:.2f} for label-blind, k^{kslope[DOPT]:.2f} for D-optimal and "
        f"k^{kslope['random']:.2f} for random (slopes over k = {min(k_grid)} to {k_max}). "
        + ("So the label dependence of Algorithm 1 is confirmed as the cause of its loss in this toy (closing means: at "
           "most half of D-optimal's significant cells and of its median excess over random are left)."
           if closes else
           "So the label dependence of Algorithm 1's design does not explain its loss: a selection that cannot see the "
           "label keeps more than half of D-optimal's gap (in significant cells or in median excess over random).")
    )
    unbiased_like = kslope[KEPT_LABEL] <= 0.75 * kslope["random"]
    text += (
        f" The label-blind subsets fitted only on the prompts whose y* the greedy picked ({kept_share:.0%} of the "
        f"prompts at n = {k_sweep_n}), an unbiased likelihood by Luce's choice axiom, fall as "
        f"k^{kslope[KEPT_LABEL]:.2f}: "
        + ("like random subsets (at least three quarters of random's slope), so the bias left in the label-blind "
           "subsets comes from the one dependence they keep: y* dropped from the top of a feature-driven order, which "
           "makes the choice set of the other prompts the top n plus y*."
           if unbiased_like else
           "not like random subsets (less than three quarters of random's slope), so even a choice set fixed before "
           "the label is seen keeps the plateau here; the subsets themselves (the extreme, high-leverage responses the "
           "design prefers) are what is left.")
    )
    return table, text


def regime_comparison(rrec):
    """Section 9's map: D-optimal and label-blind against random, paired by seed in every (shape, G_ii scale, d) cell,
    on test accuracy and on ``erel_true``; ``gain`` is signed so that positive is better than random, ``verdict``
    ``better`` / ``worse`` where the 95% interval excludes 0, else ``no clear gap``."""
    import pandas as pd

    from .plotting import paired_difference

    out = []
    for m in (DOPT, BLIND):
        for value, sign in (("test_accuracy", 1.0), ("erel_true", -1.0)):
            diff = paired_difference(rrec, ["shape", "gram_scale", "d"], "method", m, "random", value)
            diff = diff.assign(method=m, value=value, gain=sign * diff["mean"])
            diff["significant"] = (diff["lo"] > 0) | (diff["hi"] < 0)
            out.append(diff)
    out = pd.concat(out, ignore_index=True)
    out["verdict"] = np.where(~out["significant"], "no clear gap", np.where(out["gain"] > 0, "better", "worse"))
    return out


def dim_label(d) -> str:
    """``"d = 64"``: the hue of section 9's top-G_ii figure."""
    return f"d = {int(d)}"


def top_gii_curves(rrec):
    """Section 9's first figure: the share of prompts whose D-optimal subset is exactly the top-n by G_ii, mean and
    95% interval over seeds per (shape, d, expected G_ii), with ``dim`` (:func:`dim_label`) for the hue."""
    from .plotting import mean_ci

    top = mean_ci(rrec[rrec["method"] == DOPT], ["shape", "d", "gram_scale"], "same_as_top_gii")
    return top.assign(dim=[dim_label(v) for v in top["d"]])


def gii_table(rrec):
    """Section 9's cell table: per (shape, expected G_ii, d) the feature scale that sets it, the measured median
    G_ii of the pools and the share of prompts whose D-optimal subset is the top-n by G_ii (mean over seeds)."""
    keys = ["shape", "gram_scale", "d"]
    cells = rrec.groupby(keys)[["feature_scale", "gii_median"]].first()
    share = rrec[rrec["method"] == DOPT].groupby(keys)["same_as_top_gii"].mean().rename("share_top_gii")
    return cells.join(share).reset_index()


#: Section 9's map: the rows of the figure, each value with its colour-bar title (the gain is signed so that positive
#: is better than random: the accuracy difference, minus the E_rel difference).
REGIME_VALUES = (("test_accuracy", "test accuracy gain"),
                 ("erel_true", r"$-\Delta\mathcal{E}_{rel}(\hat\theta_n,\theta_{true})$"))


def short_label(method: str) -> str:
    """``"D-optimal (centred)"`` -> ``"D-optimal"``, ``"label-blind D-optimal"`` -> ``"label-blind"``: the map's
    panel titles."""
    return method.replace(" D-optimal", "").replace(" (centred)", "")


def regime_map_cells(cmp, *, shapes=None, methods=(DOPT, BLIND), values=REGIME_VALUES):
    """Section 9's heat map as cells (:func:`regime_comparison` in, the drawn numbers out): one row per (value row,
    panel = shape x method, d, expected G_ii), with ``i`` / ``j`` the panel's row and column, ``y`` / ``x`` the
    cell's position (``d`` and ``gram_scale`` in ascending order, as the runs hold them), ``gain``, ``significant``,
    ``text`` (the gain to 2 significant digits, a star where the paired interval excludes 0; empty for a missing
    cell), ``vmax`` (the colour limit of the value row: its largest |gain|, 1 where every gain is 0), ``title`` and
    ``row_label``. ``shapes``: the panels' order (default: as ``cmp`` holds them)."""
    import pandas as pd

    shapes = list(dict.fromkeys(cmp["shape"])) if shapes is None else list(shapes)
    dims = sorted(set(cmp["d"].astype(int)))
    scales = sorted(set(cmp["gram_scale"].astype(float)))
    rows = []
    for i, (value, row_label) in enumerate(values):
        part = cmp[cmp["value"] == value]
        vmax = float(part["gain"].abs().max()) if len(part) else 0.0
        vmax = vmax if vmax > 0 else 1.0
        for j, (shape, method) in enumerate((s_, m) for s_ in shapes for m in methods):
            cell = part[(part["shape"] == shape) & (part["method"] == method)]
            got = {(int(d), float(g)): (float(gain), bool(sig))
                   for d, g, gain, sig in zip(cell["d"], cell["gram_scale"], cell["gain"], cell["significant"])}
            for y, d in enumerate(dims):
                for x, g in enumerate(scales):
                    gain, sig = got.get((d, g), (math.nan, False))
                    text = "" if math.isnan(gain) else f"{gain:.2g}" + ("*" if sig else "")
                    rows.append(dict(value=value, row_label=row_label, shape=shape, method=method, i=i, j=j, y=y, x=x,
                                     d=d, gram_scale=g, gain=gain, significant=sig, text=text, vmax=vmax,
                                     title=f"{short_label(method)} − random | {shape}"))
    return pd.DataFrame(rows)


def verdict_counts(cmp):
    """Section 9's tally: per (method, value) how many cells of :func:`regime_comparison` are ``better``,
    ``worse`` and ``no clear gap`` (0 where none)."""
    return cmp.groupby(["method", "value", "verdict"]).size().unstack(fill_value=0)


def regime_findings(cmp, rrec) -> list[str]:
    """What section 9's sweep found, printed from :func:`regime_comparison` and the regime records (unnumbered):
    how often the D-optimal subset is the top-n by G_ii, then, for D-optimal and label-blind on test accuracy and on
    E_rel against theta_true, in how many (shape, G_ii, d) cells each beats or loses to random, and where (the
    number of cells, n and the number of seeds read from the records)."""

    def where(method, value, verdict):
        sub = cmp[(cmp["method"] == method) & (cmp["value"] == value) & (cmp["verdict"] == verdict)]
        return "; ".join(f"{r['shape']} G_ii~{r['gram_scale']:g} d={r['d']} ({r['mean']:+.3g})"
                         for _, r in sub.iterrows()) or "nowhere"

    cells = len(rrec[["shape", "gram_scale", "d"]].drop_duplicates())
    n = "/".join(str(int(v)) for v in sorted(set(rrec["n"])))
    seeds = rrec["seed"].nunique()
    share = rrec[rrec["method"] == DOPT].groupby("gram_scale")["same_as_top_gii"].mean()
    lines = [f"Top-n by G_ii: the D-optimal subset equals it on {share.iloc[0]:.0%} of prompts at G_ii ~ "
             f"{share.index[0]:g} and on {share.iloc[-1]:.0%} at G_ii ~ {share.index[-1]:g} (all shapes and d; random: "
             f"{rrec[rrec['method'] == 'random']['same_as_top_gii'].mean():.0%})."]
    for m in (DOPT, BLIND):
        for value, name in (("test_accuracy", "test accuracy"), ("erel_true", "E_rel against theta_true")):
            counts = cmp[(cmp["method"] == m) & (cmp["value"] == value)]["verdict"].value_counts()
            lines.append(f"{m} vs random on {name}, {cells} (shape, G_ii, d) cells at n = {n}, {seeds} seeds: "
                         f"better in {counts.get('better', 0)}, worse in {counts.get('worse', 0)}, no clear gap in "
                         f"{counts.get('no clear gap', 0)}. Better: {where(m, value, 'better')}. Worse: "
                         f"{where(m, value, 'worse')}.")
    return lines


def conclusion_lines(label_verdict: str, cmp, rrec, *, elapsed: float, regime_elapsed: float, cache: bool
                     ) -> list[str]:
    """The toy notebook's conclusion, numbered here and only here: the label-blind verdict of section 8
    (:func:`label_blind_verdict`), the regime findings of section 9 (:func:`regime_findings`), then the run time of
    the sweeps."""
    lines = [label_verdict, *regime_findings(cmp, rrec),
             f"Run time: the sweeps of sections 1-7 took {elapsed:.1f} s and the regime sweep {regime_elapsed:.1f} s "
             f"(cache {'on' if cache else 'off'})."]
    return [f"{i}. {line}" for i, line in enumerate(lines, 1)]
