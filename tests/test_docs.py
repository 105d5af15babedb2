"""The docs stay true: every measured figure in README.md and docs/*.md is what docs/render.py renders from the
committed JSONL, every `python` block runs as pasted, and the README keeps its shape and its two commands."""

from __future__ import annotations

import importlib.util
import os
import re
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
    used = {m.group(2) for p in DOCS for m in render.BLOCK.finditer(p.read_text())}
    assert used <= set(render.BLOCKS)
    for name in render.BLOCKS:
        assert render.BLOCKS[name](results).strip(), name


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
