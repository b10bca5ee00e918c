"""LastFM: the S-DPO rebuild (the key check), the train rebuild, the S-DPO reader and the shipped sample."""

import json
import random

import pytest

from mass_dpo.data import RecordError, dataset_settings, load_benchmark
from mass_dpo.data import lastfm
from mass_dpo.data.records import Complement, sdpo_candidates


@pytest.fixture(scope="module")
def settings():
    return dataset_settings("lastfm")


@pytest.mark.parametrize("split,sdpo_file", [("valid", "lastfm-val.json"), ("test", "lastfm-test.json")])
def test_rebuild_equals_sdpo_files(shared_data, settings, split, sdpo_file):
    """Every row's history, candidates and target rebuilt from *_data.jsonl equal S-DPO's own file."""
    reference = json.loads((shared_data / "lastfm" / sdpo_file).read_text(encoding="utf-8"))
    rebuilt = lastfm.build_llara(shared_data / "lastfm", split, settings)
    # the rows of S-DPO's lastfm-val.json / lastfm-test.json (LLaRA's Val/Test_data.jsonl rows with len_seq >= 3)
    assert len(rebuilt) == len(reference) == {"valid": 2767, "test": 2495}[split]
    for k, (rec, row) in enumerate(zip(rebuilt, reference)):
        assert rec["history"] == row["historyList"].split("::"), k
        assert rec["candidates"] == row["itemList"], k
        assert rec["candidates"][rec["target"]] == row["trueSelection"], k
        assert rec["chosen"] == row["trueSelection"], k
    # load_benchmark reads the LLaRA files (not the S-DPO json) and gives the same records
    ds = load_benchmark("lastfm", split, data_dir=shared_data)
    assert ds["candidates"] == [r["candidates"] for r in rebuilt]
    assert ds["target"] == [r["target"] for r in rebuilt]
    assert ds["id"] == [lastfm.record_id(split, k) for k in range(len(rebuilt))]


def test_train_rebuild(shared_data):
    ds = load_benchmark("lastfm", "train", data_dir=shared_data)
    assert len(ds) == 47872  # of train_data.jsonl's 50,800 rows, those with len_seq >= 3
    sample = ds.select(range(0, len(ds), 97)).to_list()
    for rec in sample:
        cands = rec["candidates"]
        assert len(cands) == len(set(cands)) == 20
        assert cands.count(rec["chosen"]) == 1 and cands[rec["target"]] == rec["chosen"]
        assert not set(rec["history"]) & set(rec["rejected"])
        assert 3 <= len(rec["history"]) <= 10
        assert rec["prompt"].endswith("Answer:") and ", ".join(rec["history"]) in rec["prompt"]
        assert rec["rejected"] == [c for i, c in enumerate(cands) if i != rec["target"]]


def test_complement_sampling_equals_list_sampling():
    """random.sample over the lazy complement == over the materialized list (what the rebuild relies on)."""
    gen = random.Random(7)
    for trial in range(200):
        n = gen.choice([30, 85, 86, 200, 4606])
        universe = gen.sample(range(10 * n), n)
        position = {x: i for i, x in enumerate(universe)}
        excluded = gen.sample(universe, gen.randint(0, 11))
        full = [x for x in universe if x not in excluded]
        comp = Complement(universe, position, excluded)
        assert len(comp) == len(full)
        k = gen.randint(1, min(19, len(full)))
        assert random.Random(trial).sample(comp, k) == random.Random(trial).sample(full, k)
    assert list(Complement([1, 2, 3, 4], {1: 0, 2: 1, 3: 2, 4: 3}, [2, 4])) == [1, 3]


def test_candidate_draw_leaves_global_rng_alone():
    random.seed(123)
    expected = random.random()
    random.seed(123)
    sdpo_candidates(list(range(100)), {i: i for i in range(100)}, [1, 2, 3], 5, 20)
    assert random.random() == expected


def test_sample_has_the_same_records_as_the_full_data(shared_data):
    """The sample ships only S-DPO's MIT files: its train and valid rows are S-DPO validation prompts."""
    full_valid = {r["id"]: r for r in load_benchmark("lastfm", "valid", data_dir=shared_data).to_list()}
    full_test = {r["id"]: r for r in load_benchmark("lastfm", "test", data_dir=shared_data).to_list()}
    seen = set()
    for split, source in (("train", full_valid), ("valid", full_valid), ("test", full_test)):
        sample = load_benchmark("lastfm", split, data_dir="samples").to_list()
        assert len(sample) == {"train": 1200, "valid": 240, "test": 600}[split]  # scripts/make_samples.py COUNTS
        for rec in sample:
            assert rec == source[rec["id"]]
        ids = {r["id"] for r in sample}
        assert not ids & seen  # the sample's splits are disjoint
        seen |= ids


def test_sdpo_reader_reports_bad_rows(tmp_path, settings):
    folder = tmp_path / "lastfm"
    folder.mkdir()
    rows = [
        {"historyList": "A::B::C", "itemList": ["X", "Y", "Z"], "trueSelection": "Y"},
        {"historyList": "A::B::C", "itemList": ["X", "Y", "Z"], "trueSelection": "Q"},
        {"historyList": "A::B::C", "itemList": ["X", "Y", "Y"], "trueSelection": "Y"},
    ]
    (folder / "lastfm-test.json").write_text(json.dumps(rows))
    with pytest.raises(RecordError) as err:
        load_benchmark("lastfm", "test", data_dir=tmp_path)
    msg = str(err.value)
    assert str(folder / "lastfm-test.json") in msg
    assert "lastfm-test-00001" in msg and "missing" in msg
    assert "lastfm-test-00002" in msg and "duplicated" in msg
    assert "lastfm-test-00000" not in msg
