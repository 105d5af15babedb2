"""The docs stay true: every measured figure in README.md and docs/*.md is what docs/render.py renders from the
committed JSONL, every `python` block runs as pasted, and the README keeps its shape and its two commands."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```", re.S | re.M)
TEST_COMMAND = "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]' && python -m pytest -q"
MAIN_COMMAND = "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[tour]' && gptjax train"


def _render_module():
    spec = importlib.util.spec_from_file_location("docs_render", ROOT / "docs" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _render_module()
DOCS = render.doc_files(ROOT)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of each ```python block to run; ```python no-run blocks are shown, not run."""
    blocks = []
    for m in FENCE.finditer(text):
        info = text[m.start(): text.index("\n", m.start())].removeprefix("```").split()
        if info[:1] == ["python"] and "no-run" not in info[1:]:
            blocks.append((text.count("\n", 0, m.start(2)) + 1, m.group(2)))
    return blocks


def test_every_rendered_figure_matches_the_committed_results():
    results = render.load_results()
    stale = [p.relative_to(ROOT).as_posix() for p, (now, new) in render.rendered(results, ROOT).items() if now != new]
    assert not stale, f"figures differ from benchmarks/results/: run `python docs/render.py` ({stale})"


def test_every_render_block_is_known_and_every_figure_renders():
    results = render.load_results()
    used = {m.group(2) for p in DOCS if p.exists() for m in render.BLOCK.finditer(p.read_text())}
    assert used <= set(render.BLOCKS) | set(render.PAGE_BLOCKS)
    pending = {name for p in DOCS if p.exists() for name, _ in render.PENDING.findall(p.read_text())}
    for name in render.BLOCKS:
        try:
            assert render.BLOCKS[name](results).strip(), name
        except render.MissingResults as e:
            assert e.name in pending, f"{name} reads {e.name}, missing and marked pending on no page"


def test_check_passes_on_the_committed_tree_and_lists_what_is_pending():
    bad, pending = render.problems(render.load_results())
    assert bad == []
    assert all(line.startswith("pending: ") for line in pending)


def _copied_results(tmp_path: Path) -> Path:
    folder = tmp_path / "results"
    shutil.copytree(render.RESULTS, folder)
    return folder


def test_a_changed_number_makes_check_name_the_stale_image(tmp_path, capsys):
    folder = _copied_results(tmp_path)
    path = folder / "quick-gpt2-cpu.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    row = next(r for r in rows if r.get("kind") == "workload" and r["backend"] == "jax" and r.get("status") == "ok")
    row["flops_per_s"] *= 1.01  # one number, shown only by the roofline (every picture of the file hashes it)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert render.main(["--check", "--results", str(folder)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"stale image: docs/img/roofline-[0-9a-f]{12}\.png", out), out
    assert "stale: docs/benchmarks.md" in out  # its link names the new hash
    assert "frontier-" not in out  # the pictures of other files are still current


def test_a_missing_results_file_is_named_and_pending_only_by_a_marker(tmp_path, capsys):
    folder = _copied_results(tmp_path)
    (folder / "lm-eval-byte-mini.jsonl").unlink()
    assert render.main(["--check", "--results", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "docs/evaluation.md: block lm-eval-precision: results/lm-eval-byte-mini.jsonl does not exist" in out


def test_a_missing_file_marked_pending_is_listed_not_an_error():
    page = _page("<!-- pending: peers-gpt2-cpu.jsonl not run yet -->\n<!-- render:peers-table --><!-- /render -->\n",
                 {})
    assert page.pending == {"peers-gpt2-cpu.jsonl": "not run yet"}


def _page(text: str, files: dict) -> render.Page:
    page = render.render_page(Path("page.md"), text, render.Results(files))
    render.render_page_blocks(page, render.Results(files), {})
    return page


def test_a_page_mixing_commits_fails_unless_it_says_why():
    env = {"kind": "environment", "env": {"git": "aaaaaaa", "cores": 2, "cpu": "x"}}
    files = {"quick-gpt2-cpu.jsonl": [env, {"kind": "ceiling", "matmul_n": 8, "matmul_flops": {"fp32": 1, "bf16": 1,
                                           "int8": 1}, "bandwidth": {"read": 1, "copy": 1}}],
             "quick-gpt2-cpu-xla-only.jsonl": [env | {"env": env["env"] | {"git": "bbbbbbb"}},
                                               {"kind": "ceiling", "matmul_n": 8, "matmul_flops": {"fp32": 2, "bf16": 2,
                                                "int8": 2}, "bandwidth": {"read": 2, "copy": 2}}]}
    text = "<!-- render:ceilings --><!-- /render -->\n<!-- render:provenance --><!-- /render -->\n"
    page = _page(text, files)
    assert page.used == set(files)
    assert [e for e in page.errors if "mixes commits" in e and "aaaaaaa" in e and "bbbbbbb" in e]
    assert "2 commits (aaaaaaa, bbbbbbb)" in page.new
    assert _page("<!-- mixed-commits: two runs on purpose -->\n" + text, files).errors == []
    assert [e for e in _page("<!-- render:ceilings --><!-- /render -->", files).errors if "no <!-- render:provenance" in e]


def test_results_from_a_commit_that_is_not_an_ancestor_of_head_fail_the_check(monkeypatch):
    if render._git_status("rev-parse", "HEAD") != 0:
        pytest.skip("not a git checkout")
    env = {"kind": "environment", "env": {"git": "1561032"}}  # an ancestor (the frontier run's commit)
    assert render.foreign(render.Results({"a.jsonl": [env]})) == []
    asked = []
    monkeypatch.setattr(render, "_git_status", lambda *a: asked.append(a) or 1)  # git: known, not an ancestor
    lost = {"kind": "environment", "env": {"commit": "d" * 40, "clean": False}}
    assert render.foreign(render.Results({"b.jsonl": [lost]})) == [("b.jsonl", "ddddddd")]
    assert asked == [("merge-base", "--is-ancestor", "ddddddd", "HEAD")]


def test_an_orphan_image_fails_the_check(tmp_path):
    img = tmp_path / "img"
    shutil.copytree(render.IMG, img)
    (img / "old-000000000000.png").write_bytes((img / next(iter(os.listdir(img)))).read_bytes())
    bad, _ = render.problems(render.load_results(), ROOT, img)
    assert bad == [f"orphan image: {img / 'old-000000000000.png'} (no page links it: python docs/render.py deletes it)"]


# ---- the regeneration: docs/pieces.py with fake fast pieces ----------------------------------------------------
def _writer(rows: list[dict], code: int = 0) -> tuple[str, ...]:
    """A tiny command writing rows to {out}/results.jsonl, then exiting with code."""
    body = "".join(json.dumps(r) + "\n" for r in rows)
    script = f"import sys; open(sys.argv[1] + '/results.jsonl', 'w').write({body!r}); sys.exit({code})"
    return (sys.executable, "-c", script, "{out}")


def test_rerun_copies_a_piece_only_when_it_succeeds_and_resume_skips_finished_ones(tmp_path):
    commit = "c" * 40
    env = {"kind": "environment", "env": {"commit": commit, "clean": True, "time": "2026-12-07T20:00:00Z"}}
    ok = render.pieces.Piece("one", _writer([env, {"kind": "study", "x": 1}]), (("results.jsonl", "one.jsonl"),), 0.1,
                             quiet=False)
    bad = render.pieces.Piece("two", _writer([env], code=3), (("results.jsonl", "two.jsonl"),), 0.1, quiet=False)
    folder, runs, log = tmp_path / "results", tmp_path / "runs", []
    assert render.pieces.rerun([ok, bad], folder, runs, commit, load=lambda: 0.0, log=log.append) == 3
    rows = [json.loads(line) for line in (folder / "one.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["environment", "study", "piece"] and rows[-1]["status"] == "ok"
    assert not (folder / "two.jsonl").exists()  # failed: nothing copied; the finished piece is kept
    log.clear()
    assert render.pieces.rerun([ok], folder, runs, commit, resume=True, load=lambda: 0.0, log=log.append) == 0
    assert log == [f"one: already stamped with {commit[:7]}, skipped (--resume)"]


def test_a_quiet_piece_waits_for_the_load_and_stops_when_it_stays_high(tmp_path):
    piece = render.pieces.Piece("timing", _writer([]), (("results.jsonl", "t.jsonl"),), 0.1, quiet=True)
    log = []
    assert render.pieces.rerun([piece], tmp_path / "r", tmp_path / "runs", "c" * 40, load=lambda: 99.0, wait_s=0,
                               log=log.append) == 1
    assert "stopped before timing: the machine stayed busy" in log[-1] and not (tmp_path / "runs").exists()


def test_rerun_refuses_a_dirty_tree_unless_allowed(monkeypatch, capsys):
    monkeypatch.setattr(render, "git", lambda *a: " M gptjax/x.py" if a[0] == "status" else "c" * 40)
    ran = []
    monkeypatch.setattr(render.pieces, "rerun", lambda chosen, *a, **k: ran.append([p.name for p in chosen]) or 7)
    monkeypatch.setattr(render.pieces, "run_helps", lambda chosen: {})
    monkeypatch.setattr(render.pieces, "missing", lambda piece, helps: None)
    assert render.main(["--rerun", "suite"]) == 2 and not ran
    assert "uncommitted changes" in capsys.readouterr().out
    assert render.main(["--rerun", "suite", "--allow-dirty"]) == 7  # the runner's status; nothing rendered after
    assert ran == [["suite"]]


def test_list_marks_a_command_or_flag_that_does_not_exist_yet():
    pieces = render.pieces
    study = pieces.Piece("s", ("gptjax", "bench", "--out", "{out}", "--study", "nope", "--k", "1"), (), 1)
    flag = pieces.Piece("f", ("gptjax", "bench", "--preset", "gpt2", "--shiny"), (), 1)
    helps = {("gptjax", "bench", "--study", "nope", "--help"): (2, "--study 'nope'; allowed: ..."),
             ("gptjax", "bench", "--help"): (0, "usage: --preset --out")}
    assert pieces.missing(study, helps) == "`gptjax bench --study nope` (not a command yet)"
    assert pieces.missing(flag, helps) == "--shiny in `gptjax bench`"
    assert pieces.missing(pieces.Piece("x", ("python", "-c", "pass"), (), 1), helps) is None


def test_rerun_selects_pieces_by_page_and_adds_what_they_need():
    pieces = render.pieces
    page_files = {"evaluation.md": {"lm-eval-byte-mini.jsonl"}}
    assert [p.name for p in pieces.select(["evaluation.md"], page_files)] == ["readme", "lm-eval"]
    assert [p.name for p in pieces.select(["all"], page_files)] == [p.name for p in pieces.PIECES]
    with pytest.raises(SystemExit, match="not a piece or page"):
        pieces.select(["nonsense"], page_files)


def test_linked_pages_and_images_exist():
    for page in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"


def test_readme_is_short_and_keeps_its_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert MAIN_COMMAND in readme and TEST_COMMAND in readme
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text()  # CI runs exactly the README's test command


def test_the_readme_installs_what_it_suggests():
    """The first command's extra holds what the README then suggests running (tensorboard) and the docs draw with."""
    import tomllib

    tour = " ".join(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["tour"])
    assert "tensorboard --logdir" in (ROOT / "README.md").read_text()
    for package in ("tensorboard", "matplotlib", "fastapi", "uvicorn", "opentelemetry-sdk"):
        assert package in tour, package


def _tour(text: str, prefix: str) -> list[tuple[int, str]]:
    """(number, page) of each numbered tour entry linking a page under prefix."""
    return [(int(n), page) for n, page in re.findall(r"^\|? ?\[?(\d+)\.? ?\[?[^\]\n]*\]\(" + re.escape(prefix)
                                                      + r"([\w-]+\.md)\)", text, re.MULTILINE)]


def test_the_tour_lists_every_page_in_one_order():
    """docs/README.md's table and the README's list: every docs/*.md chapter once, numbered 1.. in the same order."""
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"README.md"}
    table = _tour((ROOT / "docs" / "README.md").read_text(), "")
    listed = _tour((ROOT / "README.md").read_text(), "docs/")
    assert [n for n, _ in table] == list(range(1, len(table) + 1)), table
    assert sorted(page for _, page in table) == sorted(pages), "docs/README.md's table must list every chapter once"
    assert listed == table, "README.md's tour list must be docs/README.md's table, in the same order and numbers"


def test_fences_parse():
    """An unclosed or stray fence would hide snippets from the runner below."""
    for page in DOCS:
        assert page.read_text().count("\n```") % 2 == 0, page


RUNNER = textwrap.dedent("""
    import sys
    namespace = {"__name__": "__main__"}
    for line, code in BLOCKS:
        try:
            exec(compile(code, f"{PAGE}:{line}", "exec"), namespace)
        except BaseException:
            print(f"snippet at {PAGE} line {line} failed", file=sys.stderr)
            raise
""")


@pytest.mark.slow  # a fresh JAX process per page: about 10-40 s each on 2 cores
@pytest.mark.parametrize("page", [p for p in DOCS if python_blocks(p.read_text())],
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_snippets_run_as_pasted(page, tmp_path):
    blocks = python_blocks(page.read_text())
    name = page.relative_to(ROOT).as_posix()
    script = f"BLOCKS = {blocks!r}\nPAGE = {name!r}\n" + RUNNER
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8", MPLBACKEND="Agg")
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, f"{name}:\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
