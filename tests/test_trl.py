"""TRL reads what ``mass-dpo select`` writes: ``trl.DPOTrainer`` trains on its default output, from a plain-text and
from a conversational preference file, unchanged; and our ``dpo`` / ``dpo_k`` losses equal TRL's own loss on the
same log-probabilities.

TRL is an optional extra (``pip install -e ".[trl]"``, which the README's test command and CI install): these tests
are skipped only where it is not installed. TRL 1.16 computes its DPO loss inside ``DPOTrainer._compute_loss`` (there
is no separate loss function to call), so the loss check runs TRL's ``compute_loss`` on one pair at a time, with
reference log-probs we give it (``precompute_ref_log_probs``), and reads the policy log-probs TRL used through its
public ``compute_ref_log_probs(model, batch)``; they are also checked against our own row-per-response forward on
TRL's token ids.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is not installed: pip install -e '.[trl]'")

import datasets  # noqa: E402

from mass_dpo.forward import naive_forward  # noqa: E402
from mass_dpo.losses import preference_loss  # noqa: E402
from mass_dpo.models import load_model  # noqa: E402
from mass_dpo.preprocess import select_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "notebooks" / "data" / "quickstart_preferences.jsonl"
BETA = 0.5
PROMPTS, NEGATIVES, N = 4, 4, 2  # 4 prompts with pools of 4 negatives, 2 selected each: 8 pairs


def _preference_file(path: Path, conversational: bool) -> Path:
    rows = [json.loads(line) for line in QUICKSTART.read_text().splitlines()[:PROMPTS]]
    out = []
    for r in rows:
        row = {"id": r["id"], "prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"][:NEGATIVES]}
        if conversational:
            bot = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
            row = {"id": r["id"], "prompt": [{"role": "user", "content": r["prompt"]}], "chosen": bot(r["chosen"]),
                   "rejected": [bot(t) for t in row["rejected"]]}
        out.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return path


def _trained(tmp_path: Path, conversational: bool, caplog):
    """``select`` on the file (tiny model), then ``trl.DPOTrainer`` for 2 steps on the output as it is."""
    from trl import DPOConfig, DPOTrainer

    data = _preference_file(tmp_path / "prefs.jsonl", conversational)
    picked = select_dataset(data, load_model("tiny", device="cpu"), split=None, n=N, out=tmp_path / "pairs.jsonl",
                            cache_dir=tmp_path / "extraction", progress=False)
    train = datasets.load_dataset("json", data_files=str(picked.out), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(train) == PROMPTS * N and train.column_names[:3] == ["prompt", "chosen", "rejected"]
    assert trl.data_utils.is_conversational(train[0]) is conversational

    bundle = load_model("tiny", device="cpu")  # a fresh policy; the reference log-probs are computed from it first
    before = [p.detach().clone() for p in bundle.model.parameters()]
    args = DPOConfig(output_dir=str(tmp_path / "trl"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                     beta=BETA, precompute_ref_log_probs=True, gradient_checkpointing=False, bf16=False, use_cpu=True,
                     logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0)
    with caplog.at_level(logging.WARNING, logger="trl"):
        trainer = DPOTrainer(model=bundle.model, args=args, train_dataset=train, processing_class=bundle.tokenizer)
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 2 and len(losses) == 2
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, bundle.model.parameters()))  # it trained
    # the chat template applied by TRL renders the prompt as a prefix of prompt + response (no untemplated text)
    assert "not a prefix" not in caplog.text
    return trainer, picked


@pytest.mark.parametrize("conversational", [False, True], ids=["standard", "conversational"])
def test_dpo_trainer_trains_on_select_output_and_losses_agree(tmp_path, caplog, conversational):
    trainer, picked = _trained(tmp_path, conversational, caplog)
    model = trainer.model.eval()
    examples = list(trainer.train_dataset)  # TRL's tokenized pairs, in file order, with its reference log-probs
    assert [e["id"] for e in examples] == [r["id"] for r in picked.rows]
    if conversational:  # TRL applied the chat template: the prompt ends with the assistant's generation prompt
        assert trainer.processing_class.decode(examples[0]["prompt_ids"]).endswith("<|im_start|>assistant\n")
    # the selection scored the very token ids TRL trains on: prompt, chosen and each selected negative
    from mass_dpo.data import load_preferences
    from mass_dpo.data.formatting import encode_pool

    pools = {r["id"]: encode_pool(r, trainer.processing_class)
             for r in load_preferences(tmp_path / "prefs.jsonl").to_list()}
    for e in examples:
        prompt_ids, cand_ids = pools[e["id"]]
        assert e["prompt_ids"] == prompt_ids and e["chosen_ids"] == cand_ids[0]
        assert e["rejected_ids"] in cand_ids[1:]

    # given reference log-probs: TRL's precomputed ones, moved by a fixed offset per prompt (chosen) and per pair
    # (rejected), so that the margins, and the losses, spread
    g = torch.Generator().manual_seed(0)
    ids = list(dict.fromkeys(e["id"] for e in examples))
    chosen_shift = dict(zip(ids, torch.randn(len(ids), generator=g).tolist()))
    rows = []
    with torch.no_grad():
        for e in examples:
            e = {**e, "ref_chosen_logps": e["ref_chosen_logps"] + chosen_shift[e["id"]],
                 "ref_rejected_logps": e["ref_rejected_logps"] + float(torch.randn(1, generator=g))}
            batch = trainer.data_collator([e])
            trl_loss = float(trainer.compute_loss(model, batch))  # TRL's sigmoid DPO loss of this one pair
            pc, pr = trainer.compute_ref_log_probs(model, batch)  # the policy log-probs that loss used
            ours, _ = naive_forward(model, e["prompt_ids"], [e["chosen_ids"], e["rejected_ids"]], return_features=False)
            assert torch.allclose(ours, torch.stack([pc[0], pr[0]]).float(), atol=1e-4)  # same log-probs, our forward
            rows.append((e["id"], float(pc[0]), float(pr[0]), e["ref_chosen_logps"], e["ref_rejected_logps"], trl_loss))

    pc, pr, rc, rr, trl_losses = (torch.tensor([r[i] for r in rows], dtype=torch.float64) for i in range(1, 6))
    dpo = preference_loss("dpo", pc, pr[:, None], rc, rr[:, None], beta=BETA).loss
    assert torch.allclose(dpo, trl_losses, atol=1e-5, rtol=1e-5), (dpo, trl_losses)
    assert trl_losses.std() > 0.05  # the losses differ from pair to pair: the check can fail

    # dpo_k on each prompt's k negatives = the mean of TRL's k pairwise losses
    for pid in ids:
        mine = [i for i, r in enumerate(rows) if r[0] == pid]
        assert len(mine) == N and torch.allclose(pc[mine], pc[mine[0]], atol=1e-5)  # one chosen per prompt
        k = preference_loss("dpo_k", pc[mine[:1]], pr[mine][None], rc[mine[:1]], rr[mine][None], beta=BETA).loss
        assert float(k) == pytest.approx(float(trl_losses[mine].mean()), abs=1e-5)


def test_preference_rows_are_tokenized_as_trl_tokenizes_them(tmp_path):
    """Plain text (not chat-formatted, EOS appended), and conversations with a system turn and earlier turns
    (rendered as they are): mass_dpo's pool ids equal TRL's prompt / completion split of every pair."""
    from trl.data_utils import _tokenize, common_prefix_length

    from mass_dpo.data import load_preferences
    from mass_dpo.data.formatting import encode_pool
    from mass_dpo.models import load_tokenizer

    tok = load_tokenizer("smollm2")
    say = lambda role, text: {"role": role, "content": text}  # noqa: E731
    rows = [{"prompt": "What is 2+2? Answer:", "chosen": " 4", "rejected": [" 5", " five"]},
            {"prompt": [say("system", "Be terse."), say("user", "Hi"), say("assistant", "Hello!"), say("user", "2+2?")],
             "chosen": [say("assistant", "4")], "rejected": [[say("assistant", "5")], [say("assistant", "22")]]},
            {"prompt": "Name a colour.", "chosen": "red", "rejected": ["blue", "green"]}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for rec, row in zip(load_preferences(path).to_list(), rows):
        prompt_ids, cand_ids = encode_pool(rec, tok)
        for response, ids in zip([row["chosen"], *row["rejected"]], cand_ids):
            if isinstance(row["prompt"], list):
                trl_prompt = _tokenize(tok, row["prompt"], add_generation_prompt=True)["input_ids"]
                trl_full = _tokenize(tok, row["prompt"] + response)["input_ids"]
            else:
                trl_prompt = _tokenize(tok, row["prompt"])["input_ids"]
                trl_full = _tokenize(tok, row["prompt"] + response + tok.eos_token)["input_ids"]
            cut = common_prefix_length(trl_prompt, trl_full)
            assert (prompt_ids, ids) == (trl_prompt[:cut], trl_full[cut:]), rec["id"]
        if isinstance(row["prompt"], list):
            assert "Be terse." in tok.decode(prompt_ids) and "<|im_start|>system\nBe terse." in tok.decode(prompt_ids)
        else:
            assert tok.decode(prompt_ids) == row["prompt"]  # no chat template around a plain-text prompt


def test_tools_and_template_variables_reach_the_template_as_trl_passes_them(tmp_path):
    """TRL passes a conversational row's ``tools`` (a list, or its JSON text) and ``chat_template_kwargs`` to
    ``apply_chat_template``: our pool ids equal TRL's under a template that renders both, and ``select`` writes the
    columns back on every row (a row without them: no tools, no variables). A plain-text row ignores them, as TRL."""
    from trl.data_utils import _tokenize, common_prefix_length

    from mass_dpo.data import load_preferences
    from mass_dpo.data.formatting import encode_pool
    from mass_dpo.models import load_tokenizer

    tok = load_tokenizer("smollm2")
    tok.chat_template = (
        "{% if tools %}<tools>{% for t in tools %}{{ t.name }};{% endfor %}</tools>{% endif %}"
        "{% if persona %}<persona>{{ persona }}</persona>{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    say = lambda role, text: {"role": role, "content": text}  # noqa: E731
    tools = [{"name": "calculator", "description": "adds", "parameters": {}}]
    rows = [
        {"id": "a", "prompt": [say("user", "2+2?")], "chosen": [say("assistant", "4")],
         "rejected": [[say("assistant", "5")], [say("assistant", "22")]], "tools": tools,
         "chat_template_kwargs": {"persona": "terse"}},
        {"id": "b", "prompt": [say("user", "3+3?")], "chosen": [say("assistant", "6")],
         "rejected": [[say("assistant", "7")]], "tools": json.dumps(tools)},  # JSON text, as TRL also reads it
        {"id": "c", "prompt": [say("user", "1+1?")], "chosen": [say("assistant", "2")],
         "rejected": [[say("assistant", "3")]]},
        {"id": "d", "prompt": "Name a colour.", "chosen": "red", "rejected": ["blue"], "tools": tools},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for rec, row in zip(load_preferences(path).to_list(), rows):
        prompt_ids, cand_ids = encode_pool(rec, tok)
        tools_given = row.get("tools")
        kw = {"tools": json.loads(tools_given) if isinstance(tools_given, str) else tools_given,
              **row.get("chat_template_kwargs", {})}
        for response, ids in zip([row["chosen"], *row["rejected"]], cand_ids):
            if isinstance(row["prompt"], list):
                trl_prompt = _tokenize(tok, row["prompt"], add_generation_prompt=True, **kw)["input_ids"]
                trl_full = _tokenize(tok, row["prompt"] + response, **kw)["input_ids"]
            else:
                trl_prompt = _tokenize(tok, row["prompt"])["input_ids"]
                trl_full = _tokenize(tok, row["prompt"] + response + tok.eos_token)["input_ids"]
            cut = common_prefix_length(trl_prompt, trl_full)
            assert (prompt_ids, ids) == (trl_prompt[:cut], trl_full[cut:]), rec["id"]
        text = tok.decode(prompt_ids)
        assert ("<tools>calculator;</tools>" in text) is (row["id"] in "ab")
        assert ("<persona>terse</persona>" in text) is (row["id"] == "a")

    from mass_dpo.preprocess import _rows, pair_rows

    records = load_preferences(path).to_list()
    picked = {"indices": [torch.arange(len(r["candidates"]) - 1) + 1 for r in records],
              "gains": [torch.zeros(len(r["candidates"]) - 1) for r in records], "logdet": [0.0] * len(records)}
    written = _rows(records, None, picked)
    assert [r["tools"] for r in written] == [tools, tools, None, None]
    assert [r["chat_template_kwargs"] for r in written] == [{"persona": "terse"}, {}, {}, {}]
    assert all(p["tools"] == w["tools"] for w in written for p in pair_rows([w]))
    back = tmp_path / "back.jsonl"
    back.write_text("".join(json.dumps(r) + "\n" for r in pair_rows(written)))
    for again, first in zip(load_preferences(back).to_list()[:3], records[:3]):  # the conversational rows read back
        assert json.loads(again["messages"]) == json.loads(first["messages"])
