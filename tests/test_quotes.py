"""The gallery's prose against its tables (mass_dpo.experiments.quotes): hand-made galleries whose quotes are known
to be in or out of their sources, and the committed papers_figures/README.md itself."""

from pathlib import Path

import pandas as pd
import pytest

from mass_dpo.experiments.quotes import blocks, numbers_in, quotes, sourced, unsourced_quotes
from mass_dpo.reproduce import check_quotes

REPO = Path(__file__).resolve().parents[1]
GALLERY = REPO / "papers_figures"


@pytest.fixture
def gallery(tmp_path):
    root = tmp_path / "gallery"
    (root / "table1").mkdir(parents=True)
    pd.DataFrame({"dataset": ["qasc"], "diff": [-0.04946], "lo": [-0.09301], "hi": [-0.005919]}).to_csv(
        root / "table1" / "pairs.csv", index=False)
    (root / "table1" / "pairs.md").write_text("| dataset | diff |\n|---|---|\n| qasc | -0.04946 |\n")
    (root / "fig").mkdir()
    (root / "fig" / "curve.png").write_bytes(b"\x89PNG")
    pd.DataFrame({"step": [1, 2], "accuracy": [0.12153, 0.25]}).to_csv(root / "fig" / "curve.csv", index=False)
    (root / "paper.md").write_text("| paper | exact match |\n|---|---|\n| MovieLens | 98.8 |\n")
    (tmp_path / "notes.md").write_text("7.77\n")  # outside the gallery: hand-written, never a source
    return root


def write(root, text):
    (root / "README.md").write_text(text)
    return root / "README.md"


def test_quotes_are_decimals_outside_code_and_links():
    assert quotes("MRR -4.9 (-9.3 to -0.6), n = 3, `beta 0.1`, [v](a/1.5.md), Assumption 4.1, Sections 4, 6.4 and "
                  "72.9 min; 1e-3") == \
        ["-4.9", "-9.3", "-0.6", "72.9"]


def test_ratios_and_whole_percentages_are_quotes_and_labels_are_no_source_numbers():
    assert quotes("3.8x less, 1.78\u00d7 faster, 77% and 48-65% of prompts, the 95% interval, 20 candidates, x1.5") == \
        ["3.8", "1.78", "77", "48", "65"]
    source = "smollm2,fit_sdpo_19,MASS-DPO-5,n=3,0.48 | 1-5 | -4.9 | 1e-3"
    assert numbers_in(source).tolist() == [0.001, 0.48, 1, 3, 4.9, 5]
    labels = numbers_in("component\nfit_mass_dpo_5\nratio_fit_sdpo_19_over_mass_dpo_5\n")
    assert not sourced("0.05", labels) and not sourced("19", labels)  # once found in the labels (x 0.01, as is)
    values = numbers_in("share\n0.4812\n0.651\n")
    assert sourced("48", values) and sourced("65", values) and not sourced("47", values)


def test_the_project_readme_reads_the_gallery_not_the_docs(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "bench.md").write_text("| x | 3.8 |\n")
    (tmp_path / "gallery").mkdir()
    (tmp_path / "gallery" / "t.md").write_text("| x | 2.5 |\n")
    readme = tmp_path / "README.md"
    readme.write_text("# A\n\n3.8x faster ([bench](docs/bench.md)); 2.5 ([t](gallery/t.md)).\n")
    assert unsourced_quotes(readme) == []  # the folder's own files, docs included
    found = unsourced_quotes(readme, gallery=tmp_path / "gallery")
    assert [(u.quotes, u.sources) for u in found] == [(["3.8"], ["gallery/t.md"])]
    (tmp_path / "papers_figures").mkdir()  # a project README beside a gallery reads that gallery by default
    (tmp_path / "papers_figures" / "README.md").write_text("# Gallery\n")
    (tmp_path / "papers_figures" / "t.md").write_text("| x | 2.5 |\n")
    readme.write_text("# A\n\n3.8x faster ([bench](docs/bench.md)); 2.5 ([t](papers_figures/t.md)).\n")
    assert [(u.quotes, u.sources) for u in unsourced_quotes(readme)] == [(["3.8"], ["papers_figures/t.md"])]


def test_blocks_are_rows_bullets_and_paragraphs():
    text = "# A\n\none\ntwo\n\n- b1\n  b2\n- c\n| r | 1 |\n\n```\n9.9\n```\n## B\n\nthree\n"
    assert [(line, b, s) for line, b, s in blocks(text)] == [
        (3, "one two", 1), (6, "- b1 b2", 1), (8, "- c", 1), (9, "| r | 1 |", 1), (16, "three", 2)]


def test_rounding_at_the_quotes_own_decimals_in_each_scale():
    values = pd.Series([0.04946, 0.12153, 98.8]).sort_values().to_numpy()
    assert sourced("-4.9", values) and sourced("4.95", values)  # percent points, sign ignored
    assert sourced("0.122", values) and sourced("0.12", values) and not sourced("0.123", values)
    assert sourced("0.988", values)  # a percentage quoted as a fraction
    assert not sourced("5.0", values) and not sourced("0.06", values)


def test_a_stale_quote_is_named_with_its_line_and_sources(gallery):
    readme = write(gallery, "# Claims\n\nMASS-DPO minus S-DPO on QASC: -4.9 (-9.3 to -0.6) points "
                            "([pairs](table1/pairs.md)).\n\n"
                            "- The gap was -5.1 points ([pairs](table1/pairs.md)).\n")
    found = unsourced_quotes(readme)
    assert [(u.line, u.quotes, u.sources) for u in found] == [(5, ["-5.1"], ["table1/pairs.md"])]
    assert "line 5: -5.1 not in table1/pairs.md" in str(found[0])


def test_an_interval_and_a_z_come_from_one_row(gallery):
    (gallery / "learning.csv").write_text("dataset,gain,z\nqasc,0.072,4.4\nlastfm,0.03,1.1\n")
    readme = write(gallery, "# A\n\nQASC -4.9 (-9.3 to -0.6) and +7.2 points, z = 4.4; LastFM +3.0, z 1.1; "
                            "but -4.9 (-9.3 to -7.2) and +7.2, z 1.1 "
                            "([pairs](table1/pairs.csv), [learning](learning.csv)).\n")
    found = unsourced_quotes(readme)
    assert [u.quotes for u in found] == [["-4.9 (-9.3 to -7.2) in one row", "+7.2, z 1.1 in one row"]]


def test_sources_are_the_blocks_links_else_its_sections(gallery):
    readme = write(gallery, "# Curves\n\nSee [the curve](fig/curve.png) and [the paper](paper.md).\n\n"
                            "| accuracy at the end | 0.25 | paper 0.988 |\n\n"
                            "# Other\n\n| accuracy | 0.25 |\n")
    found = unsourced_quotes(readme)
    assert [(u.line, u.quotes, u.sources) for u in found] == [(9, ["0.25"], [])]


def test_outside_links_and_readmes_are_no_sources_and_unchecked_blocks_are_skipped(gallery):
    readme = write(gallery, "# A\n\nNotes say 7.77 ([notes](../notes.md), [here](README.md)).\n\n"
                            "<!-- unchecked: an earlier version of the text -->\nIt once read 7.77.\n")
    found = unsourced_quotes(readme)
    assert [(u.line, u.quotes, u.sources) for u in found] == [(3, ["7.77"], [])]


def test_folder_links_read_every_table_under_them(gallery):
    readme = write(gallery, "# A\n\nFrom [the tables](table1/) and [figures](fig/): -4.9 and 0.122.\n")
    assert unsourced_quotes(readme) == []


@pytest.mark.parametrize("readme", [GALLERY / "README.md", REPO / "README.md"], ids=["gallery", "project"])
def test_the_committed_text_quotes_only_numbers_its_tables_hold(readme):
    found = unsourced_quotes(readme)
    assert found == [], "\n".join(map(str, found))


@pytest.mark.parametrize("old, new, caught", [
    ("(MASS-DPO on MedMCQA: +2.3 points,\nz = 2.4;", "(MASS-DPO on MedMCQA: +2.3 points,\nz = 2.9;",
     "+2.3, z 2.9 in one row"),
    ("MedMCQA -4.9 (-7.1 to -2.7)", "MedMCQA -4.9 (-7.6 to -2.7)", "-4.9 (-7.6 to -2.7) in one row"),
    ("(+3.4, +0.5 to +6.3)", "(+3.4, +0.5 to +6.4)", "+3.4 (+0.5 to +6.4) in one row"),
])
def test_a_changed_number_in_the_committed_gallery_is_caught(old, new, caught):
    text = (GALLERY / "README.md").read_text()
    assert text.count(old) == 1
    found = unsourced_quotes(GALLERY / "README.md", text=text.replace(old, new))
    assert [u.quotes for u in found] == [[caught]]


def test_reproduce_names_the_stale_passages(gallery):
    lines = []
    assert check_quotes(gallery / "README.md", echo=lines.append) == []  # no README: nothing to check
    write(gallery, "# A\n\nThe gap: -5.1 ([pairs](table1/pairs.md)).\n")
    assert len(check_quotes(gallery / "README.md", echo=lines.append)) == 1
    assert "1 passage(s)" in lines[0] and "-5.1 not in table1/pairs.md" in lines[1]


def test_the_command_checks_this_checkouts_readmes_from_any_folder(tmp_path, monkeypatch, capsys):
    from mass_dpo.experiments.quotes import main

    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    out = capsys.readouterr().out
    assert f"{GALLERY / 'README.md'}: every quoted number" in out and f"{REPO / 'README.md'}: every quoted number" in out
    assert main([str(tmp_path / "nope.md")]) == 2
    assert "no such file" in capsys.readouterr().err
