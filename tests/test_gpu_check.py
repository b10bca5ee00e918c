"""The prepared GPU check (``benchmarks/gpu.py``, issue 12 part 3) runs on the CPU at tiny shapes and records what it
promises; its row-per-response path is checked against the shared prompt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_row_per_response_path_matches_one_row_per_candidate_and_the_shared_prompt():
    """float32: the step's row-per-response path (``pool_logps`` with ``naive_forward``) gives each pool's
    ``naive_forward`` log-probs, 0 in padded slots, and the shared prompt's."""
    from mass_dpo.forward import naive_forward
    from mass_dpo.models import load_model
    from mass_dpo.training import pool_logps

    model = load_model("tiny", device="cpu", dtype="float32").model
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 400, (7,), generator=g).tolist(), torch.randint(5, 400, (4,), generator=g).tolist()]
    cands = [[torch.randint(5, 400, (k,), generator=g).tolist() for k in (3, 1, 5, 2)],
             [torch.randint(5, 400, (k,), generator=g).tolist() for k in (2, 4, 1)]]
    mask = torch.tensor([[True] * 4, [True, True, True, False]])
    with torch.no_grad():
        rows = pool_logps(model, prompts, cands, mask, forward=naive_forward)
        shared = pool_logps(model, prompts, cands, mask)
        for b in range(2):
            ref = naive_forward(model, prompts[b], cands[b])[0]
            assert torch.allclose(rows[b, : len(cands[b])], ref, atol=1e-6), b
    assert rows[1, 3] == 0
    assert torch.allclose(rows, shared, atol=1e-4)


def test_gpu_check_runs_at_tiny_shapes_on_cpu(tmp_path):
    out = tmp_path / "record.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "MASS_DPO_RUNS": str(tmp_path / "runs")}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tiny shapes" in proc.stdout
    rec = json.loads(out.read_text())
    assert rec["tiny"] is True and rec["machine"]["device"] == "cpu"

    ext = {r["path"]: r for r in rec["extraction"]}
    assert set(ext) == {"shared", "naive"}
    assert ext["shared"]["tokens_scored"] == ext["naive"]["tokens_scored"] == ext["naive"]["tokens_fed"]
    assert ext["shared"]["tokens_fed"] < ext["naive"]["tokens_fed"]  # the prompt is read once per pool
    assert ext["shared"]["agree"] and ext["shared"]["rel_logp_diff"] <= 2e-2
    assert ext["shared"]["fp32_rel_logp_diff"] <= 1e-4  # the layouts agree in fp32 ...
    assert ext["naive"]["rel_error_vs_fp32"] > 0  # ... and bf16 rounding moves the scores of either

    step = rec["step"]
    assert step["dtype"] == "bfloat16" and step["n"] == 3 and step["batch"] == 2
    tiny_params = sum(p.numel() for p in __import__("mass_dpo.models", fromlist=["x"]).load_model(
        "tiny", device="cpu").model.parameters())
    assert step["parameters"] == tiny_params  # full fine-tuning: every weight
    assert step["agree"] and step["grad_cosine"] >= 0.99 and step["grad_norm"] > 0
    assert step["paths"]["shared"]["tokens_fed"] < step["paths"]["rows"]["tokens_fed"]
    assert step["adamw_step"]["seconds"] > 0

    runs = {r["path"]: r for r in rec["run"]}
    assert set(runs) == {"reference (untrained)", "sdpo", "mass_dpo"}
    for r in runs.values():
        assert 0 <= r["metrics"]["recall@1"] <= r["metrics"]["recall@3"] <= 1
        assert r["metrics"]["prompts"] == 4
    assert runs["sdpo"]["steps"] == runs["mass_dpo"]["steps"] == 2  # 4 prompts, batch 2, one epoch
    for line in ("extraction", "step", "reference (untrained)", "mass_dpo"):
        assert line in proc.stdout


def test_llama3_shape_has_llama_3_2_3b_parameter_count():
    """params/models/llama3_shape.yaml builds Llama-3.2-3B's 3,212,749,824 parameters (on the meta device), and the
    random-init path keeps its vocabulary size rather than the tokenizer's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mass_dpo.models import _random_model, load_tokenizer
    from mass_dpo.params import load_params

    params = load_params("models/llama3_shape")
    assert params["source"] == "random"
    config = AutoConfig.for_model(params["architecture"], **params["config"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == 3_212_749_824
    small = dict(params, config={**params["config"], "hidden_size": 32, "intermediate_size": 64, "head_dim": 8,
                                 "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2})
    tok = load_tokenizer(params["tokenizer"])
    built = _random_model(small, tok, torch.float32)
    assert built.config.vocab_size == 128256 > len(tok)
    assert built.get_input_embeddings().weight.shape == (128256, 32)
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        _random_model(dict(small, config={**small["config"], "vocab_size": 100}), tok, torch.float32)


def _gpu_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_extraction_check_fails_a_shared_prompt_that_adds_error(monkeypatch):
    """The extraction's agreement is judged against fp32 scores: a shared-prompt path whose log-probs are off by
    0.5 nats (a layout bug, not rounding) is reported as a mismatch, and the correct path as agreeing."""
    import mass_dpo.forward as fw

    gpu = _gpu_module()
    records = gpu.lastfm_pools(2, 8, "samples")
    kwargs = dict(device=torch.device("cpu"), dtype=torch.bfloat16, pools_per_forward=2)
    good = gpu.bench_extraction("tiny", records, **kwargs)
    assert all(r["agree"] for r in good) and good[0]["fp32_rel_logp_diff"] <= 1e-4
    gpu.release()

    real = fw.shared_prefix_forward_batch

    def off_by_half(model, chunk):
        logps, *rest = real(model, chunk)
        return (logps + 0.5, *rest)

    monkeypatch.setattr(fw, "shared_prefix_forward_batch", off_by_half)
    bad = gpu.bench_extraction("tiny", records, **kwargs)
    assert not any(r["agree"] for r in bad) and bad[0]["fp32_rel_logp_diff"] > 1e-4
    gpu.release()
