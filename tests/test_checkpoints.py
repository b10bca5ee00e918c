"""Checkpoints that always resume: the newest *complete* checkpoint is the resume point, a half-written one is
skipped and reported (issue 12, part 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from mass_dpo import runs
from mass_dpo.training import adopt_checkpoint_steps, checkpoint_problem, last_checkpoint, resolve_config


def _complete_checkpoint(folder: Path) -> Path:
    """A checkpoint folder laid out as the Trainer writes one (weights, optimizer, scheduler, RNG, state)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    save_file({"w": torch.arange(6.0)}, str(folder / "model.safetensors"))
    torch.save({"state": {0: torch.ones(6)}}, folder / "optimizer.pt")
    torch.save({"last_epoch": 3}, folder / "scheduler.pt")
    torch.save({"python": 1}, folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": int(folder.name.split("-")[1])}))
    return folder


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_checkpoint_problem_names_what_is_missing_or_truncated(tmp_path):
    ok = _complete_checkpoint(tmp_path / "checkpoint-2")
    assert checkpoint_problem(ok) is None
    cases = {
        "trainer_state.json": "trainer_state.json",
        "model.safetensors": "model.safetensors",
        "optimizer.pt": "optimizer.pt",
        "scheduler.pt": "scheduler.pt",
        "rng_state.pth": "rng_state",
    }
    for i, (name, said) in enumerate(cases.items()):
        for damage in ("delete", "empty", "truncate"):
            folder = _complete_checkpoint(tmp_path / f"{damage}-{i}" / "checkpoint-4")
            if damage == "delete":
                (folder / name).unlink()
            elif damage == "empty":
                (folder / name).write_bytes(b"")
            else:
                _truncate(folder / name)
            problem = checkpoint_problem(folder)
            assert problem is not None, (name, damage)
            assert (said if (damage, name) != ("delete", "model.safetensors") else "no model weights") in problem
    # the case: a run killed right after the checkpoint folder was made holds only config.json
    only_config = tmp_path / "killed" / "checkpoint-6"
    only_config.mkdir(parents=True)
    (only_config / "config.json").write_text("{}")
    assert checkpoint_problem(only_config) == "no trainer_state.json"


def test_fsdp_full_state_dict_layout_is_recognised(tmp_path):
    """FSDP through accelerate names the files pytorch_model_fsdp.bin and optimizer.bin."""
    folder = _complete_checkpoint(tmp_path / "checkpoint-8")
    (folder / "model.safetensors").unlink()
    (folder / "optimizer.pt").rename(folder / "optimizer.bin")
    torch.save({"w": torch.arange(6.0)}, folder / "pytorch_model_fsdp.bin")
    assert checkpoint_problem(folder) is None
    _truncate(folder / "optimizer.bin")
    assert checkpoint_problem(folder) == "optimizer.bin is empty or truncated"


def test_last_checkpoint_skips_and_reports_incomplete_ones(tmp_path, capsys, caplog):
    out = tmp_path / "checkpoints"
    for step in (2, 4, 10):
        _complete_checkpoint(out / f"checkpoint-{step}")
    (out / "checkpoint-12").mkdir()  # killed at once: nothing written
    _truncate(out / "checkpoint-10" / "optimizer.pt")
    (out / "not-a-checkpoint-99").mkdir()
    with caplog.at_level("WARNING", logger="mass_dpo"):
        assert last_checkpoint(out) == str(out / "checkpoint-4")  # 10 before 4: steps compare as numbers
    said = capsys.readouterr().err + caplog.text
    assert "checkpoint-12" in said and "checkpoint-10" in said and "optimizer.pt is empty or truncated" in said
    assert (out / "checkpoint-10").is_dir()  # reported, left in place unless asked
    assert last_checkpoint(out, discard_incomplete=True) == str(out / "checkpoint-4")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4", "not-a-checkpoint-99"]
    assert last_checkpoint(tmp_path / "nothing-here") is None


class Interrupt(Exception):
    pass


class StopAt(TrainerCallback):
    """Raises at the end of step ``step`` (after that step's checkpoint, if any, was written)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupt


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.mark.parametrize("damage", ["truncate", "empty"])
def test_smoke_run_resumes_from_the_checkpoint_before_a_damaged_one(tmp_path, damage):
    """Full fine-tuning of ``tiny`` on the shipped LastFM sample, a checkpoint every 2 steps; the run dies at step
    7 and the newest checkpoint (step 6) is then truncated or emptied, as when a job is killed mid-write. The rerun
    resumes from step 4 and ends with the same weights as a run that was never interrupted."""
    cfg = dict(dataset="lastfm", data_dir="samples", model="tiny", regime="full", method="sdpo", n=3,
               limit=8, eval_limit=0, test_limit=4, max_steps=8, per_device_train_batch_size=1,
               gradient_accumulation_steps=1, learning_rate=1e-3, warmup_ratio=0.0, logging_steps=1,
               save_steps=2, save_total_limit=10, optim="adamw_torch", gradient_checkpointing=False)
    with pytest.raises(Interrupt):
        runs.train_run(cfg, root=tmp_path / "a", keep_checkpoints=True, callbacks=[StopAt(7)])
    run_dir = runs.run_dir(resolve_config(**cfg), root=tmp_path / "a", world=1)
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    newest = checkpoints / "checkpoint-6"
    for name in ("model.safetensors", "optimizer.pt"):
        if damage == "truncate":
            _truncate(newest / name, 0.3)
        else:
            (newest / name).write_bytes(b"")

    resumed = runs.train_run(cfg, root=tmp_path / "a", keep_checkpoints=True)
    assert resumed.info["train"]["resumed_from"] == "checkpoint-4"
    assert resumed.info["train"]["global_step"] == 8
    assert "skipping incomplete checkpoint" in (run_dir / "run.log").read_text()
    assert checkpoint_problem(checkpoints / "checkpoint-6") is None  # written afresh by the resumed run

    straight = runs.train_run(cfg, root=tmp_path / "b", keep_checkpoints=True)
    assert straight.info["train"]["resumed_from"] is None
    a, b = _final_weights(resumed.run_dir), _final_weights(straight.run_dir)
    assert a.keys() == b.keys()
    from mass_dpo.models import load_model

    init = load_model("tiny", device="cpu").model.state_dict()
    assert any(not torch.equal(a[k], init[k]) for k in a if k in init)  # training moved the weights
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert resumed.metrics["mrr"] == pytest.approx(straight.metrics["mrr"])


@pytest.mark.parametrize("max_steps", [76, 100])
def test_resume_adopts_the_step_counts_the_checkpoint_resolved(tmp_path, monkeypatch, max_steps):
    """A run with fractional logging / eval / save steps resumes without transformers' warning that "0.05 (from
    args) != 4 (from trainer_state.json)": the checkpoint's state is resolved by transformers itself
    (``TrainerState.compute_steps``; at 100 steps 0.07 resolves to 8, a float-rounding case), and a fraction
    that resolves to another count (the user changed it) is left alone, so that warning still shows."""
    from transformers import TrainerState, TrainingArguments
    from transformers import trainer_utils

    def arguments(save_steps):
        return TrainingArguments(output_dir=str(tmp_path / "out"), logging_steps=0.05, eval_steps=0.07,
                                 eval_strategy="steps", save_steps=save_steps, use_cpu=True, report_to="none")

    args = arguments(0.25)
    state = TrainerState(max_steps=max_steps, train_batch_size=args.per_device_train_batch_size)
    state.compute_steps(args, max_steps)
    checkpoint = tmp_path / "checkpoint-19"
    checkpoint.mkdir()
    state.save_to_json(str(checkpoint / "trainer_state.json"))
    warnings = []
    monkeypatch.setattr(trainer_utils.logger, "warning_once", warnings.append)
    trainer_utils.compare_trainer_and_checkpoint_args(args, state)
    assert len(warnings) == 1 and "logging_steps: 0.05 (from args)" in warnings[0]  # what a resume printed

    adopt_checkpoint_steps(args, checkpoint)
    assert (args.logging_steps, args.eval_steps, args.save_steps) == (
        state.logging_steps, state.eval_steps, state.save_steps)
    if max_steps == 100:
        assert args.eval_steps == 8  # ceil(100 * 0.07) = ceil(7.000000000000001), as transformers counts
    trainer_utils.compare_trainer_and_checkpoint_args(args, state)
    assert len(warnings) == 1  # nothing more to warn about

    changed = arguments(0.5)  # a different save fraction: the checkpoint's count wins, and transformers says so
    adopt_checkpoint_steps(changed, checkpoint)
    assert changed.save_steps == 0.5 and changed.logging_steps == state.logging_steps
    trainer_utils.compare_trainer_and_checkpoint_args(changed, state)
    assert len(warnings) == 2 and "save_steps: 0.5 (from args)" in warnings[1]
