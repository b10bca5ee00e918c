"""Ranking evaluation of a trained policy on the test prompts (Section 6, Tables 1, 2, 5, 6, 8).

Every candidate of every test prompt (up to 20; 8 for QASC) is scored two ways: by the implicit reward
``beta * (log pi_theta(y | x) - log pi_ref(y | x))`` and by the policy's sequence log-prob ``log pi_theta(y | x)``;
``TrainConfig.score`` names the one whose metrics are unprefixed (the other's carry ``reward_`` / ``logp_``).
From the scores ``[P, C]``, through :mod:`mass_dpo.metrics` (ties broken at random in expectation):

- Accuracy: top-1 over the whole pool, as the paper's Table 1 (generation-based HitRatio@1 for a causal LM, the
  top-1 of the score in the log-linear regime);
- Recall@k, NDCG@k (k = 1, 3, 5) and MRR against the whole pool;
- pairwise accuracy and margin against a fixed set of 3 negatives per prompt, drawn once by :func:`fixed_negatives`
  from the prompt id and a seed, so every method is scored against the same negatives.

The untrained policy (:func:`reference_policy`) scored the same way is every table's ``reference`` row.
Definitions are in ``docs/training.md``; every metric comes with its standard error.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .frozen import FrozenTopPolicy
from .loglinear import LogLinearPolicy
from .metrics import mean_se, per_prompt_preference, per_prompt_ranking, preference_metrics, ranking_metrics


def fixed_negatives(ids: Sequence[str], mask, target, k: int = 3, *, seed: int = 0) -> torch.Tensor:
    """``[P, k]`` candidate indices: per prompt, ``k`` distinct non-target valid candidates drawn uniformly.

    The draw depends only on ``(seed, prompt id, pool)``, not on the order, the number of prompts or the method,
    so every method and every subset of the test set sees the same negatives. ``-1`` pads pools with fewer than
    ``k`` negatives.
    """
    mask = torch.as_tensor(mask).bool()
    target = torch.as_tensor(target).long()
    P, C = mask.shape
    if len(ids) != P or target.shape != (P,):
        raise ValueError(f"ids ({len(ids)}), mask {tuple(mask.shape)} and target {tuple(target.shape)} disagree")
    out = torch.full((P, k), -1, dtype=torch.long)
    for p in range(P):
        valid = [i for i in range(C) if bool(mask[p, i]) and i != int(target[p])]
        digest = hashlib.sha256(f"mass-dpo-eval-negatives:{seed}:{ids[p]}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "little"))
        pick = rng.sample(valid, min(k, len(valid)))
        out[p, : len(pick)] = torch.tensor(pick, dtype=torch.long)
    return out


def metrics_from_scores(scores, target, *, negatives, mask=None, ks: Sequence[int] = (1, 3, 5)) -> dict[str, float]:
    """All test metrics of candidate scores.

    Args:
        scores: ``[P, C]`` higher = better; target: ``[P]`` chosen candidate; negatives: ``[P, k]`` fixed negatives
            (``-1`` = none) for Accuracy and Margin; mask: ``[P, C]`` valid candidates; ks: Recall/NDCG cut-offs.

    Returns:
        ``accuracy, margin, recall@k, ndcg@k, mrr`` and each one's ``_se``, plus ``prompts``.
    """
    scores = torch.as_tensor(scores).to(torch.float64)
    target = torch.as_tensor(target).long()
    negatives = torch.as_tensor(negatives).long()
    rows = torch.arange(scores.shape[0])
    neg_mask = negatives >= 0
    chosen = scores[rows, target]
    rejected = torch.gather(scores, 1, negatives.clamp_min(0))
    out = dict(preference_metrics(chosen, rejected, mask=neg_mask))
    out.update(ranking_metrics(scores, target, ks=tuple(ks), mask=mask))
    out["prompts"] = int(scores.shape[0])
    return out


@torch.no_grad()
def score_candidates(
    policy: nn.Module,
    data,
    *,
    pools: Sequence[tuple[list[int], list[list[int]]]] | None = None,
    forward: Callable | None = None,
    pooling: str = "all",
    batch_size: int = 8,
    states=None,
) -> torch.Tensor:
    """``[P, C]`` policy sequence log-probs of every candidate (0 where ``data.mask`` is False).

    Args:
        policy: a :class:`LogLinearPolicy` (scores ``data.features``), a :class:`FrozenTopPolicy` (its top blocks on
            ``states``, default ``data.states``: the cached lower-block states of ``pools``) or a causal LM (scores
            ``pools``).
        data: ``Extracted``-like: ``features [P, C, d]``, ``ref_logps [P, C]``, ``mask [P, C]``.
        pools: per prompt ``(prompt_ids, [candidate_ids, ...])`` for a causal LM (``encode_pool``).
        forward: a per-pool forward ``(model, prompt_ids, candidate_ids, pooling=, return_features=) -> (logps [C],
            _)``; default: ``mass_dpo.forward.shared_prefix_forward_batch`` over ``batch_size`` pools at a time.
    """
    mask = torch.as_tensor(data.mask).bool()
    if isinstance(policy, LogLinearPolicy):
        scores = policy.score(torch.as_tensor(data.features), torch.as_tensor(data.ref_logps))
        return torch.where(mask, scores, torch.zeros_like(scores))
    if pools is None:
        raise ValueError("scoring a causal LM needs the tokenized pools (prompt_ids, candidate_ids) of every prompt")
    if len(pools) != mask.shape[0]:
        raise ValueError(f"{len(pools)} pools for {mask.shape[0]} prompts")
    if isinstance(policy, FrozenTopPolicy):
        from .frozen import score_states

        scores = score_states(policy, states if states is not None else getattr(data, "states", None), pools)
        scores = _pad_columns(scores, mask.shape[1])
        return torch.where(mask, scores, torch.zeros_like(scores))
    was_training = policy.training
    policy.eval()
    scores = torch.zeros(mask.shape, dtype=torch.float32)
    if forward is None:
        from .forward import shared_prefix_forward_batch

        for lo in range(0, len(pools), batch_size):
            chunk = list(pools[lo : lo + batch_size])
            logps, _, _ = shared_prefix_forward_batch(policy, chunk, pooling=pooling, return_features=False)
            width = min(logps.shape[1], scores.shape[1])
            scores[lo : lo + len(chunk), :width] = logps[:, :width].float().cpu()
    else:
        for p, (prompt_ids, cand_ids) in enumerate(pools):
            logps, _ = forward(policy, prompt_ids, cand_ids, pooling=pooling, return_features=False)
            scores[p, : len(cand_ids)] = logps.float().cpu()
    policy.train(was_training)
    return torch.where(mask, scores, torch.zeros_like(scores))


def _pad_columns(t: torch.Tensor, C: int) -> torch.Tensor:
    out = t.new_zeros(t.shape[0], C)
    out[:, : min(C, t.shape[1])] = t[:, :C]
    return out


SCORES = ("reward", "logp")


def _score_metrics(scores, target, *, negatives, mask, ks) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Metrics of one score over the whole pool (expected ties) and against the fixed negatives, with the
    per-prompt values: ``recall@k, ndcg@k, mrr, pairwise_accuracy, margin`` (and ``_se``)."""
    rows = torch.arange(scores.shape[0])
    neg_mask = negatives >= 0
    chosen = scores[rows, target]
    rejected = torch.gather(scores, 1, negatives.clamp_min(0))
    per = per_prompt_ranking(scores, target, ks=tuple(ks), mask=mask)
    pref = per_prompt_preference(chosen, rejected, mask=neg_mask, ties="expected")
    per["pairwise_accuracy"], per["margin"] = pref["accuracy"], pref["margin"]
    out: dict[str, float] = {}
    for name, values in per.items():
        out[name], out[f"{name}_se"] = mean_se(values)
    return out, per


def evaluate(
    policy: nn.Module,
    data,
    *,
    pools=None,
    score: str = "reward",
    beta: float = 0.1,
    ks: Sequence[int] = (1, 3, 5),
    num_negatives: int = 3,
    seed: int = 0,
    forward: Callable | None = None,
    pooling: str = "all",
    records: Sequence[dict] | None = None,
    tokenizer=None,
    max_new_tokens: int = 20,
    option_labels: bool = False,
    per_prompt=None,
    return_scores: bool = False,
    states=None,
) -> dict[str, Any]:
    """Score every candidate of every test prompt; Accuracy, Recall@k, NDCG@k, MRR, pairwise accuracy and margin.

    Both scores are computed: ``score`` (``"reward"``: the implicit reward ``beta * (log pi - log ref)``, or
    ``"logp"``: the policy's sequence log-prob) gives the unprefixed metrics, the other one the same metrics prefixed
    ``"logp_"`` or ``"reward_"``. Ties break at random in expectation (:mod:`mass_dpo.metrics`), so a constant score
    is at chance.

    ``accuracy`` is a top-1 measure over the whole pool, as the paper's Table 1 (within ~4 points of its R@1): for a
    causal LM with ``records`` and ``tokenizer`` given, the generation-based HitRatio@1 of the S-DPO line of work
    (:func:`mass_dpo.generation.hit_ratio`: greedy decoding, a hit when the output names exactly the target among the
    candidates; ``valid_ratio`` beside it); otherwise (the log-linear regime) ``recall@1`` of ``score``
    (``accuracy_kind`` says which). ``pairwise_accuracy``: the chosen response beats each of ``num_negatives`` fixed
    negatives (:func:`fixed_negatives`, shared by every method).

    Args:
        policy: the trained policy (:class:`LogLinearPolicy` or a causal LM, peft-wrapped or not).
        data: the test split's ``Extracted`` (``ids``, ``features``, ``ref_logps``, ``mask``, ``target``).
        pools: tokenized pools for a causal LM, aligned with ``data.ids``.
        records, tokenizer: the test records and tokenizer, for the generation-based accuracy of a causal LM;
            option_labels: an option label such as "(E)" also names that candidate (the QA prompts list lettered
            options; :func:`mass_dpo.generation.hit_ratio`).
        per_prompt: a CSV path: one row per test prompt with every per-prompt value (paired comparisons).
        return_scores: also return ``scores`` ``[P, C]`` (of ``score``) and ``negatives`` ``[P, k]`` (tensors).
        states: a :class:`FrozenTopPolicy`'s cached lower-block states of ``pools`` (default ``data.states``). Its
            generation runs the full model carrying its top blocks, in the base model's dtype, with the lower
            blocks' prompt cache shared between policies (:func:`mass_dpo.frozen.hit_ratio`).
    """
    if score not in SCORES:
        raise ValueError(f"score must be 'reward' or 'logp', got {score!r}")
    mask = torch.as_tensor(data.mask).bool()
    target = torch.as_tensor(data.target).long()
    logps = score_candidates(policy, data, pools=pools, forward=forward, pooling=pooling, states=states)
    negatives = fixed_negatives(list(data.ids), mask, target, num_negatives, seed=seed)
    if isinstance(policy, LogLinearPolicy):  # the reward is beta * phi . theta exactly: no float32 cancellation
        theta, features = policy.theta.detach().double().cpu(), torch.as_tensor(data.features)
        # in float64 a chunk at a time: a whole float64 copy of the test features is GBs at d = 3072
        reward = beta * torch.cat([features[lo : lo + 4096].double() @ theta for lo in range(0, len(features), 4096)]
                                  or [torch.zeros(mask.shape, dtype=torch.float64)])
    else:
        reward = beta * (logps.double() - torch.as_tensor(data.ref_logps).double())
    by_score = {"logp": logps.double(), "reward": reward}
    out: dict[str, Any] = {}
    table: dict[str, Any] = {"id": [str(i) for i in data.ids]}
    for name in (score, *[s for s in SCORES if s != score]):
        scores = by_score[name].to(torch.float64).masked_fill(~mask, float("-inf"))
        metrics, per = _score_metrics(scores, target, negatives=negatives, mask=mask, ks=ks)
        prefix = "" if name == score else f"{name}_"
        out.update({prefix + k: v for k, v in metrics.items()})
        table.update({prefix + k: v.tolist() for k, v in per.items()})
    if not isinstance(policy, LogLinearPolicy) and records is not None and tokenizer is not None:
        if isinstance(policy, FrozenTopPolicy):  # the full model with its top blocks; shared lower prompt cache
            from .frozen import hit_ratio as generation_hits
        else:
            from .generation import hit_ratio as generation_hits
        gen = generation_hits(policy, tokenizer, records, max_new_tokens=max_new_tokens, labels=option_labels)
        out["accuracy"], out["accuracy_se"] = gen["hit_ratio"], gen["hit_ratio_se"]
        out["valid_ratio"], out["valid_ratio_se"] = gen["valid_ratio"], gen["valid_ratio_se"]
        out["accuracy_kind"] = "hit_ratio@1"
        table["accuracy"] = [float(h) for h in gen["hits"]]
        table["valid"] = [float(v) for v in gen["valid"]]
    else:
        out["accuracy"], out["accuracy_se"] = out["recall@1"], out["recall@1_se"]
        out["accuracy_kind"] = "top1"
        table["accuracy"] = table["recall@1"]
    out["prompts"] = int(mask.shape[0])
    out["score"] = score
    if per_prompt is not None:
        import pandas as pd

        from .files import atomic_path

        with atomic_path(per_prompt) as tmp:
            pd.DataFrame(table).to_csv(tmp, index=False)
    if return_scores:
        out["scores"] = by_score[score].masked_fill(~mask, float("-inf"))
        out["negatives"] = negatives
    return out


def reference_policy(policy: nn.Module) -> nn.Module:
    """The untrained policy of a regime for the ``reference`` row: a log-linear policy with theta = 0 (so its
    implicit reward is 0 for every candidate and its log-prob is the reference model's)."""
    if isinstance(policy, LogLinearPolicy):
        return LogLinearPolicy(policy.dim)
    return policy
