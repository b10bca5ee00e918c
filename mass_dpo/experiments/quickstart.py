"""The quickstart: a user's own preference file, extracted, selected and trained on (``notebooks/quickstart.ipynb``)."""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import pandas as pd
import torch


# ---------------------------------------------------------------- the quickstart


def quickstart_extract(path, model: str = "smollm2"):
    """``(records, Extracted)`` of a preference file (``load_preferences``), extracted (and cached) under ``model``."""
    from ..data import load_preferences
    from ..extraction import extract

    records = load_preferences(path)
    with contextlib.redirect_stderr(io.StringIO()):
        ex = extract(records, model, dataset_key=f"quickstart/{Path(path).name}", progress=False)
    return records, ex


def check_example(records, example: int) -> None:
    """A ``ValueError`` of one line when ``example`` (the prompt the notebook looks at closely) is not the index of
    a prompt of ``records``: said once the file is read, before any extraction."""
    if not 0 <= example < len(records):
        raise ValueError(f"parameter example of quickstart is {example}, but the file holds {len(records)} prompts: "
                         f"give -p example with a value from 0 to {len(records) - 1}")


def compare_selections(records, ex, n: int = 3, *, beta: float = 0.1, gamma: float = 0.1, seed: int = 0
                       ) -> pd.DataFrame:
    """Per prompt and candidate: the text, whether D-optimal and random picked it (and at which step), and the
    D-optimal marginal gain of each pick. Also, per prompt, the information each subset adds,
    ``log det H(S) - d log gamma = log det(I + G[S, S])`` (``info_dopt``, ``info_random``; the ``d log gamma`` of an
    empty design is the same for both and would hide the difference)."""
    from ..preprocess import select_extracted

    dopt = select_extracted(ex, n, strategy="dopt", beta=beta, gamma=gamma)
    rand = select_extracted(ex, n, strategy="random", beta=beta, gamma=gamma, seed=seed)
    rows = []
    for p, rec in enumerate(records):
        d_idx, r_idx = dopt["indices"][p].tolist(), rand["indices"][p].tolist()
        for c, text in enumerate(rec["candidates"]):
            if not bool(ex.mask[p, c]):
                continue
            rows.append({
                "prompt": p, "id": rec["id"], "question": rec["prompt"], "candidate": c, "text": text,
                "chosen": c == int(ex.target[p]),
                "dopt_step": d_idx.index(c) + 1 if c in d_idx else None,
                "dopt_gain": float(dopt["gains"][p][d_idx.index(c)]) if c in d_idx else None,
                "random_step": r_idx.index(c) + 1 if c in r_idx else None,
                "info_dopt": float(dopt["gains"][p].nan_to_num(0.0).sum()),
                "info_random": float(rand["gains"][p].nan_to_num(0.0).sum()),
            })
    return pd.DataFrame(rows)


def information_summary(picks: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """``(table, sentence)`` from :func:`compare_selections`' picks: per strategy, the mean information its subset adds
    to the design (``log det(I + G_S)``, one value per prompt) and the share of prompts where it adds more than the
    other strategy, and the sentence that quotes them."""
    per_prompt = picks.groupby("prompt")[["info_dopt", "info_random"]].first()
    dopt, rand = per_prompt["info_dopt"], per_prompt["info_random"]
    table = pd.DataFrame({"strategy": ["D-optimal", "random"],
                          "mean information added": [dopt.mean(), rand.mean()],
                          "share of prompts where it is larger": [(dopt > rand).mean(), (rand > dopt).mean()]})
    sentence = (f"D-optimal subsets add more information to the design than random ones on {(dopt > rand).mean():.0%} "
                f"of the {len(per_prompt)} prompts (mean log det(I + G_S) {dopt.mean():.3f} against {rand.mean():.3f}).")
    return table, sentence


def results_sentence(results: pd.DataFrame, regime: str) -> str:
    """The quickstart's training line: each method's test accuracy, Recall@1 and MRR, and the prompts it used."""
    trained = "; ".join(f"{r['method']} accuracy {r['accuracy']:.2f}, recall@1 {r['recall@1']:.2f}, MRR {r['mrr']:.2f}"
                        for _, r in results.iterrows())
    return (f"Trained on {results['train_prompts'].iloc[0]} prompts ({regime}), tested on "
            f"{results['test_prompts'].iloc[0]}: {trained}.")


def pool_projection(ex, prompt: int) -> pd.DataFrame:
    """2-D PCA of one pool's feature differences ``phi_i = phi(x, y_i) - phi(x, y*)`` (the chosen one at 0):
    ``candidate, pc1, pc2`` and the share of variance the two components explain (``explained``)."""
    m = ex.mask[prompt]
    feats = ex.features[prompt][m].double()
    idx = torch.nonzero(m).flatten()
    diffs = feats - ex.features[prompt, int(ex.target[prompt])].double()
    centred = diffs - diffs.mean(0)
    u, s, v = torch.linalg.svd(centred, full_matrices=False)
    coords = centred @ v[:2].T
    explained = float((s[:2] ** 2).sum() / (s**2).sum()) if float((s**2).sum()) > 0 else math.nan
    return pd.DataFrame({"candidate": idx.tolist(), "pc1": coords[:, 0].tolist(), "pc2": coords[:, 1].tolist(),
                         "explained": explained})
