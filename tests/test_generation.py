"""Generation-based HitRatio@1 (mass_dpo.generation): the matching rule on hand-written outputs, hit_ratio with a
fake ``generate`` whose replies are known, and real greedy decoding on ``tiny`` against a hand-written argmax loop."""

import math

import pytest
import torch

from mass_dpo.data.formatting import encode_pool
from mass_dpo.generation import generate_replies, hit_ratio, judge_output, matched_candidates

ARTISTS = ["Coldplay", "Muse", "The Rolling Stones", "Blur"]


# ---------------------------------------------------------------- the matching rule


@pytest.mark.parametrize(
    "output, expected",
    [
        ("I would recommend Coldplay.", [0]),  # exactly one
        ("Radiohead", []),  # none
        ("", []),
        ("Muse or Blur", [1, 3]),  # two
        ("  the   ROLLING\n stones ", [2]),  # case and whitespace
        ("muse, MUSE, Muse", [1]),  # one candidate named several times
        ("Amused", [1]),  # plain substring, no word boundaries (S-DPO's rule)
    ],
)
def test_matched_candidates_basic(output, expected):
    assert matched_candidates(output, ARTISTS) == expected


def test_matched_candidates_counts_only_maximal_matches():
    cands = ["Coldplay", "Coldplay Live", "Live", "Kings of Leon", "Leon Bridges"]
    assert matched_candidates("Coldplay Live", cands) == [1]  # "Coldplay" and "Live" lie inside it
    assert matched_candidates("coldplay  LIVE!", cands) == [1]
    assert matched_candidates("Coldplay Live, then Coldplay", cands) == [0, 1]  # a free "Coldplay" too
    assert matched_candidates("Coldplay Live live", cands) == [1, 2]
    assert matched_candidates("Coldplay", cands) == [0]
    # overlapping but neither inside the other: both named
    assert matched_candidates("Kings of Leon Bridges", cands) == [3, 4]


def test_matched_candidates_equal_after_normalisation_are_ambiguous():
    assert matched_candidates("muse", ["Muse", "MUSE ", "Blur"]) == [0, 1]
    assert matched_candidates("blur", ["Muse", "", "Blur"]) == [2]  # an empty candidate never matches


def test_option_labels_only_with_labels_true():
    options = ["h2o composition", "snow, ice, and rock", "salt and pepper", "melanin amount"]
    assert matched_candidates("(C)", options) == []  # S-DPO's rule: a letter names no candidate text
    assert matched_candidates("(C)", options, labels=True) == [2]
    assert matched_candidates("( C ) salt and pepper", options, labels=True) == [2]  # label and text agree
    assert matched_candidates("(B) snow, ice, and rock. The answer is (B)", options, labels=True) == [1]
    assert matched_candidates("(C) or (D)", options, labels=True) == [2, 3]
    assert matched_candidates("(D) salt and pepper", options, labels=True) == [2, 3]  # label and text disagree
    assert matched_candidates("(a) first, (b) second", options, labels=True) == []  # lower case: enumerations
    assert matched_candidates("(E)", options, labels=True) == []  # no fifth option
    assert judge_output("(C)", options, target=2, labels=True) == (True, True, 2)


def test_judge_output():
    assert judge_output("Blur", ARTISTS, target=3) == (True, True, 3)
    assert judge_output("Blur", ARTISTS, target=0) == (True, False, 3)
    assert judge_output("Blur and Muse", ARTISTS, target=3) == (False, False, -1)
    assert judge_output("nothing", ARTISTS, target=3) == (False, False, -1)


# ---------------------------------------------------------------- hit_ratio with known replies


@pytest.fixture(scope="module")
def tiny():
    from mass_dpo.models import load_model

    return load_model("tiny", device="cpu")


def _records():
    prompts = ["Pick an artist for me, please.", "Which band next?",
               "A longer prompt: which one of these bands comes next?", "Name one.", "Your answer?", "Choose."]
    return [
        {"id": f"r{i}", "prompt": p, "candidates": list(ARTISTS), "target": t}
        for i, (p, t) in enumerate(zip(prompts, [0, 1, 2, 3, 0, 2]))
    ]


# per record: the reply the fake model gives, and (valid, hit)
REPLIES = [
    ("Coldplay", (1, 1)),  # the target
    ("I think Blur", (1, 0)),  # another candidate
    ("the rolling   STONES", (1, 1)),  # target, case and whitespace differ
    ("Muse or Blur", (0, 0)),  # two candidates
    ("Radiohead", (0, 0)),  # none
    ("The Rolling Stones, the Rolling Stones", (1, 1)),  # the target twice
]


def _fake_generate(tokenizer, records, calls):
    """A ``generate`` that answers each prompt with its REPLIES text followed by EOS and padding."""
    from mass_dpo.data.formatting import encode_text

    by_prompt = {tuple(encode_pool(r, tokenizer)[0]): text for r, (text, _) in zip(records, REPLIES)}
    eos = tokenizer.eos_token_id

    def generate(*, input_ids, attention_mask, max_new_tokens, do_sample, **kw):
        calls.append(dict(input_ids=input_ids, attention_mask=attention_mask, do_sample=do_sample,
                          grad=torch.is_grad_enabled(), **kw))
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = tuple(t for t, m in zip(ids, mask) if m)
            rows.append((encode_text(by_prompt[prompt], tokenizer) + [eos])[:max_new_tokens])
        width = max(len(r) for r in rows)
        new = torch.tensor([r + [eos] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)

    return generate


def test_hit_ratio_with_known_replies(tiny, monkeypatch):
    records = _records()
    calls = []
    monkeypatch.setattr(tiny.model, "generate", _fake_generate(tiny.tokenizer, records, calls))
    tiny.model.train()
    out = hit_ratio(tiny.model, tiny.tokenizer, records, max_new_tokens=20, batch_size=4)
    assert tiny.model.training  # mode restored
    tiny.model.eval()

    valid = torch.tensor([v for _, (v, _) in REPLIES], dtype=torch.float64)
    hits = torch.tensor([h for _, (_, h) in REPLIES], dtype=torch.float64)
    assert torch.equal(out["valid"], valid) and torch.equal(out["hits"], hits)
    assert out["outputs"] == [text for text, _ in REPLIES]
    assert out["matched"].tolist() == [0, 3, 2, -1, -1, 2]
    assert out["ids"] == [r["id"] for r in records] and out["prompts"] == 6
    n = 6
    for key, x in (("hit_ratio", hits), ("valid_ratio", valid)):
        p = float(x.mean())
        assert out[key] == pytest.approx(p)
        # mean_se of 0/1 values: the binomial sqrt(p(1-p)/n) times sqrt(n/(n-1))
        assert out[f"{key}_se"] == pytest.approx(math.sqrt(p * (1 - p) / n) * math.sqrt(n / (n - 1)))
    assert out["hit_ratio"] == pytest.approx(3 / 6) and out["valid_ratio"] == pytest.approx(4 / 6)

    # two generate calls (4 + 2 prompts), greedy, no gradient, left padding, prompts rendered as encode_pool does
    assert [c["input_ids"].shape[0] for c in calls] == [4, 2]
    assert all(c["do_sample"] is False and not c["grad"] for c in calls)
    first = calls[0]["attention_mask"]
    assert (first[:, -1] == 1).all() and (first == 0).any()  # real tokens flush right, padding on the left
    seen = {tuple(t for t, m in zip(i, a) if m) for c in calls
            for i, a in zip(c["input_ids"].tolist(), c["attention_mask"].tolist())}
    assert seen == {tuple(encode_pool(r, tiny.tokenizer)[0]) for r in records}


def test_hit_ratio_reply_is_cut_at_end_of_turn(tiny, monkeypatch):
    """Text after the first EOS is not part of the reply (a candidate there is not counted)."""
    from mass_dpo.data.formatting import encode_text

    records = _records()[:1]
    tok = tiny.tokenizer
    after = encode_text("Coldplay", tok) + [tok.eos_token_id] + encode_text(" Muse", tok)

    def generate(*, input_ids, attention_mask, max_new_tokens, **kw):
        return torch.cat([input_ids, torch.tensor([after])], dim=1)

    monkeypatch.setattr(tiny.model, "generate", generate)
    out = hit_ratio(tiny.model, tok, records)
    assert out["outputs"] == ["Coldplay"] and out["hits"].tolist() == [1.0]


def test_hit_ratio_labels_option(tiny, monkeypatch):
    from mass_dpo.data.formatting import encode_text

    tok = tiny.tokenizer
    record = {"id": "q", "prompt": "Question?\n(A) salt\n(B) pepper\nAnswer:", "candidates": ["salt", "pepper"],
              "target": 1}
    reply = encode_text("(B)", tok) + [tok.eos_token_id]

    def generate(*, input_ids, attention_mask, max_new_tokens, **kw):
        return torch.cat([input_ids, torch.tensor([reply])], dim=1)

    monkeypatch.setattr(tiny.model, "generate", generate)
    assert hit_ratio(tiny.model, tok, [record])["valid"].tolist() == [0.0]
    out = hit_ratio(tiny.model, tok, [record], labels=True)
    assert out["hits"].tolist() == [1.0] and out["matched"].tolist() == [1]


def test_hit_ratio_names_missing_fields(tiny):
    with pytest.raises(KeyError, match="candidates"):
        hit_ratio(tiny.model, tiny.tokenizer, [{"id": "x", "prompt": "p", "target": 0}])
    with pytest.raises(ValueError, match="out of range"):
        hit_ratio(tiny.model, tiny.tokenizer, [{"id": "x", "prompt": "p", "candidates": ["a"], "target": 3}])


# ---------------------------------------------------------------- real greedy decoding on tiny


@pytest.fixture(scope="module")
def sharp_tiny(tiny):
    """``tiny`` with larger random weights, so that greedy replies depend on the prompt (the seeded init gives
    near-uniform logits and the same reply everywhere)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny.model.config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 if p.dim() > 1 else torch.ones_like(p))
    return model.float().eval()


def _argmax_loop(model, prompt_ids, n, stop):
    """Greedy decoding by hand: full forward of prompt + reply so far, argmax, stop at an end-of-turn token."""
    ids, out, gaps = list(prompt_ids), [], []
    with torch.no_grad():
        for _ in range(n):
            top = model(torch.tensor([ids])).logits[0, -1].topk(2)
            gaps.append(float(top.values[0] - top.values[1]))
            t = int(top.indices[0])
            if t in stop:
                break
            out.append(t)
            ids.append(t)
    return out, min(gaps)


def test_greedy_generation_matches_argmax_loop(sharp_tiny, tiny):
    tok = tiny.tokenizer
    records = _records()[:3]  # prompts of different lengths: the batch is left-padded
    prompts = [encode_pool(r, tok)[0] for r in records]
    assert len({len(p) for p in prompts}) == 3
    refs = [_argmax_loop(sharp_tiny, p, 4, {tok.eos_token_id}) for p in prompts]
    assert min(g for _, g in refs) > 1e-4  # no near-tie that rounding could flip
    expected = [tok.decode(ids, skip_special_tokens=True) for ids, _ in refs]
    assert len(set(expected)) == 3
    assert generate_replies(sharp_tiny, tok, prompts, max_new_tokens=4, batch_size=3) == expected
    assert generate_replies(sharp_tiny, tok, prompts, max_new_tokens=4, batch_size=1) == expected


def test_hit_ratio_real_generation_on_tiny(tiny):
    records = _records()
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    out = hit_ratio(tiny.model, tiny.tokenizer, records, max_new_tokens=4, batch_size=4)
    assert out["prompts"] == 6 and len(out["outputs"]) == 6 and out["ids"] == [r["id"] for r in records]
    for key in ("hits", "valid", "matched"):
        assert out[key].shape == (6,)
    assert all(isinstance(o, str) for o in out["outputs"])
    assert 0.0 <= out["hit_ratio"] <= out["valid_ratio"] <= 1.0
    # the per-prompt arrays agree with the matching rule applied to the returned texts
    for o, r, v, h in zip(out["outputs"], records, out["valid"], out["hits"]):
        assert judge_output(o, r["candidates"], r["target"])[:2] == (bool(v), bool(h))
    assert all(torch.equal(v, tiny.model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in tiny.model.parameters())


def test_hit_ratio_peft_wrapped_equals_base(sharp_tiny, tiny):
    """A fresh LoRA adapter (B = 0) leaves the model's function unchanged: same replies through the peft wrapper."""
    import peft
    import copy

    records = _records()[:4]
    base = hit_ratio(sharp_tiny, tiny.tokenizer, records, max_new_tokens=4, batch_size=2)
    wrapped = peft.get_peft_model(copy.deepcopy(sharp_tiny), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    wrapped.train()
    out = hit_ratio(wrapped, tiny.tokenizer, records, max_new_tokens=4, batch_size=2)
    assert wrapped.training
    assert out["outputs"] == base["outputs"]
    assert torch.equal(out["hits"], base["hits"]) and torch.equal(out["valid"], base["valid"])
