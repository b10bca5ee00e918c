"""MovieLens 100k rebuild: title cleaning, windows, tie order, the disjoint user split, candidates."""

import pytest

from mass_dpo.data import dataset_settings, load_benchmark
from mass_dpo.data import movielens
from mass_dpo.data.movielens import clean_title


@pytest.mark.parametrize(
    "raw,clean",
    [
        ("Toy Story (1995)", "Toy Story"),
        ("Usual Suspects, The (1995)", "The Usual Suspects"),
        ("Farewell to Arms, A (1932)", "A Farewell to Arms"),
        ("Affair to Remember, An (1957)", "An Affair to Remember"),
        ("Heidi Fleiss: Hollywood Madam (1995) ", "Heidi Fleiss: Hollywood Madam"),
        ("Land Before Time III: The Time of the Great Giving (1995) (V)", "Land Before Time III: The Time of the Great Giving"),
        ("Big Blue, The (Grand bleu, Le) (1988)", "The Big Blue (Grand bleu, Le)"),
        ("Seven (Se7en) (1995)", "Seven (Se7en)"),
        ("Bewegte Mann, Der (1994)", "Bewegte Mann, Der"),
        ("Double vie de Véronique, La (Double Life of Veronique, The) (1991)", "Double vie de Véronique, La (Double Life of Veronique, The)"),
        ("Things to Do in Denver when You're Dead (1995)", "Things to Do in Denver when You're Dead"),
        ("Night of the Living Dead (1968)", "Night of the Living Dead"),
        ("Man Who Would Be King, The (1975)", "The Man Who Would Be King"),
        ("American in Paris, An (1951)", "An American in Paris"),
        ("Good, The Bad and The Ugly, The (1966)", "The Good, The Bad and The Ugly"),
        ("Die xue shuang xiong (Killer, The) (1989)", "Die xue shuang xiong (Killer, The)"),
    ],
)
def test_clean_title(raw, clean):
    assert clean_title(raw) == clean


def test_clean_title_keep_year():
    assert clean_title("Scarlet Letter, The (1926)", keep_year=True) == "The Scarlet Letter (1926)"


def test_windows():
    seq = list(range(15))
    got = list(movielens.windows(seq, 10, 3))
    assert [t for t, _, _ in got] == list(range(3, 15))
    assert got[0] == (3, [0, 1, 2], 3)
    assert got[-1] == (14, list(range(4, 14)), 14)
    assert all(len(h) == min(10, t) for t, h, _ in got)


def _write_ml(folder, titles, ratings):
    ml = folder / "movielens" / "ml-100k"
    ml.mkdir(parents=True)
    (ml / "u.item").write_text(
        "".join(f"{i}|{t}|01-Jan-1995||http://x|0\n" for i, t in enumerate(titles, 1)), encoding="ISO-8859-1"
    )
    (ml / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{ts}\n" for u, i, r, ts in ratings))


def test_synthetic_build_order_ties_duplicates(tmp_path):
    """Timestamp order, ties by item id, a duplicate u.item entry merged, 'unknown' dropped."""
    titles = [f"Movie {i} (1990)" for i in range(1, 41)]
    titles[4] = "Movie 2 (1990)"  # item 5 repeats item 2's raw title: one movie
    titles[5] = "unknown"
    ratings = [(1, i, 4, 1000 + i) for i in (9, 8, 7)]  # timestamps order these 7, 8, 9
    ratings += [(1, 12, 3, 2000), (1, 11, 3, 2000), (1, 10, 3, 2000)]  # a tie: item order 10, 11, 12
    ratings += [(1, 2, 5, 3000), (1, 5, 5, 3001), (1, 6, 5, 3002), (1, 13, 5, 4000)]  # 5 == 2 (repeat); 6 unknown
    _write_ml(tmp_path, titles, ratings)
    settings = dataset_settings("movielens")
    settings["construction"]["user_split"].update(valid=0.0, test=0.0)
    records, _ = movielens.build(tmp_path, "train", settings)
    # sequence: 7 8 9 10 11 12 2 13 (0-based ids 6 7 8 9 10 11 1 12)
    names = [f"Movie {i}" for i in (7, 8, 9, 10, 11, 12, 2, 13)]
    assert [r["chosen"] for r in records] == names[3:]
    assert records[0]["history"] == names[:3]
    assert records[-1]["history"] == names[:7]
    assert records[0]["id"] == "movielens-u0001-0003"
    for r in records:
        assert len(set(r["candidates"])) == 20
        assert "unknown" not in r["candidates"]
        assert not set(r["history"]) & set(r["candidates"])


@pytest.fixture(scope="module")
def ml_data(shared_data):
    ml = shared_data / "movielens" / "ml-100k"
    if not (ml / "u.data").is_file() or not (ml / "u.item").is_file():
        pytest.skip(f"MovieLens 100k not found at {ml} (it may not be redistributed; copy ml-100k there to run this)")
    return shared_data


def test_catalog(ml_data):
    names, canonical = movielens.read_catalog(ml_data / "movielens" / "ml-100k" / "u.item")
    assert len(set(names.values())) == len(names) == 1682 - 1 - 18  # 'unknown' dropped, 18 exact repeats merged
    assert canonical[246] == canonical[268] == 245  # "Chasing Amy (1997)" listed twice
    assert 266 not in names  # item 267 'unknown'
    assert {"Cape Fear (1962)", "Cape Fear (1991)", "The Scarlet Letter (1926)", "The Scarlet Letter (1995)"} <= set(names.values())
    assert names[11] == "The Usual Suspects"


def test_user_split_is_disjoint(ml_data):
    ml = ml_data / "movielens" / "ml-100k"
    seqs = movielens.read_sequences(ml / "u.data", movielens.read_catalog(ml / "u.item")[1])
    parts = movielens.split_users(list(seqs), dataset_settings("movielens"))
    train, valid, test = (set(parts[s]) for s in ("train", "valid", "test"))
    assert not train & valid and not train & test and not valid & test
    assert train | valid | test == set(seqs)
    assert (len(train), len(valid), len(test)) == (755, 94, 94)  # round(0.1 * 943) valid and test, the rest train
    assert parts == movielens.split_users(list(reversed(list(seqs))), dataset_settings("movielens"))
    for split in ("valid", "test"):  # the records of a split come from its users only
        ds = load_benchmark("movielens", split, data_dir=ml_data)
        assert {int(rid.split("-")[1][1:]) for rid in ds["id"]} == set(parts[split])


def test_test_split_records(ml_data):
    ds = load_benchmark("movielens", "test", data_dir=ml_data)
    assert len(ds) == 9272  # sum over the 94 test users of len(sequence) - min_history (3): one record per target
    seqs = movielens.read_sequences(
        ml_data / "movielens" / "ml-100k" / "u.data",
        movielens.read_catalog(ml_data / "movielens" / "ml-100k" / "u.item")[1],
    )
    names = movielens.read_catalog(ml_data / "movielens" / "ml-100k" / "u.item")[0]
    for rec in ds.select(range(0, len(ds), 37)).to_list():
        _, u, t = rec["id"].split("-")
        user, t = int(u[1:]), int(t)
        seq = seqs[user]
        assert rec["chosen"] == names[seq[t]]
        assert rec["history"] == [names[x] for x in seq[max(0, t - 10) : t]]
        cands = rec["candidates"]
        assert len(cands) == len(set(cands)) == 20 and cands.count(rec["chosen"]) == 1
        assert not set(rec["history"]) & set(cands)
        assert rec["prompt"].endswith("Answer:")
    again, _ = movielens.build(ml_data, "test", dataset_settings("movielens"))
    assert [r["candidates"] for r in again] == ds["candidates"]


def test_no_movielens_sample(monkeypatch, tmp_path):
    """No sample ships; with "samples" and an empty cache, offline, the one-line message names MASS_DPO_DATA
    (the download itself: tests/test_movielens_download.py)."""
    monkeypatch.setenv("MASS_DPO_CACHE", str(tmp_path))
    monkeypatch.delenv("MASS_DPO_DATA", raising=False)
    monkeypatch.setenv("MASS_DPO_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="licence forbids redistribution") as err:
        load_benchmark("movielens", "test", data_dir="samples")
    assert "MASS_DPO_DATA" in str(err.value) and "\n" not in str(err.value)
    assert not any(tmp_path.iterdir())
