"""A notebook's runs outside the notebook: ``[accelerate launch ...] python -m mass_dpo.experiments NOTEBOOK``."""

from __future__ import annotations

from typing import Any

from .ablations import table3_specs
from .core import FULL_POOL, Setup, grid, run_grid
from .cost import exact_fit, matched_specs
from .stability import budget_table, check_stability_regime, stability_specs


# ---------------------------------------------------------------- a notebook's runs, outside the notebook


def notebook_parameters(name: str, profile: str = "cpu") -> dict[str, Any]:
    """The parameters notebook ``name`` runs with under ``profile`` (every declared parameter, resolved as the
    notebook's setup cell resolves them: :func:`mass_dpo.notebook_params.resolve`)."""
    from ..notebook_params import resolve

    return resolve(name, {"profile": profile}).values


def setup_from(params: dict[str, Any]) -> Setup:
    """A :class:`Setup` from a notebook's parameters."""
    return Setup(model=params["model"], models=list(params.get("models") or []) or None, regime=params["regime"],
                 profile=params["profile"], data_dir=params["data_dir"], seeds=list(params["seeds"]),
                 train_limit=params["train_limit"], eval_limit=params["eval_limit"], test_limit=params["test_limit"])


#: The notebooks with a run grid (:func:`notebook_specs`): the ones ``python -m mass_dpo.experiments`` trains for.
GRID_NOTEBOOKS = ("training_dynamics", "table1", "table2", "table3", "table4", "table5", "table6", "table7", "table8")


def notebook_specs(name: str, p: dict[str, Any]) -> list[dict]:
    """The run grid of a paper notebook (what its setup cell asks :func:`run_grid` for)."""
    ds, seeds = p["datasets"], p["seeds"]
    if name == "training_dynamics":
        return grid(ds, ["sdpo", "mass_dpo"], seeds, n=p["n"], beta=p["beta"])
    if name == "table1":  # the five methods and S-DPO with every negative of the pool
        return (grid(ds, p["methods"], seeds, n=p["n"], beta=p["beta"])
                + grid(ds, ["sdpo"], seeds, n=FULL_POOL, beta=p["beta"]))
    if name in ("table2", "table5", "table6"):
        return grid(ds, p["methods"], seeds, n=p["n"], beta=p["beta"])
    if name == "table3":
        return table3_specs(ds, seeds, betas=p["betas"], ns=p["ns"], n=p["n"], beta=p["beta"],
                            readings=p["readings"], label_blind=p["label_blind"])  # every axis from the profile
    if name == "table4":  # as the notebook asks stability() for it: trivial budgets dropped, loglinear or freeze
        setup = setup_from(p)
        check_stability_regime(setup)  # before budget_table reads any extraction
        return stability_specs(setup, ds, ns=p["ns"], seeds=seeds, beta=p["beta"],
                               budgets=budget_table(setup, ds, p["ns"], echo=None))
    if name == "table7":
        return (grid(ds, ["mass_dpo"], seeds, n=p["n_selected"], beta=p["beta"])
                + grid(ds, ["sdpo"], seeds, n=p["full_pool"], beta=p["beta"]))
    if name == "table8":
        return matched_specs(ds, seeds, n=p["n_selected"], full=p["full_pool"], epochs=p["epochs"], beta=p["beta"],
                             exact=exact_fit(setup_from(p)), iterations_per_epoch=p.get("iterations_per_epoch", 5))
    raise ValueError(f"{name!r} has no run grid")


def main(argv: list[str] | None = None) -> int:
    """``[accelerate launch ...] python -m mass_dpo.experiments NOTEBOOK [...] --profile paper``: train the runs of
    notebooks (every process runs the same grid; each run is distributed by the Trainer). Then execute the
    notebooks with ``MASS_DPO_TRAINED_WORLD_SIZE=<processes>`` so that they load these runs."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mass_dpo.experiments", description=main.__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--datasets", nargs="+", default=None,
                        help="only these of each notebook's datasets (one job per dataset on a cluster, or a round "
                             "of a long grid); the notebook later loads them from the cache")
    args = parser.parse_args(argv)
    from ..params import available

    profiles = available("profiles")
    if args.profile not in profiles + ["auto"]:  # an empty --profile= would otherwise mean auto
        parser.error(f"no profile {args.profile!r} in params/profiles; choose one of {', '.join(profiles)} or auto")
    unknown = [n for n in args.notebooks if n not in GRID_NOTEBOOKS]
    if unknown:
        parser.error(f"{', '.join(unknown)}: no run grid to train; choose among {', '.join(GRID_NOTEBOOKS)}")
    plans = []
    for name in args.notebooks:  # every notebook's grid resolved before the first run trains
        try:
            p = notebook_parameters(name, args.profile)
        except (OSError, ValueError) as err:  # a bad value of the profile: one line
            parser.error(str(err))
        if args.datasets:
            unknown = [d for d in args.datasets if d not in p["datasets"]]
            if unknown:
                parser.error(f"{name} under profile {args.profile} has no dataset {', '.join(unknown)} (its datasets: "
                             f"{', '.join(p['datasets'])}); name some of those, or drop --datasets")
            p = {**p, "datasets": [d for d in p["datasets"] if d in args.datasets]}
        plans.append((name, p, notebook_specs(name, p)))
    for name, p, specs in plans:
        run_grid(setup_from(p), specs, snapshots=name == "table4")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
