"""load_preferences: TRL-style prompt / chosen / rejected data in any of its usual containers."""

import json

import datasets
import pytest

from mass_dpo.data import BASE_COLUMNS, RecordError, load_preferences

ROWS = [
    {"prompt": "Q1? Answer:", "chosen": "yes", "rejected": "no"},
    {"prompt": "Q2? Answer:", "chosen": "red", "rejected": ["blue", "green", "pink"]},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _check(ds):
    assert ds.column_names == list(BASE_COLUMNS)
    assert ds["candidates"] == [["yes", "no"], ["red", "blue", "green", "pink"]]
    assert ds["target"] == [0, 0]
    assert ds["chosen"] == ["yes", "red"]
    assert ds["rejected"] == [["no"], ["blue", "green", "pink"]]


def test_jsonl(tmp_path):
    ds = load_preferences(_jsonl(tmp_path / "mine.jsonl", ROWS))
    _check(ds)
    assert ds["id"] == ["mine-000000", "mine-000001"]


def test_json_list_parquet_dataset_and_ids(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    _check(load_preferences(tmp_path / "a.json"))
    # parquet needs one type per column: rejected as lists throughout
    rows = [dict(r, rejected=r["rejected"] if isinstance(r["rejected"], list) else [r["rejected"]]) for r in ROWS]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    _check(load_preferences(tmp_path / "a.parquet"))
    ds = load_preferences(datasets.Dataset.from_list([dict(r, id=f"x{i}") for i, r in enumerate(rows)]))
    _check(ds)
    assert ds["id"] == ["x0", "x1"]


def test_bad_rows_reported_by_line(tmp_path):
    rows = [
        ROWS[0],
        {"prompt": "Q? Answer:", "chosen": "a"},  # line 2: missing field
        {"prompt": "Q? Answer:", "chosen": "a", "rejected": []},  # line 3: empty pool
        {"prompt": "Q? Answer:", "chosen": "a", "rejected": ["b", "a"]},  # line 4: chosen among rejected
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"},  # line 5: conversational
        ROWS[1],
    ]
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(RecordError) as err:
        load_preferences(path)
    msg = str(err.value)
    assert str(path) in msg and "4 unusable" in msg
    assert "line 2" in msg and "missing field 'rejected'" in msg
    assert "line 3" in msg and "empty negative pool" in msg
    assert "line 4" in msg and "chosen text is among the rejected" in msg
    assert "line 5" in msg and "conversational" in msg
    assert "line 1 " not in msg and "line 6" not in msg
    with pytest.warns(UserWarning, match="dropped"):
        ds = load_preferences(path, on_error="drop")
    _check(ds)


def test_repeated_negative_kept_once_with_warning():
    with pytest.warns(UserWarning, match="repeated"):
        ds = load_preferences([{"prompt": "p", "chosen": "a", "rejected": ["b", "b", "c"]}])
    assert ds["rejected"] == [["b", "c"]]


def test_rows_reported_by_row_for_tables():
    with pytest.raises(RecordError, match=r"row 1 \(id pref-000001\): missing or empty 'chosen'"):
        load_preferences(datasets.Dataset.from_list([ROWS[0], {"prompt": "p", "chosen": "", "rejected": "x"}]))
