#!/usr/bin/env python3
"""Does structural pruning pay on FLUX.1-dev and SD3-medium? Real-size architectures with random weights (quality
is meaningless, size and speed are not), pruned by width (whole heads of both streams and MLP widths, GPU-shaped:
--widths gpu, magnitude criterion) to ~30% fewer FLOPs that run, and by depth (whole double/single-stream or joint
blocks, a seeded random order) to ~30% and ~50%, each timed against the dense model for one denoiser call at batch
1 and 4, bf16, CUDA graphs, 1024 px (128x128 latents). FLUX.1-dev is guidance-distilled: one call sees the batch;
SD3 runs CFG: the denoiser sees 2x the batch. The helpers (ratio search, depth plan, both MACs conventions, the
table) are bench/structural_realsize.py's.

--device meta builds the pruned architectures without memory or weights (criterion random: how many heads, MLP
units and blocks go depends only on the ratio, so the widths and MACs are those magnitude gives) and writes their
sizes and MACs, no timings: FLUX.1-dev's 12B parameters do not fit a small CPU machine in float32.

Writes OUT/flux_sd3_structural/<stem>.json and .md after every measurement (OUT: $OUT or bench/results).

  python3 bench/flux_sd3_structural.py --models tiny-flux,tiny-sd3 --device cpu  # CPU smoke test (~1.5 min)
  python3 bench/flux_sd3_structural.py --device meta                             # real-size MACs on a CPU
  PY=python3; source bench/gpu_env.sh; python3 bench/flux_sd3_structural.py     # H200: ~3 min (carry .carry)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from structural_realsize import (DTYPES, depth_plan, macs_both, prune_depth, prune_width, pruned_row,  # noqa: E402
                                 table)

from diffprune import zoo  # noqa: E402
from diffprune.models import get_adapter  # noqa: E402
from diffprune.util import atomic_write_text  # noqa: E402


def time_call(model, batch: int, mode: str, repeats: int) -> dict:
    """One denoiser call: FLUX with its guidance input (no doubled batch), SD3 with CFG's doubled batch."""
    from diffprune.latency import time_denoiser_call
    cfg = not get_adapter(model).distilled_guidance(model)
    try:
        r = time_denoiser_call(model, batch=batch, cfg=cfg, mode=mode, repeats=repeats, warmup=2)
        return {"ms": r["median_ms"], "gpu": r.get("gpu"), "denoiser_batch": r["denoiser_batch"]}
    except torch.OutOfMemoryError as e:
        return {"error": f"out of memory: {str(e)[:120]}"}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def variants(dense, args, dense_macs: int):
    """(variant, target, make) for the dense model, width at each width target, depth at each depth target."""
    meta = args.device == "meta"
    out = [("dense", None, lambda: (dense, 0.0, {}))]
    for tg in [float(t) for t in args.width_targets.split(",") if t]:
        out.append(("width", tg, lambda tg=tg: prune_width(dense, tg, dense_macs, args.search, "gpu",
                                                           "random" if meta else "magnitude")))
    plan = None
    for tg in [float(t) for t in args.depth_targets.split(",") if t]:
        plan = plan or depth_plan(dense)
        out.append(("depth", tg, lambda tg=tg, plan=plan: prune_depth(dense, tg, dense_macs, plan)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="flux-dev,sd3-medium")
    ap.add_argument("--width-targets", default="0.7", help="fractions of the dense FLOPs that run to keep (width)")
    ap.add_argument("--depth-targets", default="0.7,0.5", help="the same for depth")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on CUDA, fp32 on a CPU")
    ap.add_argument("--modes", default="graph", help="graph and/or eager (CPU: eager)")
    ap.add_argument("--repeats", default="10,5", help="timed calls per batch size (one value, or one per batch)")
    ap.add_argument("--search", type=int, default=2, help="width prunes tried per target (1: the analytic guess)")
    ap.add_argument("--device", default="cuda", help="cuda, cpu, or meta (sizes and MACs only)")
    ap.add_argument("--budget-s", type=float, default=240.0, help="start no new variant after this many seconds")
    ap.add_argument("--stem", help="output file name (default flux_sd3_structural_<device>)")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here; --device cpu --models tiny-flux,tiny-sd3 tests the script, --device meta counts")
    out = Path(os.environ.get("OUT", "bench/results")) / "flux_sd3_structural"
    out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or f"flux_sd3_structural_{args.device.split(':')[0]}"
    modes = [] if args.device == "meta" else [m for m in args.modes.split(",") if m]
    if args.device == "cpu" and args.modes == "graph":
        modes = ["eager"]  # CUDA graphs need a GPU
    batches = [int(b) for b in args.batches.split(",")]
    reps = [int(r) for r in args.repeats.split(",")]
    reps = reps * len(batches) if len(reps) == 1 else reps
    # the model is built and pruned in the timing dtype where it runs (FLUX.1-dev: 24 GB in bf16, not 48)
    dtype = DTYPES[args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    rows, start = [], time.time()

    def save():
        note = ("\nFLUX.1-dev is guidance-distilled: its denoiser sees the batch itself (no CFG doubling); SD3's sees "
                "2x the batch.\n")
        atomic_write_text(out / f"{stem}.json", json.dumps(rows, indent=1))
        atomic_write_text(out / f"{stem}.md", table([r for r in rows if "macs" in r or "error" in r]) + note)

    for name in args.models.split(","):
        dense = zoo.build(name, weights=False, dtype=dtype, device=args.device).eval()
        dm = macs_both(dense)
        for variant, target, make in variants(dense, args, dm["macs"]):
            if time.time() - start > args.budget_s:
                rows.append({"model": name, "variant": variant, "target": target, "error": "skipped: --budget-s"})
                print(rows[-1], flush=True)
                continue
            model, row = pruned_row(name, variant, target, make, dtype=str(dtype).replace("torch.", ""),
                                    device=args.device)
            rows.append(row)
            if model is None:
                continue
            save()
            for mode in modes:
                for b, rep in zip(batches, reps):
                    r = time_call(model, b, mode, rep)
                    if "ms" in r:
                        row["ms"][f"{mode}_b{b}"] = r["ms"]
                        row["gpu"] = r["gpu"]
                        row.setdefault("denoiser_batch", {})[f"b{b}"] = r["denoiser_batch"]
                    else:
                        row.setdefault("errors", {})[f"{mode}_b{b}"] = r["error"]
                    save()
            print({k: v for k, v in row.items() if k not in ("notes", "rounded")}, flush=True)
            if model is not dense:
                del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        del dense
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    save()
    print(table([r for r in rows if "macs" in r or "error" in r]))
    print(f"wrote {out / stem}.json and .md ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
