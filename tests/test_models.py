"""Models by name: tiny (random, seeded, real tokenizer), smollm2 (GGUF converted once), hub errors."""

import pytest
import torch

from mass_dpo.models import ModelBundle, cache_dir, load_model, resolve_dtype


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu")


def test_tiny_is_a_seeded_llama_with_smollm2_tokenizer(tiny):
    assert isinstance(tiny, ModelBundle) and tiny.name == "tiny"
    assert tiny.model.config.model_type == "llama"
    assert tiny.model.config.hidden_size == tiny.config["config"]["hidden_size"] == 64
    assert tiny.model.config.vocab_size == len(tiny.tokenizer)
    assert "<|im_start|>" in tiny.tokenizer.chat_template
    assert tiny.model.dtype == torch.float32 and not tiny.model.training
    again = load_model("tiny", device="cpu")
    for a, b in zip(tiny.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)
    # the seed does not leak into the global RNG
    torch.manual_seed(123)
    x = torch.rand(3)
    torch.manual_seed(123)
    load_model("tiny", device="cpu")
    assert torch.equal(torch.rand(3), x)


def test_dtype_from_params():
    params = {"dtype": {"cuda": "bfloat16", "cpu": "float32"}}
    assert resolve_dtype(None, torch.device("cuda"), params) == torch.bfloat16
    assert resolve_dtype(None, torch.device("cpu"), params) == torch.float32
    assert resolve_dtype("float64", torch.device("cpu"), params) == torch.float64
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8", torch.device("cpu"), params)


@pytest.mark.parametrize("flags, native", [
    ({"fpu", "avx2", "avx512f", "amx_tile", "amx_bf16"}, True),  # Sapphire Rapids and later
    ({"fpu", "avx2", "avx512f", "avx512_bf16"}, True),  # Cooper Lake, Zen 4
    ({"fpu", "avx2", "avx512f"}, False),  # AVX512 without bf16: emulated, slower than fp32
    ({"fpu", "avx2"}, False),
])
def test_auto_dtype_is_bf16_only_where_the_cpu_has_native_bf16(monkeypatch, flags, native):
    import mass_dpo.models as M

    monkeypatch.delenv("MASS_DPO_DTYPE", raising=False)
    monkeypatch.setattr(M, "cpu_flags", lambda: set(flags))
    params = {"dtype": {"cuda": "bfloat16", "cpu": "auto"}}
    want = torch.bfloat16 if native else torch.float32
    assert M.cpu_has_native_bf16() is native
    assert resolve_dtype(None, torch.device("cpu"), params) == want
    assert resolve_dtype("auto", torch.device("cpu")) == want
    assert resolve_dtype(None, torch.device("cuda"), {"dtype": {"cuda": "auto"}}) == torch.bfloat16
    assert resolve_dtype(None, torch.device("cpu"), {"dtype": {"cpu": "float32"}}) == torch.float32  # tiny
    # the environment forces a dtype over the params (not over an explicit argument)
    monkeypatch.setenv("MASS_DPO_DTYPE", "float32")
    assert resolve_dtype(None, torch.device("cpu"), params) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu"), params) == torch.bfloat16
    monkeypatch.setenv("MASS_DPO_DTYPE", "fp8")
    with pytest.raises(ValueError, match="MASS_DPO_DTYPE"):
        resolve_dtype(None, torch.device("cpu"), params)


def test_native_bf16_without_cpuinfo_asks_torch(monkeypatch):
    import mass_dpo.models as M

    monkeypatch.setattr(M, "cpu_flags", lambda: set())
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert M.cpu_has_native_bf16()
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert not M.cpu_has_native_bf16()


def test_tiny_stays_float32_and_smollm2_asks_for_auto(monkeypatch):
    import mass_dpo.models as M
    from mass_dpo.params import load_params

    monkeypatch.delenv("MASS_DPO_DTYPE", raising=False)
    monkeypatch.setattr(M, "cpu_flags", lambda: {"amx_bf16"})
    assert load_model("tiny", device="cpu").model.dtype == torch.float32
    assert load_params("models/smollm2")["dtype"]["cpu"] == "auto"
    monkeypatch.setenv("MASS_DPO_DTYPE", "bfloat16")
    assert load_model("tiny", device="cpu").model.dtype == torch.bfloat16


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MASS_DPO_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MASS_DPO_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "mass_dpo"


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="smollm2"):
        load_model("gpt-17")


def test_unreachable_hub_model_names_offline_choices(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"smollm2, tiny"):
        load_model("qwen3", device="cpu")


def test_smollm2_converted_once_and_reloaded():
    bundle = load_model("smollm2", device="cpu")
    folder = cache_dir() / "models" / "smollm2"
    assert (folder / "COMPLETE").is_file() and (folder / "config.json").is_file()
    assert not any(p.name.startswith(".smollm2-") for p in folder.parent.iterdir())  # no leftover temp folders
    assert bundle.model.config.hidden_size == 576  # fp32 on disk, loaded in the params' dtype (cpu: auto)
    from mass_dpo.models import block_count

    assert block_count("smollm2") == len(bundle.model.model.layers) == 30  # read from the converted config
    assert bundle.model.dtype == resolve_dtype(None, torch.device("cpu"), bundle.config)
    assert not hasattr(bundle.model.config, "quantization_config")
    ids = bundle.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = bundle.model(ids, labels=ids)
    assert out.loss.item() < 6.0  # real weights: far below log(49152) = 10.8 of a random model
    nxt = bundle.tokenizer.decode(out.logits[0, -1].argmax())
    assert nxt.strip() == "Paris"


def test_block_count_reads_configs_without_loading_weights(tmp_path, monkeypatch):
    from mass_dpo.models import block_count

    tiny = load_model("tiny", device="cpu")
    assert block_count("tiny") == len(tiny.model.model.layers) == 2
    tiny.model.save_pretrained(tmp_path / "saved")
    tiny.tokenizer.save_pretrained(tmp_path / "saved")
    assert block_count(str(tmp_path / "saved")) == 2
    monkeypatch.setenv("MASS_DPO_CACHE", str(tmp_path / "empty"))  # smollm2 not converted here yet: unknown
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # a hub model never downloaded: unknown, no connection
    assert block_count("smollm2") is None and block_count("llama3") is None
