"""MedMCQA: 20 candidates pooled by subject, the cop convention per source, the carve of the dev file."""

import json
import random
import warnings

import pytest

from mass_dpo.data import RecordError, dataset_settings, load_benchmark
from mass_dpo.data import medmcqa
from mass_dpo.data.records import normalize_text


@pytest.fixture(scope="module")
def settings():
    return dataset_settings("medmcqa")


@pytest.fixture(scope="module")
def dev_rows(shared_data):
    return medmcqa.read_local(shared_data / "medmcqa" / "dev.json")


@pytest.fixture(scope="module")
def full(shared_data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {s: load_benchmark("medmcqa", s, data_dir=shared_data).to_list() for s in ("train", "valid", "test")}


def test_carve_is_disjoint_and_complete(full, dev_rows):
    ids = {s: {r["id"] for r in recs} for s, recs in full.items()}
    assert not ids["train"] & ids["valid"] and not ids["train"] & ids["test"] and not ids["valid"] & ids["test"]
    assert sum(map(len, ids.values())) == len(dev_rows) - 4  # 4 ambiguous questions skipped
    assert (len(ids["train"]), len(ids["valid"]), len(ids["test"])) == (1943, 224, 2012)


def test_candidates(full, dev_rows):
    by_id = {r["id"]: r for r in dev_rows}
    options_of_subject = {}
    for r in dev_rows:
        options_of_subject.setdefault(r["subject_name"], set()).update(
            normalize_text(r[k]) for k in medmcqa.OPTION_KEYS
        )
    for recs in full.values():
        for rec in recs:
            src = by_id[rec["id"].removeprefix("medmcqa-")]
            cands = rec["candidates"]
            norms = [normalize_text(c) for c in cands]
            assert len(cands) == 20 and len(set(norms)) == 20  # 20 distinct texts
            answer = src[medmcqa.OPTION_KEYS[src["cop"] - 1]].strip()  # local cop is 1..4
            assert rec["chosen"] == answer and norms.count(normalize_text(answer)) == 1
            own = {normalize_text(src[k]) for k in medmcqa.OPTION_KEYS}
            assert own <= set(norms)  # the question's own options are all there
            assert rec["subject"] == src["subject_name"]
            if src["subject_name"] != "Unknown":  # the only subject too small to fill 20 from itself
                assert set(norms) <= options_of_subject[src["subject_name"]]
            assert rec["prompt"].startswith("Question: " + src["question"].strip())
            assert "\n(T) " in rec["prompt"] and rec["prompt"].endswith("\nAnswer:")


def test_deterministic_and_independent_of_row_order(dev_rows, settings):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = medmcqa.build_records(dev_rows, 1, "dev.json", settings)
        shuffled = dev_rows[:]
        random.Random(3).shuffle(shuffled)
        b = {r["id"]: r for r in medmcqa.build_records(shuffled, 1, "dev.json", settings)}
    assert all(r == b[r["id"]] for r in a)


def test_cop_convention_by_source(dev_rows, settings):
    rows = dev_rows[:200]
    hub_rows = [dict(r, cop=r["cop"] - 1) for r in rows]  # the hub's 0..3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert medmcqa.build_records(rows, 1, "dev.json", settings) == medmcqa.build_records(
            hub_rows, 0, "hub", settings
        )
    with pytest.raises(RecordError, match=r"row 0 \(id .*\): cop 0 outside 1\.\.4") as err:
        medmcqa.build_records([dict(rows[0], cop=0)] + rows[1:], 1, "dev.json", settings)
    assert "dev.json" in str(err.value)


def test_ambiguous_question_is_skipped_with_warning(dev_rows, settings):
    with pytest.warns(UserWarning, match="0190dc62-5b1a-48f7-b0c2-f91fb0fd66e7"):
        recs = medmcqa.build_records(dev_rows, 1, "dev.json", settings)
    assert "medmcqa-0190dc62-5b1a-48f7-b0c2-f91fb0fd66e7" not in {r["id"] for r in recs}


def test_referential_options():
    assert medmcqa.is_referential("All of the above") and medmcqa.is_referential("Both a and c")
    assert medmcqa.is_referential("1, 2 and 3") and medmcqa.is_referential("None")
    assert not medmcqa.is_referential("Insulin") and not medmcqa.is_referential("Above 40 years")


def test_sample_is_the_full_data(full):
    """The sample ships the whole dev.json (the pools span the file), so every split equals the full data's."""
    for split in ("train", "valid", "test"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the 4 ambiguous questions
            sample = load_benchmark("medmcqa", split, data_dir="samples")
        # dev.json's 4,183 questions less the 4 ambiguous ones, carved by a salted hash of each id at valid 0.05,
        # test 0.48 (params/datasets/medmcqa.yaml; 209 and 2,006 expected): 224 + 2,012 + 1,943 = 4,179
        assert len(sample) == {"train": 1943, "valid": 224, "test": 2012}[split]
        assert sample.to_list() == full[split]
        assert all(len(set(c)) == 20 for c in sample["candidates"])
        assert all(medmcqa.carve(i.removeprefix("medmcqa-"), dataset_settings("medmcqa")) == split for i in sample["id"])


def test_small_file_tops_up_from_other_subjects(tmp_path, settings):
    rows = [
        {"id": f"q{i}", "question": f"Question {i}?", "opa": f"a{i} text", "opb": f"b{i} text", "opc": f"c{i} text",
         "opd": f"d{i} text", "cop": 1 + i % 4, "subject_name": "Tiny" if i < 2 else "Big"}
        for i in range(12)
    ]
    (tmp_path / "medmcqa").mkdir()
    (tmp_path / "medmcqa" / "dev.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = [r for s in ("train", "valid", "test") for r in load_benchmark("medmcqa", s, data_dir=tmp_path).to_list()]
    assert len(recs) == 12
    for rec in recs:
        assert len(set(rec["candidates"])) == 20
    from mass_dpo.data.records import normalize_text

    options = {r["question"]: {normalize_text(r[k]) for k in ("opa", "opb", "opc", "opd")} for r in rows}
    big = set().union(*(options[r["question"]] for r in rows if r["subject_name"] == "Big"))
    tiny = [rec for rec in recs if rec["subject"] == "Tiny"]
    assert len(tiny) == 2
    for rec in tiny:  # its subject holds 8 options: its own 4 kept, 12 or more topped up from the other subject
        own = next(o for q, o in options.items() if rec["prompt"].startswith("Question: " + q))
        cands = {normalize_text(c) for c in rec["candidates"]}
        assert own <= cands and len(cands & big) >= 12
