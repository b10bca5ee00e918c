"""Training runs: one folder per resolved configuration, reused when finished, resumed when interrupted.

:func:`train_run` is the one entry point (``mass-dpo train``, notebooks, ``accelerate launch -m mass_dpo.train``):

    load_benchmark (train / valid / test) -> extract (cached) -> select negatives (dopt for mass_dpo, random
    otherwise, one for dpo) -> train (transformers.Trainer) -> evaluate on the test split

A run folder ``<runs root>/<dataset>_<model>_<method>_n<n>_<regime>_s<seed>_<hash>/`` holds

    config.yaml, config.json   the resolved TrainConfig (plus world size and hash)
    log.csv                    train and online-eval rows (step, loss, margin, accuracy, chosen/rejected rewards)
    run.log                    the text log (optimizer used, resume point, timings)
    checkpoints/checkpoint-N/  Trainer checkpoints while training (removed once the run is finished)
    final/                     the trained policy (theta, a LoRA adapter, or the full model)
    metrics.json               test metrics and a training summary; its presence marks the run finished

The runs root is ``$MASS_DPO_RUNS``, else ``<cache>/runs`` with cache = ``$MASS_DPO_CACHE`` else ``~/.cache/mass_dpo``.
The hash covers the resolved config, the world size (it changes the effective batch) and the data folder, so two
notebooks asking for the same run share one folder; a finished run is loaded, not retrained.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .training import (
    PreferenceDataset,
    TrainConfig,
    build_policy,
    build_trainer,
    last_checkpoint,
    resolve_config,
    select_training_negatives,
    CSVLogCallback,
)

logger = logging.getLogger("mass_dpo.runs")

#: Bump when a run's numbers would change for the same config (pipeline changes): old runs are then not reused.
RUN_FORMAT = 1

#: Config fields that do not change a run's numbers (left out of the hash).
NON_SEMANTIC = ("save_total_limit",)


# ---------------------------------------------------------------- folders and hashes


def runs_root() -> Path:
    """``$MASS_DPO_RUNS``, else ``<cache>/runs`` (cache: ``$MASS_DPO_CACHE``, else ``~/.cache/mass_dpo``)."""
    env = os.environ.get("MASS_DPO_RUNS")
    if env:
        return Path(env).expanduser()
    from .models import cache_dir

    return cache_dir() / "runs"


def world_size() -> int:
    """The number of processes (``WORLD_SIZE`` under ``accelerate launch`` / ``torchrun``; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _data_location(config: TrainConfig) -> str:
    """The data folder, or for a preference file given as the dataset its path and content hash."""
    from .data.preferences import is_preference_file, resolve_path

    if is_preference_file(config.dataset):
        path = resolve_path(config.dataset)
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
        return f"{path.resolve()}#sha256={digest}"
    try:
        from .data import resolve_data_dir

        return str(resolve_data_dir(config.data_dir)[0])
    except Exception:  # the data package is optional for hashing (tests with injected data)
        return str(config.data_dir)


def hash_payload(config: TrainConfig, *, world: int | None = None) -> dict[str, Any]:
    """What the run hash covers: the resolved config (minus :data:`NON_SEMANTIC`), world size, data folder, format."""
    cfg = {k: v for k, v in config.to_dict().items() if k not in NON_SEMANTIC}
    return {"config": cfg, "world_size": world or world_size(), "data": _data_location(config), "format": RUN_FORMAT}


def config_hash(config: TrainConfig, *, world: int | None = None) -> str:
    """sha256 (hex) of the canonical JSON of :func:`hash_payload`."""
    blob = json.dumps(hash_payload(config, world=world), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def run_name(config: TrainConfig, *, world: int | None = None) -> str:
    from .data.preferences import is_preference_file

    model = Path(str(config.model)).name or "model"
    dataset = Path(str(config.dataset)).stem if is_preference_file(config.dataset) else config.dataset
    base = f"{dataset}_{model}_{config.method}_n{config.n}_{config.regime}_s{config.seed}"
    base = re.sub(r"[^A-Za-z0-9_.=-]+", "-", base)
    return f"{base}_{config_hash(config, world=world)[:12]}"


def run_dir(config: TrainConfig, *, root=None, world: int | None = None) -> Path:
    """The run folder of a resolved config."""
    return Path(root or runs_root()) / run_name(config, world=world)


def is_finished(path) -> bool:
    return (Path(path) / "metrics.json").is_file()


# ---------------------------------------------------------------- results


@dataclass
class RunResult:
    """A finished run.

    Attributes:
        run_dir: the run folder. metrics: the test metrics (``accuracy``, ``recall@1``, ... with ``_se``).
        log_path: ``log.csv`` (see :meth:`log`). config: the resolved config. cached: True when loaded, not trained.
        info: the rest of ``metrics.json`` (training summary, final online-eval metrics, timings, optimizer).
    """

    run_dir: Path
    metrics: dict[str, Any]
    log_path: Path
    config: TrainConfig
    cached: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    def log(self):
        """The CSV log as a pandas DataFrame."""
        import pandas as pd

        return pd.read_csv(self.log_path)


def load_run(path) -> RunResult:
    """A finished run folder as a :class:`RunResult` (``cached=True``)."""
    path = Path(path)
    summary = json.loads((path / "metrics.json").read_text())
    cfg = json.loads((path / "config.json").read_text())["config"]
    return RunResult(path, summary["test"], path / "log.csv", TrainConfig(**cfg), True,
                     {k: v for k, v in summary.items() if k != "test"})


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def _write_config(path: Path, config: TrainConfig, world: int) -> None:
    import yaml

    payload = {"config": config.to_dict(), "hash": config_hash(config, world=world), "world_size": world,
               "data": _data_location(config), "format": RUN_FORMAT}
    _write_json(path / "config.json", payload)
    (path / "config.yaml").write_text(yaml.safe_dump(payload, sort_keys=False))


# ---------------------------------------------------------------- console progress


def progress_callback():
    """A ``TrainerCallback`` drawing a tqdm bar of the optimizer steps on the console (``mass-dpo train``; the
    notebooks do not pass it, so executed notebooks hold no per-step lines). It starts at the resumed step."""
    from tqdm import tqdm
    from transformers import TrainerCallback

    class ProgressBar(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.bar = tqdm(total=state.max_steps, desc="train", unit="step", dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return ProgressBar()


# ---------------------------------------------------------------- data


@dataclass
class RunData:
    """What training and evaluation consume.

    Attributes:
        policy: the trainable policy (``LogLinearPolicy``, a causal LM, or a peft model).
        train, eval: per-prompt records with fixed negatives (``eval`` may be ``None``).
        test: the test split's ``Extracted`` (ids, features, ref_logps, mask, target).
        test_pools: tokenized pools of the test prompts (LM regimes), aligned with ``test.ids``.
        forward: the per-pool forward of the LM regimes (``None``: ``shared_prefix_forward``).
    """

    policy: torch.nn.Module
    train: PreferenceDataset
    eval: PreferenceDataset | None
    test: Any
    test_pools: list | None = None
    forward: Callable | None = None


def _device():
    state = _state()
    return None if state is None else state.device


def prepare_data(config: TrainConfig) -> RunData:
    """load_benchmark -> extract (cached) -> select negatives -> records, for the train, valid and test splits."""
    from .data import load_benchmark
    from .data.formatting import encode_pool
    from .extraction import extract
    from .models import load_model

    bundle = load_model(config.model, device=_device())
    limits = {"train": config.limit, "valid": config.eval_limit, "test": config.test_limit}
    records, extracted = {}, {}
    for split, limit in limits.items():
        if split == "valid" and limit == 0:
            continue
        t0 = time.time()
        records[split] = load_benchmark(
            config.dataset, split, data_dir=config.data_dir, limit=limit, seed=config.subsample_seed
        )
        key = f"{config.dataset}/{split}/limit={limit}/seed={config.subsample_seed}"
        extracted[split] = extract(records[split], bundle, dataset_key=key, pooling=config.pooling)
        logger.info("%s: %d prompts extracted in %.1f s", split, len(extracted[split]), time.time() - t0)

    lm = config.regime != "loglinear"
    pools = {s: [encode_pool(r, bundle.tokenizer) for r in records[s]] for s in records} if lm else {}

    def records_of(split: str) -> PreferenceDataset:
        ex = extracted[split]
        neg = select_training_negatives(ex, config.method, config.n, beta=config.beta, gamma=config.gamma,
                                        seed=config.seed)
        return PreferenceDataset.from_selection(ex, neg, pools=pools.get(split))

    train = records_of("train")
    eval_ = records_of("valid") if "valid" in extracted else None
    if lm:
        policy = build_policy(config, bundle.model)
    else:
        policy = build_policy(config, dim=int(extracted["train"].features.shape[-1]))
        del bundle
    return RunData(policy, train, eval_, extracted["test"], pools.get("test"))


# ---------------------------------------------------------------- the run


def _state():
    """accelerate's process state under ``accelerate launch`` (made with ``cpu=True`` without CUDA, so that the
    processes really talk over gloo: a bare ``PartialState()`` on a CPU machine reports every process as the main
    one, and they race over the run folder), else ``None``."""
    from .extraction import process_state

    return process_state()


def _barrier(state) -> None:
    if state is not None:
        state.wait_for_everyone()


def train_run(
    config: TrainConfig | dict | None = None,
    *,
    force: bool = False,
    root=None,
    data: RunData | Callable[[TrainConfig], RunData] | None = None,
    keep_checkpoints: bool = False,
    callbacks: list | None = None,
    **overrides,
) -> RunResult:
    """Train and evaluate one run, or load it when already finished.

    Args:
        config: a :class:`TrainConfig`, a dict of options, or ``None``; ``overrides`` (``method="sdpo"``,
            ``profile="cpu"``, ...) are applied on top (see :func:`mass_dpo.training.resolve_config`).
        force: retrain even when a finished run exists (its folder is wiped first).
        root: the runs root (default :func:`runs_root`).
        data: the training data, or a function of the resolved config returning it (default :func:`prepare_data`).
        keep_checkpoints: keep ``checkpoints/`` after the run finishes.
        callbacks: extra ``transformers.TrainerCallback`` objects (progress bars, early stopping, ...).

    Returns:
        :class:`RunResult` (``cached=True`` when a finished run was loaded).
    """
    from .evaluation import evaluate

    cfg = resolve_config(config, **overrides)
    world = world_size()
    path = run_dir(cfg, root=root, world=world)
    state = _state()
    main = state is None or state.is_main_process
    if is_finished(path) and not force:
        return load_run(path)
    if main:
        if force and path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        _write_config(path, cfg, world)
    _barrier(state)

    handler = None
    checkpoints = path / "checkpoints"
    if main:
        handler = logging.FileHandler(path / "run.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logging.getLogger("mass_dpo").addHandler(handler)
        logging.getLogger("mass_dpo").setLevel(logging.INFO)
    try:
        t0 = time.time()
        run_data = data(cfg) if callable(data) else data if data is not None else prepare_data(cfg)
        t_data = time.time() - t0
        trainer = build_trainer(
            cfg, run_data.policy, run_data.train, run_data.eval, output_dir=checkpoints,
            callbacks=[CSVLogCallback(path / "log.csv"), *(callbacks or [])], forward=run_data.forward,
        )
        resume = last_checkpoint(checkpoints)
        logger.info("run %s: %d training prompts, optimizer %s%s", path.name, len(run_data.train),
                    getattr(trainer.args.optim, "value", trainer.args.optim),
                    f", resuming from {resume}" if resume else "")
        if resume and main:
            print(f"resuming {path.name} from {Path(resume).name}", flush=True)
        t1 = time.time()
        if resume is None and run_data.eval is not None:
            trainer.evaluate()  # the step-0 point of the training curves (Figures 2-3)
        out = trainer.train(resume_from_checkpoint=resume)
        t_train = time.time() - t1
        trainer.save_model(str(path / "final"))
        evals = [h for h in trainer.state.log_history if "eval_loss" in h]
        online = evals[-1] if evals else {}
        if main:
            t2 = time.time()
            policy = trainer.accelerator.unwrap_model(trainer.model)
            test = evaluate(
                policy, run_data.test, pools=run_data.test_pools, score=cfg.score, beta=cfg.beta, ks=cfg.ks,
                num_negatives=cfg.eval_negatives, seed=cfg.eval_seed, forward=run_data.forward, pooling=cfg.pooling,
            )
            summary = {
                "test": test,
                "train": {**out.metrics, "global_step": trainer.state.global_step,
                          "resumed_from": resume and Path(resume).name},
                "online_eval": online,
                "optim": getattr(trainer.args.optim, "value", trainer.args.optim),
                "seconds": {"data": round(t_data, 3), "train": round(t_train, 3), "test": round(time.time() - t2, 3)},
                "hash": config_hash(cfg, world=world),
            }
            _write_json(path / "metrics.json", summary)
            logger.info("run %s finished: %s", path.name,
                        ", ".join(f"{k} {test[k]:.4f}" for k in ("accuracy", "recall@1", "ndcg@3", "mrr") if k in test))
            if not keep_checkpoints:
                shutil.rmtree(checkpoints, ignore_errors=True)
        _barrier(state)
    except BaseException:
        # a failed run leaves no folder that looks like a run; one with checkpoints stays, to be resumed
        if main and not any(checkpoints.glob("checkpoint-*")):
            shutil.rmtree(path, ignore_errors=True)
        raise
    finally:
        if handler is not None:
            logging.getLogger("mass_dpo").removeHandler(handler)
            handler.close()
    result = load_run(path)
    result.cached = False
    return result
