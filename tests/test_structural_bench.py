"""The structural benchmark scripts' CPU paths: real subprocess runs on tiny models, real files."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from diffprune import zoo
from diffprune.models import count_params


@pytest.mark.slow  # ~15 s alone, minutes on a busy 2-core machine
def test_structural_realsize_smoke_writes_rows_for_dense_width_and_depth(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "structural_realsize.py"), "--device", "cpu",
                          "--models", "tiny-dit", "--targets", "0.6", "--batches", "1", "--modes", "eager",
                          "--dtype", "fp32", "--repeats", "1", "--search", "1", "--stem", "smoke"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads((tmp_path / "structural_realsize" / "smoke.json").read_text())
    by = {r["variant"]: r for r in rows}
    assert set(by) == {"dense", "width", "depth"}
    for r in rows:
        assert r["ms"]["eager_b1"] > 0 and r["macs_tp"] < r["macs"]  # attention products counted in "macs" only
    assert by["depth"]["removed"] == ["transformer_blocks.1"] and by["depth"]["macs"] < by["dense"]["macs"]
    assert by["width"]["macs"] < by["dense"]["macs"] and by["width"]["params"] < by["dense"]["params"]
    md = (tmp_path / "structural_realsize" / "smoke.md").read_text()
    assert "| tiny-dit | depth |" in md and "kept (TP conv.)" in md


def test_prune_to_macs_picks_the_unit_count_nearest_the_target(tmp_path):
    out = tmp_path / "p"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "prune_to_macs.py"), "tiny-sd", "--mode", "depth",
                          "--criterion", "magnitude", "--target", "0.75", "--out", str(out)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((out / "prune_report.json").read_text())
    units = sorted((u for u in report["depth"]["units"] if u["removable"]), key=lambda u: u["score"])
    d = report["macs_before"]
    kept = {n: 1 - sum(u["macs"] for u in units[:n]) / d for n in range(1, len(units) + 1)}  # unit MACs add up
    best = min(kept, key=lambda n: abs(kept[n] - 0.75))
    assert len(report["depth"]["removed"]) == best
    assert report["macs_after"] / d == kept[best]
    assert count_params(zoo.load_model(out)) == report["params_after"]


def _flux_sd3_bench(tmp_path, *args):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "flux_sd3_structural.py"),
                          "--models", "tiny-flux,tiny-sd3", "--depth-targets", "0.7", "--stem", "smoke", *args],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads((tmp_path / "flux_sd3_structural" / "smoke.json").read_text())
    assert [(r["model"], r["variant"]) for r in rows] == [(m, v) for m in ("tiny-flux", "tiny-sd3")
                                                          for v in ("dense", "width", "depth")]
    for m in ("tiny-flux", "tiny-sd3"):
        dense, width, depth = (r for r in rows if r["model"] == m)
        assert width["macs"] < dense["macs"] and depth["macs"] < dense["macs"] and len(depth["removed"]) == 1
    assert "| tiny-sd3 | width |" in (tmp_path / "flux_sd3_structural" / "smoke.md").read_text()
    return rows


def test_flux_sd3_structural_counts_pruned_architectures_on_the_meta_device(tmp_path):
    rows = _flux_sd3_bench(tmp_path, "--device", "meta")
    assert all(r["ms"] == {} and r["device"] == "meta" for r in rows)


@pytest.mark.slow  # ~1 min of CPU timings
def test_flux_sd3_structural_cpu_smoke_times_every_variant(tmp_path):
    rows = _flux_sd3_bench(tmp_path, "--device", "cpu", "--repeats", "1", "--search", "1")
    assert all(set(r["ms"]) == {"eager_b1", "eager_b4"} for r in rows)
    flux, sd3 = rows[0], rows[3]
    assert flux["denoiser_batch"] == {"b1": 1, "b4": 4} and sd3["denoiser_batch"] == {"b1": 2, "b4": 8}  # CFG
