"""The demo report's reading and figures on FIXED results: the winner it names agrees with its table, a gap within
noise is said to be one, capped rows are labelled and kept out of the contest; heatmap colours, label placement,
the SSIM axis range, the loss curve's axis; the load sampler. Fast: no model is run."""
import time

import numpy as np
import pytest

from diffprune import demo
from diffprune.demo import plots, reading, report, stats
from diffprune.figures import pyplot


def variant(key, method, level, ssim, fd, speedup=2.5, **extra):
    return {"key": key, "name": extra.pop("name", key), "method": method, "level": level, "available": True,
            "gmacs": 30.1 / speedup, "macs_speedup": speedup, "measured_speedup": speedup * 0.9,
            "latency_ms": 1400 / speedup, "latency_min_ms": 1300 / speedup, "latency_max_ms": 1450 / speedup,
            "params_m": 6.47, "fd_fmnist": fd, "fd_sd": 0.8, "ssim_to_dense": ssim, "ssim_se": 0.005,
            "class_accuracy": 0.98, **extra}


def results_with(variants, noise):
    """A complete results dict (what results.json holds) over `variants`; noise[(a, b)] = (fd_sd, ssim_se) of the
    paired difference a - b, default (0.8, 0.005)."""
    dense = variant("dense", "dense", None, 1.0, 4.1, speedup=1.0, name="dense (DDIM 20)")
    vs = [dense, *variants]
    comps = []
    for i, a in enumerate(vs):
        for b in vs[i + 1:]:
            if a.get("level") is None or a.get("level") != b.get("level"):
                continue
            fd_sd, ssim_se = noise.get((a["key"], b["key"]), (0.8, 0.005))
            comps.append({"level": a["level"], "a": a["key"], "b": b["key"], "fd_diff": a["fd_fmnist"] - b["fd_fmnist"],
                          "fd_diff_sd": fd_sd, "ssim_diff": a["ssim_to_dense"] - b["ssim_to_dense"],
                          "ssim_diff_se": ssim_se})
    return {"variants": vs, "comparisons": comps, "models": {"dense": "fmnist-unet", "pruned": "fmnist-unet-dp30"},
            "settings": {"ratios": sorted({v["level"] for v in variants}), "n_samples": 50},
            "environment": {"device": "cpu", "cpu_count": 2, "load_samples": [[0, 1.0], [5, 1.2]]},
            "dipgo": {"dense": None, "pruned": None}, "auto": {}}


def table_rows(results):
    lines = report.table(results["variants"]).splitlines()[2:]
    return {row[0]: row for row in ([c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines)}


def test_fewer_steps_wins_and_the_sentence_agrees_with_the_table():
    res = results_with([variant("dipgo-0.6", "dipgo", 0.6, 0.960, 4.27, name="DiP-GO 0.6"),
                        variant("steps-0.6", "steps", 0.6, 0.979, 4.61, name="DDIM 8 steps"),
                        variant("grid-0.6", "grid", 0.6, 0.950, 4.40, name="searched grid 0.6")], {})
    d = stats.level_verdict(res, 0.6)
    assert d["winner"]["key"] == "steps-0.6"
    sentence = reading.winner_sentence(res, 0.6)
    assert "**fewer steps wins** with DDIM 8 steps" in sentence and "no clear winner" not in sentence
    # its evidence is the table's numbers: the runner-up by SSIM, both as the table prints them
    rows = table_rows(res)
    col = [h for _, h, _ in report.TABLE_COLUMNS].index("SSIM to dense")
    best_in_table = max((r for r in rows.values() if r[0] != "dense (DDIM 20)"), key=lambda r: float(r[col]))
    assert best_in_table[0] == "DDIM 8 steps"
    assert f"SSIM {rows['DDIM 8 steps'][col]}" in sentence and f"SSIM {rows['DiP-GO 0.6'][col]}" in sentence
    assert "better beyond noise in SSIM and within noise in FD" in sentence
    assert reading.winner_sentence(res, 0.6, "about 2.5x") in reading.reading(res)[1]


def test_a_gap_within_noise_crowns_no_one():
    # the report's old lead, "best FD by DiP-GO", where every gap is within noise: now no winner is named
    res = results_with([variant("dipgo-0.8", "dipgo", 0.8, 0.886, 4.75, speedup=5.0, name="DiP-GO 0.8"),
                        variant("steps-0.8", "steps", 0.8, 0.907, 5.69, speedup=5.0, name="DDIM 4 steps")],
                       {("dipgo-0.8", "steps-0.8"): (1.2, 0.012)})
    d = stats.level_verdict(res, 0.8)
    assert d["winner"] is None and {v["key"] for v in d["front"]} == {"dipgo-0.8", "steps-0.8"}
    sentence = reading.winner_sentence(res, 0.8)
    assert "**no clear winner**" in sentence and "within noise of each other in both SSIM and FD" in sentence
    assert "wins" not in sentence
    # a trade-off (one better in SSIM, the other in FD, both beyond noise) is not a win either
    res = results_with([variant("a", "dipgo", 0.8, 0.95, 6.0, speedup=5.0, name="DiP-GO 0.8"),
                        variant("b", "steps", 0.8, 0.90, 4.0, speedup=5.0, name="DDIM 4 steps")], {})
    sentence = reading.winner_sentence(res, 0.8)
    assert "**no clear winner**" in sentence and "trade off" in sentence


def test_a_capped_row_is_labelled_and_not_in_the_contest():
    capped = variant("deepcache-0.6", "deepcache", 0.6, 0.990, 3.0, speedup=1 / (1 - 0.589),
                     name="DeepCache 0.6 (capped: 0.589)", capped=True, reached_ratio=0.589)
    res = results_with([variant("dipgo-0.6", "dipgo", 0.6, 0.960, 4.27, name="DiP-GO 0.6"),
                        variant("steps-0.6", "steps", 0.6, 0.940, 4.61, name="DDIM 8 steps"), capped,
                        {"key": "deepcache-0.8", "name": "DeepCache 0.8", "method": "deepcache", "level": 0.8,
                         "available": False, "capped": True, "reached_ratio": 0.589, "note": "prunes at most 0.589"}],
                       {})
    # the capped row has the best numbers, but prunes less: the winner is DiP-GO, and the reading says why
    assert stats.level_verdict(res, 0.6)["winner"]["key"] == "dipgo-0.6"
    line = next(x for x in reading.reading(res) if x.startswith("**Ratio 0.6"))
    assert "**DiP-GO wins**" in line
    assert "DeepCache 0.6 (capped: 0.589) sits at its cap: it prunes only 0.589 of the MACs, not 0.6" in line
    rows = table_rows(res)
    assert "DeepCache 0.6 (capped: 0.589)" in rows
    assert rows["DeepCache 0.8"][1] == "capped at 0.589"
    # a DiP-GO schedule that prunes visibly less than its level (few steps) is out of the contest too
    short = variant("dipgo-0.6", "dipgo", 0.6, 0.99, 3.0, speedup=1 / (1 - 0.56), name="DiP-GO 0.6")
    res = results_with([short, variant("steps-0.6", "steps", 0.6, 0.94, 4.6, name="DDIM 8 steps")], {})
    assert "only DDIM 8 steps reaches it" in reading.winner_sentence(res, 0.6)


def test_the_reading_says_which_learned_schedules_are_whole_step_reuse():
    res = results_with([variant("dipgo-0.6", "dipgo", 0.6, 0.96, 4.3, name="DiP-GO 0.6", whole_step_reuse=True,
                                calls_full=8, calls_reused=12, calls_partial=0),
                        variant("dipgo-0.8", "dipgo", 0.8, 0.90, 4.8, speedup=5, name="DiP-GO 0.8",
                                whole_step_reuse=False, calls_full=2, calls_reused=10, calls_partial=8)], {})
    line = next(x for x in reading.reading(res) if "whole-step reuse" in x)
    assert "DiP-GO 0.6 (8 calls in full, 12 reused) is whole-step reuse" in line
    assert "DiP-GO 0.8 computes part of the model in 8 calls" in line


def test_the_auto_line_compares_its_pick_with_the_tables_winner():
    res = results_with([variant("dipgo-0.6", "dipgo", 0.6, 0.960, 4.27, name="DiP-GO 0.6"),
                        variant("steps-0.6", "steps", 0.6, 0.979, 4.61, name="DDIM 8 steps")], {})
    res["auto"] = {"0.6": {"best": "dipgo", "summary": "", "n_samples": 4, "held_out_seed": 1, "candidates": []}}
    line = next(x for x in reading.reading(res) if x.startswith("`search --method auto`"))
    assert "picked DiP-GO at 0.6 (the table's winner is fewer steps)" in line


def test_heatmap_colours_tell_computed_from_not_computed():
    from matplotlib.colors import to_rgb

    from diffprune.schedule.plot import COLORS, KINDS, NOT_COMPUTED

    def luminance(c):
        r, g, b = to_rgb(c)
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    assert set(NOT_COMPUTED) | {"computed"} == set(KINDS)
    assert luminance(COLORS["computed"]) < 0.4  # the one dark colour ...
    assert all(luminance(COLORS[k]) > 0.75 for k in NOT_COMPUTED)  # ... every kind that costs nothing is light
    assert len({to_rgb(COLORS[k]) for k in KINDS}) == len(KINDS)


def test_labels_do_not_overlap_and_outliers_do_not_stretch_the_axis():
    plt = pyplot()
    lo, hi, out = plots.axis_range([1.0, 0.96, 0.886, 0.129, 0.979, 0.907, 0.895, 0.853], [0.01] * 8, True)
    assert out == [3] and 0.8 < lo < 0.85 and 1.0 < hi < 1.05
    lo, hi, out = plots.axis_range([4.1, 4.27, 4.75, 29.5, 4.6, 5.7, 3.45], [0.8] * 7, False)
    assert out == [3] and hi < 10
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    pts = [(10, 0.95), (10.2, 0.951), (10.1, 0.949), (9.9, 0.95), (10.05, 0.952)]  # a crowd at one spot
    ax.scatter(*zip(*pts))
    ax.set_xlim(5, 15)
    ax.set_ylim(0.9, 1.0)
    fig.canvas.draw()
    texts = plots.place_labels(ax, pts, ["DiP-GO 2.5x", "8 steps", "grid 2.5x", "reuse 2.5x", "DeepCache"],
                             ["k"] * 5)
    r = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(r) for t in texts]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b)
    plt.close(fig)


def test_the_loss_curve_axis_covers_what_its_label_says():
    curve = demo.timestep_curve(None, demo.default_settings("cpu"))  # the shipped artifact's walk: t = 0..322
    fig = plots.loss_curve_figure(curve, "a", "b")
    ax = fig.axes[0]
    assert ax.get_xlim() == (0, curve["num_train_timesteps"] - 1)
    assert f"of {curve['num_train_timesteps']}" in ax.get_xlabel()
    assert any("not walked" in t.get_text() for t in ax.get_legend().get_texts())
    pyplot().close(fig)


def test_load_is_sampled_through_the_run():
    with demo.LoadSampler(interval=0.05) as load:
        time.sleep(0.4)
    s = load.summary()
    assert len(s["load_samples"]) >= 4 and s["load_min"] <= s["load_median"] <= s["load_max"]
    times = [t for t, _ in s["load_samples"]]
    assert times == sorted(times) and times[-1] > 0.2
