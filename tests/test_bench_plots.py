"""The benchmark plots (gptjax.bench.plots) are readable: on every axis at least two labelled major ticks in view (log axes included), every
text at least 8 pt, no two plotted series alike (colour, marker, line style), a legend where there are several
series, and on the roofline every measured ceiling drawn and labelled and no point labelled."""

import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from gptjax.bench.plots import FONT, MODE_COLOURS, figures, log_axis, plain_number, roofs  # noqa: E402

CEILING = {"kind": "ceiling", "matmul_flops": {"fp32": 1.6e11, "bf16": 1.5e11, "int8": 2.8e11},
           "kernel_flops": {"bf16": 2.3e11, "int8": 6.2e11}, "bandwidth": {"read": 1.8e10}}


def _rows() -> list[dict]:
    """A synthetic run: gptjax and one peer, four modes, prefill at two lengths, decode at two batches, train."""
    rows, n = [CEILING], 0
    for backend in ("jax", "hf"):
        for mode in ("fp32", "bf16", "int8", "w8a8"):
            shapes = [("prefill", 1, 128), ("prefill", 1, 512), ("decode", 1, None), ("decode", 8, None)]
            shapes += [("train", 4, 64)] if mode in ("fp32", "bf16") else []
            for workload, batch, seq in shapes:
                n += 1
                flops = 1e9 * (2 + n % 5)
                rows.append({"kind": "workload", "status": "ok", "workload": workload, "backend": backend,
                             "precision": mode, "batch": batch, "seq": seq, "flops": flops, "flops_per_s": flops / 20,
                             "bytes_moved": (flops / 40 if workload != "decode" else flops / 2) if backend == "jax"
                             else None, "tokens_per_s": 10.0 * batch * (1 + n % 3),
                             "times_s": [0.01 * (1 + i + n % 4) for i in range(5)],
                             "per_token_s": [0.002 * (1 + i) for i in range(20)] if workload == "decode" else None})
    return rows


def _texts(fig) -> list:
    return [t for t in fig.findobj(matplotlib.text.Text) if t.get_text() and t.get_visible()]


def _series(ax) -> list[tuple]:
    return [(line.get_color(), line.get_marker(), str(line.get_linestyle())) for line in ax.get_lines()]


@pytest.fixture(scope="module")
def figs():
    out = figures(_rows())
    for fig in out.values():
        fig.canvas.draw()
    yield out
    import matplotlib.pyplot as plt

    plt.close("all")


def test_bench_plots_have_two_labelled_ticks_on_every_axis(figs):
    assert set(figs) == {"throughput_vs_batch", "roofline", "latency_cdf"}
    for name, fig in figs.items():
        for ax in fig.axes:
            for axis, (lo, hi) in ((ax.xaxis, sorted(ax.get_xlim())), (ax.yaxis, sorted(ax.get_ylim()))):
                shown = [t for t, label in zip(axis.get_majorticklocs(), axis.get_majorticklabels())
                         if lo <= t <= hi and label.get_text()]
                assert len(shown) >= 2, f"{name}: {axis.axis_name} axis has {len(shown)} labelled ticks in view"


def test_bench_plots_text_is_at_least_8pt_and_plain(figs):
    for name, fig in figs.items():
        small = [(t.get_text(), t.get_fontsize()) for t in _texts(fig) if t.get_fontsize() < FONT]
        assert not small, f"{name}: text under {FONT} pt: {small[:3]}"
        assert not [t.get_text() for t in _texts(fig) if "\\times" in t.get_text() or "^{" in t.get_text()]
    assert [plain_number(v) for v in (0.5, 20, 2000, 1.5e6, 3e9, 6.2e11)] == ["0.5", "20", "2k", "1.5M", "3G",
                                                                             "620G"]


def test_bench_plots_series_are_distinct_and_legended(figs):
    for name, fig in figs.items():
        for ax in fig.axes:
            series = _series(ax)
            assert len(series) == len(set(series)), f"{name}: two series look alike"
            if len(ax.get_legend_handles_labels()[0]) > 1:
                assert ax.get_legend() is not None and all(t.get_fontsize() >= FONT
                                                           for t in ax.get_legend().get_texts())
    throughput = figs["throughput_vs_batch"].axes[0]
    colours = {line.get_label(): line.get_color() for line in throughput.get_lines()}
    assert colours["jax int8"] == colours["hf int8"] == MODE_COLOURS["int8"]  # the colour is the mode
    styles = {line.get_label(): str(line.get_linestyle()) for line in throughput.get_lines()}
    assert styles["jax fp32"] == styles["jax bf16"] != styles["hf fp32"]  # the line style is the backend
    assert len(figs["latency_cdf"].axes) == 3  # one panel per workload


def test_bench_roofline_draws_every_measured_ceiling_and_labels_no_point(figs):
    ax = figs["roofline"].axes[0]
    assert roofs(CEILING) == {"xla fp32": 1.6e11, "xla bf16": 1.5e11, "xla int8": 2.8e11, "kernel bf16": 2.3e11,
                              "kernel int8": 6.2e11}
    labels = [t.get_text().strip() for t in ax.texts]
    assert sorted(labels) == sorted(f"{name} {plain_number(v)}FLOP/s" for name, v in roofs(CEILING).items())
    assert len(ax.get_lines()) == 5  # the roofs; the points are scatter collections with no text


def test_bench_log_axis_ticks_at_1_2_5():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([3, 700], [3, 700])
    ax.set(xscale="log", yscale="log")
    log_axis(ax)
    fig.canvas.draw()
    ticks = [t for t in ax.xaxis.get_majorticklocs() if 3 <= t <= 700]
    assert [plain_number(t) for t in ticks] == ["5", "10", "20", "50", "100", "200", "500"]
    plt.close(fig)
