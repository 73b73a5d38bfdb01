"""profiling.chart: the stacked-bar PNG of `slip profile step --png`, checked by reading its pixels back."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from profiling import chart as profile_chart
from profiling.chart import (
    BAR_WIDTH,
    SLOT,
    bar_geometry,
    stage_chart,
    stage_colour,
)

STAGES = ["data_wait", "h2d", "vision_fwd", "text_fwd", "simclr", "loss", "backward", "grad_reduce",
          "optimizer", "other"]
BACKGROUND = {(255, 255, 255), (225, 225, 225)}  # white and the gridlines a bar's top may touch


def random_bars(seed: int, n_bars: int, drop: dict[int, list[str]] | None = None) -> list[tuple[str, dict[str, float]]]:
    # times well above zero so every segment is a few pixels tall and the oracle can see it
    rng = np.random.default_rng(seed)
    bars = []
    for b in range(n_bars):
        times = {s: float(rng.uniform(15.0, 250.0)) for s in STAGES if s not in (drop or {}).get(b, [])}
        bars.append((f"config {b} seed={seed}", times))
    return bars


def column_runs(image: Image.Image, x: int, baseline: int) -> list[tuple[tuple[int, int, int], int]]:
    """(colour, length) runs from just above the baseline upwards, stopping at the first background pixel."""
    runs: list[tuple[tuple[int, int, int], int]] = []
    for y in range(baseline - 1, -1, -1):
        px = image.getpixel((x, y))
        if px in BACKGROUND:
            break
        if runs and runs[-1][0] == px:
            runs[-1] = (px, runs[-1][1] + 1)
        else:
            runs.append((px, 1))
    return runs


def colour_of(bars) -> dict[str, tuple[int, int, int]]:
    names = list(dict.fromkeys(s for _, t in bars for s in t))
    return {s: stage_colour(i) for i, s in enumerate(names)}


def test_png_opens_with_sensible_size(tmp_path):
    bars = random_bars(0, 3)
    out = stage_chart(bars, tmp_path / "step.png", title="step time")
    assert out == tmp_path / "step.png"
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert 3 * SLOT < im.width < 2000 and 200 < im.height < 2000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step.png"]  # no temp file left beside it


@pytest.mark.parametrize("seed,n_bars", [(1, 2), (2, 3), (3, 3), (4, 2)])
def test_segments_proportional_to_stage_times(tmp_path, seed, n_bars):
    bars = random_bars(seed, n_bars)
    g = bar_geometry(bars)
    colours = colour_of(bars)
    with Image.open(stage_chart(bars, tmp_path / "c.png")) as im:
        im = im.convert("RGB")
        measured = [column_runs(im, cx, g.baseline) for cx in g.centres]
        # a column just outside each bar is background, so bars really are BAR_WIDTH wide and separate
        for cx in g.centres:
            assert im.getpixel((cx - BAR_WIDTH // 2 - 2, g.baseline - 1)) not in colours.values()
    totals = [sum(t.values()) for _, t in bars]
    heights = [sum(n for _, n in runs) for runs in measured]
    # scale from the picture itself (tallest bar), independent of the module's own number
    px_per_ms = heights[int(np.argmax(totals))] / max(totals)
    assert px_per_ms == pytest.approx(g.scale, rel=0.02)
    for (label, times), runs, height, total in zip(bars, measured, heights, totals):
        assert abs(height - total * px_per_ms) <= 2, label
        # bottom-up order is stage order, one run per stage, nothing else in the bar
        assert [c for c, _ in runs] == [colours[s] for s in times], label
        for (_, n), (stage, ms) in zip(runs, times.items()):
            assert abs(n - ms * px_per_ms) <= 2, (label, stage, n, ms * px_per_ms)
    # the y axis tops out at a round number just above the tallest total
    assert max(totals) <= g.y_max < max(totals) + 2 * g.step
    assert g.top == g.baseline - round(g.y_max * g.scale)


def test_missing_stage_is_zero_but_stays_in_legend(tmp_path):
    bars = random_bars(7, 3, drop={1: ["simclr", "grad_reduce"], 2: ["simclr"]})
    g = bar_geometry(bars)
    colours = colour_of(bars)
    with Image.open(stage_chart(bars, tmp_path / "m.png")) as im:
        im = im.convert("RGB")
        arr = np.asarray(im)
        runs = [column_runs(im, cx, g.baseline) for cx in g.centres]
        assert colours["simclr"] in [c for c, _ in runs[0]]
        for b, missing in ((1, ["simclr", "grad_reduce"]), (2, ["simclr"])):
            seen = [c for c, _ in runs[b]]
            assert seen == [colours[s] for s in bars[b][1]]
            bar_block = arr[:g.baseline, g.centres[b] - BAR_WIDTH // 2: g.centres[b] + BAR_WIDTH // 2]
            for s in missing:
                assert not (bar_block == colours[s]).all(-1).any(), (b, s)
        legend = arr[:, g.legend_x:]
        for s, c in colours.items():  # every stage, including the ones some bars lack, has a legend swatch
            assert (legend == c).all(-1).sum() >= 50, s
    assert list(colours) == STAGES  # legend order is first-seen order


def test_same_stage_same_colour_when_first_bar_lacks_it(tmp_path):
    bars = [("a", {"data_wait": 50.0, "loss": 80.0}), ("b", {"data_wait": 40.0, "simclr": 30.0, "loss": 70.0})]
    g = bar_geometry(bars)
    with Image.open(stage_chart(bars, tmp_path / "s.png")) as im:
        runs = [column_runs(im.convert("RGB"), cx, g.baseline) for cx in g.centres]
    assert [c for c, _ in runs[0]] == [stage_colour(0), stage_colour(1)]
    # simclr is seen third, so it takes the third colour; its neighbours keep theirs
    assert [c for c, _ in runs[1]] == [stage_colour(0), stage_colour(2), stage_colour(1)]


def test_long_labels_stay_inside_their_slot(tmp_path):
    labels = ["loss.backend=reference engine.zero_stage=2",
              "loss.backend=triton engine.zero_stage=3 engine.gradcache=true", "x" * 90]
    bars = [(lab, t) for lab, (_, t) in zip(labels, random_bars(11, 3))]
    g = bar_geometry(bars)
    with Image.open(stage_chart(bars, tmp_path / "l.png")) as im:
        arr = np.asarray(im.convert("RGB"))
    below = arr[g.baseline + 2:]
    assert (below < 200).any()  # labels were drawn
    for i in range(1, len(bars)):  # boundaries between slots stay blank: no label runs into its neighbour
        boundary = g.left + i * SLOT
        assert (below[:, boundary - 1:boundary + 2] == 255).all(), i


def test_unit_and_zero_and_tiny_times(tmp_path):
    bars = [("zero", {"loss": 0.0}), ("tiny", {"loss": 0.004, "other": 0.002})]
    out = stage_chart(bars, tmp_path / "u.png", unit="s", title="x" * 300)
    with Image.open(out) as im:
        assert im.width >= profile_chart.ImageFont.load_default().getlength("x" * 300)
    g = bar_geometry(bars, unit="s")
    assert g.y_max >= 0.006 and math.isfinite(g.scale)
    assert bar_geometry([("z", {"loss": 0.0})]).y_max == 1.0  # all zero still gets an axis


@pytest.mark.parametrize("bad,needle", [(-1.0, "-1.0"), (float("nan"), "nan"), (float("inf"), "inf"), ("fast", "fast")])
def test_bad_time_names_bar_and_stage(tmp_path, bad, needle):
    bars = random_bars(5, 2)
    bars[1][1]["backward"] = bad
    with pytest.raises(ValueError) as err:
        stage_chart(bars, tmp_path / "bad.png")
    msg = str(err.value)
    assert "\n" not in msg and "config 1" in msg and "backward" in msg and needle in msg
    assert list(tmp_path.iterdir()) == []


def test_empty_bars_and_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="no bars"):
        stage_chart([], tmp_path / "e.png")
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        stage_chart(random_bars(6, 2), missing / "e.png")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_nothing_and_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "keep.png"
    stage_chart(random_bars(8, 2), target)
    before = target.read_bytes()

    def boom(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"partial")  # a half-written temp file must still be cleaned up
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        stage_chart(random_bars(9, 3), target)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.png"]
    assert target.read_bytes() == before
