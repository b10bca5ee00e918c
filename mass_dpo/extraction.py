"""Features phi(x, y) and sequence log-probabilities log pi(y | x) for every candidate of every prompt of a dataset
(appendix C.4), cached on disk.

The forward of one batch of pools (the prompt computed once per pool in a packed row), its shapes and the notation
are in :mod:`mass_dpo.forward`; both poolings come from the same hidden states and are cached together.

Over a dataset (:func:`_forward_pools`, no gradient) two more savings, neither of which changes a number beyond float
rounding: the rows are batched longest first, so a batch holds rows of similar length (little padding), and the
token prefix that every prompt of the call shares (the chat template's system turn and the instruction's opening, 26
to 35 SmolLM2 tokens on the four benchmarks) is computed once (:func:`mass_dpo.forward.shared_prompt_prefix`) and
given to every batch as a key/value cache.

:func:`extract` runs this over a dataset under the reference model and the preprocessing checkpoint theta0 and caches
the result on disk (safetensors shards + JSON manifests; see ``docs/extraction.md``);
:func:`selection_inputs` turns an :class:`Extracted` into the inputs of Algorithm 1.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .files import atomic_path, atomic_write_json, check_writable, clean_orphans, locked
from .forward import (
    POOLINGS,
    _check_pooling,
    _model_dtype_device,
    _parts,
    _shared_prefix,
    row_tokens,
    shared_prompt_prefix,
)

#: Bump when the extraction's numbers or stored tensors change (formatting, pooling, packing): old caches are then
#: ignored. 2: both poolings and the response lengths in one cache entry.
EXTRACTION_VERSION = 2
#: The tokenization of preference-file records (TRL's, ``trl.DPOTrainer`` 1.16): part of their fingerprint, so that
#: entries made under the earlier chat-formatted layout are not read for them (benchmark entries keep their keys).
TRL_LAYOUT = "trl-dpo-1"

#: Default bound on the tokens of one forward pass (rows x longest row).
DEFAULT_BATCH_TOKENS = 4096


@dataclass
class Extracted:
    """Features and log-probabilities of a dataset split; pools padded to ``C`` candidates.

    Attributes:
        ids: the record ids, ``P`` of them, in dataset order.
        features: ``[P, C, d]`` float32, phi(x, y_c) under theta0 (absolute, not differences), in the requested
            pooling (``meta["pooling"]``).
        ref_logps: ``[P, C]`` float32, log pi_ref(y_c | x).
        theta0_logps: ``[P, C]`` float32, log pi_theta0(y_c | x) (equal to ``ref_logps`` when theta0 is the reference).
        mask: ``[P, C]`` bool, True for real candidates.
        target: ``[P]`` int64, the index of the chosen candidate.
        meta: the manifest (model, checkpoint, pooling, dtype, dataset key, version, timing).
        lengths: ``[P, C]`` int64, the token count of each candidate's response under the reference tokenizer
            (end-of-turn included; 0 for padding); ``None`` where not known.
        states: the reference model's hidden states of every packed pool row at the input of one decoder block
            (:class:`HiddenStates`, ``extract(keep_layer=...)``: the ``freeze`` regime's cached lower blocks);
            ``None`` otherwise.
    """

    ids: list[str]
    features: torch.Tensor
    ref_logps: torch.Tensor
    theta0_logps: torch.Tensor
    mask: torch.Tensor
    target: torch.Tensor
    meta: dict = field(default_factory=dict)
    lengths: torch.Tensor | None = None
    states: "HiddenStates | None" = None

    def __len__(self) -> int:
        return len(self.ids)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {
            "features": self.features.contiguous(),
            "ref_logps": self.ref_logps.contiguous(),
            "theta0_logps": self.theta0_logps.contiguous(),
            "mask": self.mask.contiguous(),
            "target": self.target.contiguous(),
        }
        if self.lengths is not None:
            out["lengths"] = self.lengths.contiguous()
        return out


@dataclass
class HiddenStates:
    """The hidden states of every token of every packed pool row ``[prompt, cand_1, ..., cand_C]`` of a split at the
    input of decoder block ``layer`` (the output of blocks ``0..layer-1``), as the reference model computed them in
    the shared-prefix forward of :func:`extract` (``keep_layer=layer``). Rows are ragged, so they are stored flat.

    A candidate's states depend only on the prompt and itself (the block mask), so the states of any subset of a
    pool's candidates are slices of its row (:meth:`gather`): what the ``freeze`` regime (:mod:`mass_dpo.frozen`)
    feeds its trainable top blocks.

    Attributes:
        states: ``[N, d]`` every row's states, concatenated (the model's dtype: bf16 where extraction runs in bf16).
        offsets: ``[P + 1]`` int64: row p is ``states[offsets[p]:offsets[p + 1]]``.
        prompt_len: ``[P]`` int64 prompt tokens per row; cand_len: ``[P, C]`` int64 response tokens per candidate
            (0 = no candidate), in row order.
        ids: the record ids; layer: the block index.
    """

    states: torch.Tensor
    offsets: torch.Tensor
    prompt_len: torch.Tensor
    cand_len: torch.Tensor
    ids: list
    layer: int

    def __len__(self) -> int:
        return len(self.ids)

    def row(self, p: int) -> torch.Tensor:
        """``[P_p + sum_c L_pc, d]``: the whole packed row of prompt ``p``."""
        return self.states[int(self.offsets[p]) : int(self.offsets[p + 1])]

    def gather(self, p: int, candidates: Sequence[int]) -> torch.Tensor:
        """``[P_p + sum of their L, d]``: the prompt's states, then those of ``candidates`` (indices into the pool) in
        the given order: the packed row of the sub-pool ``(prompt, [cand_i for i in candidates])``."""
        P = int(self.prompt_len[p])
        lens = self.cand_len[p]
        starts = P + torch.cat([lens.new_zeros(1), lens.cumsum(0)[:-1]])
        idx = [torch.arange(P)] + [torch.arange(int(starts[c]), int(starts[c]) + int(lens[c])) for c in candidates]
        if any(int(lens[c]) == 0 for c in candidates):
            raise IndexError(f"prompt {p}: candidate index out of its pool ({list(candidates)}, {int((lens > 0).sum())})")
        return self.row(p)[torch.cat(idx)]

    def check_pools(self, pools: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]]) -> None:
        """A ``ValueError`` unless ``pools`` (``encode_pool`` output, one per record) have exactly the stored layout."""
        if len(pools) != len(self.ids):
            raise ValueError(f"{len(pools)} pools for {len(self.ids)} rows of cached states")
        for p, (prompt, cands) in enumerate(pools):
            lens = [len(c) for c in cands]
            if len(prompt) != int(self.prompt_len[p]) or lens != self.cand_len[p, : len(lens)].tolist():
                raise ValueError(f"record {self.ids[p]!r}: its tokenized pool does not match the cached states "
                                 "(another tokenizer or formatting); extract again")


#: The readings of Appendix C.4's preprocessing score ``s_i = beta (phi_i^T theta0 + b_i)``, i.e. of the relative
#: logits ``l_i`` (``s_i = beta l_i``) that Algorithm 1's q and alpha0 are computed from (``docs/extraction.md``,
#: "The selection score"): ``delta`` both terms (they cancel at theta0 = ref), ``reference`` the first term only,
#: ``offset`` the second term only.
SELECTION_SCORES = ("delta", "reference", "offset")

#: The reading the paper's text describes (Section 4, Section 6.4, Appendix C.4; ``docs/extraction.md``).
DEFAULT_SELECTION_SCORE = "reference"

#: ``selection_inputs(logits=...)``, deprecated: the old names of two readings.
_LEGACY_LOGITS = {"delta": "delta", "policy": "reference"}


def check_selection_score(selection_score: str) -> str:
    """``selection_score`` itself when it is one of :data:`SELECTION_SCORES`, else a ``ValueError`` naming them."""
    if selection_score not in SELECTION_SCORES:
        raise ValueError(
            f"unknown selection_score {selection_score!r}; choose one of {', '.join(SELECTION_SCORES)} "
            f"(the readings of appendix C.4's preprocessing score; docs/extraction.md)"
        )
    return selection_score


def _negatives(ex: Extracted) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cand [P, C-1], mask [P, C-1])``: the candidate index of each negative (the target skipped, order kept)."""
    P, C = ex.mask.shape
    j = torch.arange(C - 1)
    cand = j[None, :] + (j[None, :] >= ex.target[:, None]).long()
    return cand, torch.gather(ex.mask, 1, cand)


def selection_inputs(ex: Extracted, selection_score: str = DEFAULT_SELECTION_SCORE, *, logits: str | None = None):
    """The inputs of Algorithm 1 over the negatives of each pool (the chosen candidate removed).

    Returns ``(phi [P, C-1, d], logits [P, C-1], mask [P, C-1], cand_index [P, C-1])`` with

    - ``phi_i = phi(x, y_i) - phi(x, y*)`` (line 2);
    - ``logits`` the relative logits ``l_i`` of line 3 (``s_i = beta l_i``) under the reading ``selection_score``
      (appendix C.4's ``s_i = beta (phi_i^T theta0 + b_i)``, with ``phi_i^T theta0 = log pi_theta0(y_i) -
      log pi_theta0(y*)`` under the log-linear model of Assumption 4.1):

      - ``"delta"``: ``l_i = Delta_i(theta0) = (log pi_theta0(y_i) - log pi_theta0(y*)) + b_i``, both terms; every
        ``l_i`` is 0 (q uniform) when theta0 is the reference model;
      - ``"reference"`` (the default): ``l_i = log pi_theta0(y_i) - log pi_theta0(y*)``, the first term, which is
        ``log pi_ref(y_i) - log pi_ref(y*) = -b_i`` when theta0 is the reference: q weights the negatives the model
        finds plausible;
      - ``"offset"``: ``l_i = b_i = log pi_ref(y*) - log pi_ref(y_i)``, the second term: q weights the negatives the
        reference already rejects;
    - ``cand_index[p, j]``: the candidate index of negative j (``-1`` where padded).

    ``logits=`` is the deprecated name of the option (``"delta"``, or ``"policy"`` for ``"reference"``).
    The offsets ``b_i`` alone are :func:`reference_offsets`.
    """
    if logits is not None:
        import warnings

        if logits not in _LEGACY_LOGITS:
            raise ValueError(f"unknown logits {logits!r}; use selection_score= one of {', '.join(SELECTION_SCORES)}")
        warnings.warn(f"selection_inputs(logits={logits!r}) is deprecated; use selection_score="
                      f"{_LEGACY_LOGITS[logits]!r}", DeprecationWarning, stacklevel=2)
        selection_score = _LEGACY_LOGITS[logits]
    check_selection_score(selection_score)
    P = len(ex.target)
    cand, mask = _negatives(ex)
    rows, tgt = torch.arange(P)[:, None], ex.target
    phi = ex.features[rows, cand] - ex.features[torch.arange(P), tgt][:, None, :]
    pol = ex.theta0_logps[rows, cand] - ex.theta0_logps[torch.arange(P), tgt][:, None]
    b = reference_offsets(ex)
    lg = {"delta": pol + b, "reference": pol, "offset": b}[selection_score]
    phi = phi * mask[..., None]
    lg = lg * mask
    cand = torch.where(mask, cand, torch.full_like(cand, -1))
    return phi, lg, mask, cand


def reference_offsets(ex: Extracted) -> torch.Tensor:
    """``b_i = log pi_ref(y*) - log pi_ref(y_i)`` over the negatives, ``[P, C-1]``, in :func:`selection_inputs`'
    order (0 where padded)."""
    P = len(ex.target)
    cand, mask = _negatives(ex)
    b = ex.ref_logps[torch.arange(P), ex.target][:, None] - ex.ref_logps[torch.arange(P)[:, None], cand]
    return b * mask


def _records(dataset) -> list[dict]:
    if hasattr(dataset, "to_list"):
        return dataset.to_list()
    return [dict(r) for r in dataset]


def _check_records(records: list[dict]):
    for i, r in enumerate(records):
        for key in ("id", "prompt", "candidates", "target"):
            if key not in r:
                raise KeyError(f"record {i} has no {key!r} field; records need id, prompt, candidates, target")
        n = len(r["candidates"])
        if not 0 <= int(r["target"]) < n:
            raise ValueError(f"record {r['id']!r}: target {r['target']} out of range for {n} candidates")


def dataset_fingerprint(records: list[dict]) -> str:
    """sha256 of the records' ids, prompts, candidates and targets (what the extraction reads); for a record of a
    preference file also its message lists and :data:`TRL_LAYOUT` (its tokenization is TRL's,
    :func:`mass_dpo.data.formatting.encode_trl_pool`)."""
    h = hashlib.sha256()
    for r in records:
        item = [str(r["id"]), r["prompt"], list(r["candidates"]), int(r["target"])]
        if "messages" in r:
            item += [r["messages"], TRL_LAYOUT]
        h.update(json.dumps(item).encode())
    return h.hexdigest()


@torch.no_grad()
def weights_fingerprint(model) -> str:
    """sha256 over every parameter's name, shape and the exact values of up to 1,024 evenly strided elements: an
    in-memory model whose weights changed gets another cache key. (No reductions: a multithreaded sum is not
    bit-stable, and its rounding once gave the same weights two keys.) ``model``: a module, or a state dict."""
    h = hashlib.sha256()
    for name, w in (model.items() if isinstance(model, Mapping) else model.named_parameters()):
        flat = w.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)].float().cpu()
        h.update(f"{name}{tuple(w.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def _model_identity(model) -> dict:
    from .models import ModelBundle

    if isinstance(model, ModelBundle):
        ident = {"name": model.name, "config": model.config, "weights_fingerprint": weights_fingerprint(model.model)}
        path = Path(model.name)
        if path.is_dir():
            ident["weights"] = _folder_stamp(path)
        return ident
    path = Path(str(model)).expanduser()
    if path.is_dir():
        return {"name": str(path.resolve()), "weights": _folder_stamp(path)}
    return {"name": str(model)}


def _folder_stamp(path: Path) -> list:
    return sorted(
        [f.name, f.stat().st_size, int(f.stat().st_mtime)]
        for f in path.iterdir()
        if f.suffix in (".safetensors", ".bin", ".json")
    )


def cache_key(
    model, checkpoint, fingerprint: str, poolings: Sequence[str], dtype: str, dataset_key: str | None = None,
    truncation: dict | None = None,
) -> tuple[str, dict]:
    """``(key, description)``: a sha256 prefix over everything that changes the numbers. One entry holds the
    features of every pooling in ``poolings`` (all of :data:`mass_dpo.forward.POOLINGS` in :func:`extract`).
    ``truncation``: the ``max_length`` / ``max_prompt_length`` given explicitly (left out of the key when none is, so
    that entries made before these options existed, at the model's context, stay valid)."""
    desc = {
        "version": EXTRACTION_VERSION,
        "model": _model_identity(model),
        "checkpoint": None if checkpoint is None else _model_identity(checkpoint),
        "dataset": dataset_key,
        "fingerprint": fingerprint,
        "poolings": list(poolings),
        "dtype": dtype,
    }
    truncation = {k: v for k, v in (truncation or {}).items() if v is not None}
    if truncation:
        desc["truncation"] = truncation
    key = hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return key, desc


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def save_part(folder: Path, stem: str, tensors: dict[str, torch.Tensor], manifest: dict):
    """Write ``<stem>.safetensors`` then ``<stem>.json`` (its manifest, with the file's size and sha256), each
    atomically: a part without a valid manifest is incomplete and never read."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    st = folder / f"{stem}.safetensors"
    with atomic_path(st) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    manifest = dict(manifest, file=st.name, size=st.stat().st_size, sha256=_sha256(st))
    atomic_write_json(folder / f"{stem}.json", manifest, indent=1)


def read_part(folder: Path, stem: str, expect: dict, need: Sequence[str] | None = None
              ) -> tuple[tuple[dict[str, torch.Tensor], dict] | None, str | None]:
    """``(part, problem)``: the part written by :func:`save_part` and ``None``, or ``None`` and why it cannot be
    used: ``None`` when it is simply not there, else a short description of the damage (a partial, corrupt or
    mismatched manifest or tensor file)."""
    from safetensors.torch import load_file

    man_path, st = folder / f"{stem}.json", folder / f"{stem}.safetensors"
    if not man_path.is_file():
        return None, None
    if not st.is_file():
        return None, f"{st.name} is missing"
    try:
        manifest = json.loads(man_path.read_text())
        bad = [k for k, v in expect.items() if manifest.get(k) != v]
        if bad:
            return None, f"its manifest was written for other inputs ({', '.join(bad)})"
        if st.stat().st_size != manifest["size"]:
            return None, f"{st.name} has {st.stat().st_size} bytes, its manifest says {manifest['size']}"
        if _sha256(st) != manifest["sha256"]:
            return None, f"{st.name} does not match its manifest's sha256"
        tensors = load_file(str(st))
    except Exception as err:  # unreadable manifest or tensors: recompute
        return None, f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
    n = len(manifest.get("ids", []))
    need = STORED if need is None else need
    if any(k not in tensors for k in need) or any(tensors[k].shape[0] != n for k in need):
        return None, "its tensors do not match its manifest"
    return (tensors, manifest), None


def load_part(folder: Path, stem: str, expect: dict, need: Sequence[str] | None = None
              ) -> tuple[dict[str, torch.Tensor], dict] | None:
    """Read a part written by :func:`save_part`; ``None`` when it is missing, partial, corrupt or was written for
    other inputs (any ``expect`` entry differs from the manifest's); :func:`read_part` says why. ``need``: the
    tensors it must hold, one row per id of its manifest (default :data:`STORED`, an extraction part;
    :data:`STATES_STORED` for cached states)."""
    return read_part(folder, stem, expect, need)[0]


def cached_part(folder: Path, stem: str, expect: dict, need: Sequence[str], compute, what: str
                ) -> dict[str, torch.Tensor]:
    """A result derived from a cache entry, stored beside it once: the tensors ``need`` of the part ``folder/stem``
    (:func:`load_part`, checked against ``expect``), else ``compute()``'s (floats as float32), saved there by
    :func:`save_part` under the part's lock (parallel processes compute it once; ``what`` names it while one
    waits). A damaged part is computed again; a cache that cannot be written is only read."""

    def load():
        part = load_part(folder, stem, expect, need)
        return part[0] if part is not None else None

    def fresh():
        return {k: (v.float() if v.is_floating_point() else v).detach().contiguous().cpu()
                for k, v in compute().items()}

    out = load()
    if out is not None:
        return out
    try:
        with locked(folder / stem, what):
            out = load()  # another process may have written it while this one waited
            if out is None:
                out = fresh()
                save_part(folder, stem, out, expect)
            return out
    except OSError:  # a read-only cache: compute without storing
        return fresh()


def _pad_to(t: torch.Tensor, C: int, value=0) -> torch.Tensor:
    if t.shape[1] == C:
        return t
    shape = list(t.shape)
    shape[1] = C - t.shape[1]
    return torch.cat([t, t.new_full(shape, value)], dim=1)


def _feature_key(pooling: str) -> str:
    return f"features_{pooling}"


#: The tensors of a cache entry: the features of every pooling, log-probs, mask, target, response lengths.
STORED = tuple(_feature_key(p) for p in POOLINGS) + ("ref_logps", "theta0_logps", "mask", "target", "lengths")


def _merge(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    C = max(p["mask"].shape[1] for p in parts)
    out = {}
    for k in STORED:
        if k == "target":
            continue
        out[k] = torch.cat([_pad_to(p[k], C, False if k == "mask" else 0) for p in parts])
    out["target"] = torch.cat([p["target"] for p in parts])
    return out


def _batches(encoded: list[tuple[list[int], list[list[int]]]], batch_tokens: int, *,
             longest_first: bool = True) -> list[list[int]]:
    """Indices grouped so that rows x longest row <= batch_tokens (a single long pool still gets its own batch),
    longest rows first: rows of similar length share a batch (little padding). Callers put outputs back by index."""
    order = range(len(encoded))
    if longest_first:
        order = sorted(order, key=lambda i: -row_tokens(encoded[i]))  # stable: ties keep their order
    batches, cur, longest = [], [], 0
    for i in order:
        n = row_tokens(encoded[i])
        if cur and max(longest, n) * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    return batches


def split_rows(encoded: list[tuple[list[int], list[list[int]]]], cap: int):
    """Pools as packed rows of at most ``max(cap, prompt + longest candidate)`` tokens: a pool whose candidates do
    not fit in one row is split over several, each repeating the prompt (every candidate still sees the prompt and
    itself only, so its numbers do not change). Returns ``(rows, where)``: ``rows[j] = (prompt_ids, candidates)``
    and ``where[j] = (pool index, index of its first candidate)``. Bounds the ``[T, T]`` attention mask of a row."""
    rows, where = [], []
    for i, (p, cs) in enumerate(encoded):
        limit = max(cap, len(p) + max(len(c) for c in cs))
        start, length = 0, len(p)
        for c, toks in enumerate(cs):
            if c > start and length + len(toks) > limit:
                rows.append((p, cs[start:c]))
                where.append((i, start))
                start, length = c, len(p)
            length += len(toks)
        rows.append((p, cs[start:]))
        where.append((i, start))
    return rows, where


@torch.no_grad()
def _forward_pools(model, encoded, *, poolings, batch_tokens, pad_id, progress=None, keep_layer=None):
    """Run :func:`mass_dpo.forward.shared_prefix_outputs` over pools; returns ``(logps [N, C], {pooling: features
    [N, C, d]}, mask [N, C], lengths [N, C])``, and with ``keep_layer`` a fifth element: the :func:`states_part`
    tensors of the pools' hidden states at the input of that block. A pool longer than ``batch_tokens`` is split over
    several rows (:func:`split_rows`), so no row needs a mask larger than ``max(batch_tokens, prompt + longest
    response)`` squared; its states are put back together as one packed row (the prompt's from its first row, each
    candidate's from its own: a candidate sees the prompt and itself only, so they are those of the unsplit row).
    Rows run longest first, and the prompts' common prefix once (:func:`mass_dpo.forward.shared_prompt_prefix`); the
    outputs are in the pools' order."""
    N, C = len(encoded), max(len(cs) for _, cs in encoded)
    rows, where = split_rows(encoded, batch_tokens)
    prefix = shared_prompt_prefix(model, encoded, keep_layer=keep_layer)
    logps, masks, lengths = torch.zeros(N, C), torch.zeros(N, C, dtype=torch.bool), torch.zeros(N, C, dtype=torch.long)
    feats: dict[str, torch.Tensor | None] = {p: None for p in poolings}
    pieces: list[list[tuple[int, torch.Tensor]]] = [[] for _ in range(N)]
    done = set()
    for idx in _batches(rows, batch_tokens):
        lp, ft, m, n, st = _shared_prefix(model, [rows[j] for j in idx], poolings=poolings, pad_id=pad_id,
                                          keep_layer=keep_layer, prefix=prefix)
        lp, m, n = lp.cpu(), m.cpu(), n.cpu()
        for b, j in enumerate(idx):
            i, lo = where[j]
            k = len(rows[j][1])
            logps[i, lo : lo + k], masks[i, lo : lo + k], lengths[i, lo : lo + k] = lp[b, :k], m[b, :k], n[b, :k]
            for p in poolings:
                f = ft[p][b, :k].cpu()
                if feats[p] is None:
                    feats[p] = torch.zeros(N, C, f.shape[-1])
                feats[p][i, lo : lo + k] = f
            if keep_layer is not None:
                P = len(rows[j][0])
                end = row_tokens(rows[j])
                pieces[i].append((lo, st[b, (0 if lo == 0 else P) : end].cpu()))  # put in order at the end
        if progress is not None:
            new = {where[j][0] for j in idx} - done
            done |= new
            progress.update(len(new))
    out = logps, {p: v for p, v in feats.items()}, masks, lengths
    if keep_layer is None:
        return out
    whole = [torch.cat([t for _, t in sorted(pc, key=lambda piece: piece[0])]) for pc in pieces]
    return (*out, states_part(whole, encoded))  # rows in dataset order


#: The per-prompt tensors of a cached-states part (:class:`HiddenStates`; ``states`` and ``offsets`` are checked by
#: :func:`load_states`).
STATES_STORED = ("prompt_len", "cand_len")


def states_part(rows: list[torch.Tensor], encoded) -> dict[str, torch.Tensor]:
    """The tensors stored for :class:`HiddenStates`: ``states [N, d]`` (rows concatenated), ``offsets [P + 1]``,
    ``prompt_len [P]``, ``cand_len [P, C]``."""
    C = max(len(cs) for _, cs in encoded)
    cand_len = torch.zeros(len(encoded), C, dtype=torch.long)
    for p, (_, cs) in enumerate(encoded):
        cand_len[p, : len(cs)] = torch.tensor([len(c) for c in cs])
    sizes = torch.tensor([r.shape[0] for r in rows], dtype=torch.long)
    return {"states": torch.cat(rows), "offsets": torch.cat([sizes.new_zeros(1), sizes.cumsum(0)]),
            "prompt_len": torch.tensor([len(p) for p, _ in encoded], dtype=torch.long), "cand_len": cand_len}


def _merge_states(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Shards of :func:`states_part` tensors, concatenated in order."""
    C = max(p["cand_len"].shape[1] for p in parts)
    offsets, base = [torch.zeros(1, dtype=torch.long)], 0
    for p in parts:
        offsets.append(p["offsets"][1:] + base)
        base += int(p["offsets"][-1])
    return {"states": torch.cat([p["states"] for p in parts]), "offsets": torch.cat(offsets),
            "prompt_len": torch.cat([p["prompt_len"] for p in parts]),
            "cand_len": torch.cat([_pad_to(p["cand_len"], C) for p in parts])}


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


def _as_bundle(model, device, dtype):
    from .models import ModelBundle, load_model

    if isinstance(model, ModelBundle):
        return model
    return load_model(str(model), device=device, dtype=dtype)


def model_context(model) -> int | None:
    """The longest sequence a model was built for (``config.max_position_embeddings``; ``None`` when unknown)."""
    config = getattr(model, "config", None)
    n = getattr(config, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def encode_records(records: list[dict], tokenizer, *, max_length: int | None = None,
                   max_prompt_length: int | None = None) -> tuple[list[tuple[list[int], list[list[int]]]], list[int]]:
    """``(pools, counts)``: each record's chat-formatted pool (:func:`mass_dpo.data.formatting.encode_pool`) cut
    the way TRL cuts (:func:`mass_dpo.data.formatting.truncate_pool`), and ``counts = [prompts cut, responses cut,
    responses]`` over the records (:func:`truncation_warning` turns them into one line)."""
    from .data.formatting import encode_pool, truncate_pool

    pools, counts = [], [0, 0, 0]
    for r in records:
        p, cs = encode_pool(r, tokenizer)
        p, cs, prompt_cut, cut = truncate_pool(p, cs, max_length, max_prompt_length, where=f"record {r['id']!r}")
        pools.append((p, cs))
        counts[0] += int(prompt_cut)
        counts[1] += cut
        counts[2] += len(cs)
    return pools, counts


def truncation_warning(counts: Sequence[int], prompts: int, max_length: int | None, max_prompt_length: int | None,
                       given: bool) -> str | None:
    """One line counting what :func:`encode_records` cut (``None`` when nothing was)."""
    prompts_cut, cut, responses = (int(c) for c in counts)
    if not prompts_cut and not cut:
        return None
    parts = []
    if cut:
        source = "--max-length" if given else "the model's context; --max-length changes it"
        parts.append(f"{cut} of {responses} responses to fit max_length {max_length} tokens with their prompt "
                     f"({source}; their start is kept, as in TRL)")
    if prompts_cut:
        parts.append(f"{prompts_cut} of {prompts} prompts to their last {max_prompt_length} tokens "
                     "(--max-prompt-length)")
    return "truncated " + "; ".join(parts)


def extract(
    dataset,
    model,
    *,
    dataset_key: str | None = None,
    pooling: str = "all",
    checkpoint=None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    shard_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    device=None,
    dtype=None,
    progress: bool = True,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    keep_layer: int | None = None,
) -> Extracted:
    """Features and log-probabilities for every candidate of every record, cached on disk.

    Args:
        dataset: a ``datasets.Dataset`` (or a list of dicts) with ``id``, ``prompt``, ``candidates``, ``target``.
        model: the reference model: a name (``params/models``), a saved folder, or a
            :class:`~mass_dpo.models.ModelBundle`.
        dataset_key: a label for the dataset in the cache key and manifest (e.g. ``"lastfm/train/limit=100/seed=0"``);
            the records' content fingerprint is always part of the key.
        pooling: ``"all"`` or ``"response"`` (appendix C.4): which features ``Extracted.features`` holds. Both
            come from the same forward and are cached together: the other pooling is then a cache hit.
        checkpoint: the preprocessing checkpoint theta0 (name, folder or bundle); ``None`` = the reference model.
            Features come from theta0; ``ref_logps`` from the reference, ``theta0_logps`` from theta0.
        batch_tokens: bound on rows x longest row per forward (a longer pool is split over several rows).
            shard_size: prompts per cache shard.
        cache_dir: where to cache (default ``<cache>/extraction``, see :func:`mass_dpo.models.cache_dir`);
            ``use_cache=False`` computes without reading or writing.
        device, dtype: for models loaded by name (default: the params', or the accelerate process's device;
            ``$MASS_DPO_DTYPE`` overrides the params' dtype, see :func:`mass_dpo.models.resolve_dtype`). The model's
            dtype is part of the cache key; features and log-probs are stored as float32 whatever it is.
        max_length, max_prompt_length: TRL's truncation (:func:`mass_dpo.data.formatting.truncate_pool`): each
            prompt + response keeps its first ``max_length`` tokens (default: the model's context,
            ``config.max_position_embeddings``), a prompt its last ``max_prompt_length`` (default: no limit); one
            warning counts what was cut; a prompt with no room left for a response is a ``ValueError``.
        keep_layer: also keep the reference model's hidden states of every packed row at the input of this decoder
            block (``Extracted.states``, a :class:`HiddenStates`), captured in the same forward and cached beside the
            entry (``states<layer>.safetensors``, in the model's dtype): the ``freeze`` regime's frozen lower blocks.
            An entry cached without them is computed again (one forward gives both).

    One process computes an entry (under its lock, :func:`mass_dpo.files.locked`); another asking for it meanwhile
    waits, then reads it. A damaged entry is reported in one warning line and computed again. Under
    ``accelerate launch`` each process computes a share of the missing shards (the main one holds the lock), then
    every process reads the merged result (identical on all processes, and equal to a single-process run).
    """
    import warnings

    from .models import cache_dir as default_cache

    _check_pooling(pooling)
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    records = _records(dataset)
    if not records:
        raise ValueError("the dataset is empty")
    _check_records(records)
    root = Path(cache_dir) if cache_dir is not None else default_cache() / "extraction"
    unwritable = None  # found before the model loads; raised once an entry has to be computed (a read-only cache
    if use_cache:      # that already holds it is fine)
        try:
            check_writable(root, "extraction cache", "give a writable folder with --cache-dir or $MASS_DPO_CACHE")
        except OSError as err:
            if not root.is_dir():  # a folder that is not there holds no entry either: say it now
                raise
            unwritable = err
    state = process_state()
    multi = state is not None and state.num_processes > 1
    if device is None and multi:
        device = state.device
    t0 = time.time()
    ref = _as_bundle(model, device, dtype)
    theta0 = None if checkpoint is None else _as_bundle(checkpoint, device, dtype)
    contexts = [c for c in (model_context(ref.model), theta0 and model_context(theta0.model)) if c]
    limit = max_length if max_length is not None else (min(contexts) if contexts else None)
    fp = dataset_fingerprint(records)
    key, desc = cache_key(ref, theta0, fp, POOLINGS, str(_model_dtype_device(ref.model)[0]), dataset_key,
                          {"max_length": max_length, "max_prompt_length": max_prompt_length})
    folder = root / key
    n_shards = (len(records) + shard_size - 1) // shard_size
    expect = {"key": key, "version": EXTRACTION_VERSION}
    ids = [str(r["id"]) for r in records]
    if keep_layer is not None:
        n_layers = len(_parts(ref.model)[0].layers)
        if not 0 <= int(keep_layer) < n_layers:
            raise ValueError(f"keep_layer {keep_layer} is not a block of {ref.name} (0 .. {n_layers - 1})")
    states_stem = None if keep_layer is None else f"states{int(keep_layer)}"
    expect_states = dict(expect, layer=keep_layer)
    main = state is None or state.is_main_process

    def warn_truncated(manifest: dict):
        line = truncation_warning(manifest.get("truncated", (0, 0, 0)), len(records), limit, max_prompt_length,
                                  max_length is not None)
        if line and main:
            warnings.warn(line, stacklevel=3)

    def hit(report: bool):
        part, problem = read_part(folder, "extracted", expect) if use_cache else (None, None)
        kept = load_states(folder, states_stem, expect_states) if use_cache and states_stem else None
        if part is not None and part[1].get("ids") == ids and (states_stem is None or kept is not None
                                                                and kept.ids == ids):
            warn_truncated(part[1])
            done = _to_extracted(part[0], part[1], pooling, cache_hit=True, states=kept)
            done.meta["entry"] = str(folder)  # derived per-entry results (frozen.reference_logps) live beside it
            return done
        if report and main and (problem or part is not None and part[1].get("ids") != ids):
            warnings.warn(f"extraction cache entry {folder} is damaged ({problem or 'its ids differ'}): "
                          "computing it again", stacklevel=3)
        return None

    if not multi:  # the common case: read without waiting for any lock (several processes decide together below)
        done = hit(report=False)
        if done is not None:
            return done
    if unwritable is not None:
        raise unwritable
    with locked(folder, f"the extraction {key} ({dataset_key or len(records)})", enabled=use_cache and main):
        if multi:
            state.wait_for_everyone()  # the other processes go on once the main one holds the lock
        if use_cache:
            if main:
                clean_orphans(folder)
            done = hit(report=True)  # computed by another process while this one waited, or damaged
            if done is not None:
                return done
        return _compute(records, ref, theta0, folder, key, desc, expect, ids, n_shards, shard_size, state,
                        use_cache, batch_tokens, progress, pooling, limit, max_prompt_length, t0, warn_truncated,
                        keep_layer, states_stem, expect_states)


def _compute(records, ref, theta0, folder, key, desc, expect, ids, n_shards, shard_size, state, use_cache,
             batch_tokens, progress, pooling, max_length, max_prompt_length, t0, warn_truncated,
             keep_layer=None, states_stem=None, expect_states=None) -> Extracted:
    """The missing shards of an entry (this process's share of them under ``accelerate launch``), then the merged
    entry (:func:`extract`; the caller holds the entry's lock)."""
    from tqdm.auto import tqdm

    def shard_stem(s: int, prefix: str = "") -> str:
        return f"{prefix}shard-{s:05d}-of-{n_shards:05d}"

    def shard_done(s: int) -> bool:
        return load_part(folder, shard_stem(s), expect) is not None and (
            states_stem is None or load_states(folder, shard_stem(s, f"{states_stem}-"), expect_states) is not None)

    multi = state is not None and state.num_processes > 1
    main = state is None or state.is_main_process
    mine = list(range(n_shards))
    if multi:
        if not use_cache:
            raise ValueError("extraction under several processes needs use_cache=True (the shards are shared on disk)")
        with state.split_between_processes(mine) as share:  # fixed by rank: no race on what is done
            mine = list(share)
    if use_cache:
        mine = [s for s in mine if not shard_done(s)]  # resume
    # every pool this process computes, tokenized and cut first: a prompt with no room for a response is refused
    # before any forward pass
    todo = {s: records[s * shard_size : (s + 1) * shard_size] for s in mine}
    encoded = {s: encode_records(recs, ref.tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
               for s, recs in todo.items()}
    parts: dict[int, dict] = {}
    state_parts: dict[int, dict] = {}
    counts: dict[int, list[int]] = {}
    pad = _pad_id(ref.tokenizer)
    n_mine = sum(len(recs) for recs in todo.values())
    desc_bar = f"extract ({ref.name}, {desc['dtype'].replace('torch.', '')})"
    with tqdm(total=n_mine, desc=desc_bar, unit="prompt", disable=not (progress and main)) as bar:
        for s in mine:
            recs = todo[s]
            enc, counts[s] = encoded[s]
            ref_lp, feats, mask, lengths, *kept_rows = _forward_pools(
                ref.model, enc, poolings=POOLINGS if theta0 is None else (), batch_tokens=batch_tokens,
                pad_id=pad, progress=bar, keep_layer=keep_layer,
            )
            if theta0 is None:
                th_lp = ref_lp.clone()
            else:
                enc0, _ = encode_records(recs, theta0.tokenizer, max_length=max_length,
                                         max_prompt_length=max_prompt_length)
                th_lp, feats, _, _ = _forward_pools(
                    theta0.model, enc0, poolings=POOLINGS, batch_tokens=batch_tokens,
                    pad_id=_pad_id(theta0.tokenizer),
                )
            tensors = {
                **{_feature_key(p): feats[p] for p in POOLINGS},
                "ref_logps": ref_lp, "theta0_logps": th_lp, "mask": mask, "lengths": lengths,
                "target": torch.tensor([int(r["target"]) for r in recs], dtype=torch.long),
            }
            if use_cache:
                save_part(folder, shard_stem(s), tensors,
                          dict(expect, ids=[str(r["id"]) for r in recs], shard=s, truncated=counts[s]))
                if states_stem is not None:
                    save_part(folder, shard_stem(s, f"{states_stem}-"), kept_rows[0],
                              dict(expect_states, ids=[str(r["id"]) for r in recs], shard=s))
            else:
                parts[s] = tensors
                if states_stem is not None:
                    state_parts[s] = kept_rows[0]
    if multi:
        state.wait_for_everyone()

    if use_cache:
        for s in range(n_shards):
            got = load_part(folder, shard_stem(s), expect)
            if got is None:
                raise RuntimeError(f"extraction shard {s} missing or corrupt in {folder} after computing it")
            parts[s] = got[0]
            counts[s] = list(got[1].get("truncated", (0, 0, 0)))
            if states_stem is not None:
                got = load_part(folder, shard_stem(s, f"{states_stem}-"), expect_states, need=STATES_STORED)
                if got is None:
                    raise RuntimeError(f"states shard {s} missing or corrupt in {folder} after computing it")
                state_parts[s] = got[0]
    merged = _merge([parts[s] for s in range(n_shards)])
    del parts
    merged_states = None if states_stem is None else _merge_states([state_parts[s] for s in range(n_shards)])
    del state_parts
    if multi:
        state.wait_for_everyone()  # every process has read the shards before the main one removes them
    manifest = dict(
        expect,
        ids=ids,
        description=desc,
        seconds=round(time.time() - t0, 3),
        shapes={k: list(v.shape) for k, v in merged.items()},
        truncated=[sum(c[i] for c in counts.values()) for i in range(3)],
    )
    states_manifest = dict(expect_states or {}, ids=ids, description=desc)
    if use_cache and main:
        save_part(folder, "extracted", merged, manifest)
        if states_stem is not None:
            save_part(folder, states_stem, merged_states, states_manifest)
        for s in range(n_shards):  # the merged files replace the shards
            for stem in [shard_stem(s)] + ([shard_stem(s, f"{states_stem}-")] if states_stem else []):
                for suffix in (".json", ".safetensors"):
                    (folder / f"{stem}{suffix}").unlink(missing_ok=True)
    if multi:
        state.wait_for_everyone()
    warn_truncated(manifest)
    kept = None if states_stem is None else _hidden_states(merged_states, states_manifest)
    done = _to_extracted(merged, manifest, pooling, cache_hit=False, states=kept)
    if use_cache:
        done.meta["entry"] = str(folder)
    return done


def _hidden_states(tensors: dict, manifest: dict) -> HiddenStates:
    return HiddenStates(tensors["states"], tensors["offsets"].long(), tensors["prompt_len"].long(),
                        tensors["cand_len"].long(), list(manifest["ids"]), int(manifest["layer"]))


def load_states(folder: Path, stem: str, expect: dict) -> HiddenStates | None:
    """The :class:`HiddenStates` of a cached-states part, or ``None`` when it is missing, corrupt or for other
    inputs (as :func:`load_part`), or its offsets do not cover its states."""
    got = load_part(folder, stem, expect, need=STATES_STORED)
    if got is None:
        return None
    tensors, manifest = got
    off = tensors.get("offsets")
    if "states" not in tensors or off is None or off.shape[0] != len(manifest["ids"]) + 1 \
            or int(off[-1]) != tensors["states"].shape[0]:
        return None
    return _hidden_states(tensors, manifest)


def _to_extracted(tensors: dict, manifest: dict, pooling: str, *, cache_hit: bool, states=None) -> Extracted:
    """The :class:`Extracted` of a cache entry, its ``features`` in ``pooling``."""
    meta = {k: v for k, v in manifest.items() if k not in ("ids",)}
    meta["cache_hit"] = cache_hit
    meta["pooling"] = pooling
    meta["dtype"] = manifest.get("description", {}).get("dtype")
    return Extracted(
        ids=list(manifest["ids"]),
        features=tensors[_feature_key(pooling)].float(),
        ref_logps=tensors["ref_logps"].float(),
        theta0_logps=tensors["theta0_logps"].float(),
        mask=tensors["mask"].bool(),
        target=tensors["target"].long(),
        meta=meta,
        lengths=tensors["lengths"].long(),
        states=states,
    )


def process_state():
    """accelerate's ``PartialState`` when running under ``accelerate launch`` (several processes), else ``None``.

    Without CUDA (or under ``--cpu``) the state is made with ``cpu=True``, so that the processes talk over gloo:
    on a CPU machine, ``accelerate launch --multi_gpu --num_processes 2 script.py`` starts two CPU processes
    (accelerate 1.15's ``--cpu`` with several processes needs ``mpirun`` and a hostfile)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true")
    return PartialState(cpu=cpu)
