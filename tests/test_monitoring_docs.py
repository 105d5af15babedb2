"""docs/monitoring.md's two pictures stay drawn from their committed data: each is named by the hash of its
results file (benchmarks/results/monitoring-*.jsonl) and drawing code, and embeds it, so other data means another
picture name in the document (stale text) and a picture missing or embedding another hash (stale image); `python
docs/render.py --check` fails on either."""

import shutil
from pathlib import Path

from test_docs import render  # docs/render.py, loaded as test_docs loads it

ROOT = Path(__file__).resolve().parent.parent
STEMS = ("monitoring-signals", "monitoring-trace")
SIGNALS = "monitoring-signals.jsonl"


def test_the_pictures_are_drawn_from_the_committed_data_and_linked_from_the_page():
    results = render.load_results()
    assert render.stale_images(results) == []
    page = (ROOT / "docs" / "monitoring.md").read_text()
    for stem in STEMS:
        plot = render.PLOTS[stem]
        rows = results[plot.files[0]]
        assert rows[0]["kind"] == "run" and rows[0]["commit"]  # stamped with the commit
        assert f"](img/{plot.file_name(results)})" in page
        assert render.png_source(render.IMG / plot.file_name(results)) == f"sha256:{plot.data_hash(results)}"


def test_other_data_makes_the_page_and_the_picture_stale(tmp_path):
    results = render.load_results()
    changed = render.Results(dict(results) | {SIGNALS: results[SIGNALS][:-1]})  # one series fewer
    name = render.PLOTS["monitoring-signals"].file_name(changed)
    assert render.stale_images(changed) == [render.IMG / name]  # no picture of that data
    assert render.BLOCKS["monitoring-signals"](changed) != render.BLOCKS["monitoring-signals"](results)


def test_a_picture_embedding_another_hash_is_stale(tmp_path):
    results = render.load_results()
    signals, trace = (render.PLOTS[stem].file_name(results) for stem in STEMS)
    for other in render.IMG.glob("*.png"):
        if other.name not in (signals, trace):
            shutil.copy(other, tmp_path / other.name)
    shutil.copy(render.IMG / trace, tmp_path / trace)
    shutil.copy(render.IMG / trace, tmp_path / signals)  # the right name, the wrong picture
    assert render.stale_images(results, tmp_path) == [tmp_path / signals]
