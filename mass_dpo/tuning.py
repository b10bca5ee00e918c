"""Hyperparameters chosen once, on the validation split, by the rule written in ``params/training.yaml`` (``tuning``).

For one (model, dataset, method) every point of the regime's grid is trained on the training prompts (the rule's seed,
the method's own n and beta) and scored on the validation prompts by the rule's metric; the best wins, ties to the
first point in grid order. The test split is never read.

A grid cannot stop at its edge: when the best value of a numeric axis is its first or last value, the axis is extended
by one step on that side (the ratio of the two values at that end for an axis of positive values that are not
evenly spaced, else their difference), the new points are trained and scored, and the choice is made again, until the
best value is inside the axis or the next step would leave the bounds written beside the grid (``tuning.bounds``).
Points outside the written grid are marked ``extended`` in the table; ``edge`` on the chosen row says when the choice
still sits at the edge of the (extended) axis because a bound stopped it.

:func:`tune` takes the function that trains one grid point, so the notebooks (``mass_dpo.experiments``) and
``train_run(..., tune=True)`` / ``mass-dpo train --tune`` share the rule.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable

#: The options a tuning run always sets (besides the rule's seed): the validation split as the split it is scored
#: on, and no evaluation while it trains (``online_eval``, ``pool_eval``: a tuning run is ranked by its final
#: validation metric alone; the curves of Figures 2-3 come from the final runs. In the freeze regime the online
#: evaluations cost about as much as the training steps: docs/benchmarks.md, "Tuning runs").
SCORED_ON = {"test_split": "valid", "online_eval": False, "pool_eval": False}


def scored_on(regime: str) -> dict[str, Any]:
    """:data:`SCORED_ON` of ``regime``. The log-linear regime keeps its online evaluation: it costs nothing there, and
    with it the tuning fit at the chosen point is the final fit of the rule's seed (``runs._FITS`` shares it)."""
    return {k: v for k, v in SCORED_ON.items() if not (regime == "loglinear" and k == "online_eval")}


def tuning_rule() -> dict[str, Any]:
    """``params/training.yaml`` ``tuning``: ``metric``, ``seed``, ``grid`` per regime and ``bounds`` per axis."""
    from .params import load_params

    return dict(load_params("training").get("tuning") or {})


def grid_axes(regime: str, rule: dict | None = None) -> dict[str, list]:
    """The regime's axes in grid order (``{}``: nothing is tuned in that regime)."""
    rule = tuning_rule() if rule is None else rule
    return {k: list(v) for k, v in ((rule.get("grid") or {}).get(regime) or {}).items()}


def combos(axes: dict[str, list]) -> list[dict[str, Any]]:
    """Every combination of ``axes``, in grid order (the first axis varies slowest)."""
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def _numeric(values: list) -> bool:
    return len(values) >= 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _evenly_spaced(values: list) -> bool:
    steps = [b - a for a, b in zip(values, values[1:])]
    return len(values) >= 3 and all(math.isclose(s, steps[0], rel_tol=1e-9) for s in steps)


def next_step(values: list, side: str) -> float:
    """The value one step beyond ``values`` on ``side`` (``"first"`` or ``"last"``): geometric for positive values
    that are not evenly spaced (``1e-4, 1e-5`` -> ``1e-6``), arithmetic otherwise (``0, 1, 2`` -> ``3``)."""
    a, b = (values[0], values[1]) if side == "first" else (values[-1], values[-2])
    if all(v > 0 for v in values) and not _evenly_spaced(values):
        return float(f"{a * (a / b):.12g}")  # 1e-05 * 0.1 prints as 1e-06, not 1.0000000000000002e-06
    return a + (a - b)


def _within(value: float, bounds) -> bool:
    if not bounds:
        return True
    lo, hi = (float(b) if b is not None else None for b in bounds)
    return (lo is None or value >= lo * (1 - 1e-12)) and (hi is None or value <= hi * (1 + 1e-12))


@dataclass
class Tuned:
    """The outcome of :func:`tune`: ``options`` (the chosen value of each axis) and ``table`` (one row per grid point
    in grid order: the axes, ``metric``, ``value``, ``se``, ``prompts``, ``extended`` (outside the written grid),
    ``chosen``, and on the chosen row ``edge``: ``""``, or the axes whose chosen value sits at an edge that a bound
    kept from extending)."""

    options: dict[str, Any]
    table: Any

    def sentence(self) -> str:
        """``"tuned on the validation split (mrr): pooling=response, ridge=1e-05 (validation mrr 0.451 +- 0.02)"``."""
        if not self.options:
            return "nothing to tune in this regime"
        row = self.table[self.table["chosen"]].iloc[0]
        what = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.options.items())
        extra = f"; at the bound of {row['edge']}" if row.get("edge") else ""
        ext = int(self.table["extended"].sum())
        grown = f"; {ext} point(s) beyond the written grid" if ext else ""
        return (f"tuned on the validation split ({row['metric']}, {len(self.table)} points{grown}): {what} "
                f"(validation {row['metric']} {row['value']:.4f} +- {row['se']:.4f}{extra})")


def tune(train: Callable[[dict[str, Any]], Any], regime: str, *, rule: dict | None = None,
         echo: Callable[[str], None] | None = None) -> Tuned:
    """Choose the hyperparameters of one (model, dataset, method) by the rule (module docstring).

    Args:
        train: trains one grid point and returns its run (an object with ``metrics``): it is called with the options
            of that point plus the rule's ``seed`` and ``test_split="valid"``, and must apply them over the
            (model, dataset, method) being tuned.
        regime: whose grid (``tuning.grid.<regime>``).
        rule: the rule (default: ``params/training.yaml`` ``tuning``).
        echo: one line per grid point trained (``None``: quiet).
    """
    import pandas as pd

    rule = tuning_rule() if rule is None else rule
    axes = grid_axes(regime, rule)
    if not axes:
        return Tuned({}, pd.DataFrame())
    metric = rule.get("metric", "mrr")
    seed = int(rule.get("seed", 0))
    bounds = rule.get("bounds") or {}
    written = {k: list(v) for k, v in axes.items()}
    scored: dict[tuple, dict] = {}

    def key(combo):
        return tuple((k, combo[k]) for k in axes)

    def score(combo):
        if key(combo) not in scored:
            result = train({**combo, "seed": seed, **scored_on(regime)})
            m = result.metrics
            scored[key(combo)] = {"value": float(m[metric]), "se": float(m.get(f"{metric}_se", math.nan)),
                                  "prompts": m.get("prompts")}
            if echo:
                echo(f"tuning {combo}: validation {metric} {scored[key(combo)]['value']:.4f}")
        return scored[key(combo)]["value"]

    stuck: set[str] = set()
    while True:
        points = combos(axes)
        values = [score(c) for c in points]
        best = points[max(range(len(points)), key=lambda i: (values[i], -i))]  # first maximum: grid order
        grown = False
        for name, vals in axes.items():
            if not _numeric(vals) or name in stuck:
                continue
            side = "first" if best[name] == vals[0] else "last" if best[name] == vals[-1] else None
            if side is None:
                continue
            new = next_step(vals, side)
            if not _within(new, bounds.get(name)):
                stuck.add(name)
                continue
            axes[name] = [new, *vals] if side == "first" else [*vals, new]
            grown = True
        if not grown:
            break
    points = combos(axes)
    rows = []
    for c in points:
        s = scored[key(c)]
        extended = any(c[k] not in written[k] for k in axes)
        rows.append({**c, "metric": metric, "value": s["value"], "se": s["se"], "prompts": s["prompts"],
                     "extended": extended, "chosen": c == best, "edge": ""})
    table = pd.DataFrame(rows)
    edges = [k for k in axes if _numeric(axes[k]) and best[k] in (axes[k][0], axes[k][-1])]
    table.loc[table["chosen"], "edge"] = ", ".join(edges)
    return Tuned(dict(best), table)
