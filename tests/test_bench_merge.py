"""bench/merge_auto_fmnist.py: issue #13's tables are merged from GPU calls, some of which reran jobs that an earlier
call lost; a rerun replaces the lost job whole (no row counted twice as if it were a second seed)."""
import json
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

from merge_auto_fmnist import load, tables  # noqa: E402

ARGS = {"n": 1000, "cfg": 2.0, "budget": 32, "eval_samples": 8, "held_out": 16, "iterations": 60, "batch_size": 4,
        "paper_ratio": 0.8}


def _row(method, target, ssim, seed=0, **extra):
    return {"method": method, "target": target, "seed": seed, "pruned": target, "fd_fmnist": 2 - ssim,
            "class_accuracy": 0.99, "ssim_to_reference": ssim, "psnr_to_reference": 30.0, "held_out_ssim": ssim,
            "schedule": f"{method}_s{seed}_{target:.2f}.json", **extra}


def _part(path, jobs, latency=None):
    cfg = {"jobs": jobs}
    if latency:
        cfg["latency"] = {"rows": latency}
    path.write_text(json.dumps({"part": path.stem, "configs": {"m_ddim_50": cfg}}))
    return str(path)


def test_a_rerun_job_replaces_the_lost_one_and_latency_comes_from_the_latest_part(tmp_path):
    first = _part(tmp_path / "p1.json", {
        "paper_0": {"args": ARGS, "rows": [_row("dipgo-paper", 0.8, 0.5)]},  # killed: no "done"
        "cheap_0.8": {"args": ARGS, "done": True, "rows": [_row("steps", 0.8, 0.9, seed=None)]}},
        latency={"steps_sNone_0.80.json": {"b1_ms": 9.0, "b8_ms": 20.0}})
    second = _part(tmp_path / "p2.json", {
        "paper_0": {"args": ARGS, "done": True, "rows": [_row("dipgo-paper", 0.8, 0.7, iterations_done=44)]}},
        latency={"steps_sNone_0.80.json": {"b1_ms": 5.0, "b8_ms": 10.0}})
    cfg = load([first, second])["m_ddim_50"]
    assert [r["ssim_to_reference"] for r in cfg["rows"] if r["method"] == "dipgo-paper"] == [0.7]
    assert cfg["stopped"] == []
    assert cfg["latency"]["steps_sNone_0.80.json"]["b1_ms"] == 5.0
    md = tables([first, second])
    assert "| 0.8 | DiP-GO paper | 0.800 | 1.30 |" in md and "trained 44 of 60 iterations (time limit)" in md
    assert "Not finished" not in md
    # the lost job alone is reported as such
    assert "paper_0: did not finish" in tables([first])


def test_plot_draws_the_merged_rows(tmp_path):
    from merge_auto_fmnist import plot
    part = _part(tmp_path / "p1.json", {"cheap_0.8": {"args": ARGS, "done": True, "rows": [
        _row("steps", 0.8, 0.9, seed=None), _row("grid", 0.8, 0.95, seed=None), _row("steps", 0.6, 0.97, seed=None)]}})
    plot([part], tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
