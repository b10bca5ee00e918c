"""Chat formatting: the prompt/response token boundary is exact (SmolLM2's template, a Llama-3-style template)."""

import copy

import pytest

from mass_dpo.data.formatting import PLAIN_PROMPT, encode_pool, encode_text, format_pair, format_prompt

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

RECORD = {
    "id": "r0",
    "prompt": "The user listened to: Queen, U2.\nWhich artist comes next?",
    "candidates": ["Madonna", "The Rolling Stones", "AC/DC 2", "\nLeading newline"],
    "target": 1,
}


@pytest.fixture(scope="module")
def tok():
    from mass_dpo.models import load_tokenizer

    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def llama_tok(tok):
    t = copy.deepcopy(tok)
    t.chat_template = LLAMA3_TEMPLATE
    t.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    return t


def _full_chat(record, candidate, tokenizer):
    messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": candidate}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def test_smollm2_prompt_and_response_text(tok):
    prompt = format_prompt(RECORD, tok)
    assert prompt.endswith("<|im_start|>user\n" + RECORD["prompt"] + "<|im_end|>\n<|im_start|>assistant\n")
    for cand in RECORD["candidates"]:
        p, resp = format_pair(RECORD, cand, tok)
        assert p == prompt
        assert resp == cand + "<|im_end|>"
        assert _full_chat(RECORD, cand, tok) == p + resp + "\n"  # the newline after <|im_end|> is no response's


def test_smollm2_token_boundary_is_exact(tok):
    prompt_ids, cand_ids = encode_pool(RECORD, tok)
    newline = encode_text("\n", tok)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for cand, ids in zip(RECORD["candidates"], cand_ids):
        full = encode_text(_full_chat(RECORD, cand, tok), tok)
        assert prompt_ids + ids + newline == full
        assert ids[-1] == end
        assert tok.decode(ids) == cand + "<|im_end|>"


def test_llama3_style_template(llama_tok):
    prompt = format_prompt(RECORD, llama_tok)
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    prompt_ids, cand_ids = encode_pool(RECORD, llama_tok)
    assert prompt_ids == encode_text(prompt, llama_tok)
    eot = llama_tok.convert_tokens_to_ids("<|eot_id|>")
    for cand, ids in zip(RECORD["candidates"], cand_ids):
        p, resp = format_pair(RECORD, cand, llama_tok)
        assert resp == cand.strip() + "<|eot_id|>"  # the template trims the content
        assert p + resp == _full_chat(RECORD, cand, llama_tok)  # nothing after <|eot_id|> here
        assert ids[-1] == eot and ids.count(eot) == 1
        assert llama_tok.decode(prompt_ids + ids) == p + resp  # the ids spell exactly the chat
        # the boundary is where the prompt's tokens end: the prompt's ids are the same for every candidate
        assert encode_text(p + resp, llama_tok)[: len(prompt_ids) - 1] == prompt_ids[:-1]


def test_plain_text_fallback(tok):
    t = copy.deepcopy(tok)
    t.chat_template = None
    assert format_prompt(RECORD, t) == PLAIN_PROMPT.format(prompt=RECORD["prompt"])
    p, resp = format_pair(RECORD, "Madonna", t)
    assert resp == "Madonna" + t.eos_token


def test_bad_records_name_the_problem(tok):
    with pytest.raises(KeyError, match="prompt"):
        format_prompt({"candidates": ["a"]}, tok)
    with pytest.raises(TypeError, match="plain text"):
        format_prompt({"prompt": [{"role": "user", "content": "x"}]}, tok)
    with pytest.raises(KeyError, match="candidates"):
        encode_pool({"prompt": "x"}, tok)
