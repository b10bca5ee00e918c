"""Notebook parameters that take effect (mass_dpo.notebook_params): a parameter left at None comes from the profile,
one given with -p wins, and the setup line names where each value came from."""

import ast
import io
import json
import tokenize
from pathlib import Path

import pytest
import torch

from mass_dpo import notebook_params as NP
from mass_dpo.notebook_params import resolve

REPO = Path(__file__).resolve().parents[1]
PAPER_NOTEBOOKS = ["training_dynamics", "table1", "table2", "table3", "table4", "table5", "table6", "table7",
                   "table8"]
PROFILE_KEYS = ["model", "models", "regime", "datasets", "data_dir", "seeds", "train_limit", "eval_limit",
                "test_limit"]
ALL4 = ["medmcqa", "qasc", "lastfm", "movielens"]

# What each profile means for the paper notebooks (docs/reproduce.md, params/profiles/*.yaml), written out by hand.
COMMON = {
    "smoke": dict(model="tiny", models=None, regime="loglinear", data_dir="samples", seeds=[0], train_limit=16,
                  eval_limit=8, test_limit=8),
    "cpu": dict(model="smollm2", models=None, regime="loglinear", data_dir="samples", seeds=[0, 1, 2],
                train_limit=1000, eval_limit=200, test_limit=500),
    "paper": dict(model="llama3", models=["llama3", "qwen3", "smollm3"], regime="full", data_dir=None, seeds=[0],
                  train_limit=20000, eval_limit=200, test_limit=2000),
}
DATASETS = {
    "smoke": {"training_dynamics": ["qasc", "lastfm"], "table1": ["qasc", "lastfm", "movielens"],
              "table2": ["lastfm", "movielens"], "table3": ["qasc"], "table4": ["lastfm"], "table5": ["qasc"],
              "table6": ["qasc", "lastfm"], "table7": ["qasc"], "table8": ["qasc"]},
    "cpu": dict({n: ALL4 for n in PAPER_NOTEBOOKS}, table2=["lastfm", "movielens"], table5=["medmcqa", "qasc"]),
    "paper": dict({n: ALL4 for n in PAPER_NOTEBOOKS}, table2=["lastfm", "movielens"], table5=["medmcqa", "qasc"],
                  table4=["movielens"], table7=["movielens"], table8=["movielens"]),
}
#: Table 3's axes: the paper's ablation grid and readings, in every profile that runs it whole.
TABLE3_AXES = dict(betas=[0.1, 0.5, 1.0], ns=[1, 3, 5], readings=["delta", "reference", "offset"],
                   label_blind=["hardest", "longest"])
PER_NOTEBOOK = {  # the paper runs Tables 4, 7 and 8 on one model (Table 4 in the freeze regime, whose snapshots
    # it re-extracts); the cpu profile runs them with one seed
    "smoke": {"table3": TABLE3_AXES},
    "cpu": {**{n: {"seeds": [0]} for n in ("table4", "table7", "table8")}, "table3": TABLE3_AXES},
    "paper": {**{n: {"models": ["llama3"]} for n in ("table4", "table7", "table8")}, "table3": TABLE3_AXES},
}
PER_NOTEBOOK["paper"]["table4"] = {"models": ["llama3"], "regime": "freeze"}


def parameters_cell(name):
    """The notebook file's parameters cell: ``({name: default}, {name: comment})``."""
    nb = json.loads((REPO / "notebooks" / f"{name}.ipynb").read_text())
    (cell,) = [c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", [])]
    source = "".join(cell["source"])
    comments = {tok.start[0]: tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    defaults, notes = {}, {}
    for stmt in ast.parse(source).body:
        defaults[stmt.target.id] = ast.literal_eval(stmt.value)
        notes[stmt.target.id] = comments.get(stmt.lineno, "")
    return defaults, notes


def expected(profile, name):
    defaults, _ = parameters_cell(name)
    want = dict(defaults, profile=profile, **COMMON[profile], datasets=DATASETS[profile][name])
    want.update(PER_NOTEBOOK.get(profile, {}).get(name, {}))
    return want


@pytest.mark.parametrize("profile", ["smoke", "cpu", "paper"])
@pytest.mark.parametrize("name", PAPER_NOTEBOOKS)
def test_resolved_settings_of_every_paper_notebook(name, profile):
    defaults, _ = parameters_cell(name)
    r = resolve(name, dict(defaults, profile=profile, unrelated_global=1))  # as the setup cell: resolve(globals())
    assert r.values == expected(profile, name)
    assert r.profile == profile and r.sources["profile"] == NP.GIVEN
    for key in PROFILE_KEYS:
        if r.values[key] is not None or key == "data_dir":
            assert r.sources[key] == f"profile {profile}", key
    per_notebook = set(PER_NOTEBOOK.get(profile, {}).get(name, {})) - set(PROFILE_KEYS)  # e.g. Table 3's axes
    for key in per_notebook:
        assert r.sources[key] == f"profile {profile}", key
    for key in set(defaults) - set(PROFILE_KEYS) - {"profile"} - per_notebook:
        assert r.sources[key] == NP.DEFAULT and r.values[key] == defaults[key]


@pytest.mark.parametrize("cuda, profile", [(False, "cpu"), (True, "paper")])
@pytest.mark.parametrize("name", PAPER_NOTEBOOKS)
def test_auto_profile_is_paper_with_cuda_and_cpu_without(monkeypatch, name, cuda, profile):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    defaults, _ = parameters_cell(name)
    assert defaults["profile"] == "auto"
    r = resolve(name, defaults)
    assert r.values == expected(profile, name)
    assert r.sources["profile"] == ("auto: CUDA available" if cuda else "auto: no CUDA")
    assert f"profile {profile} (auto: " in r.describe()


@pytest.mark.parametrize("name", PAPER_NOTEBOOKS)
def test_profile_driven_parameters_default_to_none_and_say_what_none_means(name):
    defaults, notes = parameters_cell(name)
    set_by_some_profile = {k for p in ("smoke", "cpu", "paper", "cpu-lm") for k in NP.profile_values(p, name)}
    for key in set_by_some_profile & set(defaults):
        assert defaults[key] is None, f"{name}: {key} is set by a profile, so its default must be None"
        assert "None:" in notes[key], f"{name}: the comment of {key} does not say what None means"
    assert set(PROFILE_KEYS) <= set_by_some_profile & set(defaults)
    assert "save_pretrained" in notes["model"]
    assert "auto" in notes["profile"]


def test_a_value_given_with_p_wins_and_a_given_model_runs_alone():
    defaults, _ = parameters_cell("table1")
    given = dict(defaults, profile="paper", model="qwen3", seeds=[1, 2], n=5, regime="lora")
    r = resolve("table1", given)
    assert r.values["model"] == "qwen3" and r.values["models"] == ["qwen3"]  # not the paper's three models
    assert r.values["seeds"] == [1, 2] and r.values["n"] == 5 and r.values["regime"] == "lora"
    assert r.values["train_limit"] == 20000 and r.values["datasets"] == ALL4
    assert {k: r.sources[k] for k in ("model", "seeds", "n", "regime")} == dict.fromkeys(
        ("model", "seeds", "n", "regime"), NP.GIVEN)
    assert r.sources["models"] == f"{NP.GIVEN} (model)" and r.sources["train_limit"] == "profile paper"
    # smoke: a -p limit takes effect, the rest stays the smoke profile's
    s = resolve("table8", dict(parameters_cell("table8")[0], profile="smoke", train_limit=12))
    assert s.values["train_limit"] == 12 and s.values["eval_limit"] == 8 and s.values["model"] == "tiny"


def test_the_setup_line_names_every_value_and_its_source():
    defaults, _ = parameters_cell("table3")
    r = resolve("table3", dict(defaults, profile="smoke", model="smollm2", betas=[0.5]))
    line = r.describe()
    assert "\n" not in line
    assert line.startswith("table3: profile smoke (-p / given) | -p / given: model='smollm2', betas=[0.5]")
    assert "profile smoke: regime='loglinear', datasets=['qasc'], data_dir='samples', seeds=[0]" in line
    assert "test_limit=8, ns=[1, 3, 5], readings=['delta', 'reference', 'offset']" in line  # the axes: the profile's
    assert "notebook default: n=3, beta=0.1, out_dir=" in line
    for key, value in r.values.items():
        if key != "profile":
            assert f"{key}={value!r}" in line


def test_unknown_model_or_profile_is_reported():
    with pytest.raises(ValueError, match="save_pretrained"):
        resolve("table1", {"profile": "smoke", "model": "no_such_model"})
    with pytest.raises(FileNotFoundError, match="available: .*smoke"):
        resolve("table1", {"profile": "laptop"})


def test_model_accepts_a_folder_saved_with_save_pretrained(tmp_path):
    from mass_dpo.models import load_model

    tiny = load_model("tiny", device="cpu", dtype="float32")
    folder = tmp_path / "my-model"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    r = resolve("table1", {"profile": "smoke", "model": str(folder)})
    assert r.values["model"] == str(folder) and r.values["models"] == [str(folder)]
    loaded = load_model(r.values["model"], device="cpu", dtype="float32")
    ids = tiny.tokenizer("The answer is", return_tensors="pt").input_ids  # [1, T]
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, tiny.model(ids).logits)
    assert loaded.tokenizer("The answer is").input_ids == ids[0].tolist()


def test_offline_hub_error_says_a_saved_folder_works():
    from mass_dpo.models import _from_hub

    def offline():
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    with pytest.raises(OSError, match="smollm2.*local folder saved with save_pretrained"):
        _from_hub(offline, {"name": "llama3", "repo": "meta-llama/Llama-3.2-3B-Instruct"})


# ---------------------------------------------------------------- the notebooks that are not wired yet


@pytest.mark.parametrize("profile, want", [
    ("smoke", {"model": "tiny", "regime": "loglinear", "steps": 4}),
    ("cpu", {"model": "smollm2", "regime": "loglinear", "steps": 30}),
    ("paper", {"model": "smollm2", "regime": "loglinear", "steps": 30}),
])
def test_quickstart_profiles_hold_what_a_none_default_needs(profile, want):
    defaults, _ = parameters_cell("quickstart")
    wired = dict(defaults, profile="auto", model=None, regime=None, steps=None)
    r = resolve("quickstart", dict(wired, profile=profile), defaults=wired)
    assert {k: r.values[k] for k in want} == want
    assert all(r.sources[k] == f"profile {profile}" for k in want)


@pytest.mark.parametrize("profile", ["smoke", "cpu", "paper"])
def test_toy_notebook_profiles_come_from_its_own_params_file(profile):
    from mass_dpo.params import load_params

    defaults, _ = parameters_cell("toy_loglinear")
    wired = dict.fromkeys(defaults, None) | {"out_dir": defaults["out_dir"], "profile": "auto"}
    r = resolve("toy_loglinear", {"profile": profile}, defaults=wired)
    own = load_params("toy_loglinear")["profiles"]["smoke" if profile == "smoke" else "cpu"]  # paper: the cpu run
    assert {k: r.values[k] for k in own if k != "out_dir"} == {k: v for k, v in own.items() if k != "out_dir"}
    assert all(r.sources[k] == f"profile {profile}" for k in own if k != "out_dir")


# ---------------------------------------------------------------- mass-dpo reproduce


@pytest.mark.parametrize("profile", ["smoke", "cpu", "paper"])
def test_reproduce_passes_only_the_profile_to_a_wired_notebook(profile):
    for name in PAPER_NOTEBOOKS:
        assert NP.papermill_parameters(name, profile) == {"profile": profile}


def test_reproduce_passes_profile_values_a_notebook_does_not_resolve(tmp_path):
    nb = {"cells": [{"cell_type": "code", "metadata": {"tags": ["parameters"]}, "outputs": [],
                     "execution_count": None,
                     "source": "model = 'smollm2'\nsteps = 30\nseeds = None\nout_dir = 'x'\n"}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "quickstart.ipynb"
    path.write_text(json.dumps(nb))
    # no `profile` parameter: the smoke values of the parameters set to something other than None
    assert NP.papermill_parameters(path, "smoke") == {"model": "tiny", "steps": 4}


@pytest.mark.slow
def test_papermill_run_takes_the_profile_and_the_given_value(tmp_path, monkeypatch):
    """One paper notebook end to end under papermill: the smoke profile applies, a -p value wins, the log says so."""
    import papermill
    monkeypatch.setenv("MASS_DPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MASS_DPO_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    out = tmp_path / "table8.ipynb"
    papermill.execute_notebook(str(REPO / "notebooks" / "table8.ipynb"), str(out), kernel_name="python3",
                               parameters={"profile": "smoke", "train_limit": 12, "out_dir": str(tmp_path / "out")},
                               cwd=str(REPO), progress_bar=False)
    nb = json.loads(out.read_text())
    text = "".join(o.get("text", "") if isinstance(o.get("text", ""), str) else "".join(o["text"])
                   for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"])
    setup = next(line for line in text.splitlines() if line.startswith("Setup: table8: profile smoke"))
    assert "-p / given: train_limit=12" in setup and "profile smoke: model='tiny'" in setup
    import pandas as pd

    runs = pd.read_csv(tmp_path / "out" / "runs.csv")
    assert set(runs["train_prompts"]) == {12} and set(runs["model"]) == {"tiny"} and set(runs["dataset"]) == {"qasc"}


def test_the_lm_profile_runs_table3_at_the_main_setting_with_the_hardest_negatives_only():
    """cpu-lm's Table 3 is a diagnostic of why MASS-DPO learns less in the LM regime: S-DPO on the hardest n at the
    main (n, beta), beside Table 1's MASS-DPO and S-DPO runs, on the two datasets trained on 300 prompts."""
    from mass_dpo import experiments as E

    p = E.notebook_parameters("table3", "cpu-lm")
    assert (p["betas"], p["ns"], p["readings"], p["label_blind"]) == ([0.1], [3], ["reference"], ["hardest"])
    specs = E.notebook_specs("table3", p)
    table1 = E.notebook_specs("table1", E.notebook_parameters("table1", "cpu-lm"))
    new = [s for s in specs if s not in table1]
    assert new and all(s.get("negatives") == "hardest" and s["method"] == "sdpo" for s in new)
    assert len(new) == len(p["datasets"]) * len(p["seeds"]) and set(p["datasets"]) == {"lastfm", "movielens"}


@pytest.mark.parametrize("name, given, says", [
    ("table1", {"seeds": 3}, "parameter seeds of table1 is a list, got 3: give it with -y"),
    ("table1", {"n": "three"}, "parameter n of table1 must be an integer, got 'three'"),
    ("table1", {"n": 0}, "parameter n of table1 must be >= 1, got 0"),
    ("table1", {"train_limit": -5}, "parameter train_limit of table1 must be >= 1, got -5"),
    ("table1", {"methods": ["dpo", "masdpo"]}, "holds 'masdpo', not one of dpo, dpo_k, dmpo, sdpo, mass_dpo"),
    ("table1", {"datasets": []}, "parameter datasets of table1 is an empty list"),
    ("table1", {"seeds": [-1]}, "parameter seeds of table1 holds -1: each must be >= 0, got -1"),
    ("table1", {"data_dir": "/no/such/folder"}, "parameter data_dir of table1: no folder /no/such/folder"),
    ("table3", {"betas": [0.1, -1]}, "parameter betas of table3 holds -1: each must be > 0"),
    ("table3", {"readings": ["delt"]}, "holds 'delt', not one of delta, reference, offset"),
    ("table8", {"epochs": 2}, "parameter epochs of table8 is a list, got 2"),
    ("quickstart", {"beta": 0.0}, "parameter beta of quickstart must be > 0, got 0.0"),
    ("quickstart", {"regime": "nosuch"}, "parameter regime of quickstart must be one of full, lora, loglinear, freeze"),
    ("table1", {"In": ["", "# Parameters\nprofile = \"smoke\"\nnseeds = 3\n"]},
     "table1 has no parameter 'nseeds' (its parameters: profile, model"),
])
def test_a_bad_parameter_is_one_line_naming_it(name, given, says):
    defaults, _ = parameters_cell(name)
    with pytest.raises(ValueError) as err:
        resolve(name, {**defaults, "profile": "smoke", **given})
    assert says in str(err.value) and "\n" not in str(err.value)


def test_later_globals_are_not_parameters_and_the_toy_notebook_is_checked_too():
    defaults, _ = parameters_cell("table1")
    later = {"rows": [1, 2], "n_runs": 3, "In": ["# Parameters (papermill: -p name value ...)\nn: int = 3\n"]}
    assert resolve("table1", {**defaults, "profile": "smoke", **later}).values["n"] == 3  # setup run again
    toy, _ = parameters_cell("toy_loglinear")
    NP.check_notebook("toy_loglinear", dict(toy))
    for bad, says in (({"shapes": "isotropic"}, "is a list"), ({"use_cache": "no"}, "must be True or False"),
                      ({"d": 0}, "parameter d of toy_loglinear must be >= 1"),
                      ({"num_seeds": "three"}, "must be an integer")):
        with pytest.raises(ValueError, match=says):
            NP.check_notebook("toy_loglinear", {**toy, **bad})


def test_quickstart_example_out_of_range_is_one_line_once_the_file_is_read():
    from mass_dpo.data import load_preferences
    from mass_dpo.experiments import check_example

    records = load_preferences(REPO / "notebooks" / "data" / "quickstart_preferences.jsonl")
    check_example(records, 0)
    check_example(records, len(records) - 1)
    for bad in (len(records), 999, -1):
        with pytest.raises(ValueError) as err:
            check_example(records, bad)
        assert f"from 0 to {len(records) - 1}" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", [p.stem for p in sorted((REPO / "notebooks").glob("*.ipynb"))])
def test_a_bad_parameter_creates_no_output_folder(name):
    """The setup cell checks its parameters before it creates ``out_dir``: a typo leaves nothing behind."""
    import nbformat

    setup = next(c.source for c in nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4).cells
                 if c.cell_type == "code" and "resolve_out_dir(" in c.source)
    check = min(i for i in (setup.find("resolve(\""), setup.find("check_notebook(")) if i >= 0)
    assert 0 <= check < setup.find("resolve_out_dir("), name
