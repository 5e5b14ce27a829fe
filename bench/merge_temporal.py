#!/usr/bin/env python3
"""Merge the rows of several bench/temporal_fmnist.py result files into one Markdown table per model.
  python3 bench/merge_temporal.py bench/results/temporal_fmnist/run1 bench/results/temporal_fmnist/run2 \
      bench/results/temporal_fmnist/run5-dit50-0.70
A run without a model's results (a later call for a few rows of one model) is skipped for that model."""
import json
import sys
from pathlib import Path

COLS = [("method", "method", ""), ("target", "target", ".2f"), ("macs_ratio_vs_dense", "pruned MACs", ".3f"),
        ("speedup_ideal", "MACs speedup", ".2f"), ("fd_fmnist", "FD-FMNIST", ".2f"),
        ("class_accuracy", "class acc", ".3f"), ("ssim_to_reference", "SSIM to dense", ".4f"),
        ("psnr_to_reference", "PSNR", ".1f"), ("collapsed", "whole-step only", ""), ("search_s", "search s", ".0f")]


def fmt(v, f):
    return "-" if v is None else (format(v, f) if f else str(v))


for model in ("fmnist-unet", "fmnist-dit"):
    rows, dense, info = [], None, None
    for run in sys.argv[1:]:
        if not (Path(run) / model / "results.json").exists():
            continue
        r = json.loads((Path(run) / model / "results.json").read_text())
        info = info or r
        for row in r["rows"]:
            if row["method"] == "dense":
                dense = dense or row
            else:
                rows.append(row)
    rows.sort(key=lambda r: (r["target"], COLS and ["dipgo", "steps", "deepcache", "step-reuse-uniform",
                                                    "step-reuse", "random", "genetic"].index(r["method"])))
    print(f"\n**{model}** (DDIM 50, CFG 2, {info['args']['n']} samples, coarse units; DiP-GO pruner: "
          f"{info['args']['iterations']} iterations at batch {info['args']['batch_size']}, "
          f"{info.get('dipgo_train_s', 0) / 60:.1f} GPU-min shared with other jobs)\n")
    print("| " + " | ".join(h for _, h, _ in COLS) + " |")
    print("|" + "---|" * len(COLS))
    for r in [dense] + rows:
        print("| " + " | ".join(fmt(r.get(k), f) for k, _, f in COLS) + " |")
