"""Multi-negative DPO training on fixed per-prompt negatives, on top of ``transformers.Trainer``.

A training record is one prompt with its chosen response and a fixed negative subset (chosen by ``mass-dpo select``
before training and never re-drawn: D-optimal for MASS-DPO, random for S-DPO / DPO-k / DMPO, one random negative
for DPO), with the reference log-probs precomputed by extraction, so no reference model sits in memory.
Every loss goes through :func:`mass_dpo.losses.preference_loss`.

Regimes (``TrainConfig.regime``):

- ``full``       every weight of the causal LM (the paper's setting, Appendix C.4);
- ``lora``       a peft LoRA adapter on the attention projections;
- ``loglinear``  Assumption 4.1 on frozen features (:class:`mass_dpo.loglinear.LogLinearPolicy`);
- ``freeze``     the top k blocks and the final norm of the causal LM, on cached lower-block states
                 (:class:`mass_dpo.frozen.FrozenTopPolicy`).

In the LM regimes one forward per prompt shares the prompt across the chosen response and its negatives
(``mass_dpo.forward.shared_prefix_forward``: one packed row with a block mask); in ``freeze`` the records carry
the cached states of that packed row and only the top blocks run.

Distributed training, DeepSpeed and FSDP come from the Trainer and accelerate unchanged; nothing here is
distributed code beyond gathering logged statistics through the Trainer's accelerator.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from .extraction import DEFAULT_SELECTION_SCORE
from .config import (  # noqa: F401 - re-exported: the configuration lives in mass_dpo.config
    METHOD_STRATEGY,
    REGIMES,
    TrainConfig,
    _fields,
    default_optim,
    resolve_config,
)
from .frozen import FrozenTopPolicy
from .loglinear import LogLinearPolicy
from .losses import METHODS, preference_loss
from .metrics import per_prompt_ranking

logger = logging.getLogger("mass_dpo.training")

#: Statistics logged at every logging and evaluation step (TRL's names), and their CSV columns.
STAT_NAMES = {
    "rewards/chosen": "chosen_rewards",
    "rewards/rejected": "rejected_rewards",
    "rewards/margins": "margin",
    "rewards/accuracies": "accuracy",
}


# ---------------------------------------------------------------- records, dataset, collator


class PreferenceDataset(torch.utils.data.Dataset):
    """Per-prompt training records: the chosen candidate and its fixed negatives.

    Args:
        candidates: ``[P, 1 + n]`` candidate indices per prompt, column 0 the chosen one, ``-1`` = no negative.
        ref_logps: ``[P, C]`` reference sequence log-probs of every candidate (``Extracted.ref_logps``).
        features: ``[P, C, d]`` frozen features (``Extracted.features``), for the ``loglinear`` regime.
        pools: per prompt ``(prompt_ids, [candidate_ids, ...])`` (``encode_pool``), for the LM regimes.
        ids: prompt ids.
        states: the pools' cached lower-block states (:class:`mass_dpo.extraction.HiddenStates`), for ``freeze``.

    An item is a dict: ``ref_logps [1+n]``, ``mask [1+n]`` (column 0 always True, absent negatives moved last), and
    either ``features [1+n, d]`` or ``prompt_ids`` (list of int) and ``candidate_ids`` (list of lists of int, chosen
    first, one per True entry of ``mask``); with ``states`` also ``hidden [T, d]``, the states of the packed row
    ``[prompt, chosen, negatives...]`` in that order.
    """

    def __init__(self, candidates, ref_logps, *, features=None, pools=None, ids=None, states=None):
        self.candidates = torch.as_tensor(candidates, dtype=torch.long)
        self.ref_logps = torch.as_tensor(ref_logps, dtype=torch.float32)
        self.features = None if features is None else torch.as_tensor(features)
        self.pools = pools
        self.ids = list(ids) if ids is not None else [str(i) for i in range(len(self.candidates))]
        P = self.candidates.shape[0]
        if self.candidates.dim() != 2 or self.candidates.shape[1] < 2:
            raise ValueError(f"candidates must be [P, 1 + n] with n >= 1, got {tuple(self.candidates.shape)}")
        if (self.candidates[:, 0] < 0).any():
            raise ValueError("column 0 (the chosen candidate) must be a valid index")
        if not (self.candidates[:, 1:] >= 0).any(-1).all():
            raise ValueError("every prompt needs at least one negative")
        if self.ref_logps.shape[0] != P or len(self.ids) != P:
            raise ValueError("candidates, ref_logps and ids must have one row per prompt")
        if features is None and pools is None:
            raise ValueError("give features (loglinear regime) or pools (LM regimes)")
        if self.features is not None and self.features.shape[:2] != self.ref_logps.shape:
            raise ValueError(f"features {tuple(self.features.shape)} and ref_logps {tuple(self.ref_logps.shape)} disagree")
        if pools is not None and len(pools) != P:
            raise ValueError(f"{len(pools)} pools for {P} prompts")
        if self.ref_logps.dim() == 2 and int(self.candidates.max()) < self.ref_logps.shape[1]:
            # once here, not at every step: the loss is computed with check_finite=False
            scored = torch.gather(self.ref_logps, 1, self.candidates.clamp(min=0))
            bad = ~torch.isfinite(scored) & (self.candidates >= 0)
            if bad.any():
                row, col = (int(i) for i in bad.nonzero()[0])
                raise ValueError(f"ref_logps is {float(scored[row, col])} for prompt {self.ids[row]!r}, candidate "
                                 f"{int(self.candidates[row, col])}: every scored sequence needs a finite reference "
                                 "log-probability")
        if states is not None:
            if pools is None:
                raise ValueError("cached states need the pools (their token ids)")
            states.check_pools(pools)
        self.states = states

    def __len__(self) -> int:
        return int(self.candidates.shape[0])

    def columns(self, pool_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(values, ref_logps, mask)``, each ``[P, 1 + n]`` in item order (chosen first, absent negatives last,
        0 there): ``pool_values [P, C]`` (e.g. every candidate's policy log-prob) at each record's candidates."""
        idx = self.candidates.gather(1, torch.argsort((self.candidates < 0).to(torch.int8), dim=1, stable=True))
        mask = idx >= 0
        safe = idx.clamp_min(0)
        pool_values = torch.as_tensor(pool_values)
        values = torch.where(mask, pool_values.gather(1, safe), torch.zeros((), dtype=pool_values.dtype))
        return values, torch.where(mask, self.ref_logps.gather(1, safe), torch.zeros(())), mask

    def __getitem__(self, i: int) -> dict[str, Any]:
        idx = self.candidates[i]
        idx = idx[torch.argsort((idx < 0).to(torch.int8), stable=True)]  # absent negatives last
        mask = idx >= 0
        safe = idx.clamp_min(0)
        item: dict[str, Any] = {
            "ref_logps": torch.where(mask, self.ref_logps[i, safe], torch.zeros(())),
            "mask": mask,
        }
        if self.features is not None:
            item["features"] = self.features[i, safe].float() * mask[:, None]
        else:
            prompt_ids, cand_ids = self.pools[i]
            item["prompt_ids"] = list(prompt_ids)
            item["candidate_ids"] = [list(cand_ids[j]) for j in idx[mask].tolist()]
            if self.states is not None:
                item["hidden"] = self.states.gather(i, idx[mask].tolist())
        return item

    @classmethod
    def from_selection(cls, extracted, negatives, *, pools=None, with_features: bool | None = None,
                       states=None, ref_logps=None):
        """Records from an ``Extracted`` (``target``, ``ref_logps``, ``features``, ``ids``) and ``negatives`` ``[P, n]``
        (indices into each pool, ``-1`` = none). ``with_features`` defaults to ``pools is None`` (loglinear);
        ``states`` (freeze: ``extracted.states``) and ``ref_logps`` ``[P, C]`` (default ``extracted.ref_logps``)."""
        negatives = torch.as_tensor(negatives, dtype=torch.long)
        target = torch.as_tensor(extracted.target, dtype=torch.long)
        if negatives.dim() != 2 or negatives.shape[0] != target.shape[0]:
            raise ValueError(f"negatives must be [P, n] with P = {target.shape[0]}, got {tuple(negatives.shape)}")
        if (negatives == target[:, None]).any():
            raise ValueError("a selected negative is the chosen candidate")
        with_features = pools is None if with_features is None else with_features
        return cls(
            torch.cat([target[:, None], negatives], dim=1),
            extracted.ref_logps if ref_logps is None else ref_logps,
            features=extracted.features if with_features else None,
            pools=pools,
            ids=extracted.ids,
            states=states,
        )


class PreferenceCollator:
    """Batches :class:`PreferenceDataset` items, padding the number of negatives (``mask`` False on padding).

    Output: ``ref_logps [B, 1+K]``, ``mask [B, 1+K]`` and ``features [B, 1+K, d]`` or ``prompt_ids`` (list of B
    lists) and ``candidate_ids`` (list of B lists of candidate id lists, chosen first); with cached states also
    ``hidden [B, T, d]`` (right-padded packed rows, the states' dtype).
    """

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        from torch.nn.utils.rnn import pad_sequence

        def pad(key: str) -> torch.Tensor:  # [B, longest, ...], zeros (False) after each item's own length
            return pad_sequence([it[key] for it in items], batch_first=True)

        batch: dict[str, Any] = {"ref_logps": pad("ref_logps").float(), "mask": pad("mask")}
        if "features" in items[0]:
            batch["features"] = pad("features").float()
        else:
            batch["prompt_ids"] = [it["prompt_ids"] for it in items]
            batch["candidate_ids"] = [it["candidate_ids"] for it in items]
        if "hidden" in items[0]:
            batch["hidden"] = pad("hidden")
        return batch


# ---------------------------------------------------------------- negatives


def select_training_negatives(
    extracted, method: str, n: int, *, beta: float = 0.1, gamma: float = 0.1, seed: int = 0,
    selection_score: str = DEFAULT_SELECTION_SCORE, strategy: str | None = None,
) -> torch.Tensor:
    """``[P, n]`` fixed negatives per prompt (candidate indices), selected in memory exactly as ``mass-dpo select``
    does (:func:`mass_dpo.preprocess.select_extracted`): D-optimal (Algorithm 1) for ``mass_dpo``, uniform random
    for the others (one for ``dpo``), or ``strategy`` when given (``TrainConfig.negatives``: ``hardest``,
    ``longest``, ...), Algorithm 1's q under the reading ``selection_score`` (``TrainConfig``'s).
    The chosen candidate is never a negative; ``-1`` pads small pools."""
    from .preprocess import select_extracted

    n = 1 if method == "dpo" else int(n)
    picked = select_extracted(extracted, n, strategy=strategy or METHOD_STRATEGY[method], beta=beta, gamma=gamma,
                              seed=seed, selection_score=selection_score)
    return picked["indices"].long()


def negatives_from_jsonl(path, ids: Sequence[str], n: int | None = None) -> torch.Tensor:
    """``[P, n]`` negatives read from a ``mass-dpo select`` JSONL file, in the order of ``ids``: its default pair rows
    (``id``, ``rank``, ``index``: one per kept negative) or its ``--grouped`` rows (``id``, ``indices``); ``n``
    defaults to the longest list, ``-1`` pads shorter ones."""
    import json

    by_id: dict[str, list[int]] = {}
    ranked: dict[str, list[tuple[int, int]]] = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "indices" in row:
                by_id[str(row["id"])] = [int(i) for i in row["indices"] if int(i) >= 0]
            elif "index" in row and "rank" in row:
                ranked.setdefault(str(row["id"]), []).append((int(row["rank"]), int(row["index"])))
            else:
                raise KeyError(f"{path} line {lineno}: neither 'indices' (select --grouped) nor 'index' and 'rank' "
                               "(select's pair rows): not a mass-dpo select output")
    by_id.update({i: [index for _, index in sorted(pairs)] for i, pairs in ranked.items()})
    missing = [i for i in ids if str(i) not in by_id]
    if missing:
        raise KeyError(f"{len(missing)} prompt(s) have no selection in {path}, e.g. {missing[:3]}")
    rows = [by_id[str(i)] for i in ids]
    n = max(len(r) for r in rows) if n is None else int(n)
    out = torch.full((len(rows), n), -1, dtype=torch.long)
    for p, r in enumerate(rows):
        r = r[:n]
        out[p, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


# ---------------------------------------------------------------- policy log-probs


def pool_logps(model: nn.Module, prompt_ids, candidate_ids, mask: torch.Tensor, *, forward: Callable | None = None):
    """``[B, W]`` sequence log-probs of B pools (chosen first), 0 where ``mask`` ``[B, W]`` is False; differentiable.

    Default: ``mass_dpo.forward.shared_prefix_forward_batch`` (one packed row per prompt: the prompt once, then
    every response with a block mask; one forward for the batch). ``forward(model, prompt_ids, candidate_ids,
    return_features=False) -> (logps [C], _)`` replaces it, one call per pool: ``mass_dpo.forward.naive_forward``
    is the one-row-per-response forward (a pool's ``[prompt, response]`` rows in one padded forward, S-DPO's layout).
    """
    if forward is None:
        from .forward import shared_prefix_forward_batch

        logps, _, _ = shared_prefix_forward_batch(model, list(zip(prompt_ids, candidate_ids)), return_features=False)
        rows = list(logps.float())
    else:
        rows = [forward(model, p, c, return_features=False)[0].float() for p, c in zip(prompt_ids, candidate_ids)]
    width = mask.shape[1]
    out = torch.stack([torch.cat([r[:width], r.new_zeros(max(0, width - r.shape[0]))]) for r in rows])
    out = out.to(mask.device)
    return torch.where(mask, out, torch.zeros_like(out))


def enable_pool_forward(model: nn.Module, forward: Callable | None = None) -> nn.Module:
    """Make ``model(prompt_ids=..., candidate_ids=..., mask=...)`` return :func:`pool_logps` ``[B, W]``.

    The Trainer (and DDP / FSDP / DeepSpeed wrapping it) then runs each step through the model's own ``forward``, so
    gradient synchronisation works unchanged; any other call goes to the original ``forward``. The model stays a
    ``PreTrainedModel`` / ``PeftModel`` for saving and loading. Idempotent; returns ``model``.
    """
    model._mass_dpo_pool_fn = forward
    if getattr(model, "_mass_dpo_original_forward", None) is not None:
        return model
    original = model.forward

    def forward_with_pools(*args, prompt_ids=None, candidate_ids=None, mask=None, **kwargs):
        if candidate_ids is None:
            return original(*args, **kwargs)
        return pool_logps(model, prompt_ids, candidate_ids, mask, forward=model._mass_dpo_pool_fn)

    model._mass_dpo_original_forward = original
    model.forward = forward_with_pools
    return model


def policy_logps(model: nn.Module, inputs: dict[str, Any], *, forward: Callable | None = None) -> torch.Tensor:
    """``[B, 1+K]`` policy sequence log-probs of a collated batch (0 where ``mask`` is False).

    Loglinear batches (``features``) go through ``model(features, ref_logps, mask)``; freeze batches (``hidden``)
    through ``model(prompt_ids=..., candidate_ids=..., mask=..., hidden=...)`` (:class:`FrozenTopPolicy`). LM batches
    go through ``model(prompt_ids=..., candidate_ids=..., mask=...)`` (see :func:`enable_pool_forward`), or, when
    ``forward`` is given or the model has no pool forward, straight through :func:`pool_logps`.
    """
    mask = inputs["mask"]
    if "features" in inputs:
        return model(inputs["features"], inputs["ref_logps"], mask)
    if "hidden" in inputs:
        return model(prompt_ids=inputs["prompt_ids"], candidate_ids=inputs["candidate_ids"], mask=mask,
                     hidden=inputs["hidden"])
    if forward is None and _has_pool_forward(model):
        return model(prompt_ids=inputs["prompt_ids"], candidate_ids=inputs["candidate_ids"], mask=mask)
    return pool_logps(model, inputs["prompt_ids"], inputs["candidate_ids"], mask, forward=forward)


def _has_pool_forward(model) -> bool:
    while model is not None:
        if getattr(model, "_mass_dpo_original_forward", None) is not None:
            return True
        model = getattr(model, "module", None)  # DDP / DeepSpeed / FSDP wrappers
    return False


def batch_loss(method: str, beta: float, logps: torch.Tensor, inputs: dict[str, Any]):
    """:func:`preference_loss` of a collated batch given its policy log-probs ``[B, 1+K]`` (column 0 chosen)."""
    ref, mask = inputs["ref_logps"].to(logps.device), inputs["mask"].to(logps.device)
    return preference_loss(
        method, logps[:, 0], logps[:, 1:], ref[:, 0], ref[:, 1:], beta=beta, mask=mask[:, 1:], check_finite=False
    )


def _example_stats(out, mask: torch.Tensor) -> torch.Tensor:
    """``[B, 5]``: loss, chosen reward, mean rejected reward, margin, accuracy per example."""
    neg = mask[:, 1:].to(out.rejected_rewards.device)
    rej = (out.rejected_rewards * neg).sum(-1) / neg.sum(-1).clamp_min(1)
    return torch.stack(
        [out.loss.detach().float(), out.chosen_rewards.float(), rej.float(), out.margins.float(), out.accuracy.float()],
        dim=-1,
    )


_STAT_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


class PoolEval:
    """Figures 2-3 on common whole pools: at every evaluation, the policy's log-prob of *every* candidate of the
    online-eval prompts (the same candidates for every method, unlike each method's own negatives).

    With the implicit reward ``r = beta (log pi - log pi_ref)`` (as :func:`mass_dpo.experiments.main_comparison.
    pool_curve_point` defines them for the log-linear regime): ``margin`` = the chosen reward minus the mean reward of
    the pool's negatives, ``accuracy`` = Recall@1 of the reward over the pool (ties at random in expectation: the
    untrained policy sits at 1 / pool size), ``mrr`` = its MRR, ``logp_mrr`` = the MRR of the log-prob (the test's
    ranking score), ``chosen_rewards``, ``rejected_rewards`` (mean over the pool's negatives); means over prompts.

    Args:
        score: ``score(model) -> [P, C]`` policy log-probs of every candidate, without gradient (the freeze
            regime: :func:`mass_dpo.frozen.score_states` on the cached states; the others:
            :func:`mass_dpo.evaluation.score_candidates`).
        ref_logps, mask: ``[P, C]``; target: ``[P]``; beta: the DPO scale.
        records: the online-eval records of the same prompts (each method's own negatives), or ``None``: the
            trainer then reads their statistics from the same scores (:meth:`PreferenceDataset.columns`) instead of
            a second forward over those prompts.
    """

    KEYS = ("margin", "accuracy", "mrr", "logp_mrr", "chosen_rewards", "rejected_rewards")

    def __init__(self, score: Callable[[nn.Module], torch.Tensor], ref_logps, mask, target, *, beta: float,
                 records: PreferenceDataset | None = None):
        self.score, self.beta, self.records = score, float(beta), records
        self.ref_logps = torch.as_tensor(ref_logps, dtype=torch.float64)
        self.mask = torch.as_tensor(mask).bool()
        self.target = torch.as_tensor(target).long()
        if records is not None and tuple(records.ref_logps.shape) != tuple(self.ref_logps.shape):
            raise ValueError(f"the records' pools {tuple(records.ref_logps.shape)} are not the scored pools "
                             f"{tuple(self.ref_logps.shape)}")

    def __call__(self, model: nn.Module) -> dict[str, float]:
        return self.stats(self.score(model))

    def stats(self, logps: torch.Tensor) -> dict[str, float]:
        """The whole-pool statistics of ``logps`` ``[P, C]`` (the policy's log-prob of every candidate)."""
        logps = logps.double().cpu()
        rows = torch.arange(len(self.target))
        reward = self.beta * (logps - self.ref_logps)
        neg = self.mask.clone()
        neg[rows, self.target] = False
        chosen = reward[rows, self.target]
        rejected = (reward * neg).sum(-1) / neg.sum(-1).clamp_min(1)
        by_reward = per_prompt_ranking(reward.masked_fill(~self.mask, float("-inf")), self.target, ks=(1,),
                                       mask=self.mask)
        by_logp = per_prompt_ranking(logps.masked_fill(~self.mask, float("-inf")), self.target, ks=(1,),
                                     mask=self.mask)
        return {"margin": float((chosen - rejected).mean()), "accuracy": float(by_reward["recall@1"].mean()),
                "mrr": float(by_reward["mrr"].mean()), "logp_mrr": float(by_logp["mrr"].mean()),
                "chosen_rewards": float(chosen.mean()), "rejected_rewards": float(rejected.mean())}


# ---------------------------------------------------------------- trainer


class MultiNegativeTrainer(Trainer):
    """``transformers.Trainer`` with a multi-negative preference loss (``method``, ``beta``) on fixed negatives.

    Training logs add the batch means of ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` and
    ``rewards/accuracies`` (gathered over processes); :meth:`evaluate` reports ``eval_loss`` and the same
    statistics over the online-eval set, and with ``pool_eval`` (a :class:`PoolEval`) the whole-pool statistics as
    ``eval_pool_<name>``.
    """

    def __init__(self, *args, method: str, beta: float, forward: Callable | None = None,
                 pool_eval: PoolEval | None = None, **kwargs):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        kwargs.setdefault("data_collator", PreferenceCollator())
        super().__init__(*args, **kwargs)
        self.method, self.beta, self.forward, self.pool_eval = method, float(beta), forward, pool_eval
        if not isinstance(self.model, (LogLinearPolicy, FrozenTopPolicy)):
            enable_pool_forward(self.model, forward)  # one model forward per step, through any DDP/FSDP wrapper
        self.model_accepts_loss_kwargs = False  # our loss is a per-prompt mean: the Trainer scales it for accumulation
        self._train_stats: list[torch.Tensor] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logps = policy_logps(model, inputs)
        out = batch_loss(self.method, self.beta, logps, inputs)
        if model.training:
            self._train_stats.append(_example_stats(out, inputs["mask"]).detach())
        loss = out.loss.mean()
        return (loss, out) if return_outputs else loss

    def _mean_stats(self, stats: list[torch.Tensor]) -> dict[str, float]:
        local = torch.cat(stats) if stats else torch.zeros(0, len(_STAT_KEYS))
        local = local.to(self.args.device)
        sums = torch.cat([local.sum(0), local.new_tensor([local.shape[0]])])
        if self.accelerator.num_processes > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        count = float(sums[-1])
        return {k: float(sums[i]) / count for i, k in enumerate(_STAT_KEYS)} if count else {}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and not any(k.startswith("eval_") for k in logs):
            stats = self._mean_stats(self._train_stats)
            self._train_stats = []
            logs = {**logs, **{k: v for k, v in stats.items() if k != "loss"}}
        super().log(logs, start_time)

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Loss and reward statistics over the online-eval set (every process scores its shard), and the whole-pool
        ones with ``pool_eval``: when its ``records`` are the online-eval set, the own negatives' statistics are read
        from the whole-pool scores (one pass over those prompts, in every process)."""
        model = self.model_wrapped if self.model_wrapped is not None else self.model
        was_training = model.training
        model.eval()
        stats = []
        shared = self.pool_eval is not None and eval_dataset is None and self.pool_eval.records is self.eval_dataset
        if shared:  # the own negatives are candidates of the scored pools: their statistics from the same scores
            scores = self.pool_eval.score(self.accelerator.unwrap_model(model)).cpu()
            pool = self.pool_eval.stats(scores)
            logps, ref, mask = self.eval_dataset.columns(scores.float())
            stats.append(_example_stats(batch_loss(self.method, self.beta, logps, {"ref_logps": ref, "mask": mask}),
                                        mask))
        else:
            for batch in self.get_eval_dataloader(eval_dataset):
                inputs = self._prepare_inputs(batch)
                logps = policy_logps(model, inputs)
                out = batch_loss(self.method, self.beta, logps, inputs)
                stats.append(self.accelerator.gather_for_metrics(_example_stats(out, inputs["mask"])))
            if self.pool_eval is not None:
                pool = self.pool_eval(self.accelerator.unwrap_model(model))
        model.train(was_training)
        allstats = torch.cat(stats).float().cpu() if stats else torch.zeros(0, len(_STAT_KEYS))
        metrics = {f"{metric_key_prefix}_{k}": float(allstats[:, i].mean()) for i, k in enumerate(_STAT_KEYS)}
        metrics[f"{metric_key_prefix}_samples"] = int(allstats.shape[0])
        if self.pool_eval is not None:
            metrics.update({f"{metric_key_prefix}_pool_{k}": v for k, v in pool.items()})
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


class CSVLogCallback(TrainerCallback):
    """Appends every train log and every evaluation to ``path`` (one row each; world process zero only).

    Columns: ``step, epoch, split`` (``train``, ``eval``, or ``pool``: the whole pools of the online-eval prompts,
    :class:`PoolEval`), ``loss, margin, accuracy, chosen_rewards, rejected_rewards`` (the quantities of Figures
    2-3), ``learning_rate, grad_norm``, and on ``pool`` rows ``mrr, logp_mrr``. On resume, rows logged after the
    checkpoint's step are dropped so that the log reads as one uninterrupted run.
    """

    COLUMNS = ("step", "epoch", "split", "loss", "margin", "accuracy", "chosen_rewards", "rejected_rewards",
               "learning_rate", "grad_norm", "mrr", "logp_mrr")

    def __init__(self, path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from .files import atomic_path

        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if self.path.is_file():
            with open(self.path, newline="") as f:  # a row cut by a kill (fewer fields) is dropped
                rows = [r for r in csv.DictReader(f) if None not in r.values() and None not in r
                        and str(r.get("step") or "").isdigit() and int(r["step"]) <= state.global_step]
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.COLUMNS)
            w.writeheader()
            w.writerows(rows)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "eval_loss" in logs:
            split, prefix = "eval", "eval_"
        elif "loss" in logs:
            split, prefix = "train", ""
        else:
            return
        row: dict[str, Any] = {"step": state.global_step, "epoch": state.epoch, "split": split}
        row["loss"] = logs.get(prefix + "loss")
        for key, col in STAT_NAMES.items():
            row[col] = logs.get(prefix + key)
        row["learning_rate"] = logs.get("learning_rate")
        row["grad_norm"] = logs.get("grad_norm")
        rows = [row]
        if split == "eval" and "eval_pool_margin" in logs:
            rows.append({"step": state.global_step, "epoch": state.epoch, "split": "pool",
                         **{k: logs.get(f"eval_pool_{k}") for k in PoolEval.KEYS}})
        new = not self.path.is_file()
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.COLUMNS)
            if new:
                w.writeheader()
            w.writerows(rows)


class SnapshotCallback(TrainerCallback):
    """Saves a :class:`FrozenTopPolicy`'s trainable weights half-way through training to ``<folder>/mid``
    (:func:`mass_dpo.frozen.save_trainable`, step ``max_steps // 2``, at least 1): with the final weights, the two
    checkpoints Table 4 re-extracts from. Written before that step's checkpoint, so a resumed run has it."""

    def __init__(self, folder):
        self.folder = Path(folder)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        from .frozen import save_trainable

        if state.is_world_process_zero and state.global_step == max(1, state.max_steps // 2):
            save_trainable(getattr(model, "module", model), self.folder / "mid", step=state.global_step)


# ---------------------------------------------------------------- arguments, policy, trainer


def training_arguments(config: TrainConfig, output_dir, *, has_eval: bool = True, **extra) -> TrainingArguments:
    """``TrainingArguments`` of a resolved config (paper defaults; ``warmup_ratio`` becomes a fractional
    ``warmup_steps``, as transformers 5 spells it)."""
    lm = config.regime != "loglinear"
    optim = default_optim() if config.optim == "auto" else config.optim
    logger.info("optimizer: %s%s", optim, "" if optim.startswith("paged") else " (bitsandbytes not importable: no paged AdamW)")
    kwargs = dict(
        output_dir=str(output_dir),
        learning_rate=config.learning_rate,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_ratio,
        max_grad_norm=config.max_grad_norm,
        weight_decay=config.weight_decay,
        optim=optim,
        **_checkpointing_args(bool(lm and config.gradient_checkpointing)),
        bf16=bool(lm and config.bf16 is True),
        use_cpu=not torch.cuda.is_available(),
        eval_strategy="steps" if has_eval else "no",
        eval_steps=config.eval_steps if has_eval else None,
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        data_seed=config.seed,
        remove_unused_columns=False,
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
        ddp_find_unused_parameters=False,
    )
    kwargs.update(extra)
    return TrainingArguments(**kwargs)


def _checkpointing_args(enabled: bool) -> dict[str, Any]:
    """Gradient checkpointing, under the name this transformers version uses (``activation_checkpointing`` in 5.x)."""
    import inspect

    params = inspect.signature(TrainingArguments.__init__).parameters
    name = "activation_checkpointing" if "activation_checkpointing" in params else "gradient_checkpointing"
    if not enabled:
        return {}
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}


def build_policy(config: TrainConfig, model: nn.Module | None = None, *, dim: int | None = None) -> nn.Module:
    """The trainable policy of a regime: a zero-init :class:`LogLinearPolicy` of dimension ``dim``, the causal LM
    itself (``full``), the LM wrapped in a peft LoRA adapter (``lora``), or its top ``trainable_layers`` blocks and
    final norm (``freeze``: a :class:`FrozenTopPolicy`; the model itself is not changed)."""
    if config.regime == "loglinear":
        if dim is None:
            raise ValueError("the loglinear regime needs the feature dimension (dim)")
        return LogLinearPolicy(dim)
    if model is None:
        raise ValueError(f"the {config.regime} regime needs a causal LM")
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    if config.regime == "full":
        return model.train()
    if config.regime == "freeze":
        return FrozenTopPolicy(model, config.trainable_layers, name=config.model).train()
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
        task_type="CAUSAL_LM",
    )
    if config.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return get_peft_model(model, lora)


def build_trainer(
    config: TrainConfig,
    policy: nn.Module,
    train_dataset: PreferenceDataset,
    eval_dataset: PreferenceDataset | None = None,
    *,
    output_dir,
    callbacks: list[TrainerCallback] | None = None,
    forward: Callable | None = None,
    pool_eval: PoolEval | None = None,
    **args_overrides,
) -> MultiNegativeTrainer:
    """A :class:`MultiNegativeTrainer` for ``policy`` on fixed-negative records (``args_overrides`` go to
    :func:`training_arguments`; ``pool_eval``: the whole-pool statistics of every evaluation)."""
    args = training_arguments(config, output_dir, has_eval=eval_dataset is not None, **args_overrides)
    return MultiNegativeTrainer(
        model=policy,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        callbacks=callbacks,
        method=config.method,
        beta=config.beta,
        forward=forward,
        pool_eval=pool_eval,
    )


#: Model weights a Trainer checkpoint may hold (full model, LoRA adapter, sharded index, or the torch formats).
_WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "adapter_model.bin", "pytorch_model.bin.index.json")


def _readable(path: Path) -> bool:
    """Whether a file written by the Trainer can be read back: a safetensors header that covers the whole file,
    a torch zip archive with its central directory (lost when a write was cut short), a JSON document."""
    import json
    import zipfile

    try:
        if path.stat().st_size == 0:
            return False
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                f.keys()
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix in (".pt", ".pth", ".bin"):
            with zipfile.ZipFile(path) as z:
                z.namelist()
        return True
    except Exception:  # noqa: BLE001 - any failure to read means the file is not usable
        return False


def _dcp_dirs(folder: Path, prefix: str) -> list[Path]:
    """FSDP sharded-state folders (torch.distributed.checkpoint: a ``.metadata`` file beside the shards)."""
    return [p for p in folder.glob(f"{prefix}_*") if p.is_dir() and (p / ".metadata").is_file()]


def _weights_problem(folder: Path) -> str | None:
    for name in _WEIGHT_FILES:
        path = folder / name
        if not path.exists():
            continue
        if not _readable(path):
            return f"{name} is empty or truncated"
        if name.endswith(".index.json"):
            import json

            shards = sorted(set(json.loads(path.read_text()).get("weight_map", {}).values()))
            bad = [s for s in shards if not _readable(folder / s)]
            if bad:
                return f"weight shards missing or truncated: {', '.join(bad)}"
        return None
    fsdp = sorted(folder.glob("pytorch_model_fsdp*.bin"))  # FSDP full or local state dict (accelerate's names)
    if fsdp:
        bad = [p.name for p in fsdp if not _readable(p)]
        return f"{', '.join(bad)} empty or truncated" if bad else None
    if _dcp_dirs(folder, "pytorch_model_fsdp"):
        return None
    if (folder / "latest").is_file():
        return None  # DeepSpeed: the engine's folder is checked with the optimizer
    return "no model weights"


def _optimizer_problem(folder: Path) -> str | None:
    if (folder / "latest").is_file():  # DeepSpeed: weights and optimizer states live in global_step<N>/
        tag = folder / (folder / "latest").read_text().strip()
        return None if tag.is_dir() and any(tag.iterdir()) else f"DeepSpeed folder {tag.name} missing or empty"
    # optimizer.pt (Trainer), optimizer.bin / optimizer_*rank*.bin / optimizer_0/ (FSDP through accelerate)
    files = [p for p in [folder / "optimizer.pt", folder / "optimizer.bin", *folder.glob("optimizer_*rank*.bin")]
             if p.exists()]
    if not files and not _dcp_dirs(folder, "optimizer"):
        return "no optimizer.pt"
    bad = [p.name for p in files if not _readable(p)]
    if bad:
        return f"{', '.join(bad)} is empty or truncated"
    if not (folder / "scheduler.pt").exists():
        return "no scheduler.pt"
    if not _readable(folder / "scheduler.pt"):
        return "scheduler.pt is empty or truncated"
    return None


def checkpoint_problem(folder) -> str | None:
    """Why a Trainer checkpoint folder cannot be resumed from, or ``None`` when it is complete: its trainer state,
    model weights, optimizer and scheduler states and RNG states are present and readable (a run killed while
    writing a checkpoint leaves some of them missing, empty or truncated)."""
    folder = Path(folder)
    state = folder / "trainer_state.json"
    if not state.exists():
        return "no trainer_state.json"
    if not _readable(state):
        return "trainer_state.json is empty or truncated"
    problem = _weights_problem(folder) or _optimizer_problem(folder)
    if problem:
        return problem
    rng = sorted(folder.glob("rng_state*.pth"))
    if not rng:
        return "no rng_state.pth"
    bad = [p.name for p in rng if not _readable(p)]
    return f"{', '.join(bad)} empty or truncated" if bad else None


def checkpoints_newest_first(output_dir) -> list[Path]:
    """The ``checkpoint-<step>`` folders under ``output_dir``, highest step first."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        step = p.name[len(PREFIX_CHECKPOINT_DIR) + 1:]
        if p.is_dir() and p.name.startswith(PREFIX_CHECKPOINT_DIR + "-") and step.isdigit():
            found.append((int(step), p))
    return [p for _, p in sorted(found, reverse=True)]


def last_checkpoint(output_dir, *, discard_incomplete: bool = False) -> str | None:
    """The newest *complete* ``checkpoint-<step>`` folder under ``output_dir`` (:func:`checkpoint_problem`), else
    ``None``.

    A newer incomplete checkpoint (a run killed while writing it) is skipped and reported on the console and in
    the ``mass_dpo`` log; with ``discard_incomplete`` it is also deleted, so that the resumed run writes that
    step afresh (only the main process should pass it).
    """
    for folder in checkpoints_newest_first(output_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            return str(folder)
        msg = f"skipping incomplete checkpoint {folder} ({problem}); resuming from the newest complete one before it"
        logger.warning(msg)
        if not _logs_to_console():
            print(f"mass_dpo: {msg}", file=sys.stderr, flush=True)
        if discard_incomplete:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
    return None


def adopt_checkpoint_steps(args: TrainingArguments, checkpoint) -> None:
    """Write into ``args`` the logging / eval / save step counts that ``checkpoint`` resolved their fractions to.

    A resumed Trainer goes on with the counts in the checkpoint's ``trainer_state.json`` whatever ``args`` say,
    and warns when ``args`` hold a fraction (0.05 of the steps) instead of the count (4) it resolved to. Where the
    fraction gives that very count (``ceil(max_steps * fraction)``), the schedule is the same and the count is
    written back, so the warning is left for a real difference."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    for name in ("logging_steps", "eval_steps", "save_steps"):
        ours, theirs = getattr(args, name, None), state.get(name)
        if ours is not None and theirs is not None and 0 < ours < 1 and math.ceil(state["max_steps"] * ours) == theirs:
            setattr(args, name, theirs)


def _logs_to_console() -> bool:
    """Whether a ``mass_dpo.training`` warning already reaches the console (a stream handler on the way up)."""
    log = logger
    while log is not None:
        if any(type(h) is logging.StreamHandler for h in log.handlers):
            return True
        log = log.parent if log.propagate else None
    return False


def steps_per_epoch(n_records: int, config: TrainConfig, world_size: int = 1) -> int:
    """Optimizer steps per epoch for ``n_records`` training prompts."""
    batches = math.ceil(n_records / (config.per_device_train_batch_size * world_size))
    return max(1, math.ceil(batches / config.gradient_accumulation_steps))
