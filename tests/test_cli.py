"""The ``mass-dpo`` command as a user meets it: own data through ``select`` and ``train``, output that ``datasets``
reads, one-line errors with status 2, defaults in ``--help``, a fast top-level ``--help``; the README's Python lines."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from mass_dpo.cli import main

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "notebooks" / "data" / "quickstart_preferences.jsonl"


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Runs root and cache in a temporary folder."""
    monkeypatch.setenv("MASS_DPO_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("MASS_DPO_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _prefs(path: Path, rows: int = 12, negatives: int = 3) -> Path:
    """A small TRL-style file: ``rows`` prompts, each with ``negatives`` rejected answers (conversational rows too)."""
    lines = []
    for i in range(rows):
        rejected = [f"wrong answer {i}.{j}" for j in range(negatives)]
        if i % 2:  # conversational form
            lines.append({"prompt": [{"role": "user", "content": f"Question {i}? Answer:"}],
                          "chosen": [{"role": "assistant", "content": f"right answer {i}"}],
                          "rejected": [[{"role": "assistant", "content": r}] for r in rejected]})
        else:
            lines.append({"prompt": f"Question {i}? Answer:", "chosen": f"right answer {i}", "rejected": rejected})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def _error(capsys, argv) -> str:
    """Run ``argv``; assert status 2 and exactly one line on stderr; return it."""
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse errors
        status = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, err
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------- errors: one line, status 2


def test_unknown_dataset_and_model(capsys, isolated):
    line = _error(capsys, ["select", "--dataset", "my_prefs", "--model", "tiny"])
    assert "unknown benchmark 'my_prefs'" in line and "--data FILE" in line
    line = _error(capsys, ["train", "--dataset", "my_prefs", "--dry-run"])
    assert "unknown dataset 'my_prefs'" in line and "--data FILE" in line
    line = _error(capsys, ["select", "--dataset", "qasc", "--model", "gpt9"])
    assert "unknown model 'gpt9'" in line and "tiny" in line
    line = _error(capsys, ["train", "--dataset", "qasc", "--model", "gpt9", "--dry-run"])
    assert "unknown model 'gpt9'" in line


def test_missing_data(capsys, isolated):
    line = _error(capsys, ["select", "--data", str(isolated / "absent.jsonl"), "--model", "tiny"])
    assert "absent.jsonl: no such file" in line
    line = _error(capsys, ["train", "--data", str(isolated / "absent.jsonl"), "--dry-run"])
    assert "absent.jsonl: no such file" in line
    line = _error(capsys, ["train", "--dataset", "qasc", "--data-dir", str(isolated), "--dry-run"])
    assert "data files not found" in line and "MASS_DPO_DATA" in line
    _error(capsys, ["select", "--model", "tiny"])  # neither --dataset nor --data


def test_bad_rows_are_one_line_and_debug_shows_the_traceback(capsys, isolated):
    bad = isolated / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a"}\n{"prompt": "q", "chosen": "b", "rejected": []}\n'
                   '{"prompt": "r", "chosen": "c", "rejected": ["c"]}\n')
    line = _error(capsys, ["select", "--data", str(bad), "--model", "tiny", "--no-progress"])
    assert "3 unusable preference row(s)" in line and "line 1" in line
    assert line.endswith("(and 3 more lines: --debug shows them)")  # two more rows and the Python hint
    with pytest.raises(ValueError, match="unusable preference row"):
        main(["select", "--data", str(bad), "--model", "tiny", "--no-progress", "--debug"])
    with pytest.raises(ValueError, match="unknown benchmark"):
        main(["--debug", "select", "--dataset", "nope", "--model", "tiny"])


@pytest.mark.parametrize("option, value, says", [
    ("--beta", "-1", "argument --beta: must be > 0"),
    ("--beta", "0", "argument --beta: must be > 0"),
    ("--gamma", "0", "argument --gamma: must be > 0"),
    ("--n", "0", "argument --n: must be an integer >= 1"),
    ("--n", "three", "argument --n: expected an integer >= 1"),
])
@pytest.mark.parametrize("command", ["select", "train"])
def test_bad_values_are_refused_before_any_work(capsys, isolated, command, option, value, says):
    what = ["--dataset", "qasc"] if command == "select" else ["--dataset", "qasc", "--dry-run"]
    line = _error(capsys, [command, *what, option, value])
    assert says in line and f"mass-dpo {command} --help" in line


@pytest.mark.parametrize("argv, says", [
    (["--lr", "-1e-5"], "argument --learning-rate/--lr: must be > 0, got -1e-5"),  # not "expected one argument"
    (["--beta", "-.5e1"], "argument --beta: must be > 0, got -.5e1"),
    (["--limit", "0"], "argument --limit: must be an integer >= 1, got 0"),
    (["--test-limit", "-1"], "argument --test-limit: must be an integer >= 1, got -1"),
    (["--eval-limit", "-1"], "argument --eval-limit: must be an integer >= 0, got -1"),
    (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got 0"),
    (["--grad-accum", "0"], "argument --grad-accum: must be an integer >= 1, got 0"),
    (["--optim", "nosuch"], "--optim nosuch: not a transformers optimizer; give auto"),
])
def test_bad_training_values_are_refused_before_any_work(capsys, isolated, argv, says):
    line = _error(capsys, ["train", "--dataset", "qasc", "--data-dir", "samples", "--dry-run", *argv])
    assert says in line


def test_bad_counts_from_a_profile_or_the_api_name_the_option():
    import numpy as np

    from mass_dpo.config import resolve_config

    base = dict(dataset="qasc", model="tiny", method="sdpo")
    for change, says in [(dict(limit=0), "limit must be an integer >= 1 or None, got 0 (--limit)"),
                         (dict(per_device_train_batch_size=0), "got 0 (--batch-size)"),
                         (dict(gradient_accumulation_steps=2.5), "got 2.5 (--grad-accum)"),
                         (dict(eval_limit=-1), "eval_limit must be an integer >= 0 or None"),
                         (dict(max_steps=0), "max_steps must be an integer >= 1, or -1"),
                         (dict(num_train_epochs=0.0), "num_train_epochs must be > 0, got 0.0 (--epochs)")]:
        with pytest.raises(ValueError, match=re.escape(says)):
            resolve_config(**base, **change)
    cfg = resolve_config(**base, limit=np.int64(8), eval_limit=0, max_steps=-1)  # numpy counts, 0 and -1 allowed
    assert (cfg.limit, cfg.eval_limit, cfg.max_steps) == (8, 0, -1)


def test_data_file_problems_are_one_line_before_any_work(capsys, isolated):
    (isolated / "prefs.csv").write_text("prompt,chosen,rejected\n")
    (isolated / "folder.jsonl").mkdir()
    rows = [{"prompt": f"Q{i}?", "chosen": "a", "rejected": ["b", "c"], "split": ["train", "valid"][i % 2]}
            for i in range(8)]
    (isolated / "notest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for command in (["select", "--model", "tiny"], ["train", "--model", "tiny", "--dry-run"]):
        line = _error(capsys, [*command, "--data", str(isolated / "prefs.csv")])
        assert "prefs.csv: unsupported preference file type '.csv'; use .jsonl, .json or .parquet" in line
        line = _error(capsys, [*command, "--data", str(isolated / "folder.jsonl")])
        assert "folder.jsonl is a folder; give the path of a JSON-lines/JSON/Parquet file" in line
    line = _error(capsys, ["train", "--model", "tiny", "--dry-run", "--data", str(isolated / "notest.jsonl")])
    assert "no rows with split 'test'; its 'split' column has train, valid; label some rows 'test'" in line
    assert main(["train", "--model", "tiny", "--dry-run", "--eval-limit", "0", "--data",
                 str(isolated / "notest.jsonl")]) == 2  # still needs test rows
    assert "no rows with split 'test'" in capsys.readouterr().err
    line = _error(capsys, ["select", "--data", str(QUICKSTART), "--model", "tiny", "--checkpoint",
                           str(isolated / "no-such-checkpoint")])
    assert line.startswith("mass-dpo select: error: --checkpoint ") and "unknown model" in line
    assert not (isolated / "cache" / "extraction").exists()  # refused before any extraction


def test_runs_export_refuses_a_file_as_its_folder(capsys, isolated):
    (isolated / "runs").mkdir()
    (isolated / "records.txt").write_text("hello")
    line = _error(capsys, ["runs", "export", str(isolated / "records.txt")])
    assert "records.txt is a file; give a folder to export the records into" in line
    assert (isolated / "records.txt").read_text() == "hello"


def test_a_bad_value_from_a_profile_is_refused_too(capsys, isolated, monkeypatch):
    import mass_dpo.config as config

    resolve = config.resolve_config  # check_settings imports it at call time: a profile giving beta 0
    monkeypatch.setattr(config, "resolve_config", lambda *a, **k: _with(resolve(*a, **k), beta=0.0))
    line = _error(capsys, ["train", "--dataset", "qasc", "--data-dir", "samples", "--dry-run"])
    assert "beta must be > 0" in line and "--beta" in line


def _with(cfg, **changes):
    for k, v in changes.items():
        setattr(cfg, k, v)
    return cfg


def test_preference_loss_rejects_beta_not_positive():
    import torch

    from mass_dpo.losses import preference_loss

    pc, rc = torch.zeros(2), torch.zeros(2)
    pr, rr = torch.zeros(2, 3), torch.zeros(2, 3)
    for beta in (0.0, -0.1, float("nan"), float("inf"), "0.1", torch.tensor([0.1, 0.2])):
        with pytest.raises(ValueError, match="beta must be a finite number > 0"):
            preference_loss("sdpo", pc, pr, rc, rr, beta=beta)
    assert preference_loss("sdpo", pc, pr, rc, rr, beta=0.1).loss.shape == (2,)


# ---------------------------------------------------------------- help, version, speed


def test_version_and_defaults_in_every_help(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"mass-dpo {version('mass-dpo')}"
    helps = {}
    for command in ("select", "train", "reproduce"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        helps[command] = " ".join(capsys.readouterr().out.split())
    assert "--n N negatives per prompt (default: 3)" in helps["select"]
    assert "--beta BETA DPO scale, > 0 (default: 0.1)" in helps["select"]
    assert "--data FILE" in helps["select"] and "--pairs" in helps["select"]
    # train: the defaults of params/training.yaml (the default regime's section, and what another regime changes)
    assert "--beta BETA DPO scale, > 0 (default: 0.1)" in helps["train"]
    assert re.search(r"--learning-rate .*default: 0\.1; full: 1e-05, lora: 0\.0001", helps["train"])
    assert "--data FILE" in helps["train"] and "--out RUNS_ROOT" in helps["train"]
    assert "(default:" in helps["reproduce"]


def test_top_level_help_imports_no_subcommand():
    """``mass-dpo --help`` builds no subcommand parser, so it imports neither torch nor transformers."""
    code = ("import sys, time; t = time.perf_counter(); from mass_dpo.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))\n"
            "print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert "select" in out and "train" in out
    assert lines[-2] == "[]"
    assert float(lines[-1]) < 1.0


# ---------------------------------------------------------------- own data through select and train


def test_select_own_file_output_loads_with_datasets(capsys, isolated):
    import datasets

    from mass_dpo.data import load_preferences
    from mass_dpo.data.preferences import conversation

    from mass_dpo.preprocess import source_tag

    data = _prefs(isolated / "mine.jsonl", rows=6, negatives=4)  # text rows and conversational rows
    tag = source_tag(str(data.resolve()))  # the input's path, hashed: two mine.jsonl in two folders never collide
    assert main(["select", "--data", str(data), "--model", "tiny", "--n", "2", "--grouped", "--no-progress"]) == 0
    out = isolated / "runs" / "select" / f"mine-{tag}-all-tiny-all-dopt-n2-grouped.jsonl"  # the documented place
    assert f"wrote {out} (6 prompts, grouped)" in capsys.readouterr().out
    ds = datasets.load_dataset("json", data_files=str(out), split="train")
    assert ds.column_names[:3] == ["prompt", "chosen", "rejected"]
    assert {"id", "indices", "gains", "logdet"} <= set(ds.column_names)
    recs = load_preferences(data)
    for row, rec in zip(ds, recs):  # one form for the whole file: message lists, the text rows as user/assistant turns
        conv = conversation(rec)
        assert row["prompt"] == conv["prompt"] and row["chosen"] == conv["candidates"][0]
        assert len(row["rejected"]) == 2
        assert row["rejected"] == [conv["candidates"][i] for i in row["indices"]]  # in selection order
        assert row["gains"][0] >= row["gains"][1]  # greedy: marginal gains do not increase
    assert ds[1]["prompt"] == [{"role": "user", "content": "Question 1? Answer:"}]  # as given
    assert ds[0]["chosen"] == [{"role": "assistant", "content": "right answer 0"}]  # a text row, wrapped

    # the default: one row per (chosen, negative), TRL's form, in selection order
    assert main(["select", "--data", str(data), "--model", "tiny", "--n", "2", "--no-progress"]) == 0
    pairs = isolated / "runs" / "select" / f"mine-{tag}-all-tiny-all-dopt-n2.jsonl"
    assert f"wrote {pairs} (12 pairs)" in capsys.readouterr().out
    pds = datasets.load_dataset("json", data_files=str(pairs), split="train")
    assert pds.column_names == ["prompt", "chosen", "rejected", "id", "rank", "index", "gain", "logdet"]
    assert len(pds) == 6 * 2 and list(pds["rank"]) == [0, 1] * 6
    assert list(pds["rejected"]) == [r for row in ds for r in row["rejected"]]
    assert list(pds["prompt"]) == [p for p in ds["prompt"] for _ in range(2)]
    assert list(pds["gain"]) == [g for row in ds for g in row["gains"]]
    assert list(pds["index"]) == [i for row in ds for i in row["indices"]]
    # ... which reads back as one record per prompt: the selected negatives, in selection order
    back = load_preferences(pairs)
    assert list(back["id"]) == list(ds["id"]) and list(back["prompt"]) == list(recs["prompt"])
    assert list(back["rejected"]) == [[rec["candidates"][i] for i in row["indices"]] for row, rec in zip(ds, recs)]
    assert main(["train", "--data", str(pairs), "--model", "tiny", "--n", "2", "--dry-run"]) == 0  # train reads it
    assert json.loads(capsys.readouterr().out)["config"]["n"] == 2

    # a plain-text file gives plain-text pairs
    rows = [{"prompt": f"Question {i}? Answer:", "chosen": f"right {i}", "rejected": [f"wrong {i}.{j}" for j in range(3)]}
            for i in range(4)]
    text = isolated / "text.jsonl"
    text.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = isolated / "text-pairs.jsonl"
    assert main(["select", "--data", str(text), "--model", "tiny", "--n", "2", "--out", str(out), "--no-progress"]) == 0
    tds = datasets.load_dataset("json", data_files=str(out), split="train")
    assert tds.features["prompt"].dtype == tds.features["chosen"].dtype == tds.features["rejected"].dtype == "string"
    assert len(tds) == 8 and {(r["id"], r["rejected"]) for r in tds} <= {
        (f"text-{i:06d}", w) for i, r in enumerate(rows) for w in r["rejected"]}
    capsys.readouterr()
    line = _error(capsys, ["select", "--data", str(data), "--model", "tiny", "--grouped", "--pairs"])
    assert "--pairs: not allowed with argument --grouped" in line  # one form or the other


def test_n_larger_than_the_pool_warns_once_and_names_the_output_by_it(capsys, isolated):
    data = _prefs(isolated / "small.jsonl", rows=4, negatives=3)
    assert main(["select", "--data", str(data), "--model", "tiny", "--n", "50", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "n=50 is more than the largest negative pool (3 negatives)" in err
    (path,) = (isolated / "runs" / "select").glob("small-*-all-tiny-all-dopt-n3.summary.json")
    summary = json.loads(path.read_text())
    assert summary["n"] == 3 and summary["negatives_mean"] == 3
    assert main(["train", "--data", str(data), "--model", "tiny", "--n", "50", "--dry-run"]) == 0
    out = capsys.readouterr()
    assert out.err.count("warning") == 1 and "(3 negatives)" in out.err
    plan = json.loads(out.out)
    assert plan["config"]["n"] == 3 and "_n3_" in Path(plan["run_dir"]).name
    assert Path(plan["run_dir"]).name.startswith("small_tiny_mass_dpo_n3_")


def test_strategy_all_keeps_every_negative_and_its_output_name_has_no_n(capsys, isolated):
    data = _prefs(isolated / "small.jsonl", rows=4, negatives=3)
    assert main(["select", "--data", str(data), "--model", "tiny", "--strategy", "all", "--n", "2", "--grouped",
                 "--no-progress"]) == 0
    assert "(all, all): 4 prompts, 3.00 negatives each" in capsys.readouterr().out
    (path,) = (isolated / "runs" / "select").glob("small-*-all-tiny-all-all-grouped.jsonl")
    assert [len(json.loads(line)["rejected"]) for line in path.read_text().splitlines()] == [3] * 4


def test_prompts_with_fewer_negatives_than_n_are_said_once(capsys, isolated):
    """A file whose pools differ: the prompts that offer fewer than n negatives are counted in one warning."""
    rows = [{"prompt": f"Q{i}?", "chosen": f"yes {i}", "rejected": [f"no {i}.{j}" for j in range(1 if i % 2 else 5)]}
            for i in range(12)]
    data = isolated / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["train", "--data", str(data), "--model", "tiny", "--n", "3", "--dry-run"]) == 0
    err = capsys.readouterr().err
    from mass_dpo.data import load_preferences

    train = load_preferences(data, split="train")["rejected"]
    short = sum(len(r) < 3 for r in train)
    assert 0 < short < len(train)  # the carve keeps both kinds in train
    assert err.count("warning") == 1
    assert f"{short} of {len(train)} training prompts offer fewer than n=3 negatives (as few as 1)" in err
    assert main(["train", "--data", str(data), "--model", "tiny", "--n", "1", "--dry-run"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_profiles_pool_eval_that_does_nothing_warns(capsys, isolated):
    data = _prefs(isolated / "p.jsonl")
    argv = ["train", "--data", str(data), "--model", "tiny", "--profile", "cpu-lm", "--dry-run"]
    assert main(argv) == 0
    assert "warning" not in capsys.readouterr().err  # cpu-lm: the freeze regime, pool_eval on and used
    assert main([*argv, "--regime", "loglinear"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "pool_eval (from --profile cpu-lm) does nothing here" in err


def test_train_own_file_end_to_end(capsys, isolated):
    data = _prefs(isolated / "mine.jsonl", rows=20, negatives=3)
    argv = ["train", "--data", str(data), "--model", "tiny", "--method", "mass_dpo", "--n", "2", "--regime",
            "loglinear", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    folder = Path(re.search(r"run folder: (\S+)", out).group(1))
    assert folder.parent == isolated / "runs" and folder.name.startswith("mine_tiny_mass_dpo_n2_loglinear_s0_")
    metrics = json.loads((folder / "metrics.json").read_text())["test"]
    assert metrics["prompts"] == 2  # the carved test split: 10% of 20
    assert 0.0 <= metrics["recall@1"] <= 1.0
    assert main(argv) == 0 and "(cached)" in capsys.readouterr().out


def test_train_prints_when_it_resumes(capsys, isolated):
    import shutil

    data = _prefs(isolated / "mine.jsonl", rows=20, negatives=3)
    argv = ["train", "--data", str(data), "--model", "tiny", "--regime", "lora", "--max-steps", "4", "--save-steps",
            "2", "--eval-limit", "0", "--keep-checkpoints", "--no-progress"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    folder = Path(re.search(r"run folder: (\S+)", first).group(1))
    assert "resuming" not in first
    # as if interrupted after step 2: the later checkpoint and the marks of a finished run gone
    shutil.rmtree(folder / "checkpoints" / "checkpoint-4")
    shutil.rmtree(folder / "final")
    (folder / "metrics.json").unlink()
    assert main(argv) == 0
    assert f"resuming {folder.name} from checkpoint-2" in capsys.readouterr().out


def test_a_failed_run_leaves_no_run_folder(isolated):
    from mass_dpo.runs import run_dir, train_run
    from mass_dpo.training import resolve_config

    def broken(cfg):
        raise RuntimeError("data preparation failed")

    cfg = resolve_config(dataset="qasc", model="tiny", max_steps=1)
    with pytest.raises(RuntimeError, match="data preparation failed"):
        train_run(cfg, root=isolated / "runs", data=broken)
    assert not run_dir(cfg, root=isolated / "runs").exists()


def test_progress_bar_follows_the_global_step(capsys):
    from mass_dpo.runs import progress_callback

    bar = progress_callback()
    state = SimpleNamespace(is_world_process_zero=True, max_steps=10, global_step=0)
    bar.on_train_begin(None, state, None)
    state.global_step = 4  # e.g. resumed at step 3, one more step done
    bar.on_step_end(None, state, None)
    assert bar.bar.n == 4 and bar.bar.total == 10
    bar.on_train_end(None, state, None)
    assert bar.bar is None and "4/10" in capsys.readouterr().err


# ---------------------------------------------------------------- the README's Python lines


def test_readme_own_data_lines_run_with_the_tiny_model(isolated, monkeypatch):
    text = (REPO / "README.md").read_text()
    section = text.split("## Your own data", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    lines = [line for line in code.splitlines() if line.strip()]
    assert len(lines) == 4 and lines[0].startswith("from mass_dpo")  # imports, then load, select, train
    monkeypatch.chdir(REPO)
    scope: dict = {}
    exec(code.replace('"smollm2"', '"tiny"'), scope)
    picked, run = scope["picked"], scope["run"]
    assert len(picked.rows) == 48 * 3 and [r["rank"] for r in picked.rows[:3]] == [0, 1, 2]  # pairs, TRL's form
    assert all(isinstance(r["rejected"], str) for r in picked.rows)
    assert picked.out.parent == isolated / "runs" / "select"
    assert run.run_dir.parent == isolated / "runs" and run.metrics["prompts"] == 5  # 10% of 48, rounded
    assert "recall@1" in run.metrics


# ---------------------------------------------------------------- the quickstart from JupyterLab's folder


@pytest.mark.slow
@pytest.mark.parametrize("regime", ["loglinear", "lora"])
def test_quickstart_runs_from_the_notebooks_folder(isolated, regime):
    """papermill with the kernel started in notebooks/ (as JupyterLab does): the default data path resolves from the
    repository, the smoke profile fills the parameters left at None, and ``regime`` is the regime that trained."""
    import pandas as pd
    import papermill as pm

    out = isolated / "figures"
    executed = isolated / "quickstart.ipynb"
    pm.execute_notebook(str(REPO / "notebooks" / "quickstart.ipynb"), str(executed), cwd=str(REPO / "notebooks"),
                        parameters={"profile": "smoke", "regime": regime, "out_dir": str(out)},
                        kernel_name="python3", progress_bar=False)
    text = executed.read_text()
    assert "Setup: quickstart: profile smoke (-p / given)" in text and "model='tiny'" in text
    results = pd.read_csv(out / "results.csv")
    assert list(results["method"]) == ["MASS-DPO", "S-DPO"] and set(results["regime"]) == {regime}
    assert (results["train_prompts"] == 38).all() and (results["test_prompts"] == 5).all()  # 48 rows: 38/5/5
    assert results["mrr"].between(0, 1).all()
    run_folders = [p for p in (isolated / "runs").iterdir() if p.is_dir() and p.name not in ("select", ".locks")]
    assert {p.name.split("_n3_")[0] for p in run_folders} == {f"quickstart_preferences_tiny_{m}"
                                                              for m in ("mass_dpo", "sdpo")}
    assert all(f"_n3_{regime}_" in p.name for p in run_folders)


def test_one_line_counts_what_it_leaves_out():
    from mass_dpo.cli import one_line

    assert one_line(ValueError("head\nfirst")) == "head first"
    assert one_line(ValueError("head\nfirst\nsecond")) == "head first (and 1 more line: --debug shows it)"
    assert one_line(KeyError("missing\nx\ny\nz")) == "missing x (and 2 more lines: --debug shows them)"
