"""The four benchmarks (LastFM, MovieLens, MedMCQA, QASC) and a user's own preference data, as records.

- :func:`load_benchmark` (``mass_dpo.data.benchmarks``): one split of a benchmark, offline or from the hub;
- :func:`load_preferences` (``mass_dpo.data.preferences``): TRL-style ``prompt`` / ``chosen`` / ``rejected`` data;
- :func:`benchmark_sizes`: the paper's prompt counts and candidate caps (``params/datasets/*.yaml``);
- the record shape and its checks: ``mass_dpo.data.records``.

Nothing here imports transformers; the chat formatting (``format_prompt``, ``format_pair``) takes the tokenizer
from its caller.
"""

from .benchmarks import (
    BENCHMARKS,
    SAMPLES_DIR,
    SPLITS,
    SampleDataWarning,
    apply_limit,
    benchmark_sizes,
    cache_dir,
    dataset_settings,
    load_benchmark,
    locate,
    resolve_data_dir,
)
from .preferences import carve_splits, is_preference_file, load_preferences
from .records import BASE_COLUMNS, RecordError, check_records

__all__ = [
    "BENCHMARKS",
    "BASE_COLUMNS",
    "SAMPLES_DIR",
    "SPLITS",
    "RecordError",
    "SampleDataWarning",
    "apply_limit",
    "benchmark_sizes",
    "cache_dir",
    "carve_splits",
    "check_records",
    "dataset_settings",
    "is_preference_file",
    "load_benchmark",
    "load_preferences",
    "locate",
    "resolve_data_dir",
]

from .formatting import encode_pool, format_pair, format_prompt  # noqa: E402  (tokenizers are passed in)

__all__ += ["encode_pool", "format_pair", "format_prompt"]
