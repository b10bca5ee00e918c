"""The Python shown in README.md and docs/*.md is the API as it is: every block parses, every name it imports from
``mass_dpo`` exists, every keyword it passes is one the function takes (options of :class:`TrainConfig` where the
function forwards ``**overrides`` to it), and the README's core block runs on tensors of the shapes it documents."""

import argparse
import ast
import dataclasses
import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
#: Functions whose ``**overrides`` are options of a run (:func:`mass_dpo.training.resolve_config`).
FORWARD_TO_CONFIG = {("mass_dpo.runs", "train_run"), ("mass_dpo.runs", "reference_run")}


def _blocks() -> list[tuple[str, str]]:
    """(``file:line``, code) of every fenced ```python block."""
    out = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
            out.append((f"{path.name}:{text[:m.start()].count(chr(10)) + 1}", m.group(1)))
    return out


BLOCKS = _blocks()


def test_the_docs_show_python_blocks():
    assert len(BLOCKS) >= 4 and any(where.startswith("README.md") for where, _ in BLOCKS)


def _imported(tree: ast.AST) -> dict[str, tuple[str, str]]:
    """Local name -> (module, attribute) for every ``from mass_dpo... import`` of the block."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mass_dpo":
            for alias in node.names:
                names[alias.asname or alias.name] = (node.module, alias.name)
    return names


def _config_fields() -> set[str]:
    from mass_dpo.training import TrainConfig

    return {f.name for f in dataclasses.fields(TrainConfig)} | {"profile"}


@pytest.mark.parametrize("where, code", BLOCKS, ids=[w for w, _ in BLOCKS])
def test_a_docs_block_names_only_what_the_package_has(where, code):
    tree = ast.parse(code, filename=where)
    imported = _imported(tree)
    assert imported, f"{where}: imports nothing from mass_dpo"
    objects = {}
    for local, (module, attr) in imported.items():
        mod = importlib.import_module(module)
        assert hasattr(mod, attr), f"{where}: {module} has no {attr}"
        objects[local] = (module, attr, getattr(mod, attr))
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in objects):
            continue
        module, attr, fn = objects[node.func.id]
        params = inspect.signature(fn).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        allowed = set(params) | (_config_fields() if (module, attr) in FORWARD_TO_CONFIG else set())
        for kw in node.keywords:
            if kw.arg is None:
                continue
            assert kw.arg in allowed or (takes_any and (module, attr) not in FORWARD_TO_CONFIG), (
                f"{where}: {attr}() takes no keyword {kw.arg!r}")


def test_the_readmes_core_block_runs_on_the_shapes_it_documents():
    """phi [B, N, d], logits [B, N]; chosen log-probs [B], rejected [B, K]; scores [B, N], target [B]."""
    (code,) = [c for w, c in BLOCKS if w.startswith("README.md") and "select_negatives" in c]
    gen = torch.Generator().manual_seed(0)
    B, N, d, K = 4, 7, 5, 3
    pol_chosen = torch.randn(B, generator=gen, requires_grad=True)
    pol_rejected = torch.randn(B, K, generator=gen, requires_grad=True)
    scope = {"phi": torch.randn(B, N, d, generator=gen), "logits": torch.randn(B, N, generator=gen),
             "pol_chosen": pol_chosen, "pol_rejected": pol_rejected,
             "ref_chosen": torch.randn(B, generator=gen), "ref_rejected": torch.randn(B, K, generator=gen),
             "scores": torch.randn(B, N, generator=gen), "target": torch.randint(0, N, (B,), generator=gen)}
    exec(compile(code, "README.md", "exec"), scope)
    sel, out = scope["sel"], scope["out"]
    assert sel.indices.shape == sel.gains.shape == (B, 3) and sel.logdet.shape == sel.alpha.shape == (B,)
    assert out.loss.shape == (B,) and pol_chosen.grad is not None and pol_rejected.grad is not None
    from mass_dpo import ranking_metrics

    metrics = ranking_metrics(scope["scores"], scope["target"], ks=(1, 3, 5))
    assert {"recall@1", "recall@1_se", "ndcg@3", "ndcg@3_se", "mrr", "mrr_se"} <= set(metrics)


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(name)
    return None


def _documented_commands() -> list[tuple[str, list[str], list[str]]]:
    """(``file:line``, words before the first option, options) of every ``mass-dpo COMMAND ...`` shown in the docs
    and the gallery's README (up to a comment, a pipe, a backtick or the end of the line)."""
    out = []
    for path in [*DOCS, REPO / "papers_figures" / "README.md"]:
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for m in re.finditer(r"mass-dpo ((?:select|train|reproduce|runs)\b[^#|`\n]*)", line):
                words = m.group(1).split()
                head = [w for w in words[:2] if not w.startswith("-")]
                opts = [w.split("=")[0] for w in words if re.fullmatch(r"--[a-z][a-z0-9-]*(=.*)?", w)]
                out.append((f"{path.name}:{lineno}", head, opts))
    return out


COMMANDS = _documented_commands()


def test_every_option_the_docs_show_is_one_the_cli_takes():
    from mass_dpo.cli import build_parser

    assert len(COMMANDS) >= 30
    for where, head, opts in COMMANDS:
        parser, _ = build_parser(head[:1])
        command = _subparser(parser, head[0])
        if head[0] == "runs" and len(head) > 1 and not head[1].startswith("<"):
            command = _subparser(command, head[1]) or command
        known = {s for action in command._actions for s in action.option_strings}
        for opt in opts:
            assert opt in known, f"{where}: `mass-dpo {' '.join(head)}` takes no {opt}"
