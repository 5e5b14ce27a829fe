#!/usr/bin/env python3
"""Prune real-size architectures (random weights: quality is meaningless, size and speed are not) at several
ratios with the magnitude criterion, and record params and MACs; on a GPU also time one denoiser call (CUDA graph
and eager, fp16, batch 2 = CFG) before and after. Writes OUT/structural_realsize/structural_realsize.{json,md}
(structural_realsize_cuda.* with --device cuda) after every row.

  python3 bench/structural_realsize.py --device cpu                 # params/MACs only
  python3 bench/structural_realsize.py --device cuda                # + H100 latency (carry .carry)
  python3 bench/structural_realsize.py --device cuda --heads dims8,whole --stem structural_realsize_heads_cuda
--heads picks how attention loses width: dims (every head's dim shrinks alike, the default), dims8 (the same,
every kept width rounded to a multiple of 8: --width-multiple 8), whole (whole heads removed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffprune import zoo  # noqa: E402
from diffprune.models import build_graph, count_params  # noqa: E402
from diffprune.structural import prune  # noqa: E402
from diffprune.util import atomic_write_text  # noqa: E402


def call_ms(model, device):
    from diffprune.metrics.latency import time_denoiser_call
    out = {}
    for mode in ("graph", "eager"):
        r = time_denoiser_call(model.to(device).half(), batch=1, cfg=True, mode=mode, repeats=30, warmup=5)
        out[mode] = r["median_ms"]
        out["gpu"] = r.get("gpu")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="sd15,dit-xl-2")
    ap.add_argument("--ratios", default="0.2,0.3,0.5")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--heads", default="dims", help="comma-separated: dims, dims8, whole")
    ap.add_argument("--stem", help="output file name (default structural_realsize[_cuda])")
    args = ap.parse_args()
    variants = {"dims": dict(heads="dims"), "dims8": dict(heads="dims", width_multiple=8), "whole": dict(heads="whole")}
    out = Path(os.environ.get("OUT", "bench/results")) / "structural_realsize"
    out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or "structural_realsize" + ("_cuda" if args.device.startswith("cuda") else "")
    rows = []
    for name in args.models.split(","):
        cases = [(0.0, "dims")] + [(float(r), h) for h in args.heads.split(",") for r in args.ratios.split(",")]
        for ratio, heads in cases:
            t0 = time.time()
            model = zoo.build(name)
            if ratio:
                model, _ = prune(model, ratio, "magnitude", progress=False, **variants[heads])
            g = build_graph(model)
            row = {"model": name, "ratio": ratio, "heads": heads if ratio else "-", "params": count_params(model),
                   "macs": g.total_macs, "prune_s": round(time.time() - t0, 1)}
            if args.device.startswith("cuda"):
                row.update({k if k == "gpu" else f"{k}_ms": v for k, v in call_ms(model, args.device).items()})
            rows.append(row)
            print(row, flush=True)
            atomic_write_text(out / f"{stem}.json", json.dumps(rows, indent=1))
            lines = ["| model | ratio | heads | params | GMACs | MACs vs dense |" + (" graph ms | eager ms |" if
                                                                                  args.device != "cpu" else ""),
                     "|---|---|---|---|---|---|" + ("---|---|" if args.device != "cpu" else "")]
            for r in rows:
                dense = next(d for d in rows if d["model"] == r["model"] and d["ratio"] == 0.0)
                line = (f"| {r['model']} | {r['ratio']:.1f} | {r.get('heads', 'dims')} | {r['params'] / 1e6:.2f}M | "
                        f"{r['macs'] / 1e9:.2f} | {r['macs'] / dense['macs']:.3f} |")
                if "graph_ms" in r:
                    line += f" {r['graph_ms']:.2f} | {r['eager_ms']:.2f} |"
                lines.append(line)
            atomic_write_text(out / f"{stem}.md", "\n".join(lines) + "\n")
    print((out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
