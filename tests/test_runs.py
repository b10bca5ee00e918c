"""Run folders: hashing, reuse of finished runs, resume from the last checkpoint, 2 processes = 1 process, and the
whole offline pipeline on the shipped samples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mass_dpo import runs
from mass_dpo.training import resolve_config

REPO = Path(__file__).resolve().parents[1]

# A self-contained fake pipeline (frozen features, loglinear regime), importable by a subprocess too.
FAKE_DATA = textwrap.dedent(
    '''
    import torch
    from dataclasses import dataclass
    from mass_dpo.loglinear import LogLinearPolicy
    from mass_dpo.runs import RunData
    from mass_dpo.training import PreferenceDataset

    @dataclass
    class Ex:
        ids: list
        features: torch.Tensor
        ref_logps: torch.Tensor
        theta0_logps: torch.Tensor
        mask: torch.Tensor
        target: torch.Tensor

    def fake(P, seed, C=8, d=12):
        g = torch.Generator().manual_seed(seed)
        w = torch.linspace(-1, 1, d)
        feats = torch.randn(P, C, d, generator=g)
        target = torch.randint(0, C, (P,), generator=g)
        feats[torch.arange(P), target] += 0.7 * w
        ref = torch.randn(P, C, generator=g) - 4
        return Ex([f"{seed}-{i}" for i in range(P)], feats, ref, ref.clone(), torch.ones(P, C, dtype=torch.bool), target)

    def negatives(ex, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        rows = []
        for p in range(len(ex.ids)):
            valid = [i for i in range(ex.mask.shape[1]) if i != int(ex.target[p])]
            rows.append([valid[j] for j in torch.randperm(len(valid), generator=g)[:n].tolist()])
        return torch.tensor(rows)

    def make_data(cfg, P_train=16):
        train, ev, test = fake(P_train, 0), fake(6, 1), fake(20, 2)
        return RunData(
            LogLinearPolicy(12),
            PreferenceDataset.from_selection(train, negatives(train, cfg.n)),
            PreferenceDataset.from_selection(ev, negatives(ev, cfg.n)),
            test,
        )
    '''
)


@pytest.fixture(scope="module")
def fake_module(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fake")
    (folder / "fake_pipeline.py").write_text(FAKE_DATA)
    sys.path.insert(0, str(folder))
    import fake_pipeline

    yield folder, fake_pipeline
    sys.path.remove(str(folder))


def small(**kw):
    base = dict(method="sdpo", regime="loglinear", fit="adam", max_steps=8, per_device_train_batch_size=2,
                gradient_accumulation_steps=2, logging_steps=1, eval_steps=2, save_steps=2, learning_rate=0.05,
                test_limit=20, eval_limit=6, limit=16)
    base.update(kw)
    return base


def theta_of(run_dir: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))["theta"]


# ---------------------------------------------------------------- hashing and folders


def test_runs_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MASS_DPO_RUNS", str(tmp_path / "r"))
    assert runs.runs_root() == tmp_path / "r"
    monkeypatch.delenv("MASS_DPO_RUNS")
    monkeypatch.setenv("MASS_DPO_CACHE", str(tmp_path / "c"))
    assert runs.runs_root() == tmp_path / "c" / "runs"


def test_config_hash_tracks_what_changes_the_numbers():
    cfg = resolve_config(**small())
    h = runs.config_hash(cfg, world=1)
    assert h == runs.config_hash(resolve_config(**small()), world=1)
    assert h != runs.config_hash(resolve_config(**small(method="mass_dpo")), world=1)
    assert h != runs.config_hash(resolve_config(**small(seed=1)), world=1)
    assert h != runs.config_hash(cfg, world=2)  # the effective batch changes
    assert h == runs.config_hash(resolve_config(**small(save_total_limit=5)), world=1)
    name = runs.run_name(cfg, world=1)
    assert name.startswith("lastfm_smollm2_sdpo_n3_loglinear_s0_") and name.endswith(h[:12])


def test_runs_from_bf16_features_are_never_read_as_runs_from_fp32_ones(monkeypatch):
    from mass_dpo import models

    cfg = resolve_config(**small())  # smollm2: dtype {cpu: auto}
    monkeypatch.delenv("MASS_DPO_DTYPE", raising=False)
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    fp32 = runs.hash_payload(cfg, world=1)
    assert "extraction_dtype" not in fp32  # fp32 runs keep the names they had before the field
    plain = runs.config_hash(cfg, world=1)
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)  # a CPU with AMX: auto extracts in bf16
    assert runs.hash_payload(cfg, world=1)["extraction_dtype"] == "bfloat16"
    assert runs.config_hash(cfg, world=1) != plain
    monkeypatch.setenv("MASS_DPO_DTYPE", "float32")  # forced back to fp32: the fp32 runs are found again
    assert runs.config_hash(cfg, world=1) == plain


# ---------------------------------------------------------------- train_run


def test_finished_run_is_reused(fake_module, tmp_path):
    _, fake = fake_module
    calls = []

    def data(cfg):
        calls.append(cfg)
        return fake.make_data(cfg)

    first = runs.train_run(small(), root=tmp_path, data=data)
    assert not first.cached and len(calls) == 1
    for name in ("config.yaml", "config.json", "log.csv", "metrics.json", "run.log", "final/model.safetensors"):
        assert (first.run_dir / name).is_file(), name
    assert not (first.run_dir / "checkpoints").exists()
    for key in ("accuracy", "accuracy_se", "margin", "recall@1", "recall@3", "recall@5", "ndcg@1", "ndcg@3",
                "ndcg@5", "mrr", "mrr_se"):
        assert key in first.metrics
    log = first.log()
    evals = log[log.split == "eval"]
    assert list(evals.step) == [0, 2, 4, 6, 8]  # step 0: the policy before training (= the reference)
    assert evals.iloc[0].margin == 0 and evals.iloc[0].chosen_rewards == 0
    assert evals[["loss", "margin", "accuracy", "chosen_rewards", "rejected_rewards"]].notna().all().all()
    assert list(log[log.split == "train"].step) == list(range(1, 9))
    assert json.loads((first.run_dir / "config.json").read_text())["config"]["method"] == "sdpo"
    assert "optimizer" in (first.run_dir / "run.log").read_text()

    second = runs.train_run(small(), root=tmp_path, data=data)
    assert second.cached and len(calls) == 1 and second.run_dir == first.run_dir
    assert second.metrics == first.metrics
    third = runs.train_run(small(), root=tmp_path, data=data, force=True)
    assert not third.cached and len(calls) == 2
    assert torch.allclose(theta_of(third.run_dir), theta_of(first.run_dir))
    # force as a question, asked again under the run's lock: a job that waited while another retrained the run
    # (the answer changed meanwhile) loads it instead of retraining it a second time (found by a concurrency audit)
    asked = []
    fourth = runs.train_run(small(), root=tmp_path, data=data, force=lambda folder: asked.append(folder) or
                            len(asked) == 1)
    assert asked == [third.run_dir] * 2 and fourth.cached and len(calls) == 2
    fifth = runs.train_run(small(), root=tmp_path, data=data, force=lambda folder: True)
    assert not fifth.cached and len(calls) == 3


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_from_its_last_checkpoint(fake_module, tmp_path):
    from transformers import TrainerCallback

    _, fake = fake_module

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise Interrupt  # a crash after step 5: the last checkpoint is step 4

    cfg = small()
    with pytest.raises(Interrupt):
        runs.train_run(cfg, root=tmp_path / "a", data=fake.make_data, callbacks=[StopAt()])
    run_dir = runs.run_dir(resolve_config(**cfg), root=tmp_path / "a", world=1)
    assert not runs.is_finished(run_dir)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]

    resumed = runs.train_run(cfg, root=tmp_path / "a", data=fake.make_data)
    assert resumed.info["train"]["resumed_from"] == "checkpoint-4"
    assert resumed.info["train"]["global_step"] == 8
    log = resumed.log()
    assert list(log[log.split == "train"].step) == list(range(1, 9))  # rows after the checkpoint were not kept twice
    assert list(log[log.split == "eval"].step) == [0, 2, 4, 6, 8]
    # the same result as a run that was never interrupted
    straight = runs.train_run(cfg, root=tmp_path / "b", data=fake.make_data)
    assert torch.allclose(theta_of(resumed.run_dir), theta_of(straight.run_dir), atol=1e-6)
    assert resumed.metrics["mrr"] == pytest.approx(straight.metrics["mrr"])


SCRIPT = textwrap.dedent(
    '''
    import json, os, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    import fake_pipeline
    from mass_dpo.runs import train_run
    from safetensors.torch import load_file

    world = int(os.environ.get("WORLD_SIZE", "1"))
    # 16 prompts, 8 per optimizer step in both layouts: one process x batch 4 x accumulation 2,
    # or two processes x batch 2 x accumulation 2.
    res = train_run(dict(method="sdpo", regime="loglinear", fit="adam", max_steps=6, per_device_train_batch_size=4 // world,
                         gradient_accumulation_steps=2, logging_steps=1, eval_steps=3, save_steps=3,
                         learning_rate=0.05, test_limit=20, eval_limit=6, limit=16),
                    root=sys.argv[2], data=fake_pipeline.make_data)
    if int(os.environ.get("RANK", "0")) == 0:
        theta = load_file(os.path.join(res.run_dir, "final", "model.safetensors"))["theta"]
        print("RESULT " + json.dumps({"theta": theta.tolist(), "step": res.info["train"]["global_step"],
                                      "eval": res.info["online_eval"], "test": res.metrics}))
    '''
)


def _result(proc) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert line, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(line[-1][len("RESULT "):])


def test_two_processes_match_one(fake_module, tmp_path):
    """Two processes under ``accelerate launch`` give the same theta, steps and metrics as one process.

    ``accelerate launch --cpu --num_processes 2`` starts a single process in accelerate 1.x (without an MPI hostfile
    ``--cpu`` goes to the simple launcher), so the processes are started with ``--multi_gpu`` (torchrun underneath);
    without CUDA they train on the CPU over gloo."""
    folder, _ = fake_module
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    one = subprocess.run([sys.executable, str(script), str(folder), str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          str(script), str(folder), str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    a, b = _result(one), _result(two)
    assert a["step"] == b["step"] == 6
    assert torch.allclose(torch.tensor(a["theta"]), torch.tensor(b["theta"]), atol=1e-5)
    assert torch.tensor(a["theta"]).abs().sum() > 0
    assert a["eval"]["eval_samples"] == b["eval"]["eval_samples"] == 6
    assert a["eval"]["eval_loss"] == pytest.approx(b["eval"]["eval_loss"], abs=1e-5)
    assert a["test"]["mrr"] == pytest.approx(b["test"]["mrr"], abs=1e-6)
    (run_two,) = [p for p in (tmp_path / "two").iterdir() if p.name != ".locks"]  # both processes used one folder
    assert json.loads((run_two / "config.json").read_text())["world_size"] == 2


# ---------------------------------------------------------------- records: finished runs without weights


def test_a_record_carries_a_finished_run_to_another_cache(fake_module, tmp_path, monkeypatch, capsys):
    from mass_dpo import cli, records

    _, fake = fake_module
    first = runs.train_run(small(), root=tmp_path / "a", data=fake.make_data)
    (tmp_path / "a" / "half_done").mkdir()  # a run still training: config, no manifest
    (tmp_path / "a" / "half_done" / "config.json").write_text("{}")
    monkeypatch.setenv("MASS_DPO_RUNS", str(tmp_path / "a"))
    assert cli.main(["runs", "export", str(tmp_path / "rec")]) == 0
    assert "exported 1 finished run(s)" in capsys.readouterr().out
    (rec,) = [p for p in (tmp_path / "rec").iterdir() if p.name != ".locks"]  # the records' locks: hidden, skipped
    assert rec.name == first.run_dir.name and records.is_record(rec) and runs.is_finished(rec)
    assert not (rec / "final").exists() and (first.run_dir / "final" / "model.safetensors").is_file()
    assert {"config.json", "metrics.json", "log.csv", "run.log"} <= {p.name for p in rec.iterdir()}

    def no_training(cfg):
        raise AssertionError("a run found as a record must not train")

    imported, present = records.import_runs(tmp_path / "rec", root=tmp_path / "b")
    assert [p.name for p in imported] == [rec.name] and present == []
    loaded = runs.train_run(small(), root=tmp_path / "b", data=no_training)
    assert loaded.cached and loaded.metrics == first.metrics
    assert loaded.log().equals(first.log())
    with pytest.raises(FileNotFoundError, match="record"):
        runs.snapshot_folder(loaded.run_dir)

    assert records.dtype_mismatches(imported) == []
    monkeypatch.setenv("MASS_DPO_DTYPE", "bfloat16")  # a machine that extracts in bf16 does not read them
    (note,) = records.dtype_mismatches(imported)
    assert "1 record(s) of smollm2 were made from float32 features" in note and "MASS_DPO_DTYPE=float32" in note
    assert not runs.is_finished(tmp_path / "b" / runs.run_name(resolve_config(**small()), world=1))
    monkeypatch.delenv("MASS_DPO_DTYPE")

    imported, present = records.import_runs(tmp_path / "rec", root=tmp_path / "a")  # the run with weights stays
    assert imported == [] and [p.name for p in present] == [rec.name]
    assert (first.run_dir / "final" / "model.safetensors").is_file() and not records.is_record(first.run_dir)

    (tmp_path / "rec" / "stray").mkdir()
    assert cli.main(["runs", "import", str(tmp_path / "rec"), "--root", str(tmp_path / "c")]) == 2
    assert "not finished runs or records (e.g. stray)" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # nothing imported before the check


def test_a_run_on_the_shipped_samples_has_one_name_in_every_checkout(monkeypatch, tmp_path):
    from mass_dpo.data import benchmarks

    cfg = resolve_config(**small(data_dir="samples"))
    here = runs.run_name(cfg, world=1), runs.reference_name(cfg)
    assert runs.hash_payload(cfg, world=1)["data"] == runs.SHIPPED_SAMPLES
    elsewhere = tmp_path / "another_clone" / "mass_dpo" / "data" / "samples"
    elsewhere.mkdir(parents=True)
    monkeypatch.setattr(benchmarks, "SAMPLES_DIR", elsewhere)  # the same package checked out somewhere else
    assert (runs.run_name(cfg, world=1), runs.reference_name(cfg)) == here
    other = resolve_config(**small(data_dir=str(tmp_path / "my_data")))  # a data folder of one's own: its path
    assert runs.hash_payload(other, world=1)["data"] == str(tmp_path / "my_data")


def test_runs_named_by_an_older_hash_are_renamed_and_imported_under_the_current_name(fake_module, tmp_path):
    from mass_dpo import cli, records

    _, fake = fake_module
    first = runs.train_run(small(), root=tmp_path / "a", data=fake.make_data)
    assert runs.name_of(first.run_dir) == first.run_dir.name
    stale = first.run_dir.with_name(first.run_dir.name[:-12] + "0123456789ab")  # as named before a hash change
    first.run_dir.rename(stale)

    def no_training(cfg):
        raise AssertionError("a renamed run must be found, not trained again")

    assert cli.main(["runs", "rename", "--root", str(tmp_path / "a")]) == 0
    assert not stale.exists() and runs.train_run(small(), root=tmp_path / "a", data=no_training).cached
    assert records.rename_runs(tmp_path / "a") == []  # nothing left to rename
    (tmp_path / "old_format").mkdir()
    (tmp_path / "old_format" / "config.json").write_text('{"config": {"no_such_option": 1}}')
    assert runs.name_of(tmp_path / "old_format") == "old_format"  # unreadable by this version: its name is kept

    records.export_runs(tmp_path / "rec", root=tmp_path / "a")
    (rec,) = [p for p in (tmp_path / "rec").iterdir() if p.name != ".locks"]
    rec.rename(rec.with_name(rec.name[:-12] + "0123456789ab"))
    (imported,), _ = records.import_runs(tmp_path / "rec", root=tmp_path / "b")
    assert imported.name == first.run_dir.name
    assert runs.train_run(small(), root=tmp_path / "b", data=no_training).cached


def test_an_export_waits_for_another_export_of_the_same_record(fake_module, tmp_path):
    """Two exports into one folder (parallel jobs sharing it) write a record one at a time: while this process
    holds the record's lock, an export in another process says it waits and writes nothing; then it finishes."""
    import subprocess
    import sys
    import time

    from mass_dpo import records
    from mass_dpo.files import lock_path, locked

    _, fake = fake_module
    run = runs.train_run(small(), root=tmp_path / "a", data=fake.make_data).run_dir
    record = tmp_path / "rec" / run.name
    code = ("from mass_dpo import records\n"
            f"print(len(records.export_runs({str(tmp_path / 'rec')!r}, root={str(tmp_path / 'a')!r})), flush=True)\n")
    with locked(record, f"the record {run.name}"):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        first = proc.stderr.readline()  # blocks until the child says it waits (or ends)
        time.sleep(0.5)
        assert proc.poll() is None and not record.exists()  # still waiting, nothing written
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out.strip() == "1", err[-2000:]
    assert first.strip() == f"waiting for another process that is computing the record {run.name} " \
                            f"(lock {lock_path(record)})"
    assert records.is_record(record) and runs.is_finished(record)


def test_timings_sum_each_runs_own_seconds_per_dataset_and_kind(fake_module, tmp_path, capsys):
    from mass_dpo import cli, records

    _, fake = fake_module
    seed = runs.train_run(small(), root=tmp_path / "r", data=fake.make_data)
    tuning = runs.train_run(small(test_split="valid", learning_rate=0.01), root=tmp_path / "r", data=fake.make_data)
    (tmp_path / "r" / "half_done").mkdir()  # not finished: left out
    rows = {r["run"]: r for r in records.timings(tmp_path / "r")}
    assert set(rows) == {seed.run_dir.name, tuning.run_dir.name}
    assert rows[seed.run_dir.name]["kind"] == "seed" and rows[tuning.run_dir.name]["kind"] == "tuning"
    for res in (seed, tuning):
        sec = json.loads((res.run_dir / "metrics.json").read_text())["seconds"]
        assert rows[res.run_dir.name]["train"] == sec["train"] > 0
    # hand-set seconds: tuning 0.5 + 1 + 0.25 h, seed 0.1 + 2 + 0.15 h
    for res, sec in ((tuning, {"data": 1800, "train": 3600, "test": 900}),
                     (seed, {"data": 360, "train": 7200, "test": 540})):
        metrics = json.loads((res.run_dir / "metrics.json").read_text())
        (res.run_dir / "metrics.json").write_text(json.dumps({**metrics, "seconds": sec}))
        manifest = json.loads((res.run_dir / runs.MANIFEST).read_text())  # still a finished run: the size it lists
        manifest["files"]["metrics.json"] = (res.run_dir / "metrics.json").stat().st_size
        (res.run_dir / runs.MANIFEST).write_text(json.dumps(manifest))
    out = tmp_path / "timings.md"
    assert cli.main(["runs", "timings", str(tmp_path / "r"), "--out", str(out)]) == 0
    dataset = rows[seed.run_dir.name]["dataset"]
    assert f"| {dataset} | 2 | 1.75 | 2.25 | 0.00 | 0.60 / 3.00 / 0.40 | 4.00 |" in out.read_text()
    assert "| all | 2 | | | | | **4.00** |" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert cli.main(["runs", "timings", str(tmp_path / "empty")]) == 2
    assert "holds no finished runs" in capsys.readouterr().err


# ---------------------------------------------------------------- the offline pipeline


def test_pipeline_on_the_shipped_samples(tmp_path, monkeypatch):
    """load_benchmark -> extract -> select -> train -> evaluate, with ``tiny`` on the shipped LastFM sample."""
    monkeypatch.setenv("MASS_DPO_CACHE", str(tmp_path / "cache"))
    from mass_dpo.train import main  # the LastFM sample ships with the package: no skip if it is missing

    args = ["--profile", "smoke", "--method", "mass_dpo", "--dataset", "lastfm", "--data-dir", "samples",
            "--runs-root", str(tmp_path / "runs"), "--limit", "8", "--eval-limit", "4", "--test-limit", "6"]
    assert main(args) == 0
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.name != ".locks"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # the log-linear regime's default fit is exact: converged L-BFGS, its iterations as the steps
    assert metrics["test"]["prompts"] == 6 and metrics["train"]["fit"] == "exact" and metrics["train"]["converged"]
    assert metrics["train"]["global_step"] == metrics["train"]["iterations"] >= 1
    assert 0 <= metrics["test"]["recall@1"] <= metrics["test"]["recall@3"] <= metrics["test"]["recall@5"] <= 1
    assert main(args) == 0  # reused: still one folder
    assert [p for p in (tmp_path / "runs").iterdir() if p.name != ".locks"] == [run_dir]


def test_the_memo_of_extracted_splits_is_bounded_and_reads_each_split_once(monkeypatch):
    import mass_dpo.data as data
    import mass_dpo.extraction as extraction
    from mass_dpo.extraction import Extracted

    reads = []

    def fake_extract(records, bundle, *, dataset_key, pooling, progress, **limits):
        reads.append(dataset_key)
        P = 10
        return Extracted(ids=[str(i) for i in range(P)], features=torch.zeros(P, 2, 100), ref_logps=torch.zeros(P, 2),
                         theta0_logps=torch.zeros(P, 2), mask=torch.ones(P, 2, dtype=torch.bool),
                         target=torch.zeros(P, dtype=torch.long), meta={"cache_hit": False})

    monkeypatch.setattr(data, "load_benchmark", lambda *a, **k: [])
    monkeypatch.setattr(extraction, "extract", fake_extract)
    monkeypatch.setattr(runs, "_model", lambda name, lm: None)
    monkeypatch.setattr(runs, "_EXTRACTED", {})
    monkeypatch.setattr(runs, "EXTRACTED_MEMO_BYTES", 2 * 10 * 2 * 100 * 4)  # two splits' features
    cfg = resolve_config(dataset="qasc", model="tiny", regime="loglinear", limit=10, eval_limit=10, test_limit=10)
    first = runs.extracted_split(cfg, "train")[1]
    again = runs.extracted_split(cfg, "train")[1]
    assert reads == [reads[0]] and again.meta["cache_hit"]  # read once
    assert again.features is first.features  # shared, not copied
    runs.extracted_split(cfg, "valid")
    runs.extracted_split(cfg, "train")  # train is now the most recent, valid the least
    runs.extracted_split(cfg, "test")  # a third split: the least recently used (valid) goes
    assert len(runs._EXTRACTED) == 2 and len(reads) == 3
    runs.extracted_split(cfg, "train")
    assert len(reads) == 3  # kept
    runs.extracted_split(cfg, "valid")
    assert len(reads) == 4  # evicted earlier: read again
