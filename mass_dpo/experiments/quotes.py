"""Numbers that a gallery's hand-written text quotes, checked against the tables it links.

``papers_figures/README.md`` explains the results in prose and quotes their numbers ("MRR -4.9 (-7.1 to -2.7)").
The tables are rewritten by every ``mass-dpo reproduce``; the prose is not. :func:`unsourced_quotes` finds each
quoted decimal number that none of the text's sources holds any more, so a rerun on other data, settings or
hardware says which sentences now contradict their tables (``mass-dpo reproduce`` prints them;
``python -m mass_dpo.experiments.quotes`` checks it and the project's ``README.md`` by hand).

The rules, made to be predictable rather than clever:

- A *block* is one table row, one bullet (with its continuation lines) or one paragraph.
- Its *sources* are the gallery files its own links name (a ``.md`` or ``.png`` link reads the file and its ``.csv``
  sibling, the figure's plotted numbers; an executed notebook's link reads what it printed; a folder link reads
  every CSV and Markdown file in it), or, for a block without such links, those of its whole section (heading to
  heading). Links that leave the gallery's folder (``../docs``) and other ``README.md`` files are not sources: they
  are hand-written too (the project's ``README.md`` is checked against ``papers_figures/`` only). A number inside a
  label (``smollm2``, ``fit_sdpo_19``, ``MASS-DPO-5``) is not a number of its source.
- A *quote* is a decimal number written with a point (``-4.9``, ``0.53``, ``72.9``, a ratio ``3.8x``) or a whole
  percentage (``77%``, both ends of ``48-65%``; not "95% interval"), outside inline code and references into the
  paper (``Assumption 4.1``, ``Sections 4, 6.4``). Other integers are counts and settings (``n = 3``,
  ``500 test prompts``) and are not checked.
- A quote with ``k`` decimals is *sourced* when some number in the sources, as a fraction, in percent (x 100) or
  as a percentage read as a fraction (x 0.01), rounds to it at ``k`` decimals (signs ignored: the text writes
  "loses 4.9" as often as "-4.9").
- A difference with its interval, ``-4.9 (-7.1 to -2.7)`` or ``+3.4, +0.5 to +6.4``, and a gain with its z
  (``+7.2, z 4.40``) are sourced only when one row of one source (a line of a CSV or Markdown table) holds them all.
- A block that quotes something other than the tables (history, the paper's text) carries the HTML comment
  ``<!-- unchecked: why -->`` and is skipped.

What it can and cannot tell: a lone one-decimal quote among a table's hundreds of numbers usually finds one that
rounds to it by chance, so the check finds numbers that nothing in their sources supports (a stale value, a typo, a
wrong link) and intervals or z that no row holds; it does not prove a lone number right.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)\s]*)?\)")
_CODE = re.compile(r"`[^`]*`")
#: A decimal (``-4.9``, also a ratio ``3.8x``) or a whole percentage (``77%``, ``48-65%``; not the "95% interval").
_QUOTE = re.compile(r"(?<![\w.])[-+]?\d+\.\d+(?=[x\u00d7](?!\w)|(?![\w.]))"
                    r"|(?<![\w.-])\d{1,3}(?=(?:-\d{1,3})?%)(?!% (?:interval|confidence|CI))|(?<=\d-)\d{1,3}(?=%)")
#: A number of a source, not one inside a label (``smollm2``, ``fit_sdpo_19``, ``MASS-DPO-5``).
_NUMBER = re.compile(r"(?<![A-Za-z_\d.])(?<![A-Za-z_]-)[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
#: Quotes that belong together and must come from one row: a difference with its interval, a gain with its z.
_GROUPS = (
    (re.compile(r"([-+]?\d+\.\d+)(?:\s+points)?(?:\s*\(|,\s*)([-+]?\d+\.\d+)\s+to\s+([-+]?\d+\.\d+)"),
     "{0} ({1} to {2})"),
    (re.compile(r"([-+]?\d+\.\d+)(?:\s+points)?,\s*z\s*=?\s*(\d+\.\d+)"), "{0}, z {1}"),
)
#: References into the paper ("Assumption 4.1", "Sections 4, 6.4", "appendix C.4"): numbers that are no results.
_REFERENCE = re.compile(r"\b(?:Assumptions?|Sections?|[Aa]ppendix|Theorems?|Lemmas?|Propositions?|Corollary|Definitions?|"
                        r"Equations?|Eq\.|Tables?|Figures?|Algorithm)\s+[A-Z]?\d+(?:\.\d+)*(?:\s*[,-]\s*[A-Z]?\d+(?:\.\d+)*)*")
_UNCHECKED = "<!-- unchecked:"
#: The scales a quote may be written at against its source: as stored, in percent, a stored percentage as a fraction.
SCALES = (1.0, 100.0, 0.01)


@dataclass
class Unsourced:
    """A block of text and its quotes that none of its sources holds."""

    line: int  # first line of the block (1-based)
    text: str
    quotes: list[str]
    sources: list[str]

    def __str__(self) -> str:
        head = self.text if len(self.text) <= 100 else self.text[:97] + "..."
        where = ", ".join(self.sources) if self.sources else "no gallery file linked"
        return f"line {self.line}: {', '.join(self.quotes)} not in {where}: {head}"


def blocks(text: str) -> list[tuple[int, str, int]]:
    """``[(first line, block text, section index)]``: table rows, bullets and paragraphs; headings start sections."""
    out, cur, start, section = [], [], 0, 0

    def flush():
        if cur:
            out.append((start, " ".join(cur), section))
            cur.clear()

    fenced = False
    for i, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if s.startswith("```"):
            flush()
            fenced = not fenced
            continue
        if fenced:
            continue
        if s.startswith("#"):
            flush()
            section += 1
        elif not s:
            flush()
        elif s.startswith("|"):
            flush()
            out.append((i, s, section))
        elif s.startswith(("- ", "* ")):
            flush()
            cur.append(s)
            start = i
        else:
            if not cur:
                start = i
            cur.append(s)
    flush()
    return out


def gallery_of(readme: Path) -> Path:
    """The folder whose files a README's quotes may come from: its own, or for a project README beside a gallery
    (``papers_figures/README.md``), that gallery (the project's ``docs/`` are hand-written, no source)."""
    beside = Path(readme).parent / "papers_figures"
    return beside if (beside / "README.md").is_file() else Path(readme).parent


def links(text: str, root: Path, gallery: Path | None = None) -> list[str]:
    """The gallery files and folders a piece of text links, relative to ``root`` (the text's folder), in order,
    once each; only those inside ``gallery`` (default: ``root``) count."""
    out = []
    inside = (root if gallery is None else gallery).resolve()
    for target in _LINK.findall(text):
        if "://" in target:
            continue
        path = (root / target).resolve()
        if not path.is_relative_to(inside) or path.name == "README.md":
            continue
        out.append(target)
    return list(dict.fromkeys(out))


def _files(root: Path, target: str) -> list[Path]:
    path = root / target
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in (".csv", ".md") and p.name != "README.md")
    candidates = [path] if path.suffix in (".csv", ".md", ".ipynb") else []
    return [p for p in dict.fromkeys(candidates + [path.with_suffix(".csv"), path.with_suffix(".md")]) if p.is_file()]


def numbers_in(text: str) -> np.ndarray:
    """Every number written in a text (a CSV's cells, a Markdown table's), as sorted absolute values."""
    return np.unique(np.abs(np.asarray(_NUMBER.findall(text), dtype=float)))  # every token parses as a float


def sourced(quote: str, values: np.ndarray) -> bool:
    """Whether some value (sorted, absolute) rounds to ``quote`` at its own decimals, at one of :data:`SCALES`."""
    decimals = len(quote.split(".")[1]) if "." in quote else 0
    target, half = abs(float(quote)), 0.5 * 10.0 ** -decimals * (1 + 1e-9) + 1e-12
    for scale in SCALES:
        lo, hi = (target - half) / scale, (target + half) / scale
        i = np.searchsorted(values, lo, side="left")
        if i < len(values) and values[i] <= hi:
            return True
    return False


def _prose(block: str) -> str:
    return _REFERENCE.sub(" ", _LINK.sub("]", _CODE.sub(" ", block)))


def quotes(block: str) -> list[str]:
    """The decimal numbers a block quotes, outside inline code and link targets."""
    return _QUOTE.findall(_prose(block))


def groups(block: str) -> list[tuple[str, tuple[str, ...]]]:
    """The quotes that belong together (:data:`_GROUPS`): ``[(as written, (number, ...))]``."""
    text = _prose(block)
    return [(form.format(*m), m) for pattern, form in _GROUPS for m in pattern.findall(text)]


def unsourced_quotes(readme: str | Path, *, text: str | None = None, gallery: str | Path | None = None
                     ) -> list[Unsourced]:
    """Every block of ``readme`` with quotes that its sources (see the module's rules) do not hold; ``text`` checks
    that text in ``readme``'s place (its links read from ``readme``'s folder); ``gallery``: the folder whose files
    are sources (default: :func:`gallery_of`)."""
    readme = Path(readme)
    gallery = gallery_of(readme) if gallery is None else Path(gallery)
    root = readme.parent
    text = readme.read_text(encoding="utf-8") if text is None else text
    parsed = blocks(text)
    by_section: dict[int, list[str]] = {}
    for _, block, section in parsed:
        by_section.setdefault(section, []).extend(links(block, root, gallery))
    texts: dict[Path, str] = {}
    pools: dict[str, np.ndarray] = {}
    rows: dict[Path, list[np.ndarray]] = {}

    def text_of(path: Path) -> str:
        if path not in texts:
            texts[path] = path.read_text(encoding="utf-8", errors="replace")
        return texts[path]

    def pool(target: str) -> np.ndarray:
        """Every number of a source."""
        if target not in pools:
            pools[target] = numbers_in("\n".join(text_of(p) for p in _files(root, target)))
        return pools[target]

    def in_one_row(numbers, sources) -> bool:
        for path in (p for s in sources for p in _files(root, s)):
            if path not in rows:  # parsed only for a file that a group of quotes needs
                rows[path] = [numbers_in(line) for line in text_of(path).splitlines()]
            if any(all(sourced(q, row) for q in numbers) for row in rows[path]):
                return True
        return False

    out = []
    for line, block, section in parsed:
        found = quotes(block)
        if not found or _UNCHECKED in block:
            continue
        sources = links(block, root, gallery) or list(dict.fromkeys(by_section.get(section, [])))
        values = np.unique(np.concatenate([pool(s) for s in sources])) if sources else np.empty(0)
        missing = [q for q in found if not sourced(q, values)]
        missing += [f"{written} in one row" for written, numbers in groups(block) if not in_one_row(numbers, sources)]
        if missing:
            out.append(Unsourced(line, block, missing, sources))
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    checkout = Path(__file__).resolve().parents[2]  # the project's own gallery and README, from any folder
    paths = args or [checkout / "papers_figures" / "README.md", checkout / "README.md"]
    bad = 0
    for path in paths:
        if not Path(path).is_file():
            print(f"{path}: no such file; give the README of a gallery (default: this checkout's)", file=sys.stderr)
            return 2
        found = unsourced_quotes(path)
        for u in found:
            print(f"{path}: {u}")
        bad += len(found)
        if not found:
            print(f"{path}: every quoted number is in the tables it links")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
