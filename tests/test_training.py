"""Multi-negative training: every method lowers its loss in every regime; the shared-prompt forward gives the same
loss and gradients as one row per response; records, collator, negatives and config resolution."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch

from mass_dpo.forward import naive_forward
from mass_dpo.losses import METHODS
from mass_dpo.training import (
    PreferenceCollator,
    PreferenceDataset,
    TrainConfig,
    batch_loss,
    build_policy,
    build_trainer,
    negatives_from_jsonl,
    policy_logps,
    resolve_config,
    select_training_negatives,
)

torch.set_num_threads(2)


# ---------------------------------------------------------------- fakes


@dataclass
class FakeExtracted:
    """``Extracted``-shaped: ids, features [P, C, d], ref_logps / theta0_logps [P, C], mask [P, C], target [P]."""

    ids: list
    features: torch.Tensor
    ref_logps: torch.Tensor
    theta0_logps: torch.Tensor
    mask: torch.Tensor
    target: torch.Tensor

    def __len__(self):
        return len(self.ids)


def fake_extracted(P=32, C=8, d=16, seed=0, short_pools=False) -> FakeExtracted:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(P, C, d, generator=g)
    ref = torch.randn(P, C, generator=g) - 5.0
    mask = torch.ones(P, C, dtype=torch.bool)
    if short_pools:
        mask[::3, C - 3 :] = False  # some pools have C - 3 candidates
    target = torch.randint(0, C - 3, (P,), generator=g)
    return FakeExtracted([f"p{i}" for i in range(P)], feats, ref, ref.clone(), mask, target)


def random_negatives(ex, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for p in range(len(ex.ids)):
        valid = [i for i in range(ex.mask.shape[1]) if ex.mask[p, i] and i != int(ex.target[p])]
        perm = torch.randperm(len(valid), generator=g)[:n]
        out.append([valid[j] for j in perm.tolist()])
    return torch.tensor(out)


def dataset_loss(method, beta, policy, dataset, forward=None):
    """Mean loss over a whole dataset (one big batch), no gradient."""
    batch = PreferenceCollator()([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        policy.eval()
        logps = policy_logps(policy, batch, forward=forward)
        return float(batch_loss(method, beta, logps, batch).loss.mean())


def quick_config(method, regime, **kw):
    base = dict(method=method, regime=regime, max_steps=8, per_device_train_batch_size=4,
                gradient_accumulation_steps=1, warmup_ratio=0.0, lr_scheduler_type="constant", logging_steps=4,
                save_steps=1000, eval_steps=4, gradient_checkpointing=False, max_grad_norm=1.0, n=3)
    base.update(kw)
    return resolve_config(**base)


# ---------------------------------------------------------------- loglinear regime


@pytest.mark.parametrize("method", METHODS)
def test_loglinear_training_lowers_loss(method, tmp_path):
    ex = fake_extracted(P=32, d=16)
    # a planted preference direction: the chosen candidate's features lean along w
    w = torch.randn(16, generator=torch.Generator().manual_seed(1))
    ex.features[torch.arange(32), ex.target] += 0.5 * w
    cfg = quick_config(method, "loglinear", learning_rate=0.05)
    ds = PreferenceDataset.from_selection(ex, random_negatives(ex, cfg.n))
    policy = build_policy(cfg, dim=16)
    before = dataset_loss(method, cfg.beta, policy, ds)
    assert before == pytest.approx(math.log(2) if method in ("dpo", "dpo_k", "dmpo") else math.log(1 + cfg.n), rel=1e-5)
    trainer = build_trainer(cfg, policy, ds, output_dir=tmp_path)
    trainer.train()
    after = dataset_loss(method, cfg.beta, policy, ds)
    assert trainer.state.global_step == 8
    assert after < before - 1e-3, (before, after)
    assert policy.theta.abs().sum() > 0


def test_loglinear_policy_is_ref_plus_features_dot_theta():
    policy = build_policy(quick_config("sdpo", "loglinear"), dim=4)
    with torch.no_grad():
        policy.theta.copy_(torch.tensor([1.0, -2.0, 0.5, 0.0]))
    feats = torch.tensor([[[1.0, 0.0, 0.0, 3.0], [0.0, 1.0, 2.0, 0.0]]])
    ref = torch.tensor([[-1.0, -2.0]])
    assert torch.allclose(policy(feats, ref), torch.tensor([[0.0, -3.0]]))


# ---------------------------------------------------------------- LM regimes (tiny)


@pytest.fixture(scope="module")
def tiny_state():
    """The state dict of ``tiny`` (random-init Llama, seeded), loaded once."""
    from mass_dpo.models import load_model

    bundle = load_model("tiny", device="cpu")
    return bundle.model.config, {k: v.clone() for k, v in bundle.model.state_dict().items()}


def fresh_tiny(tiny_state):
    from transformers import AutoModelForCausalLM

    config, state = tiny_state
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state)
    return model.float()


def toy_pools(P=4, C=5, seed=0, vocab=400):
    """Hand-made token ids: a prompt of 6-9 tokens and C responses of 1-4 tokens per prompt."""
    g = torch.Generator().manual_seed(seed)
    pools = []
    for _ in range(P):
        prompt = torch.randint(10, vocab, (int(torch.randint(6, 10, (1,), generator=g)),), generator=g).tolist()
        cands = [torch.randint(10, vocab, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(C)]
        pools.append((prompt, cands))
    return pools


def lm_dataset(model, pools, n=3, seed=0):
    """Records over ``pools`` with reference log-probs from ``model`` itself (the policy starts at the reference)."""
    from mass_dpo.forward import shared_prefix_forward

    P, C = len(pools), len(pools[0][1])
    with torch.no_grad():
        ref = torch.stack([shared_prefix_forward(model, p, c, return_features=False)[0] for p, c in pools])
    ex = FakeExtracted([f"q{i}" for i in range(P)], torch.zeros(P, C, 1), ref, ref.clone(),
                       torch.ones(P, C, dtype=torch.bool), torch.tensor([i % C for i in range(P)]))
    return PreferenceDataset.from_selection(ex, random_negatives(ex, n, seed), pools=pools)


@pytest.mark.parametrize("regime", ["full", "lora"])
@pytest.mark.parametrize("method", METHODS)
def test_lm_training_lowers_loss(method, regime, tiny_state, tmp_path):
    model = fresh_tiny(tiny_state)
    pools = toy_pools(P=4)
    cfg = quick_config(method, regime, max_steps=4, learning_rate=1e-2 if regime == "lora" else 3e-3,
                       lora_r=4, lora_alpha=8, lora_dropout=0.0,
                       gradient_checkpointing=method == "mass_dpo")  # the default path once per regime
    ds = lm_dataset(model, pools, n=cfg.n)
    policy = build_policy(cfg, model)
    before = dataset_loss(method, cfg.beta, policy, ds)
    assert before == pytest.approx(math.log(2) if method in ("dpo", "dpo_k", "dmpo") else math.log(1 + cfg.n), abs=1e-4)
    trainer = build_trainer(cfg, policy, ds, output_dir=tmp_path)
    trainer.train()
    after = dataset_loss(method, cfg.beta, policy, ds)
    assert after < before - 1e-3, (before, after)
    if regime == "lora":
        trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("method", ["sdpo", "dpo_k", "dmpo", "dpo"])
def test_shared_prompt_forward_matches_row_per_response(method, tiny_state):
    """Loss and every gradient of the packed shared-prompt forward (the trainer's path: the model's own forward,
    one packed row per prompt) equal those of one ``[prompt, response]`` row per response (``naive_forward``, the
    package's row-per-response forward, through ``pool_logps``; its padding masked by a 2D attention mask)."""
    from mass_dpo.training import enable_pool_forward

    model = fresh_tiny(tiny_state)
    pools = toy_pools(P=3, C=5, seed=3)
    ds = lm_dataset(model, pools, n=1 if method == "dpo" else 3)
    # perturb the reference so that rewards, margins and softmax weights are not all zero
    ds.ref_logps = ds.ref_logps + torch.randn(ds.ref_logps.shape, generator=torch.Generator().manual_seed(0))
    batch = PreferenceCollator()([ds[i] for i in range(len(ds))])
    if method != "dpo":
        batch["mask"][1, 3] = False  # one padded negative slot
    results = []
    for how in ("model forward", "row per response"):
        model.zero_grad()
        if how == "model forward":
            enable_pool_forward(model)
            logps = policy_logps(model, batch)
        else:
            logps = policy_logps(model, batch, forward=naive_forward)  # the package's row-per-response forward
        loss = batch_loss(method, 0.5, logps, batch).loss.mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), logps.detach(), grads))
    (l1, lp1, g1), (l2, lp2, g2) = results
    assert torch.allclose(lp1, lp2, atol=1e-4), (lp1 - lp2).abs().max()
    assert torch.allclose(l1, l2, atol=1e-6, rtol=1e-5)
    assert g1.keys() == g2.keys() and len(g1) > 0
    for name in g1:
        scale = g2[name].abs().max().clamp_min(1e-8)
        assert (g1[name] - g2[name]).abs().max() / scale < 1e-3, name
    # the patched model still answers ordinary calls
    assert model(input_ids=torch.tensor([[5, 6, 7]])).logits.shape[:2] == (1, 3)


# ---------------------------------------------------------------- records, collator, negatives


def test_dataset_and_collator_pad_negatives():
    ex = fake_extracted(P=3, C=6, d=4)
    neg = torch.tensor([[1, 2, -1], [0, -1, -1], [5, 4, 3]])
    ex.target = torch.tensor([0, 2, 1])
    ds = PreferenceDataset.from_selection(ex, neg)
    item = ds[0]
    assert item["mask"].tolist() == [True, True, True, False]
    assert torch.equal(item["features"][1], ex.features[0, 1])
    assert item["ref_logps"][2] == ex.ref_logps[0, 2] and item["ref_logps"][3] == 0
    batch = PreferenceCollator()([ds[i] for i in range(3)])
    assert batch["features"].shape == (3, 4, 4)
    assert batch["mask"].tolist() == [[True, True, True, False], [True, True, False, False], [True] * 4]
    assert torch.equal(batch["ref_logps"][2], ex.ref_logps[2, [1, 5, 4, 3]])
    with pytest.raises(ValueError, match="chosen"):
        PreferenceDataset.from_selection(ex, torch.tensor([[0, 1, 2], [0, 1, 3], [0, 2, 3]]))


def test_lm_records_carry_token_ids():
    pools = toy_pools(P=2, C=4)
    ex = FakeExtracted(["a", "b"], torch.zeros(2, 4, 1), torch.zeros(2, 4), torch.zeros(2, 4),
                       torch.ones(2, 4, dtype=torch.bool), torch.tensor([3, 0]))
    ds = PreferenceDataset.from_selection(ex, torch.tensor([[0, 2], [-1, 1]]), pools=pools)
    item = ds[0]
    assert "features" not in item
    assert item["prompt_ids"] == pools[0][0]
    assert item["candidate_ids"] == [pools[0][1][3], pools[0][1][0], pools[0][1][2]]
    assert ds[1]["candidate_ids"] == [pools[1][1][0], pools[1][1][1]]  # an absent negative moves last
    assert ds[1]["mask"].tolist() == [True, True, False]


def test_masked_negatives_do_not_change_the_loss():
    """A padded negative slot (mask False) gives the same loss as a record without it."""
    ex = fake_extracted(P=2, C=6, d=4)
    ex.target = torch.tensor([0, 0])
    policy = build_policy(quick_config("sdpo", "loglinear"), dim=4)
    with torch.no_grad():
        policy.theta.normal_()
    short = PreferenceDataset.from_selection(ex, torch.tensor([[1, 2], [3, 4]]))
    padded = PreferenceDataset.from_selection(ex, torch.tensor([[1, 2, -1], [3, 4, -1]]))
    for method in ("sdpo", "dpo_k", "dmpo"):
        assert dataset_loss(method, 0.1, policy, short) == pytest.approx(dataset_loss(method, 0.1, policy, padded))


def test_selected_negatives_map_back_to_candidates():
    """In-memory selection (``mass-dpo select``'s own function) returns candidate indices: never the target,
    D-optimal equal to the selector run on the whole pool with the target masked out, one negative for dpo, seeded
    random for the others."""
    from mass_dpo.extraction import Extracted
    from mass_dpo.selection import select_negatives

    f = fake_extracted(P=6, C=8, d=5, short_pools=True)
    ex = Extracted(f.ids, f.features, f.ref_logps, f.ref_logps + 0.3 * torch.randn(f.ref_logps.shape), f.mask, f.target)
    neg = select_training_negatives(ex, "mass_dpo", 3, beta=0.5, selection_score="delta")
    assert neg.shape == (6, 3)
    assert not (neg == ex.target[:, None]).any()
    # reference: the whole pool, target masked out, phi and logits relative to the target
    rows = torch.arange(6)
    phi = ex.features - ex.features[rows, ex.target][:, None]
    delta = (ex.theta0_logps - ex.ref_logps) - (ex.theta0_logps - ex.ref_logps)[rows, ex.target][:, None]
    mask = ex.mask.clone()
    mask[rows, ex.target] = False
    ref = select_negatives(phi.double(), delta.double(), 3, beta=0.5, gamma=0.1, strategy="dopt", mask=mask).indices
    assert torch.equal(neg, ref)
    assert select_training_negatives(ex, "dpo", 3).shape == (6, 1)
    r0 = select_training_negatives(ex, "sdpo", 3, seed=0)
    assert torch.equal(r0, select_training_negatives(ex, "sdpo", 3, seed=0))
    assert not torch.equal(r0, select_training_negatives(ex, "sdpo", 3, seed=1))
    assert all(bool(ex.mask[p, i]) for p in range(6) for i in r0[p].tolist())


def test_negatives_from_jsonl(tmp_path):
    path = tmp_path / "sel.jsonl"
    rows = [{"id": "b", "indices": [4, 1, 2], "gains": [0.1, 0.2, 0.3], "logdet": 1.0},
            {"id": "a", "indices": [3, 0], "gains": [0.1, 0.2], "logdet": 0.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert negatives_from_jsonl(path, ["a", "b"]).tolist() == [[3, 0, -1], [4, 1, 2]]
    with pytest.raises(KeyError):
        negatives_from_jsonl(path, ["a", "c"])
    # select's default output, one row per (chosen, negative), in any row order: the same tensor
    from mass_dpo.preprocess import pair_rows

    pairs = pair_rows([{**r, "prompt": "q", "chosen": "c", "rejected": [f"r{i}" for i in r["indices"]]} for r in rows])
    path.write_text("".join(json.dumps(r) + "\n" for r in reversed(pairs)))
    assert negatives_from_jsonl(path, ["a", "b"]).tolist() == [[3, 0, -1], [4, 1, 2]]
    path.write_text(json.dumps({"id": "a", "prompt": "q"}) + "\n")
    with pytest.raises(KeyError, match="not a mass-dpo select output"):
        negatives_from_jsonl(path, ["a"])


# ---------------------------------------------------------------- configuration


def test_resolve_config_precedence():
    cfg = resolve_config()
    assert (cfg.beta, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps) == (0.1, 2, 8)
    assert (cfg.max_grad_norm, cfg.warmup_ratio, cfg.lr_scheduler_type, cfg.num_train_epochs) == (0.3, 0.05, "cosine", 3)
    full = resolve_config(regime="full")
    assert full.learning_rate == 1e-5 and full.gradient_checkpointing
    assert resolve_config(regime="loglinear").learning_rate == 0.1  # the regime's section
    assert resolve_config(regime="loglinear", learning_rate=0.5).learning_rate == 0.5  # explicit wins
    assert resolve_config(profile="smoke").model == "tiny"
    assert resolve_config(profile="smoke", max_steps=7).max_steps == 7
    assert resolve_config(method="dpo", n=5).n == 1
    assert resolve_config().optim in ("adamw_torch", "paged_adamw_32bit")
    assert resolve_config(TrainConfig(method="sdpo", regime="lora")).learning_rate == 1e-4
    for resolved in (resolve_config(profile="cpu", method="sdpo"), resolve_config(regime="lora", beta=0.5)):
        assert resolve_config(resolved) == resolved  # idempotent: a run's saved config names the same run
    with pytest.raises(ValueError, match="unknown training option"):
        resolve_config(lr=1.0)
    with pytest.raises(ValueError, match="unknown method"):
        resolve_config(method="ipo")


def test_training_arguments_follow_the_config(tmp_path):
    from mass_dpo.training import training_arguments

    args = training_arguments(resolve_config(regime="full"), tmp_path)
    assert args.learning_rate == 1e-5 and args.lr_scheduler_type.value == "cosine"
    assert args.get_warmup_steps(1000) == 50
    assert args.max_grad_norm == 0.3 and args.remove_unused_columns is False
    assert args.per_device_train_batch_size == 2 and args.gradient_accumulation_steps == 8
    assert getattr(args, "activation_checkpointing", getattr(args, "gradient_checkpointing", None)) is True
    assert args.bf16 is torch.cuda.is_available()


def test_the_collator_pads_each_item_to_the_longest_with_zeros_and_false():
    """Items with 2 and 3 candidates (and 1 and 3 cached state rows): the batch holds each item's values, then zeros
    (mask False) up to the longest, as float32 (hidden: its own dtype)."""
    items = [
        {"ref_logps": torch.tensor([-1.0, -2.0], dtype=torch.float64), "mask": torch.tensor([True, True]),
         "features": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "hidden": torch.ones(1, 2, dtype=torch.bfloat16)},
        {"ref_logps": torch.tensor([-3.0, -4.0, -5.0]), "mask": torch.tensor([True, False, True]),
         "features": torch.tensor([[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]),
         "hidden": torch.full((3, 2), 2.0, dtype=torch.bfloat16)},
    ]
    batch = PreferenceCollator()(items)
    assert batch["ref_logps"].dtype == torch.float32 and batch["ref_logps"].tolist() == [[-1, -2, 0], [-3, -4, -5]]
    assert batch["mask"].tolist() == [[True, True, False], [True, False, True]]
    assert batch["features"].tolist() == [[[1, 2], [3, 4], [0, 0]], [[5, 6], [7, 8], [9, 10]]]
    assert batch["hidden"].dtype == torch.bfloat16
    assert batch["hidden"].tolist() == [[[1, 1], [0, 0], [0, 0]], [[2, 2], [2, 2], [2, 2]]]
