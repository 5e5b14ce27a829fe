#!/usr/bin/env python3
"""Does structural pruning pay on a GPU? Real-size architectures (random weights: quality is meaningless, size and
speed are not), pruned by width (GPU-shaped widths: --widths gpu) and by depth (whole units) to ~30% and ~50% fewer
MACs, timed against the dense model at batch 1, 8 and 32 with classifier-free guidance (the denoiser sees 2x the
batch), fp16 or bf16, CUDA graphs (and eager with --modes graph,eager).

MACs are counted two ways, both recorded and labelled: "FLOPs that run" (every layer plus the attention
score/value products: build_graph(include_attention=True)) and the torch-pruning convention (layers only, no
attention products). The pruning ratio is searched so the kept fraction of the FLOPs that run is near each target:
width ratio by one analytic guess and one secant step (--search 2), depth by the exact unit count (unit MACs are
additive). Width pruning uses the magnitude criterion (no data: random weights), depth a seeded random order
(see depth_plan).

Writes OUT/structural_realsize/<stem>.json (one row per model variant, its timings added as they finish) and
<stem>.md after every measurement. OUT defaults to $OUT or bench/results.

  python3 bench/structural_realsize.py --device cpu --models tiny-sd,tiny-dit --batches 1,2 --modes eager \
      --dtype fp32 --repeats 2 --stem smoke                                  # CPU smoke test (seconds)
  python3 bench/structural_realsize.py --device cuda --models sd15,dit-xl-2  # H200: ~3 min (carry .carry)
  python3 bench/structural_realsize.py --device cuda --models sdxl --stem structural_realsize_sdxl_cuda
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from diffprune import zoo  # noqa: E402
from diffprune.errors import DiffpruneError  # noqa: E402
from diffprune.models.macs import count_macs_by_module  # noqa: E402
from diffprune.models import count_params, get_adapter  # noqa: E402
from diffprune.structural import depth as sdepth  # noqa: E402
from diffprune.structural import prune  # noqa: E402
from diffprune.structural.importance import make_importance  # noqa: E402
from diffprune.util import atomic_write_text  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def macs_by_module(model) -> dict[str, int]:
    """Per-module MACs of one call at batch 1, native size, attention products included (booked on the attention
    module, which is not a leaf). Run on fake tensors: shapes only, SDXL in seconds on a CPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    adapter = get_adapter(model)
    x, t, cond = adapter.example_inputs(model)

    def run():
        with FakeTensorMode(allow_non_fake_inputs=True):
            adapter.predict_noise(model, x, t, cond)
    return count_macs_by_module(model, run, include_attention=True)


def macs_both(model) -> dict:
    """FLOPs that run (= build_graph(include_attention=True).total_macs) and the torch-pruning convention (layers
    only: the leaf modules' share, = build_graph().total_macs)."""
    per = macs_by_module(model)
    leaves = {n for n, m in model.named_modules() if not any(True for _ in m.children())}
    return {"macs": sum(per.values()), "macs_tp": sum(v for k, v in per.items() if k in leaves)}


def prune_width(dense, target: float, dense_macs: int, search: int, widths: str, criterion: str = "magnitude"):
    """Width-prune a copy of `dense` so that about `target` of its FLOPs that run remain. Model of the kept share:
    c + (1 - c) (1 - r)^a, with a = 2 for UNets (convolutions lose inputs and outputs) and 1 for the transformers
    (only the hidden side of each layer shrinks), c the share that does not shrink (a first guess from SD-1.5: 0.25;
    transformers: 0), refitted after each prune. criterion: magnitude (random on the meta device: no weights)."""
    a = 1 if get_adapter(dense).family in ("dit", "flux", "sd3") else 2
    c = 0.0 if a == 1 else 0.25

    def ratio_for(c):
        return min(max(1 - (max(target - c, 0.01) / (1 - c)) ** (1 / a), 0.02), 0.9)

    r = ratio_for(c)
    tries = []
    for step in range(search):
        model, report = prune(copy.deepcopy(dense), r, criterion, widths=widths, progress=False)
        kept = macs_both(model)["macs"] / dense_macs
        tries.append((abs(kept - target), r, model, report))
        q = (1 - r) ** a
        if step + 1 < search and q < 1:
            c = min(max((kept - q) / (1 - q), 0.0), 0.99)
            r = ratio_for(c)
    tries.sort(key=lambda x: x[0])
    _, r, model, report = tries[0]
    return model, r, {"rounded": report.get("rounded", []), "notes": report["notes"], "tries": len(tries)}


def depth_plan(dense) -> tuple[list, dict]:
    """Removable units with the scores prune(..., "random", seed=0) gives them, and each unit's FLOPs that run
    (batch 1). Random, not magnitude: with random weights the widest layers have the smallest weights (init scales
    with 1/sqrt(fan-in)), so magnitude would remove the low-resolution units first and nothing else (SD-1.5: five
    units, 3% of the FLOPs, before the bottom level would be emptied)."""
    units = sdepth.depth_units(dense)
    scores = make_importance("random", seed=0).unit_scores(dense, [u for u in units if u.removable])
    for u in units:
        u.score = scores.get(u.name)
    per_module = macs_by_module(dense)
    macs = {u.name: sum(n for k, n in per_module.items() if any(k == m or k.startswith(m + ".") for m in u.modules))
            for u in units}
    return units, macs


def prune_depth(dense, target: float, dense_macs: int, plan):
    """Depth-prune a copy of `dense`, removing the unit count whose kept FLOPs come nearest to `target`."""
    units, macs = plan
    removable = [u for u in units if u.removable]
    best = None
    for n in range(1, len(removable) + 1):
        try:
            chosen, _ = sdepth.choose_units(units, (n - 0.25) / len(removable))
        except DiffpruneError:
            continue  # more units than can go while every level keeps one
        kept = 1 - sum(macs[u.name] for u in chosen) / dense_macs
        if best is None or abs(kept - target) < abs(best[1] - target):
            best = (n, kept)
    if best is None:
        raise DiffpruneError("no depth ratio is valid for this model")
    ratio = (best[0] - 0.25) / len(removable)  # rounds to best[0] units (choose_units: round(ratio * N))
    model, report = prune(copy.deepcopy(dense), ratio, "random", mode="depth", seed=0, progress=False)
    return model, ratio, {"removed": report["depth"]["removed"], "removable": len(removable)}


def pruned_row(name, variant, target, make, **extra) -> tuple:
    """(model or None, row): run one variant's maker and describe what it made, or the refusal as the row's error
    (printed: a refused variant is a result, not a crash)."""
    t1 = time.time()
    try:
        model, ratio, info = make()
    except DiffpruneError as e:
        row = {"model": name, "variant": variant, "target": target, "error": str(e)}
        print(row, flush=True)
        return None, row
    return model, {"model": name, "variant": variant, "target": target, "ratio": ratio, "params": count_params(model),
                   **macs_both(model), **extra, "prune_s": round(time.time() - t1, 1), **info, "ms": {}}


def time_call(model, batch, mode, repeats):
    from diffprune.latency import time_denoiser_call
    try:
        r = time_denoiser_call(model, batch=batch, cfg=True, mode=mode, repeats=repeats, warmup=2)
        return {"ms": r["median_ms"], "gpu": r.get("gpu")}
    except torch.OutOfMemoryError as e:
        return {"error": f"out of memory: {str(e)[:120]}"}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def table(rows) -> str:
    keys = sorted({k for r in rows for k in r.get("ms", {})}, key=lambda k: (k.split("_")[0], int(k.split("_b")[1])))
    head = ("| model | variant | ratio | params | GMACs run | kept (run) | kept (TP conv.) | "
            + " | ".join(f"{k} ms (x)" for k in keys) + " |")
    lines = [head, "|" + "---|" * (7 + len(keys))]
    for r in rows:
        if "error" in r:
            continue
        dense = next(d for d in rows if d["model"] == r["model"] and d["variant"] == "dense")
        cells = []
        for k in keys:
            ms, d = r.get("ms", {}).get(k), dense.get("ms", {}).get(k)
            cells.append("-" if ms is None else f"{ms:.2f}" + (f" ({d / ms:.2f}x)" if d and r is not dense else ""))
        lines.append(f"| {r['model']} | {r['variant']} | {r['ratio']:.3f} | {r['params'] / 1e6:.1f}M | "
                     f"{r['macs'] / 1e9:.1f} | {r['macs'] / dense['macs']:.3f} | {r['macs_tp'] / dense['macs_tp']:.3f} | "
                     + " | ".join(cells) + " |")
    lines.append("\nkept (run): MACs kept counting attention products (FLOPs that run); kept (TP conv.): the "
                 "torch-pruning convention (layers only). (x): dense ms / pruned ms at the same batch (CFG: the "
                 "denoiser sees 2x the batch).")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="sd15,sdxl,dit-xl-2")
    ap.add_argument("--targets", default="0.7,0.5", help="fractions of the dense FLOPs that run to keep")
    ap.add_argument("--variants", default="width,depth", help="width (GPU-shaped widths), width-exact, depth")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    ap.add_argument("--modes", default="graph", help="graph and/or eager")
    ap.add_argument("--repeats", default="20,10,5", help="timed calls per batch size (one value, or one per batch)")
    ap.add_argument("--search", type=int, default=2, help="width prunes tried per target (1: the analytic guess)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--stem", help="output file name (default structural_realsize[_cuda])")
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "bench/results")) / "structural_realsize"
    out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or "structural_realsize" + ("_cuda" if args.device.startswith("cuda") else "")
    batches = [int(b) for b in args.batches.split(",")]
    reps = [int(r) for r in args.repeats.split(",")]
    reps = reps * len(batches) if len(reps) == 1 else reps
    targets = [float(t) for t in args.targets.split(",")]
    dtype = DTYPES[args.dtype]
    rows = []

    def save():
        atomic_write_text(out / f"{stem}.json", json.dumps(rows, indent=1))
        atomic_write_text(out / f"{stem}.md", table(rows))

    for name in args.models.split(","):
        t0 = time.time()
        dense = zoo.build(name, weights=False)
        torch.nn.Module.to(dense, args.device)  # prune where the model runs (fp32): tracing and copies are faster
        dm = macs_both(dense)
        variants = [("dense", None, lambda: (dense, 0.0, {}))]
        plan = None
        for v in args.variants.split(","):
            for target in targets:
                if v in ("width", "width-exact"):
                    widths = "gpu" if v == "width" else "exact"
                    variants.append((v, target, lambda tg=target, w=widths: prune_width(dense, tg, dm["macs"],
                                                                                         args.search, w)))
                elif v == "depth":
                    plan = plan or depth_plan(dense)
                    variants.append((v, target, lambda tg=target: prune_depth(dense, tg, dm["macs"], plan)))
                else:
                    raise SystemExit(f"unknown variant {v!r}")
        for variant, target, make in variants:
            model, row = pruned_row(name, variant, target, make, dtype=args.dtype)
            rows.append(row)
            if model is None:
                continue
            save()
            timed = torch.nn.Module.to(copy.deepcopy(model) if model is dense else model, args.device, dtype)
            for mode in [m for m in args.modes.split(",") if m]:
                for b, rep in zip(batches, reps):
                    r = time_call(timed, b, mode, rep)
                    if "ms" in r:
                        row["ms"][f"{mode}_b{b}"] = r["ms"]
                        row["gpu"] = r["gpu"]
                    else:
                        row.setdefault("errors", {})[f"{mode}_b{b}"] = r["error"]
                    save()
            print({k: v for k, v in row.items() if k not in ("notes", "rounded")}, flush=True)
            del timed, model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        print(f"{name}: {time.time() - t0:.0f} s", flush=True)
    save()
    print(table(rows))


if __name__ == "__main__":
    main()
