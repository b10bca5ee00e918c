"""The ``mass-dpo`` command: one subcommand per stage, each implemented by a module exposing
``add_arguments(parser)`` and ``run(args) -> int``.

    mass-dpo select ...      negatives for a dataset           (mass_dpo.preprocess)
    mass-dpo train ...       one training run and its metrics  (mass_dpo.train)
    mass-dpo reproduce ...   every notebook, headless           (mass_dpo.reproduce)
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "select": ("mass_dpo.preprocess", "select negatives for every prompt of a dataset split"),
    "train": ("mass_dpo.train", "train one policy with one method and evaluate it"),
    "reproduce": ("mass_dpo.reproduce", "execute the paper's notebooks headless into papers_figures/"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mass-dpo", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
