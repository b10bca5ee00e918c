"""Generation-based HitRatio@1 with the valid ratio beside it: the LM regimes' Table 1 Accuracy (Section 6).

In the S-DPO line of work (S-DPO's ``evaluate_batch.py``, LLaRA) a recommender LM is scored by what it *says*:
every test prompt is decoded greedily (``max_new_tokens=20``) and the output is compared with the prompt's
candidates (the 20 names of its pool; the options of a QA question):

- the output is **valid** when exactly one candidate occurs in it;
- it is a **hit** when it is valid and that candidate is the target;
- ``HitRatio@1 = hits / prompts`` and ``valid_ratio = valid / prompts`` (both over *all* test prompts, so an
  invalid output counts as a miss; ``HitRatio@1 <= valid_ratio``).

"Occurs" is defined precisely here (:func:`matched_candidates`):

1. Output and candidates are normalised by :func:`mass_dpo.data.records.normalize_text` (outer whitespace
   stripped, runs of whitespace collapsed to one space, casefolded); a candidate occurs where its normalised text is
   a substring of the normalised output (plain substring, no word boundaries, as in S-DPO; S-DPO compares the raw
   texts, case-sensitively: here ``"coldplay"`` names ``"Coldplay"``).
2. Only maximal matches count (a departure from S-DPO, which counts every candidate that is a substring, so that
   ``"Heat Wave"`` names both ``"Heat"`` and ``"Heat Wave"`` there and is invalid): an occurrence of a candidate that lies inside an occurrence of a strictly longer
   candidate (``"Coldplay"`` inside ``"Coldplay Live"``) is not a match of the shorter one. A candidate matches
   when at least one of its occurrences is not covered that way, so ``"Coldplay Live"`` alone is valid (it names
   ``"Coldplay Live"``), ``"Coldplay Live, then Coldplay"`` names both and is invalid.
3. Candidates whose normalised texts are equal both match (the output cannot tell them apart): invalid.

Rules 1-2 are more lenient than S-DPO's ``can in selection`` count, on purpose: a reply that names the target
word for word should not be invalid because a shorter candidate is part of it. Measured on the test splits (an
audit of 2026-12-05), a reply that is exactly the target is a hit here but invalid under S-DPO's rule on 2 of 2,000
LastFM prompts, 1 of 2,000 MovieLens, 3 of 926 QASC and 25 of 2,000 MedMCQA (59 counting case): HitRatio@1 here can
sit up to about 1.3 points (MedMCQA) above S-DPO's rule. And ``max_new_tokens=20`` (S-DPO's) cuts a few targets
longer than 20 of SmolLM2's tokens (13 of 2,000 MedMCQA, 1 LastFM, 1 MovieLens, none in QASC): no reply hits
those by their text (on the QA datasets an option label still can), the same for every method and the reference.

An answer that gives only an option letter (``"(G)"``) names no candidate text and is invalid under this rule
(S-DPO's). For the lettered QA prompts (QASC, MedMCQA: ``(A) text`` one a line, labels
:func:`mass_dpo.data.records.letters` in candidate order) ``labels=True`` adds a rule 4: a parenthesised upper-case
label ``"(G)"`` in the output names candidate G as well (case-sensitive, so ordinary ``"(a)"`` enumerations do not
count); ``"(G) Buccal surface"`` then names one candidate, ``"(G) or (H)"`` two. The output is the
decoded text of the generated tokens up to the first end-of-turn token (the tokenizer's EOS and the chat end
markers of :mod:`mass_dpo.data.formatting`), special tokens skipped.

The prompts are rendered exactly as training and extraction render them
(:func:`mass_dpo.data.formatting.encode_prompt`, the prompt part of :func:`~mass_dpo.data.formatting.encode_pool`;
uncut: a ``max_prompt_length`` that cuts training prompts from the left does not cut them here, and no profile sets
one),
left-padded into batches (sorted by length, so padding is small; the
outputs come back in record order). Standard errors are :func:`mass_dpo.metrics.mean_se` of the 0/1 indicators,
``sqrt(p (1 - p) / (n - 1))``: the binomial ``sqrt(p (1 - p) / n)`` times ``sqrt(n / (n - 1))``, the same formula
as every ranking metric, so HitRatio@1 and Recall@1 carry comparable errors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .data.formatting import _end_markers, encode_prompt
from .data.records import letters, normalize_text
from .metrics import mean_se


# --------------------------------------------------------------------------------------------------------------
# The matching rule
# --------------------------------------------------------------------------------------------------------------


def _occurrences(text: str, needle: str) -> list[int]:
    """Start positions of every (possibly overlapping) occurrence of ``needle`` in ``text``."""
    starts, i = [], text.find(needle)
    while i >= 0:
        starts.append(i)
        i = text.find(needle, i + 1)
    return starts


def _labelled(output: str, n: int) -> set[int]:
    """Candidates named by a parenthesised option label ``"(A)"``, ``"(AB)"`` (rule 4) among ``n`` options."""
    index = {lab: i for i, lab in enumerate(letters(n))}
    return {index[m] for m in re.findall(r"\(\s*([A-Z]{1,3})\s*\)", output) if m in index}


def matched_candidates(output: str, candidates: Sequence[str], *, labels: bool = False) -> list[int]:
    """Indices (ascending) of the candidates the output names: maximal, case- and whitespace-insensitive substring
    matches (rules 1-3 of the module docstring), plus option labels ``"(C)"`` with ``labels=True`` (rule 4).
    Empty candidates never match."""
    text = normalize_text(output)
    norm = [normalize_text(c) for c in candidates]
    spans = {i: [(s, s + len(c)) for s in _occurrences(text, c)] for i, c in enumerate(norm) if c}
    matched = []
    for i, own in spans.items():
        longer = [span for j, js in spans.items() if len(norm[j]) > len(norm[i]) for span in js]
        if any(not any(a <= s and e <= b for a, b in longer) for s, e in own):
            matched.append(i)
    if labels:
        return sorted(set(matched) | _labelled(output, len(candidates)))
    return matched


def judge_output(
    output: str, candidates: Sequence[str], target: int, *, labels: bool = False
) -> tuple[bool, bool, int]:
    """``(valid, hit, matched)`` of one output: valid when exactly one candidate matches
    (:func:`matched_candidates`), hit when that one is ``target``; ``matched`` is its index, else -1."""
    found = matched_candidates(output, candidates, labels=labels)
    if len(found) != 1:
        return False, False, -1
    return True, found[0] == int(target), found[0]


# --------------------------------------------------------------------------------------------------------------
# Greedy generation
# --------------------------------------------------------------------------------------------------------------


def _stop_ids(model, tokenizer) -> list[int]:
    """Token ids that end a reply: the model's and the tokenizer's EOS, and every chat end marker that is one token."""
    ids: list[int] = []
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(tokenizer.eos_token_id)
    for marker in _end_markers(tokenizer):
        tid = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tokenizer.convert_ids_to_tokens(tid) == marker:
            ids.append(tid)
    return list(dict.fromkeys(int(i) for i in ids))


def _pad_id(tokenizer, stop: Sequence[int]) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else (int(stop[0]) if stop else 0)


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids [B, T]`` left-padded with ``pad_id`` and ``attention_mask [B, T]`` (1 on real tokens)."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            ids[b, T - len(r) :] = torch.tensor(list(r), dtype=torch.long)
            mask[b, T - len(r) :] = 1
    return ids, mask


def _cut(tokens: Sequence[int], stop: set[int]) -> list[int]:
    """The generated tokens before the first stop token."""
    out = []
    for t in tokens:
        if int(t) in stop:
            break
        out.append(int(t))
    return out


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_replies(
    model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 20, batch_size: int = 8,
    progress: bool = False, prefill=None,
) -> list[str]:
    """Greedy replies (``do_sample=False``) to tokenized prompts, in their order, cut at the first end-of-turn token.

    Args:
        model: a causal LM, plain or peft-wrapped (anything with ``generate``); its train/eval mode is restored.
        prompts: ``P`` lists of token ids (:func:`~mass_dpo.data.formatting.encode_prompt`).
        max_new_tokens, batch_size: generated tokens per reply; prompts per ``generate`` call (left padding).
        prefill: ``prefill(input_ids, attention_mask) -> cache`` (or ``None``), the model's key/value cache over
            all but the last token of a left-padded batch, computed another way (the ``freeze`` regime shares its
            frozen lower blocks' part between policies: :class:`mass_dpo.frozen.LowerPromptCache`); ``generate``
            continues from it. It must be the cache ``generate`` itself would build.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must be >= 1")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt tokenizes to nothing: every prompt needs at least one token")
    stop = _stop_ids(model, tokenizer)
    pad = _pad_id(tokenizer, stop)
    device = _device(model)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    replies: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        from tqdm.auto import tqdm

        with tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress) as bar:
            for lo in range(0, len(order), batch_size):
                idx = order[lo : lo + batch_size]
                ids, mask = _left_pad([prompts[i] for i in idx], pad)
                cache = prefill(ids, mask) if prefill is not None else None
                out = model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                    do_sample=False, num_beams=1, eos_token_id=stop or None, pad_token_id=pad,
                    **({"cache": cache} if cache is not None else {}),
                )
                new = out[:, ids.shape[1] :].cpu().tolist()
                for i, toks in zip(idx, new):
                    replies[i] = tokenizer.decode(_cut(toks, set(stop)), skip_special_tokens=True)
                bar.update(len(idx))
    finally:
        model.train(was_training)
    return replies


def _records(records) -> list[Mapping[str, Any]]:
    rows = records.to_list() if hasattr(records, "to_list") else [dict(r) for r in records]
    for i, r in enumerate(rows):
        missing = [k for k in ("prompt", "candidates", "target") if k not in r]
        if missing:
            raise KeyError(
                f"record {r.get('id', i)!r} has no {', '.join(map(repr, missing))}; generation scoring needs prompt, "
                "candidates and target (mass_dpo.data.records)"
            )
        if not 0 <= int(r["target"]) < len(r["candidates"]):
            raise ValueError(f"record {r.get('id', i)!r}: target {r['target']} out of range for "
                             f"{len(r['candidates'])} candidates")
    return rows


def hit_ratio(
    model, tokenizer, records: Iterable[Mapping[str, Any]], *, max_new_tokens: int = 20, batch_size: int = 8,
    labels: bool = False, progress: bool = False, prefill=None,
) -> dict[str, Any]:
    """Generation-based HitRatio@1 and valid ratio (S-DPO's ``evaluate_batch.py`` rule; module docstring).

    Args:
        model: a causal LM, plain or peft-wrapped; no gradient, its train/eval mode is restored.
        tokenizer: its tokenizer (chat template as in training).
        records: dicts (or a ``datasets.Dataset``) with ``prompt``, ``candidates``, ``target`` (``id`` optional).
        max_new_tokens: greedy tokens per reply (S-DPO: 20); batch_size: prompts per ``generate`` call.
        labels: also count ``"(C)"`` option labels as naming a candidate (rule 4; lettered QA prompts only).
        prefill: passed to :func:`generate_replies` (a shared prompt cache; the ``freeze`` regime's fast path).

    Returns:
        ``hit_ratio``, ``hit_ratio_se``, ``valid_ratio``, ``valid_ratio_se`` (floats), ``prompts`` (int), and per
        prompt in record order, for paired statistics: ``hits`` and ``valid`` (``[P]`` float64 0/1 tensors),
        ``matched`` (``[P]`` long, the named candidate or -1), ``outputs`` (list of str), ``ids`` (list).
    """
    rows = _records(records)
    prompts = [encode_prompt(r, tokenizer) for r in rows]
    outputs = generate_replies(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
        prefill=prefill,
    )
    judged = [judge_output(o, r["candidates"], int(r["target"]), labels=labels) for o, r in zip(outputs, rows)]
    valid = torch.tensor([v for v, _, _ in judged], dtype=torch.float64)
    hits = torch.tensor([h for _, h, _ in judged], dtype=torch.float64)
    out: dict[str, Any] = {}
    out["hit_ratio"], out["hit_ratio_se"] = mean_se(hits)
    out["valid_ratio"], out["valid_ratio_se"] = mean_se(valid)
    out["prompts"] = len(rows)
    out["hits"], out["valid"] = hits, valid
    out["matched"] = torch.tensor([m for _, _, m in judged], dtype=torch.long)
    out["outputs"] = outputs
    out["ids"] = [r.get("id", i) for i, r in enumerate(rows)]
    return out
