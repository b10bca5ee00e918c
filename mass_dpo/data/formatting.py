"""Chat formatting of a record: the prompt as a user turn, each candidate as the assistant's reply.

A record has ``prompt`` (plain text, no chat template) and ``candidates`` (list of str). The prompt is rendered
with the tokenizer's chat template and ``add_generation_prompt=True``; a candidate's response text is what the
template appends after that prompt when the candidate is the assistant's message, cut after the end-of-turn
marker (SmolLM2: ``"<|im_end|>"``, Llama 3: ``"<|eot_id|>"``; the newline the template writes after it belongs to
no response). Both texts are tokenized separately with ``add_special_tokens=False``; with SmolLM2

    tokens(prompt_text) + tokens(response_text) == tokens(prompt_text + response_text)

so the prompt/response boundary is exact (``tests/test_formatting.py`` checks it on SmolLM2's template and on a
Llama-3-style one). The ids are always the separate tokenizations (prompt once, shared by the pool, then each
response): that is what a model sees when it generates the response after the prompt, and it decodes to exactly the
chat text. Where a tokenizer would merge characters across the boundary (a byte-level BPE whose regex keeps
``"\n\n"`` whole at the end of the prompt but splits it before a letter), the separate tokenization is the one used.
Tokenizers without a chat template get a plain-text layout (:data:`PLAIN_PROMPT`).

Records read from a preference file (:func:`mass_dpo.data.load_preferences`: they carry a ``messages`` field) are
tokenized exactly as ``trl.DPOTrainer`` tokenizes the same rows (TRL 1.16, ``_prepare_dataset``), so that the
negatives are scored, and ``mass-dpo train --data`` trains, on the very sequences TRL trains on
(:func:`trl_layout`, :func:`encode_trl_pool`): a plain-text (standard) row is not chat-formatted (the prompt as given,
tokenized with the tokenizer's special tokens; each response + EOS); a conversational row renders its own message
lists (system turns and earlier turns included) with ``add_generation_prompt=True`` for the prompt, and the whole
conversation for each response; the response is what follows the longest common prefix of the prompt's and the
conversation's tokens (TRL's ``common_prefix_length``), the template's text after the end-of-turn marker included.
"""

from __future__ import annotations

import json
import os

from typing import Any, Mapping

#: The layout used when the tokenizer has no chat template; the response is the candidate plus the EOS token.
PLAIN_PROMPT = "User: {prompt}\nAssistant: "

#: The date Llama 3.x templates write into the system turn (fixed for reproducibility).
TEMPLATE_DATE = "26 Jul 2024"


def _has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _prompt_text(record: Mapping[str, Any]) -> str:
    if "prompt" not in record:
        raise KeyError(f"record has no 'prompt' field (fields: {', '.join(map(str, record))})")
    prompt = record["prompt"]
    if not isinstance(prompt, str):
        raise TypeError(f"record['prompt'] must be plain text (str), got {type(prompt).__name__}")
    return prompt


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    # enable_thinking=False: Qwen3 / SmolLM3 render an empty reasoning block instead of asking for one;
    # date_string: Llama 3.2 writes "Today Date: ..." (today's date by default) into its system turn, fixed here so
    # that the same record always renders the same text. Templates that do not use a variable ignore it.
    return tokenizer.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        enable_thinking=False,
        date_string=TEMPLATE_DATE,
    )


def trl_layout(record: Mapping[str, Any]) -> str | None:
    """``"standard"`` / ``"conversational"``: the TRL form of a record read from a preference file; ``None`` for a
    benchmark record (chat-formatted as the module docstring says)."""
    if "messages" not in record:
        return None
    return "conversational" if record["messages"] else "standard"


def _chat_ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    return list(out["input_ids"])


def _template_kwargs(conv: Mapping[str, Any]) -> dict[str, Any]:
    """What ``trl.DPOTrainer`` passes to ``apply_chat_template`` besides the messages: the row's ``tools`` and its
    ``chat_template_kwargs``."""
    return {"tools": conv.get("tools"), **(conv.get("chat_template_kwargs") or {})}


def encode_trl_prompt(record: Mapping[str, Any], tokenizer) -> list[int]:
    """The prompt ids ``trl.DPOTrainer`` builds for a preference-file record (:func:`trl_layout`): the plain text
    with the tokenizer's special tokens, or the prompt's messages with the generation prompt (and the row's tools
    and template variables)."""
    if trl_layout(record) == "conversational":
        conv = json.loads(record["messages"])
        return _chat_ids(tokenizer, conv["prompt"], add_generation_prompt=True, **_template_kwargs(conv))
    return list(tokenizer(_prompt_text(record))["input_ids"])


def encode_trl_pool(record: Mapping[str, Any], tokenizer) -> tuple[list[int], list[list[int]]]:
    """``(prompt_ids, [candidate_ids, ...])`` of a preference-file record as ``trl.DPOTrainer`` tokenizes each of
    its pairs: prompt + response tokenized whole (a plain-text response with EOS appended unless it ends with it),
    the response being what follows the common prefix of the prompt's ids and those (the shortest over the pool,
    so that the prompt is shared)."""
    prompt_ids = encode_trl_prompt(record, tokenizer)
    if trl_layout(record) == "conversational":
        conv = json.loads(record["messages"])
        fulls = [_chat_ids(tokenizer, conv["prompt"] + c, **_template_kwargs(conv)) for c in conv["candidates"]]
    else:
        eos = getattr(tokenizer, "eos_token", None) or ""
        prompt = _prompt_text(record)
        fulls = [list(tokenizer(prompt + c + ("" if c.endswith(eos) else eos))["input_ids"])
                 for c in record["candidates"]]
    cut = min(len(os.path.commonprefix([prompt_ids, f])) for f in fulls)
    return prompt_ids[:cut], [f[cut:] for f in fulls]


def format_prompt(record: Mapping[str, Any], tokenizer) -> str:
    """The chat-formatted prompt: ``record["prompt"]`` as the user turn, followed by the generation prompt (a
    preference-file record: the text of :func:`encode_trl_prompt`)."""
    if trl_layout(record) is not None:
        return tokenizer.decode(encode_trl_prompt(record, tokenizer))
    prompt = _prompt_text(record)
    if not _has_template(tokenizer):
        return PLAIN_PROMPT.format(prompt=prompt)
    return _render(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)


def _end_markers(tokenizer) -> list[str]:
    names = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "</s>")
    eos = getattr(tokenizer, "eos_token", None)
    return [m for m in dict.fromkeys(((eos,) if eos else ()) + names) if m]


def format_pair(record: Mapping[str, Any], candidate: str, tokenizer, *, prompt_text: str | None = None):
    """``(prompt_text, response_text)`` for one candidate; ``prompt_text + response_text`` is the chat.

    ``response_text`` is the candidate as the assistant's message, up to and including the end-of-turn marker
    (whatever the template writes after the marker, usually a newline, is dropped). Pass ``prompt_text`` (from
    :func:`format_prompt`) to skip rendering the prompt again.
    """
    if not isinstance(candidate, str):
        raise TypeError(f"a candidate must be a str, got {type(candidate).__name__}")
    if prompt_text is None:
        prompt_text = format_prompt(record, tokenizer)
    if not _has_template(tokenizer):
        return prompt_text, candidate + (getattr(tokenizer, "eos_token", None) or "")
    messages = [{"role": "user", "content": _prompt_text(record)}, {"role": "assistant", "content": candidate}]
    full = _render(tokenizer, messages, add_generation_prompt=False)
    if full.startswith(prompt_text):
        suffix = full[len(prompt_text) :]
        # cut after the first end-of-turn marker that follows the candidate text
        start = suffix.find(candidate) + len(candidate) if candidate and candidate in suffix else 0
        cuts = [suffix.find(m, start) + len(m) for m in _end_markers(tokenizer) if suffix.find(m, start) >= 0]
        response = suffix[: min(cuts)] if cuts else suffix.rstrip("\n")
        return prompt_text, response
    # the template rewrites earlier turns once an assistant reply follows: fall back to candidate + EOS
    return prompt_text, candidate + (getattr(tokenizer, "eos_token", None) or "")


def encode_text(text: str, tokenizer) -> list[int]:
    """Token ids of an already formatted text (no BOS/EOS added: the chat template writes its own)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt(record: Mapping[str, Any], tokenizer) -> list[int]:
    """The prompt ids a model generates after: :func:`encode_trl_prompt` for a preference-file record, else the
    chat-formatted prompt (:func:`format_prompt`)."""
    if trl_layout(record) is not None:
        return encode_trl_prompt(record, tokenizer)
    return encode_text(format_prompt(record, tokenizer), tokenizer)


def encode_pool(record: Mapping[str, Any], tokenizer) -> tuple[list[int], list[list[int]]]:
    """``(prompt_ids, [candidate_ids, ...])`` of a record: the chat-formatted prompt once, then each candidate's
    response tokens (see :func:`format_pair`); ``prompt_ids + candidate_ids[c]`` is the full chat for candidate c.
    A preference-file record: TRL's tokenization (:func:`encode_trl_pool`)."""
    if "candidates" not in record:
        raise KeyError(f"record has no 'candidates' field (fields: {', '.join(map(str, record))})")
    if trl_layout(record) is not None:
        prompt_ids, cand_ids = encode_trl_pool(record, tokenizer)
    else:
        prompt_text = format_prompt(record, tokenizer)
        prompt_ids = encode_text(prompt_text, tokenizer)
        cand_ids = [encode_text(format_pair(record, c, tokenizer, prompt_text=prompt_text)[1], tokenizer)
                    for c in record["candidates"]]
    for c, ids in zip(record["candidates"], cand_ids):
        if not ids:
            raise ValueError(f"candidate {c!r} of record {record.get('id', '?')!r} tokenizes to nothing")
    return prompt_ids, cand_ids


def truncate_pool(prompt_ids: list[int], candidate_ids: list[list[int]], max_length: int | None,
                  max_prompt_length: int | None = None, *, where: str = "a prompt"):
    """A pool cut the way TRL's ``DPOTrainer`` cuts its sequences: ``(prompt_ids, candidate_ids, prompt_cut,
    responses_cut)``.

    - ``max_prompt_length`` (first; ``None``: no limit): a longer prompt keeps its **last** ``max_prompt_length``
      tokens (cut from the left, as the ``max_prompt_length`` of TRL's 0.x releases did, so the end of the chat turn
      and the generation prompt stay; TRL 1.x has no prompt limit: ``None`` cuts exactly as it does);
    - ``max_length`` (``None``: no limit): each prompt + response sequence keeps its **first** ``max_length`` tokens
      (TRL's ``truncation_mode="keep_start"``, its default): a response's tail is cut. A prompt that leaves no room
      for a response (``len(prompt) >= max_length``; TRL drops such examples) is a ``ValueError`` naming ``where``.
    ``prompt_cut`` says whether the prompt was cut, ``responses_cut`` how many responses were.
    """
    prompt_ids, candidate_ids = list(prompt_ids), [list(c) for c in candidate_ids]
    prompt_cut = max_prompt_length is not None and len(prompt_ids) > max_prompt_length
    if prompt_cut:
        prompt_ids = prompt_ids[len(prompt_ids) - max_prompt_length:]
    if max_length is None:
        return prompt_ids, candidate_ids, prompt_cut, 0
    room = max_length - len(prompt_ids)
    if room < 1:
        raise ValueError(
            f"{where}: its prompt has {len(prompt_ids)} tokens, which leaves no room for a response within "
            f"max_length {max_length}: raise max_length (--max-length) or cut prompts from the left with "
            "max_prompt_length (--max-prompt-length)")
    cut = sum(len(c) > room for c in candidate_ids)
    return prompt_ids, [c[:room] for c in candidate_ids], prompt_cut, cut
