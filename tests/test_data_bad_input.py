"""Bad benchmark copies and bad arguments: one line naming the file and the fix, before any model loads (found by
an audit of the data layer, 2026-12-05: empty or truncated copies gave empty or smaller splits in silence, the
LastFM readers raised bare decoder errors, a corrupt held-out split surfaced only after extraction)."""

import json
import shutil
import warnings

import pytest

from mass_dpo.data import RecordError, load_benchmark
from mass_dpo.data import movielens


def _copy(shared_data, tmp_path, name):
    shutil.copytree(shared_data / name, tmp_path / name)
    return tmp_path


def test_an_empty_split_file_is_refused_naming_it(shared_data, tmp_path):
    data = _copy(shared_data, tmp_path, "qasc")
    (data / "qasc" / "dev.jsonl").write_bytes(b"")
    with pytest.raises(RecordError) as err:
        load_benchmark("qasc", "test", data_dir=data)
    assert "dev.jsonl holds nothing (an empty or truncated copy); restore it from" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("limit", [0, -1, 2.5, "10", True])
def test_a_bad_limit_is_one_line_before_the_split_is_read(limit):
    with pytest.raises(ValueError, match=r"limit must be a whole number >= 1 \(or None for the whole split\), got"):
        load_benchmark("qasc", "test", data_dir="/nonexistent", limit=limit)  # said before the folder is looked at


def test_a_limit_above_the_split_keeps_every_prompt_and_numpy_integers_are_limits():
    import numpy as np

    whole = load_benchmark("qasc", "test", data_dir="samples")
    assert len(load_benchmark("qasc", "test", data_dir="samples", limit=len(whole) + 1)) == len(whole)
    assert len(load_benchmark("qasc", "test", data_dir="samples", limit=np.int64(5))) == 5


@pytest.mark.parametrize("content, says", [
    ("0::Morcheeba\n".encode("utf-16"), "not UTF-8 text"),
    (b"", "no 'id::name' lines (an empty or truncated copy)"),
])
def test_lastfm_id2name_problems_name_the_file(shared_data, tmp_path, content, says):
    data = _copy(shared_data, tmp_path, "lastfm")
    (data / "lastfm" / "id2name.txt").write_bytes(content)
    with pytest.raises(RecordError) as err:
        load_benchmark("lastfm", "valid", data_dir=data)
    assert "id2name.txt" in str(err.value) and says in str(err.value)


def test_lastfm_accepts_a_byte_order_mark_and_reports_bad_rows(shared_data, tmp_path):
    data = _copy(shared_data, tmp_path, "lastfm")
    names = data / "lastfm" / "id2name.txt"
    names.write_bytes(b"\xef\xbb\xbf" + names.read_bytes())
    assert len(load_benchmark("lastfm", "valid", data_dir=data)) == len(load_benchmark("lastfm", "valid",
                                                                                      data_dir=shared_data))
    rows = (data / "lastfm" / "Val_data.jsonl").read_text().splitlines()
    rows[5] = json.dumps({"seq": 5, "len_seq": 3, "next": 1})
    (data / "lastfm" / "Val_data.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(RecordError, match=r"(?s)Val_data.jsonl: 1 bad row\(s\).*line 6: not a \{seq, len_seq, next\}"):
        load_benchmark("lastfm", "valid", data_dir=data)


def test_lastfm_sdpo_file_that_is_not_json_names_the_file(tmp_path):
    folder = tmp_path / "lastfm"
    folder.mkdir()
    (folder / "lastfm-test.json").write_text('[{"historyList": "a::b", "itemList": ["x"')
    with pytest.raises(RecordError, match=r"lastfm-test.json: not valid JSON \(line 1 column"):
        load_benchmark("lastfm", "test", data_dir=tmp_path)
    (folder / "lastfm-test.json").write_text(json.dumps([["not", "an", "object"]]))
    with pytest.raises(RecordError, match=r"row 0: not an object"):
        load_benchmark("lastfm", "test", data_dir=tmp_path)


def test_movielens_copies_other_than_the_release_warn(shared_data, tmp_path):
    ml = shared_data / "movielens" / "ml-100k"
    if not (ml / "u.data").is_file():
        pytest.skip("MovieLens 100k not in the shared data")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the release itself: no warning
        movielens.check_release(ml)
    copy = tmp_path / "movielens" / "ml-100k"
    shutil.copytree(ml, copy)
    lines = (copy / "u.data").read_text().splitlines()
    (copy / "u.data").write_text("\n".join(lines[: len(lines) // 2]) + "\n")  # cut at a line end: still parses
    with pytest.warns(UserWarning, match=r"u.data is not the GroupLens ml-100k release .*truncated, edited or "
                                         r"re-encoded\?\): its splits are not the paper's"):
        load_benchmark("movielens", "valid", data_dir=tmp_path)
    (copy / "u.data").write_text("abc\t1\t5\t881250949\n" + "\n".join(lines[1:]) + "\n")
    with pytest.raises(RecordError, match=r"(?s)u.data: 1 malformed line\(s\).*line 1: not a 'user item rating"):
        movielens.read_sequences(copy / "u.data", movielens.read_catalog(copy / "u.item")[1])


def test_a_missing_data_folder_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"under some/data \(no such folder\) \(from the data_dir argument"):
        load_benchmark("qasc", "test", data_dir="some/data")
    (tmp_path / "afile").write_text("")
    with pytest.raises(FileNotFoundError, match=r"under afile \(a file, not a folder\)"):
        load_benchmark("qasc", "test", data_dir="afile")


def test_train_reads_every_split_before_the_model_loads(shared_data, tmp_path, monkeypatch, capsys):
    from mass_dpo import models
    from mass_dpo.cli import main

    monkeypatch.setenv("MASS_DPO_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("MASS_DPO_CACHE", str(tmp_path / "cache"))
    data = _copy(shared_data, tmp_path / "data", "qasc")
    rows = (data / "qasc" / "dev.jsonl").read_text().splitlines()
    rows[5] = "{not json"
    (data / "qasc" / "dev.jsonl").write_text("\n".join(rows) + "\n")
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded before the data check"))
    assert main(["train", "--dataset", "qasc", "--data-dir", str(data), "--model", "tiny", "--dry-run"]) != 0
    err = capsys.readouterr().err
    assert "dev.jsonl: line 6 is not JSON" in err


@pytest.mark.parametrize("overrides, splits", [
    ({}, ["train", "valid", "test"]),
    ({"eval_limit": 0}, ["train", "test"]),
    ({"test_split": "valid"}, ["train", "valid"]),
    ({"eval_limit": 0, "test_split": "valid"}, ["train"]),
])
def test_the_splits_a_run_reads(overrides, splits):
    """One rule, read by the early check of `mass-dpo train` and by prepare_data."""
    from mass_dpo.config import resolve_config

    assert resolve_config(dataset="qasc", **overrides).splits == splits


def test_reproduce_refuses_a_profile_whose_data_is_all_missing(tmp_path, monkeypatch):
    from mass_dpo import reproduce

    monkeypatch.setattr(reproduce, "data_sources", lambda profile, names, echo=None: {"qasc": None, "lastfm": None})
    with pytest.raises(FileNotFoundError, match=r"no benchmark data for --profile smoke \(qasc, lastfm all missing"):
        reproduce.reproduce("smoke", ["table1"], out_dir=tmp_path / "gallery")
    assert not any((tmp_path / "gallery").rglob("*"))  # nothing written (the folder itself was checked writable)
