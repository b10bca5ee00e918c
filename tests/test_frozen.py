"""The freeze regime (mass_dpo.frozen): the top k blocks trained on cached lower-block states equal the whole model
with its lower blocks frozen (loss, every trainable gradient, log-probs of any candidate subset); the states cache;
generation from a shared lower-block prompt cache equals plain ``generate``; checkpoints hold only the trainable
weights and resume; a run end to end (whole-pool online evaluation, snapshots, re-extraction, reference row)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from mass_dpo import frozen, runs
from mass_dpo.data.formatting import encode_pool
from mass_dpo.extraction import extract
from mass_dpo.forward import shared_prefix_forward_batch
from mass_dpo.models import ModelBundle
from mass_dpo.training import PoolEval, PreferenceCollator, PreferenceDataset, batch_loss, enable_pool_forward, \
    policy_logps, resolve_config

torch.set_num_threads(2)


# ---------------------------------------------------------------- fixtures


def deep_tiny(layers: int = 4, seed: int = 0):
    """``tiny``'s architecture with ``layers`` blocks and larger random weights (so that replies depend on the prompt
    and candidates get different log-probs), float32, sdpa."""
    from mass_dpo.models import _random_model, load_tokenizer
    from mass_dpo.params import load_params

    params = load_params("models/tiny")
    params = {**params, "config": {**params["config"], "num_hidden_layers": layers}, "seed": seed}
    tok = load_tokenizer("tiny")
    model = _random_model(params, tok, torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.25)
    return model.eval(), tok


@pytest.fixture(scope="module")
def model_tok():
    return deep_tiny()


@pytest.fixture(scope="module")
def lastfm():
    from mass_dpo.data import load_benchmark

    return load_benchmark("lastfm", "valid", data_dir="samples", limit=7, seed=0).to_list()


def extracted(model, tok, records, keep_layer, **kw):
    bundle = ModelBundle(model, tok, "deep-tiny", {})
    kw.setdefault("use_cache", False)
    return extract(records, bundle, dataset_key="test", keep_layer=keep_layer, progress=False, **kw)


def random_negatives(ex, n=3, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for p in range(len(ex.ids)):
        valid = [i for i in range(ex.mask.shape[1]) if ex.mask[p, i] and i != int(ex.target[p])]
        rows.append([valid[j] for j in torch.randperm(len(valid), generator=g)[:n].tolist()])
    return torch.tensor(rows)


def perturbed(policy, scale, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return policy


# ---------------------------------------------------------------- the equivalence (issue 19's test)


@pytest.mark.parametrize("k, method", [(1, "sdpo"), (3, "dmpo"), (4, "sdpo")])  # k = 4: on the embeddings
def test_cached_top_blocks_equal_the_whole_model_with_frozen_lower_blocks(k, method, model_tok, lastfm):
    """Loss and every trainable gradient of the cached path (states entering block L-k, the top k blocks, norm, head)
    equal those of the whole model run through the shared-prefix forward with its lower blocks, embeddings and head
    frozen (requires_grad False), within 1e-4 relative; float32, 4 blocks."""
    model, tok = model_tok
    records = lastfm[:4]
    L = len(model.model.layers)
    ex = extracted(model, tok, records, keep_layer=L - k)
    pools = [encode_pool(r, tok) for r in records]
    neg = random_negatives(ex, 3)
    ref = ex.ref_logps + torch.randn(ex.ref_logps.shape, generator=torch.Generator().manual_seed(1))  # rewards != 0

    whole = copy.deepcopy(model)
    trainable = {f"model.layers.{j}." for j in range(L - k, L)} | {"model.norm."}
    for name, p in whole.named_parameters():
        p.requires_grad_(any(name.startswith(t) for t in trainable))
    enable_pool_forward(whole)
    policy = frozen.FrozenTopPolicy(model, k)

    out = {}
    for how, net, states in (("whole", whole, None), ("cached", policy, ex.states)):
        ds = PreferenceDataset.from_selection(ex, neg, pools=pools, states=states, ref_logps=ref)
        batch = PreferenceCollator()([ds[i] for i in range(len(ds))])
        batch["mask"][1, 3] = False  # one padded negative slot
        net.zero_grad()
        logps = policy_logps(net, batch)
        loss = batch_loss(method, 0.5, logps, batch).loss.mean()
        loss.backward()
        out[how] = (loss.detach(), logps.detach())
        assert ("hidden" in batch) == (states is not None)
    (l1, lp1), (l2, lp2) = out["whole"], out["cached"]
    assert torch.allclose(lp1, lp2, atol=1e-4), (lp1 - lp2).abs().max()
    assert abs(float(l1 - l2)) <= 1e-4 * abs(float(l1))

    whole_grads = {n: p.grad for n, p in whole.named_parameters() if p.grad is not None}
    mine = {n: p.grad for n, p in zip(policy.trainable_state_dict(), policy.parameters())}
    assert set(whole_grads) == set(mine) and len(mine) == 9 * k + 1  # nothing below block L-k got a gradient
    for name, g in mine.items():
        scale = whole_grads[name].abs().max()
        assert scale > 0, name
        assert (g - whole_grads[name]).abs().max() / scale < 1e-4, name


def test_log_probs_of_any_candidate_subset_equal_the_full_model(model_tok, lastfm):
    """Gathered states of any candidates, in any order, give the full model's log-probs of that sub-pool; scoring the
    whole pools from the states gives extraction's log-probs."""
    model, tok = model_tok
    records = lastfm[:3]
    ex = extracted(model, tok, records, keep_layer=2)
    pools = [encode_pool(r, tok) for r in records]
    policy = frozen.FrozenTopPolicy(model, 2)
    assert torch.allclose(frozen.score_states(policy, ex.states, pools), ex.ref_logps, atol=1e-4)
    g = torch.Generator().manual_seed(0)
    for p, (prompt, cands) in enumerate(pools):
        for size in (1, 4, len(cands)):
            pick = torch.randperm(len(cands), generator=g)[:size].tolist()
            sub = [cands[i] for i in pick]
            hidden = ex.states.gather(p, pick)[None]
            with torch.no_grad():
                mine = policy(prompt_ids=[prompt], candidate_ids=[sub], mask=torch.ones(1, size, dtype=torch.bool),
                              hidden=hidden)
                full, _, _ = shared_prefix_forward_batch(model, [(prompt, sub)], return_features=False)
            assert torch.allclose(mine, full, atol=1e-4), (p, size)


def test_wrong_states_are_refused(model_tok, lastfm):
    model, tok = model_tok
    ex = extracted(model, tok, lastfm[:2], keep_layer=1)
    pools = [encode_pool(r, tok) for r in lastfm[:2]]
    with pytest.raises(ValueError, match="keep_layer=2"):
        frozen.score_states(frozen.FrozenTopPolicy(model, 2), ex.states, pools)
    with pytest.raises(ValueError, match="does not match the cached states"):
        frozen.score_states(frozen.FrozenTopPolicy(model, 3), ex.states, pools[::-1])
    with pytest.raises(ValueError, match="between 1 and"):
        frozen.FrozenTopPolicy(model, 5)


# ---------------------------------------------------------------- the states cache


def test_states_are_the_hidden_states_entering_the_block_and_are_cached(model_tok, lastfm, tmp_path):
    from mass_dpo.forward import pack_pools, additive_mask

    model, tok = model_tok
    plain = extracted(model, tok, lastfm, keep_layer=None, use_cache=True, cache_dir=tmp_path, shard_size=3)
    assert plain.states is None
    ex = extracted(model, tok, lastfm, keep_layer=2, use_cache=True, cache_dir=tmp_path, shard_size=3)
    assert not ex.meta["cache_hit"]  # an entry without states is computed again, states and all
    assert torch.equal(ex.ref_logps, plain.ref_logps) and torch.equal(ex.features, plain.features)
    again = extracted(model, tok, lastfm, keep_layer=2, use_cache=True, cache_dir=tmp_path, shard_size=3)
    assert again.meta["cache_hit"] and torch.equal(again.states.states, ex.states.states)
    assert torch.equal(again.states.offsets, ex.states.offsets) and again.states.layer == 2
    folder = next(p for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert sorted(p.name for p in folder.iterdir()) == ["extracted.json", "extracted.safetensors", "states2.json",
                                                       "states2.safetensors"]
    # every row is the model's own hidden state entering block 2 on that pool's packed row
    pools = [encode_pool(r, tok) for r in lastfm]
    for p in (0, 5):
        packed = pack_pools([pools[p]])
        with torch.no_grad():
            hs = model.model(input_ids=packed["input_ids"], attention_mask=additive_mask(packed["allowed"], torch.float32),
                             position_ids=packed["position_ids"], output_hidden_states=True).hidden_states[2]
        assert torch.allclose(ex.states.row(p), hs[0], rtol=1e-5, atol=1e-4)  # another batch: rounding only
    # a sub-pool's states are slices of the row: prompt, then the candidates in the order asked
    P = int(ex.states.prompt_len[0])
    lens = ex.states.cand_len[0]
    start3 = P + int(lens[:3].sum())
    got = ex.states.gather(0, [3, 0])
    assert torch.equal(got, torch.cat([ex.states.row(0)[:P], ex.states.row(0)[start3 : start3 + int(lens[3])],
                                       ex.states.row(0)[P : P + int(lens[0])]]))


def test_reference_logps_are_stored_beside_the_extraction_once(model_tok, lastfm, tmp_path, monkeypatch):
    """log pi_ref of the freeze regime is computed once per cache entry: the first call stores it beside the entry
    (bit-equal to scoring the states with the untrained top), later processes read it without scoring; a damaged
    file is computed again; a split extracted without a cache is scored and stores nothing."""
    model, tok = model_tok
    ex = extracted(model, tok, lastfm, keep_layer=2, use_cache=True, cache_dir=tmp_path)
    pools = [encode_pool(r, tok) for r in lastfm]
    policy = frozen.FrozenTopPolicy(model, 2)
    direct = frozen.score_states(frozen.FrozenTopPolicy(model, 2), ex.states, pools)
    frozen._REFERENCE.clear()
    first = frozen.reference_logps(policy, ex, pools)
    assert torch.equal(first, direct)
    stored = list(Path(ex.meta["entry"]).glob("reference-L2-*.safetensors"))
    assert len(stored) == 1
    frozen._REFERENCE.clear()  # another process: the in-process memo is empty, the file is read

    def no_scoring(*a, **k):
        raise AssertionError("scored again")

    monkeypatch.setattr(frozen, "score_states", no_scoring)
    again = extracted(model, tok, lastfm, keep_layer=2, use_cache=True, cache_dir=tmp_path)
    assert again.meta["cache_hit"] and torch.equal(frozen.reference_logps(policy, again, pools), direct)
    monkeypatch.undo()
    stored[0].write_bytes(b"damaged")
    frozen._REFERENCE.clear()
    assert torch.equal(frozen.reference_logps(policy, again, pools), direct)
    frozen._REFERENCE.clear()
    monkeypatch.setattr(frozen, "score_states", no_scoring)
    assert torch.equal(frozen.reference_logps(policy, again, pools), direct)  # rewritten whole
    monkeypatch.undo()
    plain = extracted(model, tok, lastfm, keep_layer=2)  # no cache: no entry to store beside
    assert "entry" not in plain.meta and torch.equal(frozen.reference_logps(policy, plain, pools), direct)
    frozen._REFERENCE.clear()


def test_reextractions_are_stored_beside_the_extraction_once(model_tok, lastfm, tmp_path, monkeypatch):
    """Table 4's re-extraction under a policy is computed once per (cache entry, weights, pooling): the first call
    stores it beside the entry (bit-equal to running the top blocks), later processes read it; other weights or
    another pooling are other parts; a damaged file is computed again."""
    model, tok = model_tok
    ex = extracted(model, tok, lastfm, keep_layer=2, use_cache=True, cache_dir=tmp_path)
    pools = [encode_pool(r, tok) for r in lastfm]
    init, moved = frozen.FrozenTopPolicy(model, 2), frozen.FrozenTopPolicy(model, 2)
    with torch.no_grad():
        moved.norm.weight.mul_(1.5)
    direct = {}
    for name, policy in ("init", init), ("moved", moved):
        logps, feats, mask, lengths = frozen.state_outputs(policy, ex.states, pools, poolings=("response",))
        direct[name] = (logps, feats["response"], lengths)
    assert not torch.allclose(direct["init"][0], direct["moved"][0])  # the case under test: other weights

    def same(got, name):
        return (torch.equal(got.theta0_logps, direct[name][0]) and torch.equal(got.features, direct[name][1])
                and torch.equal(got.lengths, direct[name][2]))

    assert same(frozen.reextract(moved, ex, pools, pooling="response"), "moved")
    assert same(frozen.reextract(init, ex, pools, pooling="response"), "init")
    stored = sorted(Path(ex.meta["entry"]).glob("reextract-L2-*-response-*.safetensors"))
    assert len(stored) == 2  # one part per weights

    def no_outputs(*a, **k):
        raise AssertionError("ran the top blocks again")

    monkeypatch.setattr(frozen, "state_outputs", no_outputs)  # another process: both are read from disk
    again = extracted(model, tok, lastfm, keep_layer=2, use_cache=True, cache_dir=tmp_path)
    assert again.meta["cache_hit"]
    assert same(frozen.reextract(moved, again, pools, pooling="response"), "moved")
    assert same(frozen.reextract(init, again, pools, pooling="response"), "init")
    with pytest.raises(AssertionError, match="again"):
        frozen.reextract(moved, again, pools, pooling="all")  # another pooling is another part
    monkeypatch.undo()
    for path in stored:
        path.write_bytes(b"damaged")
    assert same(frozen.reextract(moved, again, pools, pooling="response"), "moved")  # computed again, rewritten
    monkeypatch.setattr(frozen, "state_outputs", no_outputs)
    assert same(frozen.reextract(moved, again, pools, pooling="response"), "moved")
    monkeypatch.undo()
    frozen._REFERENCE.clear()


def test_states_of_a_pool_split_over_several_rows_are_those_of_one_row(model_tok, lastfm):
    # a pool longer than batch_tokens is split over rows that each repeat the prompt; its states are put back
    # together as the one packed row the freeze regime reads
    model, tok = model_tok
    one = extracted(model, tok, lastfm[:4], keep_layer=2, use_cache=False)
    from mass_dpo.extraction import split_rows

    pools = [encode_pool(r, tok) for r in lastfm[:4]]
    longest = max(len(p) + max(len(c) for c in cs) for p, cs in pools)
    assert len(split_rows(pools, longest)[0]) > len(pools)  # the case under test: some pools take several rows
    split = extracted(model, tok, lastfm[:4], keep_layer=2, use_cache=False, batch_tokens=longest)
    assert torch.equal(split.states.offsets, one.states.offsets)
    assert torch.equal(split.states.cand_len, one.states.cand_len)
    assert torch.allclose(split.states.states, one.states.states, rtol=1e-5, atol=1e-4)  # other shapes: rounding
    assert torch.allclose(split.ref_logps, one.ref_logps, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- generation


def test_fast_generation_equals_plain_generate(model_tok, lastfm):
    """Replies from the shared lower-block prompt cache plus the policy's own top blocks equal plain
    ``model.generate`` of the policy's full model (left-padded batches); a second policy reuses the cache."""
    from mass_dpo.generation import hit_ratio as plain_hit_ratio

    model, tok = model_tok
    frozen._LOWER.clear()
    outs = []
    for seed in (0, 1):
        policy = perturbed(frozen.FrozenTopPolicy(model, 1), 0.3, seed)
        fast = frozen.hit_ratio(policy, tok, lastfm, max_new_tokens=6, batch_size=3)
        slow = frozen.hit_ratio(policy, tok, lastfm, max_new_tokens=6, batch_size=3, fast=False)
        plain = plain_hit_ratio(frozen.generation_model(policy), tok, lastfm, max_new_tokens=6, batch_size=3)
        assert fast["outputs"] == slow["outputs"] == plain["outputs"]
        assert torch.equal(fast["hits"], plain["hits"]) and torch.equal(fast["valid"], plain["valid"])
        outs.append(fast["outputs"])
        (shared,) = frozen._LOWER.values()
        assert len(shared.memo) == 3  # 7 prompts in batches of 3: computed once, for both policies
    assert outs[0] != outs[1] and len(set(outs[0])) > 1  # the top block matters, replies depend on the prompt
    # every block trained (k = L): nothing shared but the embeddings
    policy = perturbed(frozen.FrozenTopPolicy(model, 4), 0.3, 2)
    fast = frozen.hit_ratio(policy, tok, lastfm[:4], max_new_tokens=4, batch_size=2)
    assert fast["outputs"] == frozen.hit_ratio(policy, tok, lastfm[:4], max_new_tokens=4, batch_size=2, fast=False)["outputs"]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), deep_tiny()[0].parameters()))  # base unchanged


# ---------------------------------------------------------------- saving, loading


def test_saved_policy_is_the_base_model_plus_its_trainable_weights(model_tok, tmp_path):
    model, _ = model_tok
    policy = perturbed(frozen.FrozenTopPolicy(model, 2, name="deep-tiny"), 0.1, 0)
    frozen.save_trainable(policy, tmp_path / "p", step=7)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "p" / frozen.TRAINABLE_FILE))
    assert set(saved) == {n for n, _ in model.named_parameters() if n.startswith(("model.layers.2.", "model.layers.3.",
                                                                                  "model.norm."))}
    meta = json.loads((tmp_path / "p" / frozen.META_FILE).read_text())
    assert (meta["trainable_layers"], meta["first_layer"], meta["step"], meta["model"]) == (2, 2, 7, "deep-tiny")
    loaded = frozen.load_policy(tmp_path / "p", base=model)
    for a, b in zip(policy.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    full = frozen.generation_model(loaded)
    assert torch.equal(full.model.layers[3].mlp.up_proj.weight, policy.layers[1].mlp.up_proj.weight)
    assert torch.equal(full.model.layers[1].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight)
    assert not torch.equal(model.model.layers[3].mlp.up_proj.weight, policy.layers[1].mlp.up_proj.weight)
    with pytest.raises(ValueError, match="k=2"):
        frozen.load_trainable(frozen.FrozenTopPolicy(model, 1), tmp_path / "p")


def test_pool_eval_statistics_by_hand():
    """Whole-pool statistics of hand-made log-probs: 2 prompts, 3 candidates, beta 0.5."""
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -5.0]])
    ref = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -1.0, -1.0]])
    pe = PoolEval(lambda model: logps, ref, torch.ones(2, 3, dtype=torch.bool), torch.tensor([0, 1]), beta=0.5)
    out = pe(None)
    # rewards: [[0, -0.5, -1], [0.5, 0, -2]]; chosen 0 and 0; negatives' means -0.75 and -0.75
    assert out["chosen_rewards"] == pytest.approx(0.0)
    assert out["rejected_rewards"] == pytest.approx(-0.75)
    assert out["margin"] == pytest.approx(0.75)
    assert out["accuracy"] == pytest.approx(0.5)  # prompt 0 ranks first by reward, prompt 1 second
    assert out["mrr"] == pytest.approx((1 + 0.5) / 2)
    assert out["logp_mrr"] == pytest.approx((1 + 0.75) / 2)  # prompt 1: tied with candidate 0 -> ranks 1, 2: 0.75


def test_online_eval_reads_the_own_negatives_from_the_whole_pool_scores(tmp_path):
    """With whole-pool curves on, an online evaluation scores each pool once and reads the method's own negatives
    from those scores: the same statistics as the forward over the records (tiny, k = 1, LastFM sample, after two
    training steps so that rewards are not all 0); a record's columns are its pool's values at its candidates."""
    from mass_dpo.training import PoolEval, build_trainer

    cfg = resolve_config(dataset="lastfm", data_dir="samples", model="tiny", regime="freeze", trainable_layers=1,
                         method="dmpo", n=3, limit=8, eval_limit=6, test_limit=2, max_steps=2,
                         per_device_train_batch_size=2, per_device_eval_batch_size=4, gradient_accumulation_steps=1,
                         learning_rate=5e-2, warmup_ratio=0.0, optim="adamw_torch", pool_eval=True)
    data = runs.prepare_data(cfg)
    assert data.pool_eval.records is data.eval
    trainer = build_trainer(cfg, data.policy, data.train, data.eval, output_dir=tmp_path, pool_eval=data.pool_eval)
    trainer.train()
    shared = trainer.evaluate()
    pe = data.pool_eval
    trainer.pool_eval = PoolEval(pe.score, pe.ref_logps, pe.mask, pe.target, beta=pe.beta)  # no records: a forward
    forward = trainer.evaluate()
    assert shared["eval_samples"] == forward["eval_samples"] == 6
    assert abs(shared["eval_rewards/margins"]) > 1e-4
    for key, value in forward.items():
        assert shared[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key

    values, ref, mask = data.eval.columns(torch.arange(6 * 20, dtype=torch.float64).reshape(6, 20))
    cand = data.eval.candidates
    assert mask.all() and torch.equal(values, (cand + 20 * torch.arange(6)[:, None]).double())
    assert torch.equal(ref, data.eval.ref_logps.gather(1, cand))
    with pytest.raises(ValueError, match="not the scored pools"):
        PoolEval(pe.score, pe.ref_logps[:3], pe.mask[:3], pe.target[:3], beta=pe.beta, records=data.eval)


def test_a_run_without_online_eval_trains_the_same_policy_without_curves(tmp_path):
    """``online_eval=False`` (tuning runs): no evaluation rows in the log, the same trained weights and final metrics
    as the run with curves; left out of the run name when on, so that earlier folders keep their names."""
    from safetensors.torch import load_file

    cfg = dict(dataset="lastfm", data_dir="samples", model="tiny", regime="freeze", trainable_layers=1,
               method="sdpo", n=3, limit=8, eval_limit=4, test_limit=4, max_steps=4, per_device_train_batch_size=2,
               gradient_accumulation_steps=1, learning_rate=1e-2, warmup_ratio=0.0, logging_steps=1, eval_steps=2,
               optim="adamw_torch", pool_eval=True, test_split="valid")
    curves = runs.train_run(cfg, root=tmp_path)
    bare = runs.train_run({**cfg, "online_eval": False}, root=tmp_path)
    assert bare.run_dir != curves.run_dir
    assert set(curves.log()["split"]) == {"train", "eval", "pool"} and set(bare.log()["split"]) == {"train"}
    a = load_file(str(curves.run_dir / "final" / frozen.TRAINABLE_FILE))
    b = load_file(str(bare.run_dir / "final" / frozen.TRAINABLE_FILE))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert bare.metrics["mrr"] == curves.metrics["mrr"] and bare.info["online_eval"] == {}
    assert "online_eval" not in runs.hash_payload(resolve_config(**cfg), world=1)["config"]
    assert runs.hash_payload(resolve_config(**cfg, online_eval=False), world=1)["config"]["online_eval"] is False

    # fit_gain: the MRR of the log-prob ranking before and after training, here on the split the run was tested on
    gain = runs.fit_gain(bare.run_dir, "valid")
    untrained = runs.reference_run(cfg, root=tmp_path)
    assert gain["prompts"] == 4 and gain["mrr"] == pytest.approx(bare.metrics["mrr"])
    assert gain["mrr_init"] == pytest.approx(untrained.metrics["mrr"])
    # the mean paired gain: the run's own MRR on that split less the untrained policy's (each run's evaluation)
    assert gain["gain"] == pytest.approx(bare.metrics["mrr"] - untrained.metrics["mrr"]) and gain["se"] >= 0
    on_train = runs.fit_gain(bare.run_dir, "train")
    assert on_train["split"] == "train" and on_train["prompts"] == 8


# ---------------------------------------------------------------- runs


from test_checkpoints import Interrupt, StopAt  # noqa: E402  (tests/ is on the path: pytest's rootdir insertion)


def test_freeze_run_end_to_end_resumes_and_keeps_only_trainable_weights(tmp_path):
    """``tiny`` (2 blocks, k = 1) on the shipped LastFM sample: checkpoints hold the top block and norm and their
    optimizer state only; a run killed at step 5 resumes from checkpoint 4 and ends where a straight run ends;
    ``final/`` and ``snapshots/{mid,final}`` hold the trainable weights; the log has whole-pool rows; re-extraction at
    the final snapshot equals the policy's own scores; the reference row is the untrained policy."""
    from safetensors.torch import load_file

    from mass_dpo.preprocess import select_extracted

    cfg = dict(dataset="lastfm", data_dir="samples", model="tiny", regime="freeze", trainable_layers=1,
               method="sdpo", n=3, limit=8, eval_limit=4, test_limit=4, max_steps=6, per_device_train_batch_size=2,
               gradient_accumulation_steps=1, learning_rate=1e-2, warmup_ratio=0.0, logging_steps=1, eval_steps=3,
               save_steps=2, save_total_limit=10, optim="adamw_torch", pool_eval=True)
    with pytest.raises(Interrupt):
        runs.train_run(cfg, root=tmp_path / "a", keep_checkpoints=True, callbacks=[StopAt(5)])
    run_dir = runs.run_dir(resolve_config(**cfg), root=tmp_path / "a", world=1)
    ckpt = run_dir / "checkpoints" / "checkpoint-4"
    weights = load_file(str(ckpt / "model.safetensors"))
    assert all(k.startswith(("layers.0.", "norm.")) for k in weights) and len(weights) == 10
    assert sum(v.numel() for v in weights.values()) < 0.2 * sum(
        p.numel() for p in runs._model("tiny", False).model.parameters())
    resumed = runs.train_run(cfg, root=tmp_path / "a")
    assert resumed.info["train"]["resumed_from"] == "checkpoint-4" and resumed.info["train"]["global_step"] == 6
    straight = runs.train_run(cfg, root=tmp_path / "b")
    a = load_file(str(resumed.run_dir / "final" / frozen.TRAINABLE_FILE))
    b = load_file(str(straight.run_dir / "final" / frozen.TRAINABLE_FILE))
    assert a.keys() == b.keys() and len(a) == 10
    assert all(k.startswith(("model.layers.1.", "model.norm.")) for k in a)  # tiny's top block (of 2) and norm
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert resumed.metrics["mrr"] == pytest.approx(straight.metrics["mrr"])

    run = straight.run_dir
    assert sorted(p.name for p in (run / "final").iterdir()) == [frozen.META_FILE, frozen.TRAINABLE_FILE]
    assert json.loads((run / "snapshots" / "mid" / frozen.META_FILE).read_text())["step"] == 3
    assert (run / "snapshots" / "final" / frozen.TRAINABLE_FILE).stat().st_ino == \
        (run / "final" / frozen.TRAINABLE_FILE).stat().st_ino
    log = straight.log()
    pool = log[log["split"] == "pool"]
    assert pool["step"].tolist() == [0, 3, 6] and pool["margin"].iloc[0] == 0 and pool["mrr"].notna().all()
    assert straight.metrics["accuracy_kind"] == "hit_ratio@1" and straight.metrics["prompts"] == 4
    # Figures 2-3's whole-pool curves of a run that is not an exact fit: its pool rows, over optimizer steps
    import pandas as pd

    from mass_dpo.experiments import common_curves

    row = pd.DataFrame([{"label": "S-DPO", "ridge": float("nan"), "run_dir": str(run), "dataset": "lastfm",
                         "method": "sdpo", "seed": 0}])
    curve = common_curves(row)
    assert set(curve["negatives"]) == {"common"} and sorted(set(curve["step"])) == [0, 3, 6]
    got = curve[curve["metric"] == "mrr"].sort_values("step")["value"].tolist()
    assert got == pytest.approx(pool["mrr"].tolist())

    # Table 4's re-extraction: the snapshot's log-probs and features of every candidate, the untrained reference
    final = runs.load_policy(run, "final")
    ex = runs.reextract_run(run, "valid", snapshot="final")
    mid = runs.reextract_run(run, "valid", snapshot="mid")
    data = runs.prepare_data(resolve_config(**cfg))
    from mass_dpo.data import load_benchmark

    valid = load_benchmark("lastfm", "valid", data_dir="samples", limit=cfg["eval_limit"], seed=0)
    valid_pools = [encode_pool(r, data.tokenizer) for r in valid]
    untrained = frozen.FrozenTopPolicy(final.base, 1)
    assert ex.meta["snapshot"] == "final" and ex.meta["step"] == 6 and mid.meta["step"] == 3
    assert torch.allclose(ex.theta0_logps, frozen.score_states(final, ex.states, valid_pools), atol=1e-6)
    assert torch.allclose(ex.ref_logps, frozen.score_states(untrained, ex.states, valid_pools), atol=1e-6)
    assert not torch.allclose(ex.theta0_logps, ex.ref_logps) and not torch.allclose(ex.theta0_logps, mid.theta0_logps)
    assert ex.features.shape == (4, 20, 64)
    init = runs.reextract_run(run, "valid", snapshot="init")  # the starting point, through the same path
    assert init.meta["step"] == 0 and torch.allclose(init.theta0_logps, init.ref_logps, atol=1e-6)
    assert select_extracted(ex, 3, strategy="dopt")["indices"].shape == (4, 3)

    # the test ranking is the final policy's log-prob of every candidate, from the cached test states
    import pandas as pd

    from mass_dpo.metrics import per_prompt_ranking

    test_pools = [encode_pool(r, data.tokenizer) for r in data.test_records]
    scores = frozen.score_states(final, data.test.states, test_pools).double()
    expect = per_prompt_ranking(scores.masked_fill(~data.test.mask, float("-inf")), data.test.target,
                                mask=data.test.mask)["mrr"]
    assert pd.read_csv(run / "test_per_prompt.csv")["mrr"].tolist() == pytest.approx(expect.tolist())

    ref = runs.reference_run(cfg, root=tmp_path / "a")
    assert ref.metrics["reward_margin"] == 0.0  # the untrained policy: every reward exactly 0
    assert ref.metrics["accuracy_kind"] == "hit_ratio@1"


def test_training_negatives_of_a_finished_run_are_those_it_trained_on(tmp_path, monkeypatch):
    """The analyses' view of a run's training negatives (``experiments.training_negatives``: the selection redone on
    the split's extraction, no cached states, no other split) equals what ``prepare_data`` gave the run, in the
    freeze and loglinear regimes, for D-optimal and seeded random picks."""
    from mass_dpo import experiments as E

    base = dict(dataset="lastfm", data_dir="samples", model="tiny", n=3, limit=8, eval_limit=4, test_limit=4, seed=1)
    freeze = dict(regime="freeze", trainable_layers=1, max_steps=2, per_device_train_batch_size=2,
                  gradient_accumulation_steps=1, learning_rate=1e-2, warmup_ratio=0.0, optim="adamw_torch")
    for extra in (freeze, {"regime": "loglinear"}):
        for method in ("mass_dpo", "sdpo"):
            run = runs.train_run({**base, **extra, "method": method}, root=tmp_path)
            expect = runs.prepare_data(E.config_of(run.run_dir)).train.candidates
            with monkeypatch.context() as m:
                m.setattr(runs, "prepare_data", lambda *a, **k: pytest.fail("prepared the run's data"))
                split, got = E.training_negatives(run.run_dir)
            assert torch.equal(got, expect), (extra["regime"], method)
            assert split.states is None and got.shape == (8, 4) and split.lengths is not None


# ---------------------------------------------------------------- configuration, CLI


def test_freeze_config_profile_and_hash():
    cfg = resolve_config(regime="freeze")
    assert (cfg.trainable_layers, cfg.learning_rate, cfg.gradient_checkpointing, cfg.fit) == (2, 1e-3, False, "adam")
    lm = resolve_config(profile="cpu-lm")
    assert (lm.regime, lm.model, lm.pool_eval) == ("freeze", "smollm2", True)
    assert "trainable_layers" not in runs.hash_payload(resolve_config(), world=1)["config"]
    assert "pool_eval" not in runs.hash_payload(resolve_config(regime="full"), world=1)["config"]
    h = runs.config_hash(cfg, world=1)
    assert h != runs.config_hash(resolve_config(regime="freeze", trainable_layers=4), world=1)
    assert h != runs.config_hash(resolve_config(regime="freeze", pool_eval=True), world=1)
    with pytest.raises(ValueError, match="trainable_layers"):
        resolve_config(regime="freeze", trainable_layers=0)


def test_cli_trainable_layers(capsys):
    from mass_dpo.cli import main

    assert main(["train", "--regime", "freeze", "--trainable-layers", "4", "--pool-eval", "--dry-run"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["config"]["regime"], out["config"]["trainable_layers"], out["config"]["pool_eval"]) == \
        ("freeze", 4, True)
    with pytest.raises(SystemExit) as err:
        main(["train", "--regime", "freeze", "--trainable-layers", "0", "--dry-run"])
    assert err.value.code == 2


# ---------------------------------------------------------------- Table 4 as the paper ran it


def test_table4_of_a_freeze_run_equals_algorithm_1_on_whole_model_extractions(tmp_path, monkeypatch):
    """``experiments.stability`` in the freeze regime re-extracts every candidate under the untrained model and the
    mid and final snapshots. Its final row must equal Algorithm 1 run on extractions of the whole causal LM carrying
    the initial and the final weights (``generation_model`` + ``extract``: no cached states), and the weights it
    reports as moved must differ from the pretrained ones by exactly that relative distance."""
    from dataclasses import replace

    from mass_dpo import experiments as E, stability as stab, tuning
    from mass_dpo.data import load_benchmark

    monkeypatch.setenv("MASS_DPO_CACHE", str(tmp_path / "cache"))
    rule = {"metric": "mrr", "seed": 0, "grid": {"freeze": {"learning_rate": [5e-2]}},
            "bounds": {"learning_rate": [5e-2, 5e-2]}}
    monkeypatch.setattr(tuning, "tuning_rule", lambda: rule)
    setup = E.Setup(model="tiny", regime="freeze", profile="smoke", data_dir="samples", seeds=[0], train_limit=8,
                    eval_limit=4, test_limit=4, root=str(tmp_path / "runs"),
                    options={"trainable_layers": 1, "max_steps": 6, "warmup_ratio": 0.0, "optim": "adamw_torch"})
    table = E.stability(setup, ["lastfm"], ns=(2,), seeds=[0], echo=None)
    assert table["checkpoint"].tolist() == ["mid", "final", "final_heldout"] and set(table["regime"]) == {"freeze"}
    assert table["step"].tolist() == [3, 6, 6] and "theta_norm" not in table
    final_row = table.iloc[1]
    run = final_row["run_dir"]
    cfg = E.config_of(run)
    assert (cfg.n, cfg.learning_rate) == (2, 5e-2)

    tok = runs._model("tiny", False).tokenizer
    records = load_benchmark("lastfm", "train", data_dir="samples", limit=cfg.limit, seed=cfg.subsample_seed)

    def whole(snapshot, recs=records):
        model = frozen.generation_model(runs.load_policy(run, snapshot))
        return extract(recs, ModelBundle(model, tok, f"tiny-{snapshot}", {}), dataset_key=snapshot,
                       pooling=cfg.pooling, use_cache=False, progress=False)

    heldout = load_benchmark("lastfm", "valid", data_dir="samples", limit=cfg.eval_limit, seed=cfg.subsample_seed)
    for row, recs in ((final_row, records), (table.iloc[2], heldout)):  # training prompts, then held-out ones
        start, end = whole("init", recs), whole("final", recs)
        assert not torch.allclose(start.theta0_logps, end.theta0_logps, atol=1e-3)  # training moved the log-probs
        expect = stab.recompute_extracted(start, replace(end, ref_logps=start.ref_logps), int(cfg.n), beta=cfg.beta,
                                          gamma=cfg.gamma, selection_score=cfg.selection_score)
        for key in ("exact_match", "jaccard", "top1_match", "top3_exact_match", "saturated", "chance_jaccard"):
            assert row[key] == pytest.approx(expect[key]), key
        for key in ("objective_retention", "random_retention"):
            assert row[key] == pytest.approx(expect[key], rel=1e-4), key
        assert row["prompts"] == len(recs)

    w0 = runs.load_policy(run, "init").trainable_state_dict()
    w1 = runs.load_policy(run, "final").trainable_state_dict()
    dist = sum((w1[k] - w0[k]).pow(2).sum() for k in w0).sqrt() / sum(w0[k].pow(2).sum() for k in w0).sqrt()
    assert final_row["weight_change"] == pytest.approx(float(dist), rel=1e-5) and final_row["weight_change"] > 0
    lines = E.stability_sentences(E.stability_table(table, model="tiny"), table)
    assert any("re-extracted at each checkpoint" in line for line in lines)
