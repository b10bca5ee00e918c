import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# the notebooks' analyses are memoised on disk by their inputs (experiments.core.disk_memo); tests that fake those
# inputs must never read a table a real run left in the cache
os.environ.setdefault("MASS_DPO_NO_MEMO", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real benchmark copies beside the checkout (``../shared/data``); skip when absent."""
    if not (SHARED_DATA / "MANIFEST.md").is_file():
        pytest.skip(f"real data not found at {SHARED_DATA} (expected beside the checkout)")
    return SHARED_DATA
