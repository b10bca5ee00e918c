"""The ``freeze`` regime: fine-tune the top ``k`` decoder blocks and the final norm of the causal LM on cached states.

LLaMA-Factory calls this ``finetuning_type: freeze``: the top ``k`` of the ``L`` transformer blocks and the final
norm train; the embeddings, the lower ``L - k`` blocks and the LM head stay frozen. Frozen lower blocks give the same
output at every step, so they run once per prompt: :func:`mass_dpo.extraction.extract` with ``keep_layer = L - k``
keeps, from the same shared-prefix forward that computes the features and log-probs, the hidden states of every
packed pool row ``[prompt, cand_1, ..., cand_C]`` at the input of block ``L - k``
(:class:`~mass_dpo.extraction.HiddenStates`). A candidate's states depend only on the prompt and itself (the block
mask), so the packed row of any sub-pool (the chosen response and the selected negatives) is a slice of those states;
a training step runs only the top ``k`` blocks on it (with the same block mask and rotary positions), the final norm
and the head at the response positions: a step costs about ``k / L`` of a full one
(``benchmarks/lm_step.py``). The sequence log-probs then go to :func:`mass_dpo.losses.preference_loss` as in
every regime.

- :class:`FrozenTopPolicy`: the trainable module (fp32 copies of the top blocks and norm, the frozen head as a
  non-persistent buffer): what the Trainer optimises, checkpoints (the top blocks and norm only, ~28 MB for SmolLM2
  at k = 2, plus their optimizer state) and resumes.
- :func:`state_outputs`: log-probs (and pooled features) of every candidate of every pool from cached states:
  test ranking, the reference log-probs, whole-pool online evaluation, re-extraction at a checkpoint
  (:func:`reextract`, Table 4).
- :func:`save_trainable` / :func:`load_trainable` / :func:`load_policy`: a policy = base model + those weights.
- :func:`hit_ratio`: generation HitRatio@1 by the full model carrying the trained top blocks, in the base model's
  dtype; the lower blocks' key/value cache of every test prompt is computed once and shared by every policy on the
  same base (:class:`LowerPromptCache`), so a policy pays only its top-``k`` prefill and the decoding.

Precision: the cached states are in the extraction's dtype (bf16 on a CPU with native bf16), the top blocks train
in float32 on them. The reference log-probs of the loss are those of the untrained policy computed the same way
(:func:`state_outputs`), so every implicit reward starts at exactly 0.

Works for Llama-family decoders (``model.model.layers``, ``.norm``, ``.rotary_emb``; SmolLM2, Llama 3, Qwen 3).
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .files import atomic_path, atomic_write_json
from .extraction import (
    DEFAULT_BATCH_TOKENS,
    Extracted,
    HiddenStates,
    _batches,
    _pad_to,
    cached_part,
    weights_fingerprint,
)
from .forward import POOLINGS, _parts, additive_mask, pack_pools, pool_outputs

#: The files of a saved freeze policy (``final/``, ``snapshots/<name>/``): the trainable weights under the base
#: model's parameter names, and what they belong to.
TRAINABLE_FILE = "trainable.safetensors"
META_FILE = "freeze.json"


def first_trainable_layer(model, k: int) -> int:
    """``L - k``: the first trainable block of a model with ``L`` blocks (a ``ValueError`` unless 1 <= k <= L)."""
    n = len(_parts(model)[0].layers)
    if not 1 <= int(k) <= n:
        raise ValueError(f"trainable_layers must be between 1 and the model's {n} blocks, got {k}")
    return n - int(k)


# ---------------------------------------------------------------- the policy


def _rotary(decoder, model):
    """A float32 rotary embedding of the decoder's kind (rebuilt from the config: a bf16 model's may be rounded)."""
    try:
        return type(decoder.rotary_emb)(config=model.config)
    except Exception:  # noqa: BLE001 - an unusual constructor: copy the model's own
        return copy.deepcopy(decoder.rotary_emb).float()


class FrozenTopPolicy(nn.Module):
    """The trainable top of a causal LM: its last ``k`` decoder blocks and final norm (float32 copies), the frozen LM
    head (a non-persistent buffer: never trained, never checkpointed), run on cached lower-block states.

    Args:
        model: the base causal LM (Llama-family ``*ForCausalLM``); it is not changed and stays ``policy.base``.
        k: trainable blocks (1 .. L). dtype: of the trainable copies (float32: the optimizer's master weights).
        name: the base model's name (``params/models``) or folder, written beside saved weights (:func:`load_policy`).

    ``policy(prompt_ids=..., candidate_ids=..., mask=..., hidden=...)`` is the Trainer's call (a collated
    :class:`~mass_dpo.training.PreferenceDataset` batch of the freeze regime): ``[B, W]`` sequence log-probs of the
    chosen response and its negatives, 0 where ``mask`` is False. ``state_dict()`` holds the top blocks and the norm
    only (names ``layers.<i>.*``, ``norm.*``); :meth:`trainable_state_dict` names them as the base model does.
    """

    takes_hidden_states = True  # the Trainer feeds it cached states (mass_dpo.training.policy_logps)

    def __init__(self, model, k: int = 2, *, dtype: torch.dtype = torch.float32, name: str | None = None):
        super().__init__()
        decoder, head = _parts(model)
        attn = str(getattr(model.config, "_attn_implementation", "") or "")
        if attn.startswith("flash"):
            raise ValueError(f"attention implementation {attn!r} ignores the 4D block mask; load the model with sdpa")
        self.first = first_trainable_layer(model, k)
        self.k, self.num_layers = int(k), len(decoder.layers)
        self.layers = nn.ModuleList(copy.deepcopy(decoder.layers[j]).to(dtype) for j in range(self.first, self.num_layers))
        self.norm = copy.deepcopy(decoder.norm).to(dtype)
        self.rotary_emb = _rotary(decoder, model)
        self.register_buffer("head_weight", head.weight.detach().to(dtype).clone(), persistent=False)
        bias = getattr(head, "bias", None)
        self.register_buffer("head_bias", None if bias is None else bias.detach().to(dtype).clone(), persistent=False)
        names = {id(m): n for n, m in model.named_modules()}
        #: policy prefix -> the base model's module name (``layers.0`` -> ``model.layers.28``)
        self.base_names = {f"layers.{i}": names[id(decoder.layers[self.first + i])] for i in range(self.k)}
        self.base_names["norm"] = names[id(decoder.norm)]
        self.base_name = name
        object.__setattr__(self, "base", model)  # not a submodule: not trained, saved, or moved with the policy
        for p in self.parameters():
            p.requires_grad_(True)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """``[n, d] -> [n, vocab]`` logits of the frozen LM head."""
        return F.linear(h.to(self.head_weight.dtype), self.head_weight, self.head_bias)

    def top_hidden(self, hidden: torch.Tensor, packed: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, T, d]`` final hidden states (after the norm) of packed rows whose block-``L-k`` input is ``hidden``
        ``[B, T, d]`` (:func:`mass_dpo.forward.pack_pools` layout: block mask, positions restarting per
        candidate)."""
        p = self.head_weight
        h = hidden.to(device=p.device, dtype=p.dtype)
        if h.shape[:2] != packed["input_ids"].shape:
            raise ValueError(f"states {tuple(h.shape[:2])} do not match the packed rows "
                             f"{tuple(packed['input_ids'].shape)}")
        mask = additive_mask(packed["allowed"].to(p.device), p.dtype)
        pos = packed["position_ids"].to(p.device)
        emb = self.rotary_emb(h, pos)
        for layer in self.layers:
            h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=emb)
            h = h[0] if isinstance(h, tuple) else h
        return self.norm(h)

    def outputs(self, hidden, packed, *, poolings: Sequence[str] = ()):
        """:func:`mass_dpo.forward.pool_outputs` of the policy on packed rows: ``(logps [B, C], {pooling:
        features [B, C, d]}, mask [B, C], lengths [B, C])``; differentiable."""
        return pool_outputs(self.top_hidden(hidden, packed), self.head, packed, poolings=poolings)

    def forward(self, prompt_ids=None, candidate_ids=None, mask=None, hidden=None, **_):
        """``[B, W]`` log-probs of a collated batch (chosen first), 0 where ``mask`` ``[B, W]`` is False."""
        if hidden is None or candidate_ids is None or mask is None:
            raise TypeError("FrozenTopPolicy needs prompt_ids, candidate_ids, mask and the cached states (hidden)")
        packed = pack_pools(list(zip(prompt_ids, candidate_ids)))
        logps = self.outputs(hidden, packed)[0]  # [B, C]
        width = mask.shape[1]
        out = logps.new_zeros(logps.shape[0], width)
        out[:, : min(width, logps.shape[1])] = logps[:, :width]
        mask = mask.to(out.device)
        return torch.where(mask, out, torch.zeros_like(out))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable weights under the base model's names (``model.layers.28.mlp.up_proj.weight``, ...)."""
        out = {}
        for name, value in self.state_dict().items():
            prefix = next(p for p in self.base_names if name == p or name.startswith(p + "."))
            out[self.base_names[prefix] + name[len(prefix):]] = value.detach()
        return out

    def load_trainable_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`trainable_state_dict` (every trainable weight must be given)."""
        back = {base: mine for mine, base in self.base_names.items()}
        local = {}
        for name, value in tensors.items():
            prefix = next((b for b in back if name.startswith(b + ".")), None)
            if prefix is None:
                raise KeyError(f"{name} is not a trainable weight of this policy (blocks {self.first}..)")
            local[back[prefix] + name[len(prefix):]] = value
        self.load_state_dict(local, strict=True)


# ---------------------------------------------------------------- every candidate from cached states


def _check_states(policy: FrozenTopPolicy, states: HiddenStates | None):
    if states is None:
        raise ValueError("the freeze regime needs the cached lower-block states of the split "
                         "(extract(..., keep_layer=L - k): Extracted.states)")
    if states.layer != policy.first:
        raise ValueError(f"the cached states are at block {states.layer}, the policy's top starts at block "
                         f"{policy.first}: extract with keep_layer={policy.first}")


@torch.no_grad()
def state_outputs(policy: FrozenTopPolicy, states: HiddenStates, pools, *, poolings: Sequence[str] = (),
                  batch_tokens: int = DEFAULT_BATCH_TOKENS):
    """Every candidate of every pool scored by the policy from the cached states, without gradient.

    Args:
        states: the split's cached states (block ``policy.first``); pools: its ``encode_pool`` pools, aligned.
        poolings: the features to compute too (``"all"``, ``"response"``; ``()``: log-probs only).

    Returns:
        ``(logps [P, C], {pooling: features [P, C, d]}, mask [P, C], lengths [P, C])`` float32 / bool / int64 on
        the CPU, as :func:`mass_dpo.extraction.extract` stores them.
    """
    _check_states(policy, states)
    pools = [(list(p), [list(c) for c in cs]) for p, cs in pools]
    states.check_pools(pools)
    C = max(len(cs) for _, cs in pools)
    was_training = policy.training
    policy.eval()
    logps, masks, lengths = [], [], []
    feats: dict[str, list] = {p: [] for p in poolings}
    batches = _batches(pools, batch_tokens)
    try:
        for idx in batches:
            packed = pack_pools([pools[i] for i in idx])
            rows = [states.row(i) for i in idx]
            hidden = rows[0].new_zeros(len(idx), packed["input_ids"].shape[1], rows[0].shape[-1])
            for b, r in enumerate(rows):
                hidden[b, : r.shape[0]] = r
            lp, ft, m, n = policy.outputs(hidden, packed, poolings=poolings)
            logps.append(_pad_to(lp.float().cpu(), C))
            masks.append(_pad_to(m.cpu(), C, False))
            lengths.append(_pad_to(n.cpu(), C))
            for p in poolings:
                feats[p].append(_pad_to(ft[p].float().cpu(), C))
    finally:
        policy.train(was_training)
    back = torch.argsort(torch.tensor([i for idx in batches for i in idx]))  # batch order -> the pools' order
    return (torch.cat(logps)[back], {p: torch.cat(v)[back] for p, v in feats.items()}, torch.cat(masks)[back],
            torch.cat(lengths)[back])


def score_states(policy: FrozenTopPolicy, states: HiddenStates, pools, **kwargs) -> torch.Tensor:
    """``[P, C]`` policy sequence log-probs of every candidate (0 on padding): :func:`state_outputs`' first part."""
    return state_outputs(policy, states, pools, **kwargs)[0]


def reextract(policy: FrozenTopPolicy, extracted: Extracted, pools, *, pooling: str | None = None,
              reference: torch.Tensor | None = None, meta: dict | None = None) -> Extracted:
    """The split as extraction would see it under ``policy`` (e.g. a mid-training or final snapshot): Table 4's
    re-extraction "as the paper ran it", so that :func:`mass_dpo.preprocess.select_extracted` runs on it unchanged.

    ``features`` (mean-pooled final hidden states in ``pooling``, default the extraction's) and ``theta0_logps``
    come from ``policy``; ``ref_logps`` are ``reference`` (default: the untrained policy's,
    :func:`reference_logps`); ids, mask, target and states are ``extracted``'s (its ``states`` must be set).
    Stored once beside the extraction's cache entry, as the reference log-probs are (the part
    ``reextract-L<layer>-<dtype>-<pooling>-<weights>-<ids>``, ``weights`` naming the base and the policy's own top
    weights): a redraw of Table 4 reads it instead of running the top blocks again.
    """
    pooling = pooling or extracted.meta.get("pooling", "all")
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    _check_states(policy, extracted.states)
    extracted.states.check_pools([(list(p), [list(c) for c in cs]) for p, cs in pools])
    t0 = time.time()

    def compute() -> dict[str, torch.Tensor]:
        logps, feats, mask, lengths = state_outputs(policy, extracted.states, pools, poolings=(pooling,))
        if not torch.equal(mask, extracted.mask.bool()):
            raise ValueError("the pools do not match the extracted split")
        return {"theta0_logps": logps, "features": feats[pooling], "lengths": lengths}

    entry = _entry(extracted)
    if entry is not None:
        layer, dtype, ids = _part_names(policy, extracted)
        base, top = weights_fingerprint(policy.base), weights_fingerprint(policy.trainable_state_dict())
        weights = hashlib.sha256(f"{base}/{top}".encode()).hexdigest()[:16]
        expect = {"key": extracted.meta["key"], "layer": layer, "dtype": dtype, "pooling": pooling, "weights": base,
                  "trainable": top, "ids": list(extracted.ids)}
        out = cached_part(entry, f"reextract-L{layer}-{dtype}-{pooling}-{weights}-{ids}", expect,
                          ("theta0_logps", "features", "lengths"), compute,
                          f"the re-extraction {pooling} under weights {top}")
    else:
        out = compute()
    ref = reference if reference is not None else reference_logps(policy, extracted, pools)
    info = dict(extracted.meta, pooling=pooling, reextracted=True, seconds=round(time.time() - t0, 3), **(meta or {}))
    return Extracted(ids=list(extracted.ids), features=out["features"], ref_logps=ref.float(),
                     theta0_logps=out["theta0_logps"], mask=extracted.mask.bool(), target=extracted.target.long(),
                     meta=info, lengths=out["lengths"], states=extracted.states)


#: In-process memo of reference log-probs by (extraction entry, block, base weights): the runs of a grid share them.
_REFERENCE: OrderedDict = OrderedDict()


def reference_logps(policy: FrozenTopPolicy, extracted: Extracted, pools) -> torch.Tensor:
    """``[P, C]`` log-probs of every candidate under the *untrained* top (the base model's top blocks, float32) on
    the split's cached states: the freeze regime's ``log pi_ref``, computed exactly as the policy's own log-probs, so
    that every implicit reward starts at 0. Memoised in-process by the extraction's cache key, and on disk beside
    the extraction's cache entry (the part ``reference-L<layer>-<dtype>-<weights>-<ids>``, written once under
    its lock and atomically): the runs and notebooks of one cache compute it once."""
    layer, dtype, ids = _part_names(policy, extracted)  # the untrained top computes in the policy's dtype
    key = (extracted.meta.get("key"), layer, weights_fingerprint(policy.base), ids, dtype)
    if key[0] is not None and key in _REFERENCE:
        _REFERENCE.move_to_end(key)
        return _REFERENCE[key]
    entry = _entry(extracted)
    if entry is not None:
        expect = {"key": key[0], "layer": layer, "dtype": dtype, "weights": key[2], "ids": list(extracted.ids)}
        stem = f"reference-L{layer}-{dtype}-{key[2]}-{ids}"
        out = cached_part(entry, stem, expect, ("ref_logps",),
                          lambda: {"ref_logps": _untrained_logps(policy, extracted, pools)},
                          f"the reference log-probs {stem}")["ref_logps"]
    else:
        out = _untrained_logps(policy, extracted, pools)
    if key[0] is not None:
        _REFERENCE[key] = out
        while len(_REFERENCE) > 16:
            _REFERENCE.popitem(last=False)
    return out


def _entry(extracted: Extracted) -> Path | None:
    """The extraction cache entry ``extracted`` was read from or written to (results derived from it are stored
    beside it), ``None`` for a split extracted without a cache."""
    entry = extracted.meta.get("entry") if extracted.meta.get("key") is not None else None
    return Path(entry) if entry is not None else None


def _part_names(policy: FrozenTopPolicy, extracted: Extracted) -> tuple[int | None, str, str]:
    """``(layer, dtype, ids)`` that name a part derived from ``extracted`` under ``policy``: the block whose input
    states it read, the policy's dtype, and a digest of the prompt ids (a subset of a split is another part)."""
    layer = extracted.states.layer if extracted.states is not None else None
    ids = hashlib.sha256("\n".join(map(str, extracted.ids)).encode()).hexdigest()[:12]
    return layer, str(policy.head_weight.dtype).replace("torch.", ""), ids


def _untrained_logps(policy: FrozenTopPolicy, extracted: Extracted, pools) -> torch.Tensor:
    untrained = FrozenTopPolicy(policy.base, policy.k, dtype=policy.head_weight.dtype, name=policy.base_name)
    return score_states(untrained, extracted.states, pools)


# ---------------------------------------------------------------- saving and loading


def save_trainable(policy: FrozenTopPolicy, folder, *, step: int | None = None) -> Path:
    """Write ``trainable.safetensors`` (the top blocks and norm under the base model's names) and ``freeze.json``
    (base model, k, blocks, step) into ``folder``, each atomically, the JSON last (a folder without it is
    incomplete)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in policy.trainable_state_dict().items()}
    with atomic_path(folder / TRAINABLE_FILE) as tmp:
        save_file(tensors, str(tmp))
    meta = {"model": policy.base_name, "trainable_layers": policy.k, "first_layer": policy.first,
            "num_layers": policy.num_layers, "dtype": str(policy.head_weight.dtype).replace("torch.", ""),
            "step": step, "base_weights": weights_fingerprint(policy.base)}
    atomic_write_json(folder / META_FILE, meta, indent=1)
    return folder


def read_meta(folder) -> dict:
    """``freeze.json`` of a saved policy (a ``FileNotFoundError`` naming the folder when it is not one)."""
    path = Path(folder) / META_FILE
    if not path.is_file() or not (Path(folder) / TRAINABLE_FILE).is_file():
        raise FileNotFoundError(f"{folder} holds no saved freeze policy ({TRAINABLE_FILE} + {META_FILE})")
    return json.loads(path.read_text())


def load_trainable(policy: FrozenTopPolicy, folder) -> FrozenTopPolicy:
    """Load saved trainable weights into ``policy`` (same base model and k); returns it."""
    from safetensors.torch import load_file

    meta = read_meta(folder)
    if (meta["trainable_layers"], meta["first_layer"]) != (policy.k, policy.first):
        raise ValueError(f"{folder} holds blocks {meta['first_layer']}.. (k={meta['trainable_layers']}), the policy "
                         f"trains blocks {policy.first}.. (k={policy.k})")
    policy.load_trainable_state_dict(load_file(str(Path(folder) / TRAINABLE_FILE)))
    return policy


def load_policy(folder, base=None) -> FrozenTopPolicy:
    """A saved freeze policy: the base model (``base``, a model or :class:`~mass_dpo.models.ModelBundle`; default the
    one named in ``freeze.json``, loaded by :func:`mass_dpo.models.load_model`) with the saved top blocks and norm."""
    from .models import ModelBundle, load_model

    meta = read_meta(folder)
    name = meta.get("model")
    if base is None:
        if not name:
            raise ValueError(f"{folder}/{META_FILE} names no base model: pass base=")
        base = load_model(name)
    model = base.model if isinstance(base, ModelBundle) else base
    return load_trainable(FrozenTopPolicy(model, meta["trainable_layers"], name=name), folder)


# ---------------------------------------------------------------- generation


def generation_model(policy: FrozenTopPolicy):
    """The full causal LM the policy stands for: a copy of the base model (its dtype: the extraction's) carrying the
    policy's top blocks and norm, cast to that dtype. The base model itself is not changed."""
    model = copy.deepcopy(policy.base)
    dtype = next(model.parameters()).dtype
    model.load_state_dict({k: v.to(dtype) for k, v in policy.trainable_state_dict().items()}, strict=False)
    return model.eval()


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows, as ``generate`` makes them (``cumsum - 1``, 0 on padding)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


class LowerPromptCache:
    """The frozen lower blocks' keys and values of prompts, computed once and shared by every policy on one base.

    For a left-padded batch of prompts (``input_ids``, ``attention_mask`` ``[B, T]``, as
    :func:`mass_dpo.generation.generate_replies` makes them) the base model runs once over the first ``T - 1``
    tokens; the keys/values of blocks ``0..first-1`` and the hidden states entering block ``first`` are kept
    (in-process, least recently used first out past ``max_bytes``). :meth:`prefill` then builds, for one policy's
    generation model, the cache of the whole model over those tokens by running only its top blocks; ``generate``
    continues from the last prompt token. Only the top blocks differ between policies, so this is exactly the cache
    ``generate``'s own prefill would build (``tests/test_frozen.py`` checks the generated text is identical).
    """

    def __init__(self, base, first: int, *, max_bytes: int = 3 << 30):
        self.base, self.first, self.max_bytes = base, int(first), int(max_bytes)
        self.tag = _cache_tag(base, first)
        self.memo: OrderedDict = OrderedDict()

    def _key(self, ids: torch.Tensor, mask: torch.Tensor) -> str:
        h = hashlib.sha256(repr(self.tag).encode())
        h.update(ids.cpu().numpy().tobytes())
        h.update(mask.cpu().numpy().tobytes())
        return h.hexdigest()

    @torch.no_grad()
    def lower(self, ids: torch.Tensor, mask: torch.Tensor):
        """``([(keys, values)] of blocks < first, hidden [B, T-1, d] entering block first)`` of a batch."""
        from transformers import DynamicCache

        key = self._key(ids, mask)
        if key in self.memo:
            self.memo.move_to_end(key)
            return self.memo[key]
        model = self.base
        device = next(model.parameters()).device
        att = mask[:, :-1].to(device)
        out = _parts(model)[0](
            input_ids=ids[:, :-1].to(device), attention_mask=None if bool((mask == 1).all()) else att,
            position_ids=_positions(att), cache=DynamicCache(config=model.config), use_cache=True,
            output_hidden_states=[self.first],  # a list: block 0 (k = L) too
        )
        kv = [(layer.keys, layer.values) for layer in out.cache.layers[: self.first]]
        entry = (kv, out.hidden_states[self.first])
        self.memo[key] = entry
        size = lambda e: sum(t.nbytes for pair in e[0] for t in pair) + e[1].nbytes  # noqa: E731
        while len(self.memo) > 1 and sum(size(e) for e in self.memo.values()) > self.max_bytes:
            self.memo.popitem(last=False)
        return entry

    @torch.no_grad()
    def prefill(self, model, ids: torch.Tensor, mask: torch.Tensor):
        """A ``DynamicCache`` of ``model`` (a :func:`generation_model` on this base) over ``ids[:, :-1]``: the shared
        lower keys/values, then the model's own top blocks run on the shared hidden states."""
        from transformers import DynamicCache
        from transformers.masking_utils import create_causal_mask

        if ids.shape[1] < 2:
            return None
        kv, hidden = self.lower(ids, mask)
        decoder = _parts(model)[0]
        device = next(model.parameters()).device
        att = mask[:, :-1].to(device)
        pos = _positions(att)
        top = DynamicCache(config=model.config)
        h = hidden.to(device)
        causal = create_causal_mask(config=model.config, inputs_embeds=h,
                                    attention_mask=None if bool((mask == 1).all()) else att, cache=top,
                                    position_ids=pos)
        emb = decoder.rotary_emb(h, pos)
        for layer in decoder.layers[self.first :]:
            h = layer(h, attention_mask=causal, position_ids=pos, cache=top, use_cache=True, position_embeddings=emb)
            h = h[0] if isinstance(h, tuple) else h
        data = list(kv) + [(layer.keys, layer.values) for layer in top.layers[self.first :]]
        return DynamicCache(ddp_cache_data=data, config=model.config)


def _cache_tag(base, first: int) -> tuple:
    return weights_fingerprint(base), int(first), str(next(base.parameters()).dtype)


#: Shared lower-block caches by (base weights, first block, dtype): every policy of a process reuses them.
_LOWER: OrderedDict = OrderedDict()


def lower_prompt_cache(policy: FrozenTopPolicy) -> LowerPromptCache:
    """The process's :class:`LowerPromptCache` for the policy's base model and first trainable block (the two most
    recently used are kept)."""
    tag = _cache_tag(policy.base, policy.first)
    if tag not in _LOWER:
        _LOWER[tag] = LowerPromptCache(policy.base, policy.first)
        while len(_LOWER) > 2:
            _LOWER.popitem(last=False)
    _LOWER.move_to_end(tag)
    return _LOWER[tag]


#: Prompts per ``generate`` call of the freeze regime's evaluation: on a 2-core CPU, batch 32 decodes about twice as
#: fast per prompt as batch 8 (``docs/benchmarks.md``); the prompts are sorted by length, so padding stays small.
GENERATION_BATCH = 32


def hit_ratio(policy: FrozenTopPolicy, tokenizer, records, *, max_new_tokens: int = 20,
              batch_size: int = GENERATION_BATCH, labels: bool = False, fast: bool = True,
              progress: bool = False) -> dict[str, Any]:
    """:func:`mass_dpo.generation.hit_ratio` of the policy's full model (:func:`generation_model`: greedy, in the
    base model's dtype). ``fast``: the lower blocks' prompt cache comes from :func:`lower_prompt_cache` (computed
    once per batch of prompts and base model), so the policy runs only its top blocks over the prompts, then
    decodes; ``fast=False`` is plain ``model.generate``. Both give the same replies."""
    from .generation import hit_ratio as generate_hit_ratio

    model = generation_model(policy)
    prefill = None
    if fast:
        shared = lower_prompt_cache(policy)

        def prefill(ids, mask):
            return shared.prefill(model, ids, mask)

    return generate_hit_ratio(model, tokenizer, records, max_new_tokens=max_new_tokens, batch_size=batch_size,
                              labels=labels, progress=progress, prefill=prefill)
