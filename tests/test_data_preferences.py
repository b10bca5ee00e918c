"""load_preferences: TRL-style prompt / chosen / rejected data in any of its usual containers."""

import json

import datasets
import pytest

from mass_dpo.data import BASE_COLUMNS, RecordError, load_benchmark, load_preferences
from mass_dpo.data.records import stable_fraction

ROWS = [
    {"prompt": "Q1? Answer:", "chosen": "yes", "rejected": "no"},
    {"prompt": "Q2? Answer:", "chosen": "red", "rejected": ["blue", "green", "pink"]},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _check(ds):
    assert ds.column_names == [*BASE_COLUMNS, "messages"]
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


def test_a_byte_order_mark_is_read_past(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _jsonl(tmp_path / "plain.jsonl", ROWS).read_bytes())
    _check(load_preferences(path))
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS).encode())
    _check(load_preferences(tmp_path / "bom.json"))


@pytest.mark.parametrize("name, content, says", [
    ("latin1.jsonl", '{"prompt": "caf\u00e9", "chosen": "a", "rejected": ["b"]}\n'.encode("latin-1"),
     r"latin1.jsonl: not UTF-8 text \(byte 0xe9 at offset 15\); save it as UTF-8"),
    ("list.json", b'[\n{"prompt": "p", "chosen": "a", "rejected": ["b"]}\n{"prompt": "q"}]',
     r"list.json: not valid JSON \(line 3 column 1: Expecting ',' delimiter\); fix it, or write one JSON object per "
     r"line"),
    ("wrapped.json", b'{\n  "data": [{"prompt": "p", "chosen": "a", "rejected": ["b"]}],\n  "version": 2\n}\n',
     r"wrapped.json holds one JSON object \(keys 'data', 'version'\), not rows; give a JSON list of rows or one row"),
    ("table.parquet", b"not parquet at all", r"table.parquet: not a readable Parquet file"),
    ("prefs.csv", b"prompt,chosen,rejected\n", r"prefs.csv: unsupported preference file type '.csv'; use .jsonl"),
])
def test_unreadable_files_are_named_with_the_fix(tmp_path, name, content, says):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=says):
        load_preferences(tmp_path / name)


def test_a_file_of_other_columns_is_said_once(tmp_path):
    rows = [{"question": f"Q{i}?", "response_j": "a", "response_k": "b"} for i in range(30)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "se.parquet"))
    with pytest.raises(RecordError, match=r"se.parquet: no 'prompt', 'chosen', 'rejected' in any row \(its fields: "
                                          r"question, response_j, response_k\); name them prompt, chosen, rejected"):
        load_preferences(tmp_path / "se.parquet")
    with pytest.raises(RecordError, match=r"sft.jsonl: no 'rejected' in any row \(its fields: chosen, prompt\)"):
        load_preferences(_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "chosen": "a"}] * 3))


def test_too_few_prompts_to_carve_names_the_file(tmp_path):
    with pytest.raises(RecordError, match=r"two.jsonl: 2 distinct prompt\(s\): carving train/valid/test needs at least 3"):
        load_preferences(_jsonl(tmp_path / "two.jsonl", ROWS), split="test")


def test_a_folder_is_not_a_preference_file(tmp_path):
    (tmp_path / "prefs.jsonl").mkdir()
    with pytest.raises(ValueError, match=r"prefs.jsonl is a folder; give the path of a JSON-lines"):
        load_preferences(tmp_path / "prefs.jsonl")


def test_bad_rows_reported_by_line(tmp_path):
    rows = [
        ROWS[0],
        {"prompt": "Q? Answer:", "chosen": "a"},  # line 2: missing field
        {"prompt": "Q? Answer:", "chosen": "a", "rejected": []},  # line 3: empty pool
        {"prompt": "Q? Answer:", "chosen": "a", "rejected": ["b", "a"]},  # line 4: chosen among rejected
        {"prompt": [{"role": "user", "content": ""}], "chosen": "a", "rejected": "b"},  # line 5: empty message
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
    assert "line 5" in msg and "a message of 'prompt' has no text content" in msg
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


def test_trls_implicit_prompt_form_is_refused_with_the_fix(tmp_path):
    """TRL's implicit-prompt form (the prompt's turns inside chosen and rejected) would score the prompt twice."""
    turn = lambda role, text: {"role": role, "content": text}  # noqa: E731
    with pytest.raises(RecordError, match=r"no 'prompt' in any row .*TRL's implicit-prompt form is not read: move "
                                          r"the shared turns into a 'prompt' column"):
        load_preferences(_jsonl(tmp_path / "implicit.jsonl", [{"chosen": "a", "rejected": ["b"]}] * 3))
    rows = [{"prompt": "q0", "chosen": [turn("user", "q0"), turn("assistant", "yes")],
             "rejected": [[turn("assistant", "no")]]},
            {"prompt": "q1", "chosen": [turn("assistant", "yes")],
             "rejected": [[turn("system", "s"), turn("assistant", "no")]]}]
    with pytest.raises(RecordError) as err:
        load_preferences(_jsonl(tmp_path / "mixed.jsonl", rows))
    assert "line 1 (id mixed-000000): 'chosen' holds a user message; give the prompt's turns in 'prompt'" in str(err.value)
    assert "line 2 (id mixed-000001): 'rejected' holds a system message" in str(err.value)


def test_conversational_form_reads_as_text(tmp_path):
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    bot = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    rows = [
        {"prompt": user("Q1? Answer:"), "chosen": bot("yes"), "rejected": bot("no")},  # one negative
        {"prompt": user("Q2? Answer:"), "chosen": bot("red"), "rejected": [bot("blue"), bot("green"), bot("pink")]},
    ]
    _check(load_preferences(_jsonl(tmp_path / "conv.jsonl", rows)))
    ds = load_preferences([{"prompt": [{"role": "system", "content": "Be brief."}, *user("Q?")], "chosen": bot("a"),
                            "rejected": [bot("b")]}])
    assert list(ds["prompt"]) == ["System: Be brief.\nUser: Q?"]


def test_held_out_splits_carved_by_a_fixed_seed(tmp_path):
    rows = [{"id": f"r{i}", "prompt": f"Q{i}?", "chosen": "a", "rejected": ["b", "c"]} for i in range(40)]
    path = _jsonl(tmp_path / "forty.jsonl", rows)
    parts = {s: list(load_preferences(path, split=s)["id"]) for s in ("train", "valid", "test")}
    assert (len(parts["train"]), len(parts["valid"]), len(parts["test"])) == (32, 4, 4)  # 10% test, 10% valid
    assert sorted(sum(parts.values(), [])) == sorted(r["id"] for r in rows)  # a partition
    for ids in parts.values():  # file order kept within a split
        assert ids == sorted(ids, key=lambda i: int(i[1:]))
    # the rule of the docstring, by hand: ids ordered by their SHA-256 fraction; first 4 test, next 4 valid
    order = sorted((r["id"] for r in rows), key=lambda i: stable_fraction(i, "preferences-split/0"))
    assert set(parts["test"]) == set(order[:4]) and set(parts["valid"]) == set(order[4:8])
    # independent of the file order; another seed carves another split
    _jsonl(tmp_path / "reversed.jsonl", rows[::-1])
    assert set(load_preferences(tmp_path / "reversed.jsonl", split="test")["id"]) == set(parts["test"])
    assert set(load_preferences(path, split="test", split_seed=1)["id"]) != set(parts["test"])
    assert len(load_preferences(path)) == 40  # split=None: every row


def test_rows_that_share_a_prompt_stay_in_one_split(tmp_path):
    # pairwise data: one row per (prompt, rejected); 20 prompts x 2 rows
    rows = [{"id": f"r{i}-{j}", "prompt": f"Q{i}?", "chosen": "a", "rejected": [f"b{j}"]}
            for i in range(20) for j in range(2)]
    path = _jsonl(tmp_path / "pairs.jsonl", rows)
    prompts = {s: set(load_preferences(path, split=s)["prompt"]) for s in ("train", "valid", "test")}
    assert not (prompts["train"] & prompts["test"]) and not (prompts["train"] & prompts["valid"])
    assert not (prompts["valid"] & prompts["test"])
    assert (len(prompts["train"]), len(prompts["valid"]), len(prompts["test"])) == (16, 2, 2)  # 10% of 20 prompts
    assert len(load_preferences(path, split="test")) == 4  # both rows of each test prompt


def test_split_column_is_used_when_present(tmp_path):
    rows = [{"prompt": f"Q{i}?", "chosen": "a", "rejected": ["b"], "split": s}
            for i, s in enumerate(["train", "train", "validation", "test"])]
    path = _jsonl(tmp_path / "own.jsonl", rows)
    assert list(load_preferences(path, split="train")["prompt"]) == ["Q0?", "Q1?"]
    assert list(load_preferences(path, split="valid")["prompt"]) == ["Q2?"]
    assert list(load_preferences(path, split="test")["prompt"]) == ["Q3?"]
    with pytest.raises(RecordError, match="some rows have a 'split'"):
        load_preferences(rows[:2] + [{k: v for k, v in rows[2].items() if k != "split"}], split="train")
    with pytest.raises(ValueError, match="at least 3"):
        load_preferences(ROWS, split="test")


def test_relative_path_resolves_from_the_repository(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # e.g. a JupyterLab kernel started in notebooks/
    ds = load_preferences("notebooks/data/quickstart_preferences.jsonl")
    assert len(ds) == 48
    with pytest.raises(FileNotFoundError, match="no such file .*not found in"):
        load_preferences("notebooks/data/absent.jsonl")


def test_load_benchmark_dispatches_a_file(tmp_path):
    rows = [{"id": f"r{i}", "prompt": f"Q{i}?", "chosen": "a", "rejected": ["b", "c"]} for i in range(20)]
    path = _jsonl(tmp_path / "mine.jsonl", rows)
    test = load_benchmark(str(path), "test")
    assert list(test["id"]) == list(load_preferences(path, split="test")["id"]) and len(test) == 2
    with pytest.raises(ValueError, match="--data FILE"):
        load_benchmark("mine", "train")


def test_conversational_rows_keep_their_messages(tmp_path):
    from mass_dpo.data.preferences import conversation, is_conversational

    user = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}]
    bot = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    rows = [{"prompt": user, "chosen": bot("a"), "rejected": [bot("b"), "c", bot("b")]},  # "c": a text negative
            {"prompt": "Q2?", "chosen": "x", "rejected": ["y"]}]
    with pytest.warns(UserWarning, match="repeated"):
        ds = load_preferences(_jsonl(tmp_path / "conv.jsonl", rows))
    first, second = ds[0], ds[1]
    assert first["candidates"] == ["a", "b", "c"] and is_conversational(first) and not is_conversational(second)
    assert json.loads(first["messages"]) == {"prompt": user, "candidates": [bot("a"), bot("b"), bot("c")]}
    assert second["messages"] == ""
    assert conversation(first) == json.loads(first["messages"])
    assert conversation(second) == {"prompt": [{"role": "user", "content": "Q2?"}], "candidates": [bot("x"), bot("y")]}


def test_pairs_that_share_an_id_read_as_one_prompt(tmp_path):
    """``mass-dpo select``'s default output (one row per pair) reads back as one record per prompt."""
    rows = [{"id": "a", "prompt": "Q1?", "chosen": "yes", "rejected": "no", "rank": 0},
            {"id": "b", "prompt": "Q2?", "chosen": "red", "rejected": "blue"},
            {"id": "a", "prompt": "Q1?", "chosen": "yes", "rejected": "maybe", "rank": 1},
            {"id": "b", "prompt": "Q2?", "chosen": "red", "rejected": ["green", "pink"]}]
    ds = load_preferences(_jsonl(tmp_path / "pairs.jsonl", rows))
    assert ds["id"] == ["a", "b"] and ds["rejected"] == [["no", "maybe"], ["blue", "green", "pink"]]
    # the same id with another prompt (or chosen) is not a pair of the same prompt: reported by line
    rows.append({"id": "a", "prompt": "Q3?", "chosen": "yes", "rejected": "x"})
    with pytest.raises(RecordError, match=r"line 5 \(id a\): id 'a' repeats line 1"):
        load_preferences(_jsonl(tmp_path / "clash.jsonl", rows))
    # rows without ids stay one record each
    assert len(load_preferences([{k: v for k, v in r.items() if k != "id"} for r in rows[:4]])) == 4


def test_bad_tools_or_template_variables_are_reported_by_line(tmp_path):
    conv = {"prompt": [{"role": "user", "content": "Q?"}], "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [[{"role": "assistant", "content": "b"}]]}
    rows = [{**conv, "id": "ok", "tools": '[{"name": "f"}]', "chat_template_kwargs": {"x": 1}},
            {**conv, "id": "t1", "tools": "[not json"},
            {**conv, "id": "t2", "tools": {"name": "f"}},
            {**conv, "id": "k", "chat_template_kwargs": ["x"]}]
    with pytest.raises(RecordError) as err:
        load_preferences(_jsonl(tmp_path / "tools.jsonl", rows))
    msg = str(err.value)
    assert "3 unusable" in msg and "line 1 " not in msg
    assert "line 2 (id t1): 'tools' is text that is not JSON" in msg
    assert "line 3 (id t2): 'tools' is dict, not a list of tool schemas" in msg
    assert "line 4 (id k): 'chat_template_kwargs' is list, not a dict" in msg
