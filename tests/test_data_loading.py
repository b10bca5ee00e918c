"""Where data is read from, the sample fallback, limits, sizes, the record shape and its checks."""

import shutil
import subprocess
import sys
import warnings

import pytest

from mass_dpo.data import (
    BASE_COLUMNS,
    SAMPLES_DIR,
    RecordError,
    SampleDataWarning,
    benchmark_sizes,
    cache_dir,
    check_records,
    load_benchmark,
    resolve_data_dir,
)
from mass_dpo.params import load_params

COLUMNS = {
    "lastfm": [*BASE_COLUMNS, "history"],
    "movielens": [*BASE_COLUMNS, "history"],
    "medmcqa": [*BASE_COLUMNS, "subject"],
    "qasc": [*BASE_COLUMNS],
}


@pytest.fixture
def no_env(monkeypatch, tmp_path):
    """No MASS_DPO_DATA, an empty cache folder, offline (no MovieLens download)."""
    monkeypatch.delenv("MASS_DPO_DATA", raising=False)
    monkeypatch.delenv("MASS_DPO_CACHE", raising=False)
    monkeypatch.setenv("MASS_DPO_OFFLINE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def test_resolution_order(no_env, monkeypatch, tmp_path):
    assert cache_dir() == tmp_path / "cache" / "mass_dpo" / "data"
    assert resolve_data_dir()[0] == cache_dir()
    monkeypatch.setenv("MASS_DPO_DATA", str(tmp_path / "env"))
    assert resolve_data_dir()[0] == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg")[0] == tmp_path / "arg"
    monkeypatch.setenv("MASS_DPO_DATA", "samples")
    assert resolve_data_dir()[0] == SAMPLES_DIR
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "mass_dpo" / "data"


def test_env_var_points_at_shared_data(monkeypatch, shared_data):
    monkeypatch.setenv("MASS_DPO_DATA", str(shared_data))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SampleDataWarning)
        assert len(load_benchmark("qasc", "test")) == 926


def test_no_data_dir_falls_back_to_the_sample_with_a_warning(no_env):
    with pytest.warns(SampleDataWarning, match="SAMPLE"):
        ds = load_benchmark("qasc", "valid")
    assert len(ds) == 204  # the sample's valid-carved QASC rows (tests/test_data_qasc.py)
    with pytest.raises(FileNotFoundError) as err:
        load_benchmark("movielens", "train")
    assert "u.data" in str(err.value) and "grouplens" in str(err.value).lower()


def test_cache_folder_with_data_is_used(no_env):
    shutil.copytree(SAMPLES_DIR / "qasc", cache_dir() / "qasc")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SampleDataWarning)
        assert len(load_benchmark("qasc", "test")) == 926


def test_explicit_folder_without_files_raises(no_env, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as err:
        load_benchmark("medmcqa", "test", data_dir=empty)
    msg = str(err.value)
    assert "medmcqa/dev.json" in msg and str(empty) in msg and "openlifescienceai/medmcqa" in msg
    with pytest.raises(FileNotFoundError, match=r"lastfm/Val_data\.jsonl \+ lastfm/id2name\.txt, or lastfm/lastfm-val\.json"):
        load_benchmark("lastfm", "valid", data_dir=empty)
    monkeypatch.setenv("MASS_DPO_DATA", str(empty))
    with pytest.raises(FileNotFoundError, match=r"\$MASS_DPO_DATA"):
        load_benchmark("qasc", "train")


@pytest.mark.parametrize("name", ["lastfm", "medmcqa", "qasc"])
def test_samples_load_with_fixed_columns(name):
    for split in ("train", "valid", "test"):
        ds = load_benchmark(name, split, data_dir="samples")
        assert ds.column_names == COLUMNS[name]
        for rec in ds.select(range(10)):
            assert rec["chosen"] == rec["candidates"][rec["target"]]
            assert rec["rejected"] == [c for i, c in enumerate(rec["candidates"]) if i != rec["target"]]
            assert rec["prompt"].endswith("Answer:")
        assert len(set(ds["id"])) == len(ds)


def test_sample_folders_are_small():
    """The package data stays under about 15 MB (issue 10); a licence beside each sample."""
    total = sum(p.stat().st_size for p in SAMPLES_DIR.rglob("*") if p.is_file())
    assert total < 15_000_000, total
    for name in ("lastfm", "medmcqa", "qasc"):
        assert (SAMPLES_DIR / name / "LICENSE.md").is_file()
    assert not (SAMPLES_DIR / "movielens").exists()
    assert (SAMPLES_DIR / "README.md").is_file()


# The cpu profile's prompt counts per dataset (issue 10): train 1,000, online eval / valid 200, test 500.
CPU_PROFILE_FLOOR = {"train": 1000, "valid": 200, "test": 500}
PROFILE_LIMITS = {"train": "train_limit", "valid": "eval_limit", "test": "test_limit"}


@pytest.mark.parametrize("name", ["lastfm", "medmcqa", "qasc"])
def test_samples_have_the_sizes_the_cpu_profile_needs(name):
    """Each sample split holds at least what the cpu profile draws (and at least the issue's floor), so the
    offline default needs no data folder. (Every split of these samples is above the floor; none is smaller.)"""
    common = load_params("profiles/cpu")["common"]
    for split, key in PROFILE_LIMITS.items():
        need = max(CPU_PROFILE_FLOOR[split], int(common.get(key) or 0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert len(load_benchmark(name, split, data_dir="samples")) >= need, (name, split, need)


def test_limit():
    full = load_benchmark("lastfm", "train", data_dir="samples")
    a = load_benchmark("lastfm", "train", data_dir="samples", limit=50, seed=1)
    assert len(a) == 50
    assert a["id"] == load_benchmark("lastfm", "train", data_dir="samples", limit=50, seed=1)["id"]
    assert a["id"] != load_benchmark("lastfm", "train", data_dir="samples", limit=50, seed=2)["id"]
    order = {rid: i for i, rid in enumerate(full["id"])}
    assert [order[i] for i in a["id"]] == sorted(order[i] for i in a["id"])  # source order kept
    small = load_benchmark("lastfm", "train", data_dir="samples", limit=20, seed=1)
    assert set(small["id"]) <= set(a["id"])  # nested subsets
    assert len(load_benchmark("lastfm", "train", data_dir="samples", limit=10_000)) == len(full)
    assert load_benchmark("lastfm", "train", data_dir="samples", limit=None)["id"] == full["id"]


def test_split_names_and_unknowns():
    assert len(load_benchmark("qasc", "val", data_dir="samples")) == 204
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("imdb", "train", data_dir="samples")
    with pytest.raises(ValueError, match="unknown split"):
        load_benchmark("qasc", "holdout", data_dir="samples")
    with pytest.raises(ValueError, match="no hub source"):
        load_benchmark("lastfm", "test", source="hub")


def test_sizes():
    for name, cap in (("lastfm", 20), ("movielens", 20), ("medmcqa", 20), ("qasc", 8)):
        assert benchmark_sizes(name) == {"train": 20000, "valid": 200, "test": 2000, "candidates": cap}


def test_check_records_names_record_and_file():
    good = {"id": "r0", "prompt": "p Answer:", "candidates": ["a", "b"], "target": 0, "chosen": "a", "rejected": ["b"]}
    check_records([good], "f.jsonl")
    bad = [
        dict(good, id="r1", candidates=[], target=0),
        dict(good, id="r2", target=5),
        dict(good, id="r3", candidates=["a", "b", "a"], chosen="a"),
        dict(good, id="r0"),
    ]
    with pytest.raises(RecordError) as err:
        check_records([good, *bad], "/data/f.jsonl")
    msg = str(err.value)
    assert "/data/f.jsonl" in msg
    assert "record r1: empty candidate pool" in msg
    assert "record r2: target 5 missing" in msg
    assert "record r3: target text 'a' duplicated" in msg
    assert "record r0: id not unique" in msg


def test_no_transformers_at_import():
    code = "import sys, mass_dpo.data; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
