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
    metrics.json               test metrics and a training summary
    manifest.json              written last: the run's files and their sizes; a run is finished when it is there
                               and every file it lists is (:func:`is_finished`)

The runs root is ``$MASS_DPO_RUNS``, else ``<cache>/runs`` with cache = ``$MASS_DPO_CACHE``, else
``$XDG_CACHE_HOME/mass_dpo``, else ``~/.cache/mass_dpo``.
The hash covers the resolved config, the world size (it changes the effective batch) and the data folder, so two
notebooks asking for the same run share one folder; a finished run is loaded, not retrained. One process trains a
run at a time (the folder's lock, :func:`mass_dpo.files.locked`; under ``accelerate launch`` the main process holds
it for all of them): a second one asking for the same run waits, then loads it. Every file is written atomically.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from .config import TrainConfig, resolve_config
from .files import (
    atomic_folder, atomic_path, atomic_write_json, atomic_write_text, check_writable, clean_orphans, locked,
)

if TYPE_CHECKING:  # the Trainer side is imported when a run trains, not when one is read
    from .training import PreferenceDataset

logger = logging.getLogger("mass_dpo.runs")

#: Bump when a run's numbers would change for the same config (pipeline changes): old runs are then not reused.
RUN_FORMAT = 1

#: Config fields that do not change a run's numbers (left out of the hash).
NON_SEMANTIC = ("save_total_limit",)

#: Config fields added after runs were first cached: left out of the hash while ``None`` (their default), so that
#: older runs keep their names.
OPTIONAL_FIELDS = ("max_length", "max_prompt_length")

#: The file written last in a finished run folder (:func:`is_finished`).
MANIFEST = "manifest.json"

#: ``config.json``'s ``layout``: 2 = the run is finished when its manifest says so. Folders written before (no
#: ``layout``) counted as finished once ``metrics.json`` was there; they are still read when both of their JSON
#: files parse.
LAYOUT = 2


# ---------------------------------------------------------------- folders and hashes


def runs_root() -> Path:
    """``$MASS_DPO_RUNS``, else ``<cache>/runs`` (cache: ``$MASS_DPO_CACHE``, else ``$XDG_CACHE_HOME/mass_dpo``, else
    ``~/.cache/mass_dpo``)."""
    env = os.environ.get("MASS_DPO_RUNS")
    if env:
        return Path(env).expanduser()
    from .models import cache_dir

    return cache_dir() / "runs"


def world_size() -> int:
    """The number of processes (``WORLD_SIZE`` under ``accelerate launch`` / ``torchrun``; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    """sha256 of a file, read once per (path, modification time, size): run names are computed often."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _data_location(config: TrainConfig) -> str:
    """The data folder, or for a preference file given as the dataset its path and content hash."""
    from .data.preferences import is_preference_file, resolve_path

    if is_preference_file(config.dataset):
        path = resolve_path(config.dataset)
        if not path.is_file():
            return f"{path.resolve()}#sha256=missing"
        stat = path.stat()
        from .extraction import TRL_LAYOUT  # its tokenization: a run made under another layout is another run

        digest = _file_digest(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        return f"{path.resolve()}#sha256={digest}#layout={TRL_LAYOUT}"
    try:
        from .data import resolve_data_dir
        from .data.benchmarks import SAMPLES_DIR

        folder = resolve_data_dir(config.data_dir)[0]
    except Exception:  # the data package is optional for hashing (tests with injected data)
        return str(config.data_dir)
    if Path(folder).resolve() == Path(SAMPLES_DIR).resolve():
        return SHIPPED_SAMPLES  # versioned with the code: a run is the same run in every checkout
    return str(folder)


#: The run hash's name for the package's shipped samples (before: the checkout's absolute path to them, so that a
#: second clone or a moved checkout, or records imported elsewhere, named the same run differently).
SHIPPED_SAMPLES = "mass_dpo/data/samples"


def hash_payload(config: TrainConfig, *, world: int | None = None, dtype: str | None = None) -> dict[str, Any]:
    """What the run hash covers: the resolved config (minus :data:`NON_SEMANTIC`), world size, data folder, format.
    Later options are left out where they change nothing, so that run folders made before them keep their names:
    :data:`OPTIONAL_FIELDS` when ``None``, ``trainable_layers`` outside the freeze regime, ``pool_eval`` when off,
    ``online_eval`` when on. The dtype the reference model extracts in (:func:`mass_dpo.models.planned_dtype`: with
    ``dtype: auto`` bf16 on a CPU with native bf16, fp32 on one without; ``dtype`` names it for a run made
    elsewhere) is covered when it is not fp32, so a run made from bf16 features (another machine, a GPU,
    ``$MASS_DPO_DTYPE``) is never read as one made from fp32 ones."""
    cfg = {k: v for k, v in config.to_dict().items()
           if k not in NON_SEMANTIC and not (k in OPTIONAL_FIELDS and v is None)}
    if config.regime != "freeze":
        cfg.pop("trainable_layers", None)
    if not cfg.get("pool_eval"):
        cfg.pop("pool_eval", None)
    if cfg.get("online_eval", True):
        cfg.pop("online_eval", None)
    payload = {"config": cfg, "world_size": world or world_size(), "data": _data_location(config), "format": RUN_FORMAT}
    dtype = dtype or extraction_dtype(config.model)
    if dtype != "float32":
        payload["extraction_dtype"] = dtype
    return payload


def extraction_dtype(model) -> str:
    """The name of :func:`mass_dpo.models.planned_dtype` for the shared reference model on this process's device;
    ``float32`` for a model the params do not know (its load fails later, with its own message)."""
    from .models import planned_dtype

    try:
        dtype = planned_dtype(str(model), device=_device())
    except (FileNotFoundError, ValueError):
        return "float32"
    return str(dtype).removeprefix("torch.")


def config_hash(config: TrainConfig, *, world: int | None = None, dtype: str | None = None) -> str:
    """sha256 (hex) of the canonical JSON of :func:`hash_payload`."""
    blob = json.dumps(hash_payload(config, world=world, dtype=dtype), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def run_name(config: TrainConfig, *, world: int | None = None, dtype: str | None = None) -> str:
    """``<dataset>_<model>_<method>_n<n>_<regime>_s<seed>_<hash>``, the hash of :func:`hash_payload`."""
    from .data.preferences import is_preference_file

    model = Path(str(config.model)).name or "model"
    dataset = Path(str(config.dataset)).stem if is_preference_file(config.dataset) else config.dataset
    base = f"{dataset}_{model}_{config.method}_n{config.n}_{config.regime}_s{config.seed}"
    base = re.sub(r"[^A-Za-z0-9_.=-]+", "-", base)
    return f"{base}_{config_hash(config, world=world, dtype=dtype)[:12]}"


def run_dir(config: TrainConfig, *, root=None, world: int | None = None) -> Path:
    """The run folder of a resolved config."""
    return Path(root or runs_root()) / run_name(config, world=world)


def is_finished(path) -> bool:
    """True when ``path`` holds a finished run: its manifest (written last) is there and so is every file it lists,
    with the size it lists. A run folder of an earlier version (no manifest, no ``layout`` in its config) is
    finished when its ``config.json`` and ``metrics.json`` both parse."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        try:
            config = json.loads((path / "config.json").read_text())
            json.loads((path / "metrics.json").read_text())
        except (OSError, ValueError):
            return False
        return int(config.get("layout", 1)) < LAYOUT
    except (OSError, ValueError):
        return False
    try:
        return all((path / name).stat().st_size == size for name, size in manifest["files"].items())
    except (OSError, KeyError, TypeError, AttributeError):
        return False


#: Files of a run folder that may change after it is finished (left out of the manifest).
UNLISTED = ("run.log", MANIFEST)


def write_manifest(path: Path) -> None:
    """Mark ``path`` finished: ``manifest.json`` with every file of the folder (but ``checkpoints/`` and
    :data:`UNLISTED`) and its size, written atomically and last."""
    files = {}
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path).as_posix()
        if f.is_file() and rel not in UNLISTED and not rel.startswith("checkpoints/") and "/." not in f"/{rel}":
            files[rel] = f.stat().st_size
    atomic_write_json(path / MANIFEST, {"format": RUN_FORMAT, "layout": LAYOUT, "files": files}, sort_keys=True)


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


def _nan_for_null(values: dict) -> dict:
    """Metrics read back from strict JSON: ``null`` (a NaN or infinity when written) as NaN again."""
    return {k: float("nan") if v is None else v for k, v in values.items()}


def load_run(path) -> RunResult:
    """A finished run folder as a :class:`RunResult` (``cached=True``)."""
    path = Path(path)
    summary = json.loads((path / "metrics.json").read_text())
    cfg = json.loads((path / "config.json").read_text())["config"]
    info = {k: v for k, v in summary.items() if k != "test"}
    if isinstance(info.get("online_eval"), dict):
        info["online_eval"] = _nan_for_null(info["online_eval"])
    return RunResult(path, _nan_for_null(summary["test"]), path / "log.csv", TrainConfig(**cfg), True, info)


def _write_json(path: Path, obj) -> None:
    atomic_write_json(path, obj, indent=2, sort_keys=True)


def _write_config(path: Path, config: TrainConfig, world: int) -> None:
    import yaml

    payload = {"config": config.to_dict(), "hash": config_hash(config, world=world), "world_size": world,
               "data": _data_location(config), "format": RUN_FORMAT, "layout": LAYOUT,
               "extraction_dtype": extraction_dtype(config.model)}
    _write_json(path / "config.json", payload)
    atomic_write_text(path / "config.yaml", yaml.safe_dump(payload, sort_keys=False))


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
        test_records: the test records (``prompt``, ``candidates``, ``target``), for the generation-based accuracy of
            the LM regimes; tokenizer: the model's tokenizer (LM regimes).
        pool_eval: the whole-pool statistics of every online evaluation (``TrainConfig.pool_eval``), or ``None``.
    """

    policy: torch.nn.Module
    train: PreferenceDataset
    eval: PreferenceDataset | None
    test: Any
    test_pools: list | None = None
    forward: Callable | None = None
    test_records: list | None = None
    tokenizer: Any = None
    pool_eval: Any = None


def _device():
    state = _state()
    return None if state is None else state.device


#: In-process memo of the log-linear regime's frozen inputs (its reference model is never trained): a notebook that
#: trains hundreds of exact fits loads the model and reads each split's extraction once.
_BUNDLES: dict = {}
_EXTRACTED: dict = {}
#: The memo of extracted splits keeps at most this many bytes of features (the most recent first; the latest split is
#: always kept): the cpu profile's splits all fit, a paper-scale split (20k prompts x 20 x 3072 floats) is read again.
EXTRACTED_MEMO_BYTES = 4 << 30


def _console() -> bool:
    """True when stderr is a terminal (``mass-dpo train`` by hand) and bars are on, False in a notebook kernel, a log
    file or under ``--no-progress`` (:func:`mass_dpo.models.set_progress_bars`)."""
    import sys

    from .models import progress_bars

    return progress_bars() and bool(getattr(sys.stderr, "isatty", lambda: False)())


def _model(name, lm: bool):
    """The model bundle: loaded afresh for the LM regimes (training changes it), shared in-process otherwise."""
    from .models import load_model

    if lm:  # trained weights: float32 on a CPU (bf16 extraction is a CPU speed-up, not a training precision)
        return load_model(name, device=_device(), dtype=None if torch.cuda.is_available() else "float32")
    key = (str(name), str(_device()))
    if key not in _BUNDLES:
        _BUNDLES[key] = load_model(name, device=_device())
    return _BUNDLES[key]


def split_key(config: TrainConfig, split: str) -> str:
    """The extraction cache's ``dataset_key`` of one split of a config (which prompts: dataset, split, limit, seed)."""
    limit = {"train": config.limit, "valid": config.eval_limit, "test": config.test_limit}[split]
    return f"{config.dataset}/{split}/limit={limit}/seed={config.subsample_seed}"


def extracted_split(config: TrainConfig, split: str, *, progress: bool = False):
    """``(records, Extracted)`` of one split at the frozen reference model (the log-linear regime's inputs, and the
    features every notebook analysis reads), memoised in-process: the model loads and each split is read once."""
    from .data import load_benchmark
    from .extraction import extract

    limit = {"train": config.limit, "valid": config.eval_limit, "test": config.test_limit}[split]
    key = split_key(config, split)
    memo = (str(config.model), _data_location(config), key, config.pooling, config.max_length, config.max_prompt_length)
    if memo in _EXTRACTED:  # served from memory: a cache hit like a read from disk (tensors shared, not copied)
        records, ex = _EXTRACTED[memo] = _EXTRACTED.pop(memo)  # now the most recent
        return records, dataclasses.replace(ex, meta={**ex.meta, "cache_hit": True})
    records = load_benchmark(config.dataset, split, data_dir=config.data_dir, limit=limit, seed=config.subsample_seed)
    _EXTRACTED[memo] = (records, extract(records, _model(config.model, False), dataset_key=key,
                                         pooling=config.pooling, progress=progress, max_length=config.max_length,
                                         max_prompt_length=config.max_prompt_length))
    while len(_EXTRACTED) > 1 and sum(e.features.nbytes for _, e in _EXTRACTED.values()) > EXTRACTED_MEMO_BYTES:
        del _EXTRACTED[next(iter(_EXTRACTED))]  # the least recently used
    return _EXTRACTED[memo]


def _lm_split(config: TrainConfig, split: str, bundle, keep_layer: int | None = None):
    """``(records, Extracted)`` of one split extracted with ``bundle`` (cached on disk; ``keep_layer``: with the
    states entering that block, the freeze regime's)."""
    from .data import load_benchmark
    from .extraction import extract

    limit = {"train": config.limit, "valid": config.eval_limit, "test": config.test_limit}[split]
    records = load_benchmark(config.dataset, split, data_dir=config.data_dir, limit=limit, seed=config.subsample_seed)
    # a progress bar on a console only: an executed notebook keeps one line per run (experiments.run_grid)
    return records, extract(records, bundle, dataset_key=split_key(config, split), pooling=config.pooling,
                            progress=_console(), keep_layer=keep_layer, max_length=config.max_length,
                            max_prompt_length=config.max_prompt_length)


def _freeze_bundle(config: TrainConfig):
    """``(bundle, first trainable block)`` of the freeze regime: the shared model in the extraction's dtype (never
    trained: the policy copies its top blocks) and ``L - trainable_layers``."""
    from .frozen import first_trainable_layer

    bundle = _model(config.model, False)
    return bundle, first_trainable_layer(bundle.model, config.trainable_layers)


def prepare_data(config: TrainConfig) -> RunData:
    """load_benchmark -> extract (cached) -> select negatives -> records, for the train, valid and test splits.

    The freeze regime extracts with the shared model in its extraction dtype and keeps the states entering block
    ``L - trainable_layers`` (``Extracted.states``, one forward with the features); its records carry those states
    and its reference log-probs are the untrained policy's on them (:func:`mass_dpo.frozen.reference_logps`; the
    test split's ``ref_logps`` are replaced by them too, so every implicit reward starts at 0)."""
    from .training import PoolEval, PreferenceDataset, build_policy, select_training_negatives
    from .extraction import encode_records, model_context

    from .data import load_benchmark

    lm = config.regime != "loglinear"
    freeze = config.regime == "freeze"
    keep = None
    limits = {"train": config.limit, "valid": config.eval_limit, "test": config.test_limit}
    for split in config.splits:  # every split read before the model loads: a bad file is said first
        load_benchmark(config.dataset, split, data_dir=config.data_dir, limit=limits[split], seed=config.subsample_seed)
    if freeze:
        bundle, keep = _freeze_bundle(config)
    else:
        bundle = _model(config.model, lm)
    records, extracted = {}, {}
    for split, limit in limits.items():
        if split == "valid" and limit == 0:
            continue
        if split == "test" and config.test_split == "valid":  # tuning: the final metrics are the validation split's
            if "valid" not in records:
                raise ValueError("test_split='valid' needs validation prompts: set eval_limit > 0")
            records["test"], extracted["test"] = records["valid"], extracted["valid"]
            continue
        t0 = time.time()
        if lm:  # extracted with the model this run trains (loaded afresh; freeze: the shared one, with states)
            records[split], extracted[split] = _lm_split(config, split, bundle, keep)
        else:  # the log-linear runs of one process share their frozen features
            records[split], extracted[split] = extracted_split(config, split, progress=_console())
        logger.info("%s: %d prompts ready in %.1f s", split, len(extracted[split]), time.time() - t0)

    # the LM regimes train on the pools the extraction saw: cut the same way (TRL's truncation)
    length = config.max_length or (model_context(bundle.model) if lm else None)
    pools = {s: encode_records(records[s], bundle.tokenizer, max_length=length,
                               max_prompt_length=config.max_prompt_length)[0] for s in records} if lm else {}
    if lm:
        policy = build_policy(config, bundle.model)
    else:
        policy = build_policy(config, dim=int(extracted["train"].features.shape[-1]))
    if freeze:  # log pi_ref = the untrained policy on the cached states (selection reads the extraction as it is)
        from .frozen import reference_logps

        ref = {s: reference_logps(policy, extracted[s], pools[s]) for s in extracted}
    else:
        ref = {s: extracted[s].ref_logps for s in extracted}

    def records_of(split: str) -> PreferenceDataset:
        ex = extracted[split]
        neg = select_training_negatives(ex, config.method, config.n, beta=config.beta, gamma=config.gamma,
                                        seed=config.seed, selection_score=config.selection_score,
                                        strategy=config.strategy)
        return PreferenceDataset.from_selection(ex, neg, pools=pools.get(split), ref_logps=ref[split],
                                                states=ex.states if freeze else None)

    train = records_of("train")
    online = config.online_eval and "valid" in extracted
    eval_ = records_of("valid") if online else None
    test = dataclasses.replace(extracted["test"], ref_logps=ref["test"]) if freeze else extracted["test"]
    pool_eval = None
    if config.pool_eval and online:
        from .evaluation import score_candidates

        valid = dataclasses.replace(extracted["valid"], ref_logps=ref["valid"])
        pool_eval = PoolEval(lambda model: score_candidates(model, valid, pools=pools.get("valid")), valid.ref_logps,
                             valid.mask, valid.target, beta=config.beta, records=eval_)
    return RunData(policy, train, eval_, test, pools.get("test"),
                   # tuning runs (test_split 'valid') are ranked by the tuning metric alone: no generation
                   test_records=records["test"] if lm and config.test_split != "valid" else None,
                   tokenizer=bundle.tokenizer if lm else None,
                   pool_eval=pool_eval)


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


def _train_with_trainer(cfg: TrainConfig, run_data: RunData, path: Path, checkpoints: Path, callbacks, main: bool):
    """The Trainer path (LM regimes; the log-linear regime with ``fit="adam"``): ``(policy, train summary, last
    online-eval metrics, optimizer name, seconds)``; resumes from the newest complete checkpoint.

    A freeze-regime policy saves only its trainable weights: ``final/`` and ``snapshots/{mid,final}/``
    (:func:`mass_dpo.frozen.save_trainable`; ``snapshots/final`` holds hard links to ``final/``'s files)."""
    from .frozen import FrozenTopPolicy, save_trainable
    from .training import CSVLogCallback, SnapshotCallback, adopt_checkpoint_steps, build_trainer, last_checkpoint

    freeze = isinstance(run_data.policy, FrozenTopPolicy)
    extra = [SnapshotCallback(path / "snapshots")] if freeze else []
    trainer = build_trainer(
        cfg, run_data.policy, run_data.train, run_data.eval, output_dir=checkpoints,
        callbacks=[CSVLogCallback(path / "log.csv"), *extra, *(callbacks or [])], forward=run_data.forward,
        pool_eval=run_data.pool_eval,
    )
    resume = last_checkpoint(checkpoints, discard_incomplete=main)  # skips (and reports) a half-written one
    if resume is None and main:  # a fresh start: no rows of an earlier, unfinished attempt
        (path / "log.csv").unlink(missing_ok=True)
    optim = getattr(trainer.args.optim, "value", trainer.args.optim)
    logger.info("run %s: %d training prompts, optimizer %s%s", path.name, len(run_data.train), optim,
                f", resuming from {resume}" if resume else "")
    if resume:
        adopt_checkpoint_steps(trainer.args, resume)  # no spurious "0.05 (from args) != 4" warning
        if main:
            print(f"resuming {path.name} from {Path(resume).name}", flush=True)
    t1 = time.time()
    if resume is None and run_data.eval is not None:
        trainer.evaluate()  # the step-0 point of the training curves (Figures 2-3)
    out = trainer.train(resume_from_checkpoint=resume)
    t_train = time.time() - t1
    policy = trainer.accelerator.unwrap_model(trainer.model)
    if freeze:
        if main:
            save_trainable(policy, path / "final", step=trainer.state.global_step)
            _link_folder(path / "final", path / "snapshots" / "final")
    else:
        trainer.save_model(str(path / "final"))
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    info = {**out.metrics, "global_step": trainer.state.global_step, "resumed_from": resume and Path(resume).name}
    return policy, info, (evals[-1] if evals else {}), optim, t_train


def _link_folder(src: Path, dst: Path) -> None:
    """``dst`` with a hard link to every file of ``src`` (a copy where the file system has no hard links)."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)


def _records_tensors(records: PreferenceDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [P, 1+n, d], mask [P, 1+n])`` of log-linear training records (column 0 the chosen response)."""
    cand = records.candidates
    rows = torch.arange(cand.shape[0])[:, None]
    feats = records.features[rows, cand.clamp_min(0)].float()
    mask = cand >= 0
    return feats * mask[..., None], mask


#: In-process memo of exact fits by what determines them (objective, data, tolerance): MASS-DPO's selection and the
#: fit are deterministic, so its seeds (and its tuning run at the same settings) would repeat the same fit.
_FITS: dict = {}


def _fit_key(cfg: TrainConfig, X: torch.Tensor, M: torch.Tensor, evalset) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([cfg.method, cfg.beta, cfg.ridge, cfg.fit_tol, cfg.fit_max_iter]).encode())
    for t in (X, M, *(evalset or ())):
        h.update(repr((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _train_exact(cfg: TrainConfig, run_data: RunData, path: Path):
    """The log-linear regime's exact fit (:func:`mass_dpo.loglinear.fit_loglinear`): theta_hat minimises the
    ridge-regularised objective over all training prompts. Every L-BFGS iterate is logged to ``log.csv`` (train loss;
    online-eval loss, margin, accuracy and chosen reward: the curves of Figures 2-3, with the iteration as step), and
    the iterate half-way along the path and the final theta are saved as ``snapshots/{mid,final}.pt`` (Table 4)."""
    from .training import CSVLogCallback
    import csv

    from safetensors.torch import save_file

    from .loglinear import fit_loglinear, loglinear_objective
    from .losses import preference_loss

    X, M = _records_tensors(run_data.train)
    X = X.double()
    evalset = _records_tensors(run_data.eval) if run_data.eval is not None else None
    if evalset is not None:
        evalset = (evalset[0].double(), evalset[1])
    key = _fit_key(cfg, X, M, evalset)
    rows = []

    def stats(split, it, theta, feats, mask):
        z = feats.double() @ theta.double()
        zero = torch.zeros_like(z)
        out = preference_loss(cfg.method, z[:, 0], z[:, 1:], zero[:, 0], zero[:, 1:], beta=cfg.beta, mask=mask[:, 1:],
                              check_finite=False)
        neg = mask[:, 1:]
        rej = (out.rejected_rewards * neg).sum(-1) / neg.sum(-1).clamp_min(1)
        rows.append({"step": it, "epoch": None, "split": split, "loss": float(out.loss.mean()),
                     "margin": float(out.margins.mean()), "accuracy": float(out.accuracy.mean()),
                     "chosen_rewards": float(out.chosen_rewards.mean()), "rejected_rewards": float(rej.mean()),
                     "learning_rate": None, "grad_norm": None})

    def on_iterate(it, theta):
        stats("train", it, theta, X, M)
        if evalset is not None:
            stats("eval", it, theta, *evalset)

    logger.info("run %s: %d training prompts, exact fit (L-BFGS, ridge %g, tol %g)", path.name, len(run_data.train),
                cfg.ridge, cfg.fit_tol)
    t1 = time.time()
    if key in _FITS:  # the same objective on the same data (a deterministic selection under another seed)
        fit, rows, t_train = _FITS[key]
        rows = [dict(r) for r in rows]
        logger.info("run %s: the same fit as an earlier run of this process (%.2f s then)", path.name, t_train)
    else:
        fit = fit_loglinear(X, M, method=cfg.method, beta=cfg.beta, ridge=cfg.ridge, tol=cfg.fit_tol,
                            max_iter=cfg.fit_max_iter, callback=on_iterate)
        t_train = time.time() - t1
        _FITS[key] = (fit, [dict(r) for r in rows], t_train)
        while len(_FITS) > 64:
            _FITS.pop(next(iter(_FITS)))
    if not fit.converged:
        logger.warning("exact fit stopped at gradient norm %.3g > tol %g after %d iterations", fit.grad_norm,
                       cfg.fit_tol, fit.iterations)
    policy = run_data.policy
    with torch.no_grad():
        policy.theta.copy_(fit.theta.to(policy.theta.dtype))
    with atomic_path(path / "final" / "theta.safetensors") as tmp:
        save_file({"theta": policy.theta.detach().cpu().contiguous()}, str(tmp))
    snaps = path / "snapshots"
    mid_it, mid_theta = fit.path[len(fit.path) // 2]
    for name, snap in (("mid", {"theta": mid_theta, "step": int(mid_it)}),
                       ("final", {"theta": fit.theta.clone(), "step": int(fit.iterations)})):
        with atomic_path(snaps / f"{name}.pt") as tmp:
            torch.save(snap, tmp)
    with atomic_path(path / "log.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSVLogCallback.COLUMNS)
        w.writeheader()
        w.writerows(rows)
    objective = float(loglinear_objective(fit.theta.double(), X.double(), M, method=cfg.method, beta=cfg.beta,
                                          ridge=cfg.ridge))
    info = {"fit": "exact", "iterations": fit.iterations, "grad_norm": fit.grad_norm, "converged": fit.converged,
            "objective": objective, "ridge": cfg.ridge, "global_step": fit.iterations,
            "theta_norm": float(fit.theta.norm())}
    online = {f"eval_{k}": v for k, v in rows[-1].items() if k in ("loss", "margin", "accuracy")} if evalset else {}
    return policy, info, online, "lbfgs", t_train


def train_run(
    config: TrainConfig | dict | None = None,
    *,
    force: bool | Callable[[Path], bool] = False,
    root=None,
    data: RunData | Callable[[TrainConfig], RunData] | None = None,
    keep_checkpoints: bool = False,
    callbacks: list | None = None,
    tune: bool = False,
    **overrides,
) -> RunResult:
    """Train and evaluate one run, or load it when already finished.

    Args:
        config: a :class:`TrainConfig`, a dict of options, or ``None``; ``overrides`` (``method="sdpo"``,
            ``profile="cpu"``, ...) are applied on top (see :func:`mass_dpo.training.resolve_config`).
        tune: first choose the regime's tuned options (``params/training.yaml`` ``tuning``: e.g. pooling and ridge
            in the log-linear regime) on the validation split by the rule (:func:`mass_dpo.tuning.tune`), for this
            (model, dataset, method); options given explicitly in ``config`` / ``overrides`` stay fixed. The choice
            is printed, and saved as ``tuning.csv`` in the run folder.
        force: retrain even when a finished run exists (its folder is wiped first); or a function of the run
            folder saying whether to, asked again once the run's lock is held (so that jobs waiting on one run
            retrain it once, not once each).
        root: the runs root (default :func:`runs_root`).
        data: the training data, or a function of the resolved config returning it (default :func:`prepare_data`).
        keep_checkpoints: keep ``checkpoints/`` after the run finishes.
        callbacks: extra ``transformers.TrainerCallback`` objects (progress bars, early stopping, ...).

    Returns:
        :class:`RunResult` (``cached=True`` when a finished run was loaded).
    """
    if tune:
        tuned = tune_config(config, root=root, **overrides)
        result = train_run(tuned.config, force=force, root=root, data=data, keep_checkpoints=keep_checkpoints,
                           callbacks=callbacks)
        state = _state()
        if state is None or state.is_main_process:
            with locked(result.run_dir, f"the run {result.run_dir.name}"):  # not beside a forced retrain of it
                if result.run_dir.is_dir():
                    with atomic_path(result.run_dir / "tuning.csv") as tmp:
                        tuned.table.to_csv(tmp, index=False)
        result.info["tuning"] = tuned.options
        return result
    cfg = resolve_config(config, **overrides)
    world = world_size()
    path = run_dir(cfg, root=root, world=world)
    state = _state()
    main = state is None or state.is_main_process
    multi = state is not None and state.num_processes > 1
    if not multi and is_finished(path) and not _forced(force, path):  # several processes decide together, below
        return load_run(path)
    check_writable(path.parent, "runs root", "give --out a folder you can write, or set $MASS_DPO_RUNS")
    with locked(path, f"the run {path.name}", enabled=main):
        _barrier(state)  # the other processes go on once the main one holds the lock
        forced = _forced(force, path)  # asked again: another process may have retrained it while this one waited
        if is_finished(path) and not forced:  # trained by another process while this one waited
            return load_run(path)
        return _train_locked(cfg, path, world, state, main, forced, data, keep_checkpoints, callbacks)


def _forced(force: bool | Callable[[Path], bool], path: Path) -> bool:
    return bool(force(path)) if callable(force) else bool(force)


def _train_locked(cfg: TrainConfig, path: Path, world: int, state, main: bool, force: bool, data,
                  keep_checkpoints: bool, callbacks) -> RunResult:
    """:func:`train_run` once the run folder's lock is held: train, evaluate, write the files, the manifest last."""
    from .evaluation import evaluate

    if main:
        for folder in (path, path / "final", path / "snapshots"):  # temporaries of a killed attempt
            clean_orphans(folder)
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
        if cfg.regime == "loglinear" and cfg.fit == "exact":
            if main:  # one deterministic full-batch fit: the other ranks would redo and rewrite the same files
                policy, train_info, online, optim, t_train = _train_exact(cfg, run_data, path)
        else:
            policy, train_info, online, optim, t_train = _train_with_trainer(
                cfg, run_data, path, checkpoints, callbacks, main)
        if main:
            t2 = time.time()
            test = evaluate(
                policy, run_data.test, pools=run_data.test_pools, score=cfg.score, beta=cfg.beta, ks=cfg.ks,
                num_negatives=cfg.eval_negatives, seed=cfg.eval_seed, forward=run_data.forward, pooling=cfg.pooling,
                records=run_data.test_records, tokenizer=run_data.tokenizer, per_prompt=path / "test_per_prompt.csv",
                option_labels=_lettered_options(cfg.dataset),
            )
            summary = {
                "test": test,
                "train": train_info,
                "online_eval": online,
                "optim": optim,
                "seconds": {"data": round(t_data, 3), "train": round(t_train, 3), "test": round(time.time() - t2, 3)},
                "hash": config_hash(cfg, world=world),
            }
            _write_json(path / "metrics.json", summary)
            logger.info("run %s finished: %s", path.name,
                        ", ".join(f"{k} {test[k]:.4f}" for k in ("accuracy", "recall@1", "ndcg@3", "mrr") if k in test))
            if not keep_checkpoints:
                shutil.rmtree(checkpoints, ignore_errors=True)
            write_manifest(path)  # last: from now on the run is finished
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


# ---------------------------------------------------------------- tuning one run


@dataclass
class TunedConfig:
    """:func:`tune_config`'s result: the resolved ``config`` with the chosen ``options``, the grid ``table``
    (:class:`mass_dpo.tuning.Tuned`) and its one-line ``sentence``."""

    config: TrainConfig
    options: dict[str, Any]
    table: Any
    sentence: str


def tune_config(config: TrainConfig | dict | None = None, *, root=None, echo: Callable[[str], None] | None = print,
                **overrides) -> TunedConfig:
    """The run's config with its regime's tuned options chosen on the validation split (:func:`mass_dpo.tuning.tune`,
    the rule of ``params/training.yaml``): each grid point is a run (cached like any other) with the rule's seed and
    ``test_split="valid"``. Axes given explicitly (in a dict ``config`` or in ``overrides``; a :class:`TrainConfig`
    ``config`` is tuned over every axis) are held fixed. ``echo`` gets the chosen setting in one line."""
    from .tuning import grid_axes, tune, tuning_rule

    given = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(config, dict):  # a TrainConfig carries every field: only its overrides count as given
        given.update({k: v for k, v in config.items() if v is not None})
    base = resolve_config(config, **overrides)
    rule = tuning_rule()
    axes = grid_axes(base.regime, rule)
    fixed = set(axes) & set(given)
    rule = {**rule, "grid": {base.regime: {k: v for k, v in axes.items() if k not in fixed}}}

    def train_point(options: dict) -> RunResult:
        return train_run(TrainConfig(**{**base.to_dict(), **options}), root=root)

    tuned = tune(train_point, base.regime, rule=rule)
    table = tuned.table.assign(dataset=base.dataset, method=base.method, model=base.model) if len(tuned.table) else tuned.table
    chosen = TrainConfig(**{**base.to_dict(), **tuned.options})
    sentence = tuned.sentence() + (f"; held fixed: {', '.join(sorted(fixed))}" if fixed else "")
    if echo:
        echo(f"{base.dataset} {base.method}: {sentence}")
    logger.info("%s %s: %s", base.dataset, base.method, sentence)
    return TunedConfig(chosen, tuned.options, table, sentence)


# ---------------------------------------------------------------- the reference row


#: Config fields a reference evaluation does not depend on (the untrained policy is the same for every method).
REFERENCE_FREE = ("method", "n", "seed", "ridge", "fit", "fit_tol", "fit_max_iter", "learning_rate",
                  "num_train_epochs", "max_steps", "selection_score", "gamma", "limit", "negatives", "pool_eval",
                  "online_eval")


def _lettered_options(dataset: str) -> bool:
    """True for the QA benchmarks, whose prompts list lettered options (an answer "(E)" names option E)."""
    from .params import available, load_params

    return dataset in available("datasets") and load_params(f"datasets/{dataset}").get("task") == "qa"


def reference_name(cfg: TrainConfig, *, dtype: str | None = None) -> str:
    """``reference_<dataset>_<model>_<regime>_<test split>_<hash>``: the hash of :func:`hash_payload` without what
    cannot change an untrained policy (:data:`REFERENCE_FREE`)."""
    base = TrainConfig(**{**cfg.to_dict(), "method": "sdpo"})
    payload = hash_payload(base, world=1, dtype=dtype)
    payload["config"] = {k: v for k, v in payload["config"].items() if k not in REFERENCE_FREE}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]
    model = Path(str(cfg.model)).name or "model"
    name = re.sub(r"[^A-Za-z0-9_.=-]+", "-", f"reference_{cfg.dataset}_{model}_{cfg.regime}_{cfg.test_split}")
    return f"{name}_{digest}"


def name_of(run_dir) -> str:
    """The name the current code gives the finished run (or record) in ``run_dir``, from its ``config.json`` (its
    config, world size and extraction dtype). That is the folder's own name unless the run hash changed since the
    run was made (:data:`SHIPPED_SAMPLES`); a config this version cannot read keeps the folder's name.
    :func:`mass_dpo.records.import_runs` and ``mass-dpo runs rename`` file runs under it."""
    try:
        meta = json.loads((Path(run_dir) / "config.json").read_text())
        cfg = TrainConfig(**meta["config"])
    except (OSError, ValueError, KeyError, TypeError):  # a config this version cannot read: keep the folder's name
        return Path(run_dir).name
    dtype = meta.get("extraction_dtype") or "float32"
    if Path(run_dir).name.startswith("reference_"):
        return reference_name(cfg, dtype=dtype)
    return run_name(cfg, world=meta.get("world_size") or 1, dtype=dtype)


def reference_run(config: TrainConfig | dict | None = None, *, root=None, **overrides) -> RunResult:
    """The untrained policy (theta = 0 in the log-linear regime, the pretrained model in the LM regimes) evaluated
    exactly like a trained run on the same test prompts: every table's ``reference`` row. Cached in
    ``<runs root>/reference_<dataset>_<model>_<regime>_<test split>_<hash>/`` (``metrics.json``, ``test_per_prompt.csv``);
    the hash leaves out what cannot change an untrained policy (:data:`REFERENCE_FREE`)."""
    from .evaluation import evaluate, reference_policy

    cfg = resolve_config(config, **overrides)
    path = Path(root or runs_root()) / reference_name(cfg)
    if is_finished(path):
        return load_run(path)
    from .training import CSVLogCallback

    check_writable(path.parent, "runs root", "give a folder you can write (root=, or $MASS_DPO_RUNS)")
    with locked(path, f"the reference row {path.name}"):
        if is_finished(path):  # computed by another process while this one waited
            return load_run(path)
        clean_orphans(path.parent, prefix=path.name)
        shutil.rmtree(path.with_name(path.name + ".partial"), ignore_errors=True)  # the temporary of older versions
        with atomic_folder(path) as tmp:
            _write_config(tmp, cfg, 1)
            t0 = time.time()
            data = prepare_data(TrainConfig(**{**cfg.to_dict(), "limit": 1, "eval_limit": cfg.eval_limit
                                               if cfg.test_split == "valid" else 0}))
            t_data = time.time() - t0
            t1 = time.time()
            test = evaluate(reference_policy(data.policy), data.test, pools=data.test_pools, score=cfg.score,
                            beta=cfg.beta, ks=cfg.ks, num_negatives=cfg.eval_negatives, seed=cfg.eval_seed,
                            forward=data.forward, pooling=cfg.pooling, records=data.test_records,
                            tokenizer=data.tokenizer, per_prompt=tmp / "test_per_prompt.csv",
                            option_labels=_lettered_options(cfg.dataset))
            atomic_write_text(tmp / "log.csv", ",".join(CSVLogCallback.COLUMNS) + "\n")
            _write_json(tmp / "metrics.json", {"test": test, "train": {"reference": True}, "online_eval": {},
                                               "optim": None, "seconds": {"data": round(t_data, 3), "train": 0.0,
                                                                          "test": round(time.time() - t1, 3)}})
            write_manifest(tmp)
    result = load_run(path)
    result.cached = False
    return result


# ---------------------------------------------------------------- the freeze regime: snapshots, re-extraction


def snapshot_folder(run_dir, snapshot: str = "final") -> Path:
    """The saved trainable weights of a freeze run: ``snapshots/<snapshot>/`` (``mid``: half-way, ``final``)."""
    folder = Path(run_dir) / "snapshots" / snapshot
    if not (folder / "freeze.json").is_file():
        from .records import is_record

        if is_record(run_dir):
            raise FileNotFoundError(f"{run_dir}: a record (imported without its weights) has no snapshot "
                                    f"{snapshot!r}; train the run again (train_run(..., force=True)) for its weights")
        raise FileNotFoundError(f"{folder}: no saved snapshot {snapshot!r} (a freeze run keeps snapshots/mid and "
                                "snapshots/final)")
    return folder


def load_policy(run_dir, snapshot: str = "final"):
    """The policy of a freeze run at ``snapshot`` (``init``: untrained, ``mid`` or ``final``): the shared base model
    (:func:`_freeze_bundle`, the extraction's dtype) with that snapshot's top blocks and norm
    (:class:`mass_dpo.frozen.FrozenTopPolicy`). Its full causal LM: :func:`mass_dpo.frozen.generation_model`."""
    from .frozen import load_trainable
    from .training import build_policy

    cfg = TrainConfig(**json.loads((Path(run_dir) / "config.json").read_text())["config"])
    if cfg.regime != "freeze":
        raise ValueError(f"{run_dir} is a {cfg.regime} run; snapshots of trainable weights are the freeze regime's")
    bundle, _ = _freeze_bundle(cfg)
    if snapshot == "init":  # the run's starting point, through the same cached-states path as its snapshots
        return build_policy(cfg, bundle.model)
    return load_trainable(build_policy(cfg, bundle.model), snapshot_folder(run_dir, snapshot))


def reextract_run(run_dir, split: str = "train", *, snapshot: str = "final", pooling: str | None = None):
    """Table 4 as the paper ran it: the features (mean-pooled final hidden states, ``pooling``: default the run's)
    and log-probs of every candidate of ``split`` under a freeze run's ``snapshot`` (``init``, ``mid`` or ``final``), as an
    :class:`~mass_dpo.extraction.Extracted` (``theta0_logps`` and ``features`` the snapshot's, ``ref_logps`` the
    untrained policy's), so that :func:`mass_dpo.preprocess.select_extracted` recomputes the selection on it. The
    snapshot's top blocks run on the split's cached states: seconds, no full forward."""
    from .extraction import encode_records, model_context
    from .frozen import read_meta, reextract

    policy = load_policy(run_dir, snapshot)
    cfg = TrainConfig(**json.loads((Path(run_dir) / "config.json").read_text())["config"])
    bundle, keep = _freeze_bundle(cfg)
    records, ex = _lm_split(cfg, split, bundle, keep)
    pools = encode_records(records, bundle.tokenizer, max_length=cfg.max_length or model_context(bundle.model),
                           max_prompt_length=cfg.max_prompt_length)[0]  # cut as the run's extraction was
    step = 0 if snapshot == "init" else read_meta(snapshot_folder(run_dir, snapshot)).get("step")
    return reextract(policy, ex, pools, pooling=pooling or cfg.pooling,
                     meta={"run": Path(run_dir).name, "snapshot": snapshot, "step": step, "split": split})


def fit_gain(run_dir, split: str = "train", *, snapshot: str = "final") -> dict[str, Any]:
    """Does a freeze run fit the prompts it trained on, and does that carry to others? The MRR of the policy's
    log-prob ranking of every candidate of ``split`` at ``snapshot`` against the untrained policy (``init``), paired
    per prompt: ``{"split", "prompts", "mrr_init", "mrr", "gain", "se"}`` (``se`` of the mean paired gain). On
    ``train`` a gain says the optimiser fits its prompts; a gain there and none on ``valid`` says what it learned does
    not carry to unseen prompts (knowledge rather than form)."""
    from .metrics import per_prompt_ranking

    def mrr(ex) -> torch.Tensor:
        scores = ex.theta0_logps.double().masked_fill(~ex.mask.bool(), float("-inf"))
        return per_prompt_ranking(scores, ex.target, mask=ex.mask)["mrr"].double()

    before = mrr(reextract_run(run_dir, split, snapshot="init"))
    after = mrr(reextract_run(run_dir, split, snapshot=snapshot))
    gain = after - before
    n = int(gain.numel())
    se = float(gain.std(unbiased=True) / n ** 0.5) if n > 1 else float("nan")
    return {"split": split, "prompts": n, "mrr_init": float(before.mean()), "mrr": float(after.mean()),
            "gain": float(gain.mean()), "se": se}
