"""The pictures are readable: every docs picture (docs/render.py's plots, drawn on the committed data) keeps its
text at 8 pt or more, labels at least two ticks on each log axis, never gives two legend entries the same colour,
marker and line, and the frontier draws its Pareto points as a line."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
from matplotlib.collections import PathCollection
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.text import Text
from test_docs import render  # docs/render.py, loaded as test_docs loads it

RESULTS = render.load_results()
DRAWABLE = [p.stem for p in render.drawable(RESULTS)]


@pytest.fixture(scope="module", params=DRAWABLE)
def drawn(request):
    fig = render.figure(render.PLOTS[request.param], RESULTS)
    fig.canvas.draw()
    yield request.param, fig
    plt.close(fig)


def _look(handle) -> tuple:
    """What tells a legend entry apart: colour, marker and line style (hatch for bars)."""
    if isinstance(handle, Line2D):
        return ("line", str(handle.get_color()), str(handle.get_marker()), str(handle.get_linestyle()))
    if isinstance(handle, PathCollection):
        path = handle.get_paths()[0].vertices.round(3).tobytes()
        return ("points", handle.get_facecolor().round(3).tobytes(), handle.get_edgecolor().round(3).tobytes(), path)
    if isinstance(handle, Patch):
        return ("patch", tuple(handle.get_facecolor()), handle.get_hatch())
    return ("other", id(handle))


def test_render_every_picture_is_drawn():
    assert set(DRAWABLE) >= {"decode-by-precision", "roofline", "frontier", "monitoring-signals", "monitoring-trace"}


def test_render_no_text_under_8_points(drawn):
    stem, fig = drawn
    small = [(t.get_text(), t.get_fontsize()) for t in fig.findobj(Text) if t.get_text().strip() and t.get_visible()
             and t.get_fontsize() < 8]
    assert not small, f"{stem}: {small[:5]}"


def test_render_log_axes_label_at_least_two_ticks(drawn):
    stem, fig = drawn
    for ax in fig.axes:
        for axis, lim in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            if axis.get_scale() != "log":
                continue
            low, high = sorted(lim)
            labelled = [t for t in axis.get_major_ticks() if low <= t.get_loc() <= high and t.label1.get_visible()
                        and t.label1.get_text()]
            assert len(labelled) >= 2, f"{stem}: a log axis labels {len(labelled)} tick(s)"


def test_render_no_two_legend_entries_look_alike(drawn):
    stem, fig = drawn
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is None:
            continue
        looks = [_look(h) for h in legend.legend_handles]
        assert len(set(looks)) == len(looks), f"{stem}: {[t.get_text() for t in legend.get_texts()]}"


def test_render_frontier_draws_its_pareto_line_through_several_points():
    fig = render.figure(render.PLOTS["frontier"], RESULTS)
    for ax in fig.axes:
        [line] = [ln for ln in ax.get_lines() if ln.get_label().startswith("Pareto")]
        assert len(line.get_xdata()) >= 2  # a line, not one point: non-dominated over size, speed and bits/byte
    plt.close(fig)


def test_render_non_dominated_over_three_objectives():
    frontier = pytest.importorskip("figures.frontier")
    # (size, -speed, bits/byte): the small slow one and the big fast one both stay; the one worse at all goes
    assert frontier.non_dominated([(1, -1, 3.0), (5, -9, 2.5), (6, -2, 3.1)]) == [True, True, False]
