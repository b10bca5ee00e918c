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


def _private_cache() -> None:
    """The tests' own cache and runs root (a temporary folder, removed at exit): they never write extraction entries,
    runs or analyses into the user's cache. Only the converted models and tokenizers are the user's (linked: a model
    converted once serves the tests and the real runs alike)."""
    import atexit
    import shutil
    import tempfile

    env = os.environ.get("MASS_DPO_CACHE")
    xdg = os.environ.get("XDG_CACHE_HOME")
    user = Path(env).expanduser() if env else (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mass_dpo"
    private = Path(tempfile.mkdtemp(prefix="mass-dpo-tests-"))
    for shared in ("models", "tokenizers"):
        (user / shared).mkdir(parents=True, exist_ok=True)
        (private / shared).symlink_to(user / shared, target_is_directory=True)
    os.environ["MASS_DPO_CACHE"] = str(private)
    os.environ.pop("MASS_DPO_RUNS", None)
    atexit.register(shutil.rmtree, private, ignore_errors=True)  # removes the links, never what they point to


_private_cache()

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real benchmark copies beside the checkout (``../shared/data``); skip when absent."""
    if not (SHARED_DATA / "MANIFEST.md").is_file():
        pytest.skip(f"real data not found at {SHARED_DATA} (expected beside the checkout)")
    return SHARED_DATA
