"""What defines one training run: :class:`TrainConfig` and :func:`resolve_config` (``params/training.yaml``).

Kept apart from :mod:`mass_dpo.training` so that reading a finished run (``mass_dpo.runs.load_run``) or resolving a
notebook's runs does not import transformers' Trainer; :mod:`mass_dpo.training` re-exports every name.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch

from .extraction import DEFAULT_SELECTION_SCORE, check_selection_score
from .losses import METHODS

REGIMES = ("full", "lora", "loglinear", "freeze")

#: How each method's fixed negatives are drawn (``mass_dpo.selection`` strategies).
METHOD_STRATEGY = {"mass_dpo": "dopt", "sdpo": "random", "dpo_k": "random", "dmpo": "random", "dpo": "random"}
#: Strategies a run's ``negatives`` may name (``mass_dpo.preprocess.STRATEGIES`` less ``all``, which is ``n`` = pool).
NEGATIVES = ("dopt", "random", "hardest", "longest")

# ---------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    """Everything that defines one run; its hash names the run folder (``mass_dpo.runs``).

    Defaults are the paper's (Appendix C.4); ``params/training.yaml`` repeats them and adds per-regime and
    per-profile overrides (:func:`resolve_config`). ``"auto"`` values are resolved on the machine that runs.
    """

    # what is trained
    dataset: str = "lastfm"
    model: str = "smollm2"
    method: str = "mass_dpo"
    n: int = 3
    beta: float = 0.1
    regime: str = "loglinear"
    seed: int = 0
    # data
    data_dir: str | None = None
    limit: int | None = None  # training prompts (None: the whole split)
    eval_limit: int | None = 200  # online-eval prompts (the paper's 200)
    test_limit: int | None = 2000  # test prompts (the paper's 2,000)
    subsample_seed: int = 0  # which prompts a limit keeps: fixed, so seeds and methods share the data
    test_split: str = "test"  # the split the final metrics are measured on ("valid" for hyperparameter tuning)
    pooling: str = "response"  # feature pooling of extraction: "response" (response tokens) or "all" (prompt too)
    # TRL's truncation (mass_dpo.data.formatting.truncate_pool): a prompt + response keeps its first max_length tokens
    # (None: the model's context), a prompt its last max_prompt_length (None: no limit)
    max_length: int | None = None
    max_prompt_length: int | None = None
    gamma: float = 0.1  # ridge of the D-optimal design matrix (selection)
    # the log-linear regime's fit: "exact" (L-BFGS to a gradient tolerance on the ridge-regularised convex objective,
    # mass_dpo.loglinear.fit_loglinear) or "adam" (the Trainer, like the LM regimes); ignored by the LM regimes
    fit: str = "exact"
    ridge: float = 1e-3  # L2 weight of the exact fit (chosen on the validation split: params/training.yaml tuning)
    fit_tol: float = 1e-6  # gradient-norm tolerance of the exact fit
    fit_max_iter: int = 500
    selection_score: str = DEFAULT_SELECTION_SCORE  # reading of the preprocessing score: delta, reference, offset
    # how the fixed negatives are chosen: None = the method's own (METHOD_STRATEGY: D-optimal for mass_dpo, random
    # otherwise); "hardest" (top-n by log pi_ref) or "longest" (top-n by tokens) train a method on label-blind picks
    negatives: str | None = None
    # optimisation
    learning_rate: float = 1e-5
    num_train_epochs: float = 3.0
    max_steps: int = -1
    per_device_train_batch_size: int = 2
    per_device_eval_batch_size: int = 2
    gradient_accumulation_steps: int = 8
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.05
    max_grad_norm: float = 0.3
    weight_decay: float = 0.0
    optim: str = "auto"  # auto: paged_adamw_32bit when bitsandbytes imports, else adamw_torch
    gradient_checkpointing: bool = True  # LM regimes only
    bf16: Any = "auto"  # auto: on a GPU that supports it, LM regimes only
    eval_steps: float = 0.05  # < 1: a fraction of the training steps (20 evaluations)
    logging_steps: float = 0.05
    save_steps: float = 0.1
    save_total_limit: int | None = 2
    # lora
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # freeze: the top k blocks and the final norm train, on cached lower-block states (mass_dpo.frozen)
    trainable_layers: int = 2
    # evaluate on the online-eval prompts while training (log.csv rows split "eval": Figures 2-3); tuning runs, scored
    # by their final validation metric alone, turn it off in the LM regimes (mass_dpo.tuning.scored_on)
    online_eval: bool = True
    # every online evaluation also scores the whole pools of the online-eval prompts (log.csv rows split "pool")
    pool_eval: bool = False
    # test evaluation
    score: str = "logp"  # "logp": policy sequence log-prob; "reward": beta * (log pi - log ref)
    eval_negatives: int = 3  # the fixed negatives of Accuracy and Margin
    eval_seed: int = 0  # their seed, shared by every method
    ks: list[int] = field(default_factory=lambda: [1, 3, 5])

    def __post_init__(self):
        self._check_numbers()
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.regime not in REGIMES:
            raise ValueError(f"unknown regime {self.regime!r}; choose one of {', '.join(REGIMES)}")
        check_selection_score(self.selection_score)
        if self.test_split not in ("test", "valid"):
            raise ValueError(f"test_split must be 'test' or 'valid', got {self.test_split!r}")
        if self.fit not in ("exact", "adam"):
            raise ValueError(f"fit must be 'exact' or 'adam', got {self.fit!r}")
        if float(self.ridge) <= 0:
            raise ValueError(f"ridge must be > 0, got {self.ridge}")
        if self.score not in ("logp", "reward"):
            raise ValueError(f"score must be 'logp' or 'reward', got {self.score!r}")
        if self.negatives is not None and self.negatives not in NEGATIVES:
            raise ValueError(f"unknown negatives {self.negatives!r}; choose one of {', '.join(NEGATIVES)} (or None: "
                             "the method's own)")
        if self.method == "dpo":
            self.n = 1  # DPO: one random negative
        if int(self.n) < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if int(self.trainable_layers) < 1:
            raise ValueError(f"trainable_layers must be >= 1, got {self.trainable_layers}")
        self.ks = [int(k) for k in self.ks]
        self.lora_target_modules = list(self.lora_target_modules)

    #: ``field: (lowest, highest, lowest allowed?)``; every float field must be finite.
    RANGES = {
        "beta": (0, None, False), "gamma": (0, None, False), "ridge": (0, None, False), "fit_tol": (0, None, False),
        "learning_rate": (0, None, False), "num_train_epochs": (0, None, False), "warmup_ratio": (0, 1, True),
        "max_grad_norm": (0, None, False), "weight_decay": (0, None, True), "eval_steps": (0, None, False),
        "logging_steps": (0, None, False), "save_steps": (0, None, False), "lora_dropout": (0, 1, True),
    }

    #: Integer options: ``field: (lowest allowed, None allowed?)``.
    INT_RANGES = {
        "limit": (1, True), "eval_limit": (0, True), "test_limit": (1, True), "per_device_train_batch_size": (1, False),
        "per_device_eval_batch_size": (1, False), "gradient_accumulation_steps": (1, False),
    }
    #: The ``mass-dpo train`` flag of a field whose flag is not ``--<field with dashes>``.
    FLAGS = {"per_device_train_batch_size": "--batch-size", "gradient_accumulation_steps": "--grad-accum",
             "num_train_epochs": "--epochs"}

    @classmethod
    def flag(cls, name: str) -> str:
        """The ``mass-dpo train`` option that sets field ``name``."""
        return cls.FLAGS.get(name, f"--{name.replace('_', '-')}")

    def _check_numbers(self):
        """Every float option finite and in its range (:data:`RANGES`), the counts integers in theirs
        (:data:`INT_RANGES`), the lengths positive integers: a ``ValueError`` naming the option before any work."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value} ({self.flag(f.name)})")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) > FLOAT32_MAX:
                raise ValueError(f"{f.name} must be a number float32 holds (at most {FLOAT32_MAX:.3g}), got "
                                 f"{value:g} ({self.flag(f.name)})")
        for name in ("eval_steps", "logging_steps", "save_steps"):  # transformers: a fraction of the steps, or steps
            value = getattr(self, name)
            if isinstance(value, (int, float)) and value > 1 and value != int(value):
                raise ValueError(f"{name} must be a fraction < 1 of the training steps or a whole number of steps, "
                                 f"got {value:g} ({self.flag(name)})")
        for name, (low, none_ok) in self.INT_RANGES.items():
            value = getattr(self, name)
            if value is None and none_ok:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}{' or None' if none_ok else ''}, got {value!r} "
                                 f"({self.flag(name)})")
        steps = self.max_steps
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or (steps < 1 and steps != -1):
            raise ValueError(f"max_steps must be an integer >= 1, or -1 (train for num_train_epochs), got "
                             f"{self.max_steps!r} (--max-steps)")
        for name, (low, high, closed) in self.RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value) or (value < low if closed else value <= low) or (high is not None and value > high):
                bound = f"{'>=' if closed else '>'} {low}" + (f" and <= {high}" if high is not None else "")
                raise ValueError(f"{name} must be {bound}, got {value} ({self.flag(name)})")
        for name in ("max_length", "max_prompt_length"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")

    @property
    def strategy(self) -> str:
        """The selection strategy of the run's negatives (``negatives``, else the method's own)."""
        return self.negatives or METHOD_STRATEGY[self.method]

    @property
    def splits(self) -> list[str]:
        """The splits a run reads: train, valid for online evaluation (``eval_limit != 0``), and test unless the
        final metrics are measured on valid (``test_split="valid"``, tuning)."""
        return ["train"] + (["valid"] if self.eval_limit != 0 else []) + (["test"] if self.test_split != "valid" else [])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: The largest float32: options are used as float32 tensors (a learning rate of 1e39 overflows there).
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _fields() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainConfig)}


def default_optim() -> str:
    """``paged_adamw_32bit`` when bitsandbytes is importable (the paper's Paged AdamW), else ``adamw_torch``."""
    return "paged_adamw_32bit" if importlib.util.find_spec("bitsandbytes") is not None else "adamw_torch"


def resolve_config(config: TrainConfig | dict | None = None, *, profile: str | None = None, **overrides) -> TrainConfig:
    """A fully resolved :class:`TrainConfig`.

    Precedence, lowest first: dataclass defaults, ``params/training.yaml`` ``defaults``, its ``regimes.<regime>``
    section, its ``profiles.<profile>`` section, then ``config`` / ``overrides`` (``None`` values are ignored).
    The fields of a :class:`TrainConfig` passed as ``config`` count as given where they differ from the dataclass
    defaults (so resolving a resolved config returns it unchanged). ``optim="auto"`` and ``bf16="auto"`` are
    resolved here, so the resolved config says what ran.
    """
    from .params import load_params

    given: dict[str, Any] = {}
    if isinstance(config, TrainConfig):
        given.update(config.to_dict())
    elif config:
        given.update(config)
    given.update(overrides)
    profile = given.pop("profile", None) or profile
    given = {k: v for k, v in given.items() if v is not None}
    unknown = set(given) - _fields()
    if unknown:
        raise ValueError(f"unknown training option(s): {', '.join(sorted(unknown))}")

    params = load_params("training")
    values = dict(params.get("defaults") or {})
    prof: dict[str, Any] = {}
    if profile:
        profiles = params.get("profiles") or {}
        if profile not in profiles:
            raise ValueError(f"unknown profile {profile!r}; params/training.yaml has: {', '.join(profiles)}")
        prof = dict(profiles[profile] or {})
    regime = given.get("regime") or prof.get("regime") or values.get("regime") or TrainConfig.regime
    values.update((params.get("regimes") or {}).get(regime) or {})
    values.update(prof)
    if isinstance(config, TrainConfig):
        # a TrainConfig carries every field: only the ones that differ from the dataclass defaults count as given
        default = TrainConfig().to_dict()
        given = {k: v for k, v in given.items() if k in overrides or v != default.get(k)}
    values.update(given)
    values["regime"] = regime
    unknown = set(values) - _fields()
    if unknown:
        raise ValueError(f"params/training.yaml: unknown option(s) {', '.join(sorted(unknown))}")
    cfg = TrainConfig(**values)
    if cfg.optim == "auto":
        cfg.optim = default_optim()
    if cfg.bf16 == "auto":
        cfg.bf16 = bool(cfg.regime != "loglinear" and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    cfg.bf16 = bool(cfg.bf16)
    if cfg.regime in ("loglinear", "freeze"):  # freeze: k blocks on cached states, nothing to checkpoint
        cfg.gradient_checkpointing = False
    if cfg.regime != "loglinear":
        cfg.fit = "adam"  # the LM regimes always train with the Trainer
    return cfg
