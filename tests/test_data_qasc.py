"""QASC: 8 choices in label order, the target from answerKey, valid carved from train by stem, test = dev."""

import json

import pytest

from mass_dpo.data import RecordError, dataset_settings, load_benchmark
from mass_dpo.data import qasc
from mass_dpo.data.records import normalize_text


@pytest.fixture(scope="module")
def settings():
    return dataset_settings("qasc")


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_test_split_is_dev(shared_data):
    rows = _rows(shared_data / "qasc" / "dev.jsonl")
    ds = load_benchmark("qasc", "test", data_dir=shared_data).to_list()
    assert len(ds) == len(rows) == 926  # every row of dev.jsonl
    for rec, row in zip(ds, rows):
        choices = sorted((c["label"], c["text"]) for c in row["question"]["choices"])
        assert rec["candidates"] == [t for _, t in choices]
        assert len(rec["candidates"]) == 8
        assert rec["chosen"] == dict(choices)[row["answerKey"]]
        assert rec["target"] == "ABCDEFGH".index(row["answerKey"])
        assert rec["prompt"].startswith(f"Question: {row['question']['stem']}\nOptions:\n(A) ")
        assert rec["prompt"].endswith("\nAnswer:")


def test_train_valid_carve(shared_data):
    train = load_benchmark("qasc", "train", data_dir=shared_data)
    valid = load_benchmark("qasc", "valid", data_dir=shared_data)
    # train.jsonl's 8,134 rows carved by a salted hash of each id at valid 0.025 (params/datasets/qasc.yaml):
    # 204 valid (203.4 expected), the rest train
    assert len(train) + len(valid) == 8134 and (len(train), len(valid)) == (7930, 204)
    assert not set(train["id"]) & set(valid["id"])
    stems = lambda ds: {normalize_text(p.split("\n")[0]) for p in ds["prompt"]}  # noqa: E731
    assert not stems(train) & stems(valid)  # all variants of a question stay on one side
    assert all(len(c) == 8 for c in valid["candidates"])


def test_hub_schema_gives_the_same_record(shared_data, settings):
    row = _rows(shared_data / "qasc" / "dev.jsonl")[0]
    hub = {
        "id": "3NGI5ARFTT4HNGVWXAMLNBMFA0U1PG",
        "question": row["question"]["stem"],
        "choices": {"label": [c["label"] for c in row["question"]["choices"]],
                    "text": [c["text"] for c in row["question"]["choices"]]},
        "answerKey": row["answerKey"],
    }
    a = qasc.build_records([row], "dev.jsonl", "test", settings, carve_from_train=False)
    b = qasc.build_records([hub], "allenai/qasc:validation", "test", settings, carve_from_train=False)
    assert a == b


def test_sample_matches_full(shared_data):
    for split in ("train", "valid", "test"):
        sample = load_benchmark("qasc", split, data_dir="samples").to_list()
        full = {r["id"]: r for r in load_benchmark("qasc", split, data_dir=shared_data).to_list()}
        # the sample's train.jsonl is 1,404 rows: the 204 valid-carved ones and 1,200 train ones; dev.jsonl whole
        assert len(sample) == {"train": 1200, "valid": 204, "test": 926}[split]
        assert all(rec == full[rec["id"]] for rec in sample)
        if split != "train":  # every valid-carved row of train.jsonl and the whole dev.jsonl ship
            assert [r["id"] for r in sample] == list(full)


def test_bad_answer_key_names_row_record_and_file(tmp_path, shared_data):
    rows = _rows(shared_data / "qasc" / "dev.jsonl")[:3]
    rows[1]["answerKey"] = "Z"
    (tmp_path / "qasc").mkdir()
    path = tmp_path / "qasc" / "dev.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RecordError) as err:
        load_benchmark("qasc", "test", data_dir=tmp_path)
    msg = str(err.value)
    assert str(path) in msg and "row 1 (record qasc-" in msg and "'Z'" in msg
