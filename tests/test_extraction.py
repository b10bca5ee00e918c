"""Extraction: shared-prefix forward == naive forward, the cache (hit, miss, corruption, resume), theta0,
Algorithm 1's inputs, and the 2-process accelerate run == the single-process one."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import mass_dpo.extraction as X
import mass_dpo.forward as FW
from mass_dpo.data.formatting import encode_pool
from mass_dpo.extraction import Extracted, extract, reference_offsets, selection_inputs
from mass_dpo.forward import naive_forward, shared_prefix_forward, shared_prefix_forward_batch
from mass_dpo.models import load_model

ARTISTS = ["Queen", "U2", "Madonna", "The Beatles", "AC/DC", "Björk", "Daft Punk", "Portishead", "Radiohead", "ABBA"]


def entries(folder):
    """The cache entries of an extraction folder (its ``.locks`` folder left out)."""
    return [p for p in folder.iterdir() if not p.name.startswith(".")]


def make_records(n=6, seed=0):
    """LastFM-like records: a history prompt, 3-6 candidate artists (pools of different sizes)."""
    g = torch.Generator().manual_seed(seed)
    recs = []
    for i in range(n):
        hist = [ARTISTS[int(j)] for j in torch.randperm(len(ARTISTS), generator=g)[: 2 + i % 4]]
        cands = [ARTISTS[int(j)] + (" Live" * (k % 2)) for k, j in enumerate(torch.randperm(10, generator=g)[: 3 + i % 4])]
        target = int(torch.randint(len(cands), (1,), generator=g))
        recs.append({
            "id": f"r{i}",
            "prompt": "The user listened to: " + ", ".join(hist) + ".\nWhich artist will they play next?",
            "candidates": cands,
            "target": target,
            "chosen": cands[target],
            "rejected": [c for k, c in enumerate(cands) if k != target],
        })
    return recs


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu")


@pytest.fixture(scope="module")
def records():
    return make_records()


@pytest.mark.parametrize("pooling", ["all", "response"])
def test_shared_prefix_equals_naive_tiny(tiny, records, pooling):
    for rec in records:
        p, cs = encode_pool(rec, tiny.tokenizer)
        with torch.no_grad():
            lp, ft = shared_prefix_forward(tiny.model, p, cs, pooling=pooling)
            lp0, ft0 = naive_forward(tiny.model, p, cs, pooling=pooling)
        assert lp.shape == (len(cs),) and ft.shape == (len(cs), 64)
        torch.testing.assert_close(lp, lp0, atol=1e-4, rtol=0)
        torch.testing.assert_close(ft, ft0, atol=1e-4, rtol=0)
    # the two poolings differ (the prompt tokens are in one and not the other)
    other = "response" if pooling == "all" else "all"
    with torch.no_grad():
        _, ft_other = shared_prefix_forward(tiny.model, p, cs, pooling=other)
    assert (ft - ft_other).abs().max() > 1e-3


def test_batch_of_pools_equals_one_at_a_time(tiny, records):
    pools = [encode_pool(r, tiny.tokenizer) for r in records]
    with torch.no_grad():
        lp, ft, mask = shared_prefix_forward_batch(tiny.model, pools, pooling="all")
        assert mask.tolist() == [[c < len(cs) for c in range(mask.shape[1])] for _, cs in pools]
        for b, (p, cs) in enumerate(pools):
            lp0, ft0 = naive_forward(tiny.model, p, cs, pooling="all")
            torch.testing.assert_close(lp[b, : len(cs)], lp0, atol=1e-4, rtol=0)
            torch.testing.assert_close(ft[b, : len(cs)], ft0, atol=1e-4, rtol=0)
            assert (lp[b, len(cs):] == 0).all() and (ft[b, len(cs):] == 0).all()


def test_common_prompt_prefix_by_hand():
    pools = [([1, 2, 3], [[9]]), ([1, 2, 4, 5], [[9]]), ([1, 2], [[9], [8]])]
    assert FW.common_prompt_prefix(pools) == [1, 2]
    assert FW.common_prompt_prefix([([1, 2, 3], [[9]]), ([1, 2, 3], [[8]])]) == [1, 2, 3]  # one prompt twice
    assert FW.common_prompt_prefix([([5, 1], [[9]]), ([6, 1], [[9]])]) == []
    assert FW.common_prompt_prefix([]) == []


@pytest.mark.parametrize("case", ["chat", "same prompt", "no common prefix"])
def test_pools_over_a_shared_prompt_prefix_equal_naive(tiny, records, monkeypatch, case):
    """Over a dataset the prompts' common prefix runs once and every batch attends to its keys/values, rows of
    several batches run longest first: every pool's log-probs and both features equal its naive rows, in the pools'
    order, and the hidden states kept for the freeze regime equal those of the pool's own packed row."""
    pools = [encode_pool(r, tiny.tokenizer) for r in records]
    if case == "same prompt":  # the whole prompt is the prefix: the first response token is predicted from it
        pools = [(pools[0][0], cs) for _, cs in pools]
    elif case == "no common prefix":
        pools = [([7 + i] + p[1:], cs) for i, (p, cs) in enumerate(pools)]
    shared = FW.common_prompt_prefix(pools)
    assert (len(shared) > 20) if case == "chat" else (shared == pools[0][0] if case == "same prompt" else not shared)
    used = []
    real = FW.shared_prompt_prefix
    # patched in extraction, where _forward_pools looks them up (it imports them from mass_dpo.forward)
    monkeypatch.setattr(X, "shared_prompt_prefix", lambda *a, **kw: (used.append(real(*a, **kw)), used[-1])[1])
    batches, forward = [], FW._shared_prefix
    monkeypatch.setattr(X, "_shared_prefix", lambda m, rows, **kw: (
        batches.append([len(p) + sum(len(c) for c in cs) for p, cs in rows]), forward(m, rows, **kw))[1])
    longest = max(len(p) + sum(len(c) for c in cs) for p, cs in pools)
    with torch.no_grad():
        lp, ft, mask, lengths, states = X._forward_pools(
            tiny.model, pools, poolings=FW.POOLINGS, batch_tokens=2 * longest, pad_id=0, keep_layer=1)
        assert (used[0].length if used[0] is not None else 0) == len(shared)
        run = [n for b in batches for n in b]  # the rows as they ran: longest first, over several batches
        assert len(batches) > 1 and run == sorted(run, reverse=True) and len(run) == len(pools)
        for b, (p, cs) in enumerate(pools):
            for pooling in FW.POOLINGS:
                lp0, ft0 = naive_forward(tiny.model, p, cs, pooling=pooling)
                torch.testing.assert_close(lp[b, : len(cs)], lp0, atol=1e-4, rtol=0)
                torch.testing.assert_close(ft[pooling][b, : len(cs)], ft0, atol=1e-4, rtol=0)
            assert lengths[b, : len(cs)].tolist() == [len(c) for c in cs] and mask[b].sum() == len(cs)
            *_, own = FW._shared_prefix(tiny.model, [(p, cs)], poolings=(), pad_id=0, keep_layer=1)
            lo, hi = int(states["offsets"][b]), int(states["offsets"][b + 1])
            torch.testing.assert_close(states["states"][lo:hi], own[0], atol=1e-4, rtol=0)


def test_eager_attention_with_additive_mask(records):
    eager = load_model("tiny", device="cpu")
    eager.model.set_attn_implementation("eager")
    assert eager.model.config._attn_implementation == "eager"
    p, cs = encode_pool(records[3], eager.tokenizer)
    with torch.no_grad():
        lp, ft = shared_prefix_forward(eager.model, p, cs, pooling="response")
        lp0, ft0 = naive_forward(eager.model, p, cs, pooling="response")
    torch.testing.assert_close(lp, lp0, atol=1e-4, rtol=0)
    torch.testing.assert_close(ft, ft0, atol=1e-4, rtol=0)


def test_gradients_equal_naive(tiny, records):
    """Training backpropagates through the shared-prefix forward: same gradients as the naive rows."""
    p, cs = encode_pool(records[2], tiny.tokenizer)
    params = [tiny.model.model.embed_tokens.weight, tiny.model.model.layers[0].self_attn.q_proj.weight]

    def grads(fn):
        tiny.model.zero_grad()
        lp, ft = fn(tiny.model, p, cs, pooling="all")
        (lp.sum() + ft.sum()).backward()
        return [w.grad.clone() for w in params]

    for g, g0 in zip(grads(shared_prefix_forward), grads(naive_forward)):
        assert g.abs().max() > 0
        torch.testing.assert_close(g, g0, atol=1e-4, rtol=1e-3)
    tiny.model.zero_grad()


def test_smollm2_shared_prefix_equals_naive():
    """Real weights, a real LastFM prompt (the shipped samples) with 5 of its 20 candidates, both poolings, fp32."""
    from mass_dpo.data import load_benchmark

    row = load_benchmark("lastfm", "valid", data_dir="samples", limit=1)[0]
    rec = dict(row, candidates=row["candidates"][:5])  # 5 of the 20 keep the naive reference quick on 2 cores
    bundle = load_model("smollm2", device="cpu", dtype="float32")
    p, cs = encode_pool(rec, bundle.tokenizer)
    assert len(cs) == 5 and len(p) > 100
    with torch.no_grad():
        for pooling in ("all", "response"):
            lp, ft = shared_prefix_forward(bundle.model, p, cs, pooling=pooling)
            lp0, ft0 = naive_forward(bundle.model, p, cs, pooling=pooling)
            torch.testing.assert_close(lp, lp0, atol=1e-4, rtol=0)
            torch.testing.assert_close(ft, ft0, atol=1e-4, rtol=0)
    assert (lp < 0).all() and lp.std() > 0.5  # real weights tell candidates apart


def test_bad_pools_are_rejected(tiny):
    with pytest.raises(ValueError, match="pooling"):
        shared_prefix_forward(tiny.model, [1, 2], [[3]], pooling="max")
    with pytest.raises(ValueError, match="candidate 1 has no tokens"):
        shared_prefix_forward(tiny.model, [1, 2], [[3], []])
    with pytest.raises(ValueError, match="prompt has no tokens"):
        shared_prefix_forward(tiny.model, [], [[3]])
    impl = tiny.model.config._attn_implementation
    try:
        tiny.model.config._attn_implementation = "flash_attention_2"
        with pytest.raises(ValueError, match="sdpa"):
            shared_prefix_forward(tiny.model, [1, 2], [[3]])
    finally:
        tiny.model.config._attn_implementation = impl


# ---------------------------------------------------------------------------------------------------- extract


def _direct(bundle, records, pooling="all"):
    out = []
    for r in records:
        with torch.no_grad():
            out.append(naive_forward(bundle.model, *encode_pool(r, bundle.tokenizer), pooling=pooling))
    return out


def _assert_matches(ex: Extracted, records, direct):
    assert ex.ids == [r["id"] for r in records]
    assert ex.target.tolist() == [r["target"] for r in records]
    C = max(len(r["candidates"]) for r in records)
    assert ex.features.shape == (len(records), C, 64) and ex.mask.shape == (len(records), C)
    for i, (r, (lp, ft)) in enumerate(zip(records, direct)):
        n = len(r["candidates"])
        assert ex.mask[i].tolist() == [True] * n + [False] * (C - n)
        torch.testing.assert_close(ex.ref_logps[i, :n], lp, atol=1e-4, rtol=0)
        torch.testing.assert_close(ex.features[i, :n], ft, atol=1e-4, rtol=0)


def _same(a: Extracted, b: Extracted):
    assert a.ids == b.ids
    for k, v in a.tensors().items():
        assert torch.equal(v, b.tensors()[k]), k


def test_extract_cache_hit_and_miss(tiny, records, tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(records)
    ex = extract(ds, tiny, cache_dir=tmp_path, shard_size=4, progress=False)
    _assert_matches(ex, records, _direct(tiny, records))
    assert torch.equal(ex.theta0_logps, ex.ref_logps)  # theta0 = the reference by default
    assert not ex.meta["cache_hit"]
    (folder,) = entries(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["extracted.json", "extracted.safetensors"]
    assert json.loads((folder / "extracted.json").read_text())["version"] == X.EXTRACTION_VERSION

    again = extract(records, tiny, cache_dir=tmp_path, shard_size=4, progress=False)
    assert again.meta["cache_hit"]
    _same(ex, again)

    # the other pooling comes from the same entry (one forward computed both); another dataset: another key
    resp = extract(records, tiny, cache_dir=tmp_path, pooling="response", progress=False)
    assert resp.meta["cache_hit"] and resp.meta["pooling"] == "response" and ex.meta["pooling"] == "all"
    _assert_matches(resp, records, _direct(tiny, records, pooling="response"))
    assert torch.equal(resp.lengths, ex.lengths) and torch.equal(resp.ref_logps, ex.ref_logps)
    extract(records[:3], tiny, cache_dir=tmp_path, progress=False)
    assert len(entries(tmp_path)) == 2


def test_a_read_only_cache_is_read_and_a_missing_one_is_said_first(tiny, records, tmp_path, monkeypatch):
    """A cache folder that cannot be written still serves the entries it holds; an entry it lacks is one clear
    error, and a cache folder that is not there (and cannot be made) is that error before the model is used."""
    ex = extract(records, tiny, cache_dir=tmp_path / "c", progress=False)

    def read_only(folder, what, fix):
        raise PermissionError(f"{what} {folder}: cannot write there (read-only); {fix}")

    monkeypatch.setattr(X, "check_writable", read_only)
    _same(ex, extract(records, tiny, cache_dir=tmp_path / "c", progress=False))  # the entry is there: read
    with pytest.raises(PermissionError, match="read-only"):
        extract(records[:3], tiny, cache_dir=tmp_path / "c", progress=False)  # not there: it cannot be stored
    monkeypatch.setattr(X, "_as_bundle", lambda *a, **k: pytest.fail("the model was used first"))
    with pytest.raises(PermissionError, match="read-only"):
        extract(records, tiny, cache_dir=tmp_path / "absent", progress=False)


def test_extract_version_is_in_the_key(tiny, records, tmp_path, monkeypatch):
    extract(records, tiny, cache_dir=tmp_path, progress=False)
    monkeypatch.setattr(X, "EXTRACTION_VERSION", X.EXTRACTION_VERSION + 1)
    assert not extract(records, tiny, cache_dir=tmp_path, progress=False).meta["cache_hit"]
    assert len(entries(tmp_path)) == 2


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest", "no_manifest"])
def test_corrupt_cache_is_recomputed(tiny, records, tmp_path, damage):
    ex = extract(records, tiny, cache_dir=tmp_path, progress=False)
    (folder,) = entries(tmp_path)
    st, man = folder / "extracted.safetensors", folder / "extracted.json"
    data = bytearray(st.read_bytes())
    if damage == "truncate":
        st.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flip":
        data[-5] ^= 0xFF  # inside the tensors, the header still parses
        st.write_bytes(bytes(data))
    elif damage == "manifest":
        man.write_text(man.read_text()[:40])
    else:
        man.unlink()
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = extract(records, tiny, cache_dir=tmp_path, progress=False)
    said = [str(w.message) for w in caught if "is damaged" in str(w.message)]
    assert len(said) == (damage != "no_manifest")  # a damaged entry is said in one line; a missing one is not there
    assert not again.meta["cache_hit"]
    _same(ex, again)
    assert extract(records, tiny, cache_dir=tmp_path, progress=False).meta["cache_hit"]


def test_interrupted_run_resumes(tiny, records, tmp_path, monkeypatch):
    calls = []
    real = X._forward_pools

    def failing(model, encoded, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        calls.append(len(encoded))
        return real(model, encoded, **kw)

    monkeypatch.setattr(X, "_forward_pools", failing)
    with pytest.raises(KeyboardInterrupt):
        extract(records, tiny, cache_dir=tmp_path, shard_size=2, progress=False)
    (folder,) = entries(tmp_path)
    assert sorted(p.name for p in folder.glob("shard-*.json")) == ["shard-00000-of-00003.json", "shard-00001-of-00003.json"]
    # a shard whose tensors were damaged after its manifest was written is recomputed, not used
    shard1 = folder / "shard-00001-of-00003.safetensors"
    shard1.write_bytes(shard1.read_bytes()[:-8])

    calls.clear()
    monkeypatch.setattr(X, "_forward_pools", lambda model, encoded, **kw: (calls.append(len(encoded)), real(model, encoded, **kw))[1])
    ex = extract(records, tiny, cache_dir=tmp_path, shard_size=2, progress=False)
    assert calls == [2, 2]  # shards 1 and 2 only
    _assert_matches(ex, records, _direct(tiny, records))
    assert not list(folder.glob("shard-*"))  # merged, shards removed


def test_checkpoint_theta0(tiny, records, tmp_path):
    theta0 = load_model("tiny", device="cpu")
    with torch.no_grad():
        for w in theta0.model.parameters():
            w.add_(0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(w.numel())))
    # same name and config as the reference: only the weights fingerprint tells them apart in the cache key
    ex = extract(records, tiny, checkpoint=theta0, cache_dir=tmp_path, progress=False)
    ref_direct, th_direct = _direct(tiny, records), _direct(theta0, records)
    for i, r in enumerate(records):
        n = len(r["candidates"])
        torch.testing.assert_close(ex.ref_logps[i, :n], ref_direct[i][0], atol=1e-4, rtol=0)
        torch.testing.assert_close(ex.theta0_logps[i, :n], th_direct[i][0], atol=1e-4, rtol=0)
        torch.testing.assert_close(ex.features[i, :n], th_direct[i][1], atol=1e-4, rtol=0)  # phi under theta0
    assert (ex.theta0_logps - ex.ref_logps).abs().max() > 1e-2
    plain = extract(records, tiny, cache_dir=tmp_path, progress=False)
    assert not plain.meta["cache_hit"]  # the checkpoint is part of the key
    other = extract(records, theta0, cache_dir=tmp_path, progress=False)
    assert not other.meta["cache_hit"]  # same name and config, other weights: another key
    torch.testing.assert_close(other.ref_logps, ex.theta0_logps)
    assert len(entries(tmp_path)) == 3


def test_both_poolings_in_one_forward_equal_single_pooling_calls(tiny, records):
    pools = [encode_pool(r, tiny.tokenizer) for r in records]
    with torch.no_grad():
        lp, feats, mask, lengths = FW.shared_prefix_outputs(tiny.model, pools, poolings=FW.POOLINGS)
        for pooling in FW.POOLINGS:
            lp1, ft1, m1 = shared_prefix_forward_batch(tiny.model, pools, pooling=pooling)
            torch.testing.assert_close(feats[pooling], ft1, atol=0, rtol=0)
            torch.testing.assert_close(lp, lp1, atol=0, rtol=0)
            assert torch.equal(mask, m1)
    assert not torch.allclose(feats["all"][mask], feats["response"][mask])  # the two poolings differ
    # lengths: each candidate's response tokens (end-of-turn included), 0 for padding
    for i, (_, cs) in enumerate(pools):
        assert lengths[i].tolist() == [len(c) for c in cs] + [0] * (lengths.shape[1] - len(cs))
    _, none, _, _ = FW.shared_prefix_outputs(tiny.model, pools, poolings=())
    assert none == {}


def test_extract_lengths_and_other_pooling_under_theta0(tiny, records, tmp_path):
    theta0 = load_model("tiny", device="cpu")
    with torch.no_grad():
        for w in theta0.model.parameters():
            w.add_(0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(w.numel() + 1)))
    resp = extract(records, tiny, checkpoint=theta0, pooling="response", cache_dir=tmp_path, progress=False)
    assert not resp.meta["cache_hit"]
    everything = extract(records, tiny, checkpoint=theta0, pooling="all", cache_dir=tmp_path, progress=False)
    assert everything.meta["cache_hit"] and everything.meta["pooling"] == "all"
    _assert_matches(everything, records, [(lp, ft) for (lp, _), (_, ft) in
                                          zip(_direct(tiny, records), _direct(theta0, records))])
    for i, r in enumerate(records):
        n = [len(c) for c in encode_pool(r, tiny.tokenizer)[1]]
        assert resp.lengths[i].tolist() == n + [0] * (resp.lengths.shape[1] - len(n))
        assert all(k >= 2 for k in n)  # a name plus the end-of-turn token at least
    assert resp.lengths.dtype == torch.long and torch.equal(resp.lengths, everything.lengths)


def test_bf16_extraction_is_stored_in_float32_under_its_own_key(records, tmp_path):
    fp32 = load_model("tiny", device="cpu")
    bf16 = load_model("tiny", device="cpu", dtype="bfloat16")
    a = extract(records, fp32, cache_dir=tmp_path, progress=False)
    b = extract(records, bf16, cache_dir=tmp_path, progress=False)
    assert not b.meta["cache_hit"] and len(entries(tmp_path)) == 2  # the dtype is part of the key
    assert (a.meta["dtype"], b.meta["dtype"]) == ("torch.float32", "torch.bfloat16")
    assert b.features.dtype == b.ref_logps.dtype == torch.float32
    assert torch.equal(a.lengths, b.lengths)
    m = a.mask
    assert 0 < (a.ref_logps[m] - b.ref_logps[m]).abs().max() < 0.5  # bf16 rounding, not another model
    cos = F.cosine_similarity(a.features[m], b.features[m], dim=-1)
    assert cos.min() > 0.99


# ---------------------------------------------------------------------------------------------- Algorithm 1


def _toy_extracted():
    feats = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3) ** 1.5
    ref = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-5.0, -6.0, -7.0, 0.0]])
    th = ref + torch.tensor([[0.5, 0.0, -0.5, 1.0], [0.25, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[True] * 4, [True, True, True, False]])
    return Extracted(["a", "b"], feats * mask[..., None], ref * mask, th * mask, mask, torch.tensor([1, 2]))


def test_selection_inputs_by_hand():
    ex = _toy_extracted()
    phi, logits, mask, cand = selection_inputs(ex, "delta")
    assert cand.tolist() == [[0, 2, 3], [0, 1, -1]]
    assert mask.tolist() == [[True, True, True], [True, True, False]]
    torch.testing.assert_close(phi[0], ex.features[0, [0, 2, 3]] - ex.features[0, 1])
    torch.testing.assert_close(phi[1, :2], ex.features[1, [0, 1]] - ex.features[1, 2])
    assert (phi[1, 2] == 0).all()
    # Delta_i(theta0) = (th_i - ref_i) - (th* - ref*)
    torch.testing.assert_close(logits, torch.tensor([[0.5, -0.5, 1.0], [0.25, 1.0, 0.0]]))
    b = reference_offsets(ex)
    torch.testing.assert_close(b, torch.tensor([[-1.0, 1.0, 2.0], [-2.0, -1.0, 0.0]]))
    # l_i = (log pi_theta0(y_i) - log pi_theta0(y*)) + b_i: Algorithm 1's phi_i^T theta0 + b_i, log-linear reading
    _, policy, _, _ = selection_inputs(ex, "reference")
    torch.testing.assert_close(logits, (policy + b) * mask)


def test_theta0_equal_ref_gives_uniform_q(tiny, records, tmp_path):
    """At theta0 = the reference every Delta_i is 0, so Algorithm 1's lines 3-5 reduce to hand values per prompt with
    n valid negatives: q = 1/n, alpha0 = beta^2 sigmoid(log n), v_i = sqrt(1/n) (phi_i - mean of the valid phi)."""
    from mass_dpo.selection import fisher_vectors, fisher_weights

    ex = extract(records, tiny, cache_dir=tmp_path, progress=False)
    phi, logits, mask, cand = selection_inputs(ex, "delta")
    assert (logits == 0).all()
    beta = 0.1
    n = mask.sum(-1, keepdim=True).double()  # [P, 1], pools of 2 to 5 negatives
    assert n.unique().numel() > 1
    q, alpha = fisher_weights(logits.double(), mask, beta)
    torch.testing.assert_close(q, mask / n)
    torch.testing.assert_close(alpha, beta**2 * torch.sigmoid(torch.log(n[:, 0])))
    v, _ = fisher_vectors(phi.double(), logits.double(), mask, beta)
    x = phi.double()
    mean = (x * mask[..., None]).sum(1, keepdim=True) / n[..., None]
    want = torch.where(mask[..., None], (1 / n[..., None]).sqrt() * (x - mean), torch.zeros(()))
    torch.testing.assert_close(v, want)
    assert (v[~mask] == 0).all() and (~mask).any()
    for i, r in enumerate(records):
        assert sorted(cand[i][mask[i]].tolist() + [r["target"]]) == list(range(len(r["candidates"])))


# ------------------------------------------------------------------------------------------ two processes

SCRIPT = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from test_extraction import make_records
from mass_dpo.extraction import extract
ex = extract(make_records(), "tiny", cache_dir=sys.argv[1], shard_size=2, device="cpu", progress=False)
import os
torch.save({{"ids": ex.ids, **ex.tensors()}}, sys.argv[2] + "." + os.environ["RANK"])
"""


def test_two_accelerate_processes_equal_one(tiny, records, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=os.path.dirname(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    # On a CPU machine, --multi_gpu starts the processes with torchrun; extraction's PartialState(cpu=True) then
    # talks over gloo (accelerate 1.15's --cpu with several processes wants mpirun and a hostfile).
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
        str(script), str(tmp_path / "cache"), str(tmp_path / "out"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = extract(records, tiny, use_cache=False, progress=False)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"out.{rank}")
        assert got.pop("ids") == single.ids
        for k, v in single.tensors().items():
            if v.dtype == torch.bool or not v.is_floating_point():
                assert torch.equal(got[k], v), k
            else:
                torch.testing.assert_close(got[k], v, atol=1e-5, rtol=0)
    (folder,) = entries(tmp_path / "cache")
    assert sorted(p.name for p in folder.iterdir()) == ["extracted.json", "extracted.safetensors"]
