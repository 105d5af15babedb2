"""Render every measured number in README.md and docs/*.md from the JSONL committed under benchmarks/results/.

A figure in the prose sits between `<!-- render:NAME -->` and `<!-- /render -->`; NAME is a block of docs/figures/
(`@block`), and `img-STEM` links a picture (`@plot`), drawn as docs/img/STEM-<hash>.png, the hash of its data and
drawing code, which the PNG also embeds. `python docs/render.py` rewrites the blocks, draws the pictures and
deletes pictures no page links; `--check` changes nothing and exits 1 naming each stale page, each missing, stale or
orphan picture, each results file a page reads that does not exist (unless the page says
`<!-- pending: FILE REASON -->`, listed as pending), and each page whose figures come from several commits (unless it
says `<!-- mixed-commits: REASON -->`). Every page that shows results ends with a `<!-- render:provenance -->` block:
the commit, time, CPU, load and ceilings of each file it read.

`--list` prints the pieces (docs/pieces.py) that regenerate the results and whether each command exists yet;
`--rerun all | PAGE.md | PIECE...` runs them (each in its own process) and then renders.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

# docs/ (the figures package, the pieces manifest) and the tree's root: the gptjax this tree holds, not an
# installed copy, is what the figures and the stamps of --rerun's own rows describe
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import pieces
from figures import BLOCKS, PLOTS

# Page is a dataclass, so it lives in a module sys.modules knows (tests/test_docs.py loads this file by path)
from figures.common import RESULTS, ROOT, MissingResults, Page, Results
from figures.provenance import PAGE_BLOCKS, PageContext, commit_of

IMG = ROOT / "docs" / "img"
BLOCK = re.compile(r"(<!-- render:([a-z0-9-]+) -->)(.*?)(<!-- /render -->)", re.DOTALL)
PENDING = re.compile(r"<!-- pending: (\S+) (.*?) -->")
MIXED = re.compile(r"<!-- mixed-commits: (.+?) -->", re.DOTALL)
IMAGE_LINK = re.compile(r"\]\(img/([^)\s]+\.png)\)")


def load_results(folder: Path = RESULTS) -> Results:
    """Every results file under folder, by file name: a list of its JSON lines."""
    return Results({p.name: [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
                    for p in sorted(folder.glob("*.jsonl"))}, folder)


def doc_files(root: Path = ROOT) -> list[Path]:
    """The markdown files whose blocks are rendered (and whose Python snippets the tests run)."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md")), root / "benchmarks" / "results" / "README.md"]


def _as_results(results: dict[str, Any]) -> Results:
    return results if isinstance(results, Results) else Results(results)


def render_page(path: Path, text: str, results: Results) -> Page:
    """The page's ordinary blocks rendered; a block reading a missing file keeps its text (an error unless the page
    marks that file pending). Page blocks (provenance, results-index) are left for render_page_blocks."""
    page = Page(path, text, text, set(), dict(PENDING.findall(text)), [])

    def one(m: re.Match) -> str:
        name = m.group(2)
        if name in PAGE_BLOCKS:
            return m.group(0)
        if name not in BLOCKS:
            raise KeyError(f"unknown render block {name!r}; known: {sorted(BLOCKS) + sorted(PAGE_BLOCKS)}")
        view = results.recorder()
        try:
            return m.group(1) + BLOCKS[name](view) + m.group(4)
        except MissingResults as e:
            if e.name not in page.pending:
                page.errors.append(f"{_rel(path)}: block {name}: {e}")
            return m.group(0)
        finally:
            page.used |= view.used

    page.new = BLOCK.sub(one, text)
    return page


def render_page_blocks(page: Page, results: Results, reads: dict[str, list[str]]) -> None:
    """Render the page's provenance and results-index blocks, and check it shows one commit (or says why not)."""
    context = PageContext(tuple(sorted(page.used)), reads, page.pending)
    page.new = BLOCK.sub(lambda m: m.group(1) + PAGE_BLOCKS[m.group(2)](results, context) + m.group(4)
                         if m.group(2) in PAGE_BLOCKS else m.group(0), page.new)
    present = sorted(n for n in page.used if n in results)
    commits = {n: commit_of(dict.__getitem__(results, n)) for n in present}
    if len(set(commits.values())) > 1 and not MIXED.search(page.text):
        page.errors.append(f"{_rel(page.path)} mixes commits ({', '.join(f'{n}@{c}' for n, c in commits.items())}): "
                           "regenerate (python docs/render.py --rerun PAGE) or say why: <!-- mixed-commits: REASON -->")
    if present and "<!-- render:provenance -->" not in page.text:
        page.errors.append(f"{_rel(page.path)} shows results but has no <!-- render:provenance --><!-- /render --> block")


def pages(results: dict[str, Any], root: Path = ROOT) -> list[Page]:
    """Every document rendered from results, with what each read and its errors."""
    results = _as_results(results)
    done = [render_page(p, p.read_text(), results) for p in doc_files(root) if p.exists()]
    reads: dict[str, list[str]] = {}
    for page in done:
        for name in sorted(page.used):
            reads.setdefault(name, []).append(_rel(page.path, root))
    for page in done:
        render_page_blocks(page, results, reads)
    return done


def rendered(results: dict[str, Any], root: Path = ROOT) -> dict[Path, tuple[str, str]]:
    """For each document: (its text now, its text rendered from results)."""
    return {p.path: (p.text, p.new) for p in pages(results, root)}


def render_text(text: str, results: dict[str, Any]) -> str:
    """text with every ordinary block re-rendered (page blocks as they are)."""
    return render_page(Path("text.md"), text, _as_results(results)).new


def _rel(path: Path, root: Path = ROOT) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


# ---- pictures: named by the hash of their data and code ---------------------------------------------------------
def png_source(path: Path) -> str | None:
    """The Source text a PNG embeds ('sha256:...'), or None."""
    from PIL import Image  # matplotlib's own dependency

    with Image.open(path) as image:
        return image.text.get("Source")


def drawable(results: Results) -> list[Any]:
    """The plots whose results files all exist."""
    return [p for p in PLOTS.values() if all(n in results for n in p.files)]


def stale_images(results: dict[str, Any], img: Path = IMG) -> list[Path]:
    """The pictures that are missing, or embed another hash than their data and code have now."""
    results = _as_results(results)
    return [img / p.file_name(results) for p in drawable(results)
            if not (img / p.file_name(results)).exists()
            or png_source(img / p.file_name(results)) != f"sha256:{p.data_hash(results)}"]


def orphans(done: list[Page], img: Path = IMG) -> list[Path]:
    """Pictures in img/ that no rendered page links."""
    linked = {name for page in done for name in IMAGE_LINK.findall(page.new)}
    return sorted(p for p in img.glob("*.png") if p.name not in linked)


def figure(plot: Any, results: Results) -> Any:
    """The plot's figure, drawn with readable defaults (no text under 8 pt); an error if it read other files than
    it declares (its hash would not cover them)."""
    import matplotlib

    matplotlib.use("Agg")
    view = results.recorder()
    with matplotlib.rc_context({"font.size": 9, "legend.fontsize": 8, "xtick.labelsize": 8, "ytick.labelsize": 8}):
        fig = plot.draw(view)
        fig.tight_layout()
    if view.used - set(plot.files):
        raise RuntimeError(f"plot {plot.stem} read {sorted(view.used - set(plot.files))}, not in its files")
    return fig


def draw(results: Results, img: Path = IMG) -> None:
    """Draw every picture that is missing or stale, embedding its hash (no version stamp: same data, same bytes)."""
    import matplotlib.pyplot as plt

    stale = stale_images(results, img)
    for plot in drawable(results):
        path = img / plot.file_name(results)
        if path in stale:
            fig = figure(plot, results)
            img.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=100, metadata={"Software": None, "Source": f"sha256:{plot.data_hash(results)}"})
            plt.close(fig)
            print(f"drew {_rel(path)}")


# ---- the command ------------------------------------------------------------------------------------------------
def problems(results: Results, root: Path = ROOT, img: Path = IMG) -> tuple[list[str], list[str]]:
    """(what makes --check fail, what it only lists: pending files)."""
    done = pages(results, root)
    bad = [f"stale: {_rel(p.path, root)} (run python docs/render.py)" for p in done if p.new != p.text]
    bad += [e for p in done for e in p.errors]
    bad += [f"stale image: {_rel(p, root)} (missing, or drawn from other data or code: run python docs/render.py)"
            for p in stale_images(results, img)]
    bad += [f"orphan image: {_rel(p, root)} (no page links it: python docs/render.py deletes it)"
            for p in orphans(done, img)]
    bad += [f"{name}: stamped with {commit}, which is not an ancestor of HEAD (data from another branch)"
            for name, commit in foreign(results)]
    pending = [f"pending: {_rel(p.path, root)}: {name} ({why})" for p in done for name, why in p.pending.items()]
    return bad, pending


def foreign(results: Results) -> list[tuple[str, str]]:
    """(file, commit) for each results file stamped with a commit git knows that is not an ancestor of HEAD (a
    commit git does not know, e.g. in a shallow clone, is not judged)."""
    found = []
    for name in sorted(results):
        for commit in commit_of(dict.__getitem__(results, name)).split(" + "):
            commit = commit.removesuffix("+dirty")
            if commit != "not stamped" and _git_status("merge-base", "--is-ancestor", commit, "HEAD") == 1:
                found.append((name, commit))
    return found


def _git_status(*args: str) -> int | None:
    """git's exit status (1 for merge-base --is-ancestor: known, not an ancestor), None outside a checkout."""
    try:
        return subprocess.run(["git", *args], check=False, cwd=ROOT, capture_output=True, timeout=10).returncode
    except (OSError, subprocess.SubprocessError):
        return None


def git(*args: str) -> str:
    """git's output in the repository (empty outside a checkout)."""
    try:
        return subprocess.run(["git", *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def write(results: Results) -> int:
    """Rewrite the stale pages, draw the pictures, delete the orphans; exit 1 (naming them) on page errors."""
    done = pages(results)
    for page in done:
        if page.new != page.text:
            page.path.write_text(page.new)
            print(f"rendered {_rel(page.path)}")
    draw(results)
    for path in orphans(done):
        path.unlink()
        print(f"deleted {_rel(path)} (no page links it)")
    errors = [e for p in done for e in p.errors]
    print(*errors, sep="\n") if errors else None
    return 1 if errors else 0


def rerun(args: argparse.Namespace) -> int:
    """Run the chosen pieces at a clean HEAD (or --allow-dirty), then render."""
    commit = git("rev-parse", "HEAD")
    if git("status", "--porcelain", "--untracked-files=no") and not args.allow_dirty:
        print("the tree has uncommitted changes, so the stamps would name code that is not committed: commit first, "
              "or pass --allow-dirty")
        return 2
    page_files = {_rel(p.path): p.used for p in pages(load_results(args.results))}
    page_files |= {Path(k).name: v for k, v in page_files.items()}
    chosen = pieces.select(args.rerun, page_files)
    helps = pieces.run_helps(chosen)
    for p in list(chosen):  # in order, so a piece whose needs were skipped is skipped too; the rest still run
        if why := pieces.missing(p, helps) or ", ".join(set(p.needs) - {q.name for q in chosen}):
            chosen.remove(p)
            print(f"skipped {p.name}: needs {why}")
    print(f"{len(chosen)} pieces, about {sum(p.minutes for p in chosen):.0f} min: {', '.join(p.name for p in chosen)}")
    runs = ROOT / "runs" / f"docs-{commit[:7] or 'unknown'}"
    code = pieces.rerun(chosen, args.results, runs, commit, resume=args.resume, busy_ok=args.busy_ok)
    return code or write(load_results(args.results))


def main(argv: list[str] | None = None) -> int:
    """Render (default), --check, --list or --rerun."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if anything is stale or wrong")
    parser.add_argument("--list", action="store_true", help="the pieces that regenerate the results, and their state")
    parser.add_argument("--rerun", nargs="+", metavar="all|PAGE.md|PIECE", help="run these pieces, then render")
    parser.add_argument("--resume", action="store_true", help="with --rerun: skip pieces already stamped with HEAD")
    parser.add_argument("--allow-dirty", action="store_true", help="with --rerun: run on uncommitted changes")
    parser.add_argument("--busy-ok", action="store_true", help="with --rerun: do not wait for a quiet machine")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.list:
        print(*pieces.listing(pieces.PIECES, args.results), sep="\n")
        return 0
    if args.rerun:
        return rerun(args)
    results = load_results(args.results)
    if not args.check:
        return write(results)
    bad, pending = problems(results)
    print(*bad, *pending, sep="\n") if bad or pending else None
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
