"""The shared-prompt forward: the sequence log-probabilities log pi(y | x) and features phi(x, y) of every candidate
of a pool, the prompt computed once (appendix C.4).

For a pool (one prompt x, candidates y_1..y_C), with the chat-formatted prompt tokens p_1..p_P and the response
tokens of candidate c, t_1..t_L (``mass_dpo.data.formatting.encode_pool``):

- ``logp(c) = sum_k log pi(t_k | p, t_<k)``, the sequence log-probability of the response (end-of-turn included);
- ``phi(x, y_c)`` = the mean of the final hidden states (after the last norm, the input of the LM head) over the
  prompt and response tokens (``pooling="all"``) or the response tokens only (``pooling="response"``). Both come
  from the same hidden states (:func:`shared_prefix_outputs`).

Packing: the prompt is computed once per pool. One packed row ``[prompt, cand_1, ..., cand_C]`` goes through
the model with a 4D additive attention mask in which each candidate sees the whole prompt and itself causally, and
position ids that restart at ``P`` for each candidate, so every candidate token gets exactly the hidden state it
would get in the row ``[prompt, cand_c]`` (:func:`naive_forward`, the reference). For LastFM (prompt ~180 tokens,
20 candidates of ~5) the row has ~280 tokens against ~3,760 for the naive rows.

Shapes: ``B`` pools per forward, one right-padded row each; ``T`` the tokens of the longest row
(:func:`row_tokens`: ``P + L_1 + ... + L_C``); ``Cmax`` the most candidates of a pool (missing ones are padding,
``mask`` False); ``d`` the hidden size. :func:`pack_pools` gives ``input_ids``, ``position_ids``, ``segment``
``[B, T]`` and the block mask ``allowed`` ``[B, T, T]`` (:func:`additive_mask` makes it ``[B, 1, T, T]``);
:func:`shared_prefix_outputs` returns ``logps [B, Cmax]``, ``{pooling: features [B, Cmax, d]}``, ``mask`` and
``lengths [B, Cmax]``. :func:`shared_prompt_prefix` computes the tokens that every prompt of a call starts with
once, as a key/value cache for every batch. Differentiable except :func:`shared_prompt_prefix` (training
backpropagates through :func:`shared_prefix_forward`); :mod:`mass_dpo.extraction` runs it over a dataset and caches
the result.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

POOLINGS = ("all", "response")

#: Response positions sent through the LM head at once (bounds the [positions, vocab] logits).
HEAD_CHUNK = 1024

#: The most entries a packed batch's ``[B, T, T]`` attention mask may have (1 G: a 4 GB float32 mask); beyond, a
#: one-line error instead of an allocation that cannot succeed (:func:`pack_pools`).
MAX_MASK_ELEMENTS = 1 << 30


def _ids(x) -> list[int]:
    if isinstance(x, torch.Tensor):
        if x.dim() != 1:
            raise ValueError(f"token ids must be 1D, got shape {tuple(x.shape)}")
        return [int(t) for t in x.tolist()]
    return [int(t) for t in x]


def _check_pool(prompt_ids, candidate_ids) -> tuple[list[int], list[list[int]]]:
    p = _ids(prompt_ids)
    cands = [_ids(c) for c in candidate_ids]
    if not p:
        raise ValueError("the prompt has no tokens: a candidate's first token needs a prompt token to condition on")
    if not cands:
        raise ValueError("the pool has no candidates")
    for i, c in enumerate(cands):
        if not c:
            raise ValueError(f"candidate {i} has no tokens")
    return p, cands


def _parts(model):
    """``(decoder, lm_head)`` of a causal LM (works through a peft wrapper)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    head = model.get_output_embeddings()
    if decoder is None or head is None:
        raise TypeError(f"{type(model).__name__} is not a causal LM with a decoder and an LM head")
    return decoder, head


def _model_dtype_device(model) -> tuple[torch.dtype, torch.device]:
    p = next(model.parameters())
    return p.dtype, p.device


def _check_pooling(pooling: str):
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")


def row_tokens(row: tuple[Sequence[int], Sequence[Sequence[int]]]) -> int:
    """Tokens of the packed row ``[prompt, cand_1, ..., cand_C]`` of ``row = (prompt_ids, candidates)``."""
    return len(row[0]) + sum(len(c) for c in row[1])


def pack_pools(pools: Sequence[tuple[list[int], list[list[int]]]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """The packed rows of a batch of pools (CPU tensors).

    Returns a dict with ``input_ids`` ``[B, T]``, ``position_ids`` ``[B, T]``, ``segment`` ``[B, T]`` (``-1`` prompt,
    ``c`` candidate c, ``-2`` padding), ``allowed`` ``[B, T, T]`` bool (query row attends key column),
    ``prompt_len`` ``[B]`` and ``cand_len`` ``[B, Cmax]`` (0 for missing candidates).
    """
    rows = [_check_pool(p, c) for p, c in pools]
    B = len(rows)
    T = max(row_tokens(r) for r in rows)
    C = max(len(cs) for _, cs in rows)
    if B * T * T > MAX_MASK_ELEMENTS:
        raise ValueError(
            f"{B} packed row(s) of {T} tokens need a {B} x {T} x {T} attention mask ({B * T * T / 2**30:.0f} G "
            "entries): cut long prompts and responses with max_length / max_prompt_length (--max-length, "
            "--max-prompt-length) or pass fewer pools at once")
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    seg = torch.full((B, T), -2, dtype=torch.long)
    plen = torch.zeros(B, dtype=torch.long)
    clen = torch.zeros((B, C), dtype=torch.long)
    for b, (p, cs) in enumerate(rows):
        P = len(p)
        ids[b, :P] = torch.tensor(p)
        pos[b, :P] = torch.arange(P)
        seg[b, :P] = -1
        plen[b] = P
        s = P
        for c, toks in enumerate(cs):
            L = len(toks)
            ids[b, s : s + L] = torch.tensor(toks)
            pos[b, s : s + L] = torch.arange(P, P + L)
            seg[b, s : s + L] = c
            clen[b, c] = L
            s += L
        pos[b, s:] = torch.arange(T - s)  # padding: any valid positions
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    sq, sk = seg[:, :, None], seg[:, None, :]
    allowed = causal & ((sk == -1) & (sq >= -1) | (sk == sq))  # prompt keys for real queries; own segment always
    return {
        "input_ids": ids, "position_ids": pos, "segment": seg, "allowed": allowed, "prompt_len": plen, "cand_len": clen,
    }


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, T, T]`` bool -> ``[B, 1, T, T]`` additive float mask (0 = attend, dtype's min = blocked).

    Additive, not bool: with eager attention a bool mask is added to the scores and silently wrong.
    The finite minimum (not -inf) keeps padding rows NaN-free."""
    m = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    m.masked_fill_(~allowed, torch.finfo(dtype).min)
    return m[:, None]


def _response_logps(h, head, ids, rows, pred, flat_cand, n_out) -> torch.Tensor:
    """Sum of log p(token) per candidate: ``h[rows, pred]`` predicts ``ids[rows, pred + 1]``-style targets given as
    ``ids`` (already gathered); returns ``[n_out]`` float32."""
    out = h.new_zeros(n_out, dtype=torch.float32)
    for lo in range(0, rows.numel(), HEAD_CHUNK):
        sl = slice(lo, lo + HEAD_CHUNK)
        logits = head(h[rows[sl], pred[sl]]).float()
        tok_logp = -F.cross_entropy(logits, ids[sl], reduction="none")
        out = out.index_add(0, flat_cand[sl], tok_logp)
    return out


def shared_prefix_outputs(
    model,
    pools: Sequence[tuple[Any, Sequence[Any]]],
    *,
    poolings: Sequence[str] = POOLINGS,
    pad_id: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """One forward for several pools, one packed row each (right-padded), every requested pooling at once.

    Args:
        model: a causal LM (transformers ``*ForCausalLM``, possibly peft-wrapped).
        pools: ``[(prompt_ids, [candidate_ids, ...]), ...]``; ids as lists or 1D LongTensors.
        poolings: any of ``"all"`` (prompt + response tokens) and ``"response"`` (response tokens only); both come
            from the same final hidden states; ``()`` skips the features.

    Returns:
        ``(logps [B, Cmax] float32, {pooling: features [B, Cmax, d] float32}, mask [B, Cmax] bool,
        lengths [B, Cmax] int64)``; ``lengths`` counts each candidate's response tokens; padded entries are 0.
        Differentiable: no ``torch.no_grad`` inside (wrap the call for inference).
    """
    return _shared_prefix(model, pools, poolings=poolings, pad_id=pad_id)[:4]


@dataclass
class PromptPrefix:
    """The first ``length`` tokens shared by every prompt of a call, computed once (:func:`shared_prompt_prefix`).

    ``cache``: per decoder block the ``(keys, values)`` ``[1, kv_heads, length, head_dim]``; ``hidden``: the final
    hidden states ``[1, length, d]``; ``kept``: the hidden states entering block ``keep_layer`` ``[1, length, d]``
    (or ``None``)."""

    length: int
    cache: list[tuple[torch.Tensor, torch.Tensor]]
    hidden: torch.Tensor
    kept: torch.Tensor | None = None


def common_prompt_prefix(pools: Sequence[tuple[Sequence[int], Sequence[Any]]]) -> list[int]:
    """The longest run of tokens that every pool's prompt starts with."""
    return list(os.path.commonprefix([list(p) for p, _ in pools])) if pools else []


@torch.no_grad()
def shared_prompt_prefix(model, pools, *, keep_layer: int | None = None) -> PromptPrefix | None:
    """:class:`PromptPrefix` of the prompts' common token prefix (:func:`common_prompt_prefix`) under ``model``:
    one forward of those tokens alone, whose keys/values every packed row then attends to (each of its tokens sees
    only the tokens before it, all inside the prefix, as in the full row). ``None`` when there is none."""
    from transformers import DynamicCache

    ids = common_prompt_prefix(pools)
    if not ids:
        return None
    decoder, _ = _parts(model)
    _, device = _model_dtype_device(model)
    K = len(ids)
    extra = {} if keep_layer is None else {"output_hidden_states": [int(keep_layer)]}
    out = decoder(input_ids=torch.tensor([ids], device=device), position_ids=torch.arange(K, device=device)[None],
                  cache=DynamicCache(config=decoder.config), use_cache=True, **extra)
    return PromptPrefix(K, [(layer.keys, layer.values) for layer in out.cache.layers], out.last_hidden_state,
                        None if keep_layer is None else out.hidden_states[int(keep_layer)])


def _shared_prefix(model, pools, *, poolings, pad_id, keep_layer: int | None = None,
                   prefix: PromptPrefix | None = None):
    """:func:`shared_prefix_outputs` plus, with ``keep_layer = j``, the hidden states ``[B, T, d]`` of the packed
    rows at the input of decoder block ``j`` (the output of blocks ``0..j-1``; model dtype), from the same forward.
    With ``prefix`` (:func:`shared_prompt_prefix` of pools whose prompts all start with its tokens; inference only),
    only the rows' tokens after it go through the model, attending to its cached keys/values."""
    for pooling in poolings:
        _check_pooling(pooling)
    attn = str(getattr(getattr(model, "config", None), "_attn_implementation", "") or "")
    if attn.startswith("flash"):
        raise ValueError(
            f"attention implementation {attn!r} ignores the 4D block mask the shared prefix needs; "
            "load the model with attn_implementation='sdpa' (or 'eager')"
        )
    dtype, device = _model_dtype_device(model)
    packed = pack_pools(pools, pad_id)
    decoder, head = _parts(model)
    extra = {} if keep_layer is None else {"output_hidden_states": [int(keep_layer)]}  # a list: index 0 too
    K = 0 if prefix is None else prefix.length
    if prefix is not None:
        from transformers import DynamicCache

        B = len(pools)
        cached = [(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in prefix.cache]
        extra.update(cache=DynamicCache(ddp_cache_data=cached, config=decoder.config), use_cache=True)
    else:
        extra.update(use_cache=False)
    out = decoder(
        input_ids=packed["input_ids"][:, K:].to(device),
        attention_mask=additive_mask(packed["allowed"][:, K:].to(device), dtype),  # [B, 1, T - K, T]
        position_ids=packed["position_ids"][:, K:].to(device),
        **extra,
    )
    h = out[0] if not hasattr(out, "last_hidden_state") else out.last_hidden_state  # [B, T - K, d]
    states = None if keep_layer is None else out.hidden_states[int(keep_layer)]
    if prefix is not None:  # the prefix's own states, the same in every row
        h = torch.cat([prefix.hidden.expand(len(pools), -1, -1), h], 1)
        if states is not None:
            states = torch.cat([prefix.kept.expand(len(pools), -1, -1), states], 1)
    return (*pool_outputs(h, head, packed, poolings=poolings), states)


def pool_outputs(
    h: torch.Tensor, head, packed: dict[str, torch.Tensor], *, poolings: Sequence[str] = POOLINGS
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Log-probs and pooled features of packed pool rows from their final hidden states (the output of the last
    norm): the second half of :func:`shared_prefix_outputs`, shared with the ``freeze`` regime
    (:mod:`mass_dpo.frozen`), whose top blocks produce ``h`` from cached lower-block states.

    Args:
        h: ``[B, T, d]`` final hidden states of the rows of ``packed`` (:func:`pack_pools`).
        head: the LM head, ``[n, d] -> [n, vocab]`` logits.

    Returns:
        ``(logps [B, C], {pooling: features [B, C, d]}, mask [B, C], lengths [B, C])`` as :func:`shared_prefix_outputs`.
    """
    device = h.device
    ids = packed["input_ids"].to(device)
    clen = packed["cand_len"]
    B, C = clen.shape
    mask = clen > 0
    # log-probs: candidate c's k-th token is predicted at the previous position of its own sequence, i.e. the last
    # prompt token for k = 0 and the row position just before it otherwise.
    seg = packed["segment"]
    plen = packed["prompt_len"]
    tok_b, tok_t = (seg >= 0).nonzero(as_tuple=True)  # every response token
    tok_c = seg[tok_b, tok_t]
    first = torch.ones_like(tok_t, dtype=torch.bool)
    first[1:] = (tok_b[1:] != tok_b[:-1]) | (tok_c[1:] != tok_c[:-1])
    pred = torch.where(first, plen[tok_b] - 1, tok_t - 1)
    flat = tok_b * C + tok_c
    logps = _response_logps(
        h, head, ids[tok_b.to(device), tok_t.to(device)], tok_b.to(device), pred.to(device), flat.to(device), B * C
    ).view(B, C)

    features: dict[str, torch.Tensor] = {}
    if poolings:
        hf = h.float()
        d = hf.shape[-1]
        cand_sum = hf.new_zeros(B * C, d).index_add(0, flat.to(device), hf[tok_b.to(device), tok_t.to(device)])
        cand_sum = cand_sum.view(B, C, d)  # sum over each candidate's response tokens
        n_resp = clen.to(device=device, dtype=torch.float32)
        keep = mask.to(device)[..., None]
        for pooling in poolings:
            if pooling == "all":
                is_prompt = (seg == -1).to(device=device, dtype=hf.dtype)
                prompt_sum = torch.einsum("bt,btd->bd", is_prompt, hf)
                total = cand_sum + prompt_sum[:, None, :]
                n = n_resp + plen.to(device=device, dtype=torch.float32)[:, None]
            else:
                total, n = cand_sum, n_resp
            features[pooling] = total / n.clamp_min(1.0)[..., None] * keep
    return logps, features, mask.to(device), clen.to(device)


def shared_prefix_forward_batch(
    model,
    pools: Sequence[tuple[Any, Sequence[Any]]],
    *,
    pooling: str = "all",
    return_features: bool = True,
    pad_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One forward for several pools, one packed row each (right-padded): :func:`shared_prefix_outputs` with one
    pooling.

    Args:
        model: a causal LM (transformers ``*ForCausalLM``, possibly peft-wrapped).
        pools: ``[(prompt_ids, [candidate_ids, ...]), ...]``; ids as lists or 1D LongTensors.
        pooling: ``"all"`` (prompt + response tokens) or ``"response"`` (response tokens only).

    Returns:
        ``(logps [B, Cmax] float32, features [B, Cmax, d] float32 or None, mask [B, Cmax] bool)``; padded entries
        are 0. Differentiable: no ``torch.no_grad`` inside (wrap the call for inference).
    """
    _check_pooling(pooling)
    logps, feats, mask, _ = shared_prefix_outputs(
        model, pools, poolings=(pooling,) if return_features else (), pad_id=pad_id
    )
    return logps, feats.get(pooling), mask


def shared_prefix_forward(
    model, prompt_ids, candidate_ids, *, pooling: str = "all", return_features: bool = True, pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One pool in one forward: ``(logps [C], features [C, d] or None)``, float32, differentiable.

    ``logps[c] = sum_k log p(t_k | prompt, t_<k)`` over candidate c's response tokens; ``features[c]`` the mean
    final hidden state over the prompt and c's tokens (``pooling="all"``) or c's tokens (``"response"``)."""
    logps, feats, _ = shared_prefix_forward_batch(
        model, [(prompt_ids, candidate_ids)], pooling=pooling, return_features=return_features, pad_id=pad_id
    )
    return logps[0], (feats[0] if feats is not None else None)


def naive_forward(
    model, prompt_ids, candidate_ids, *, pooling: str = "all", pad_id: int = 0, return_features: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference: one row ``[prompt, cand_c]`` per candidate (right-padded, a 2D attention mask), through the
    full model (``model(...).logits`` and the last of ``hidden_states``). ``(logps [C], features [C, d])``;
    ``features`` is None with ``return_features=False``. Differentiable: it is also the package's one-row-per-response
    training forward (``mass_dpo.training.pool_logps(..., forward=naive_forward)``, S-DPO's layout)."""
    _check_pooling(pooling)
    p, cands = _check_pool(prompt_ids, candidate_ids)
    _, device = _model_dtype_device(model)
    P, C = len(p), len(cands)
    T = P + max(len(c) for c in cands)
    ids = torch.full((C, T), pad_id, dtype=torch.long)
    att = torch.zeros((C, T), dtype=torch.long)
    for c, toks in enumerate(cands):
        ids[c, : P + len(toks)] = torch.tensor(p + toks)
        att[c, : P + len(toks)] = 1
    # logits only from the last prompt position on (logits_to_keep): the response tokens are predicted there
    out = model(
        input_ids=ids.to(device),
        attention_mask=att.to(device),
        output_hidden_states=return_features,
        use_cache=False,
        logits_to_keep=T - P + 1,
    )
    logprobs = out.logits.float().log_softmax(-1)  # [C, T - P + 1, V]; index j = position P - 1 + j
    logps, feats = [], []
    for c, toks in enumerate(cands):
        L = len(toks)
        tgt = torch.tensor(toks, device=device)
        logps.append(logprobs[c, :L].gather(-1, tgt[:, None]).sum())
        if return_features:
            lo = 0 if pooling == "all" else P
            feats.append(out.hidden_states[-1][c, lo : P + L].float().mean(0))  # [d]
    return torch.stack(logps), torch.stack(feats) if return_features else None
