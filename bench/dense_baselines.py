#!/usr/bin/env python3
"""Dense baselines of the Fashion-MNIST reference models: FD-FMNIST and class accuracy at several DDIM step
counts, plus a ceiling (the same architecture with untrained random weights). Writes OUT/dense_baselines.{json,md}.

  python3 bench/dense_baselines.py --device cuda --n 1000            # GPU (carry .whl; see bench/README.md)
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
from diffprune.evaluate import evaluate  # noqa: E402
from diffprune.tables import format_table  # noqa: E402
from diffprune.util import atomic_write_text  # noqa: E402

COLUMNS = [("model", "model", ""), ("num_steps", "DDIM steps", ""), ("n_samples", "samples", ""),
           ("guidance_scale", "CFG", ".1f"), ("fd_fmnist", "FD-FMNIST", ".2f"), ("class_accuracy", "class acc", ".3f"),
           ("ms_per_image", "ms/image (batch 500)", ".2f")]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="fmnist-unet,fmnist-dit")
    ap.add_argument("--steps", default="100,50,20,10")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "bench/results")) / ("dense_baselines_" + args.models.replace(",", "_"))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        for weights in (True, False):
            model = zoo.build(name, weights=weights).to(args.device)
            for steps in ([int(s) for s in args.steps.split(",")] if weights else [50]):
                t0 = time.time()
                m, _ = evaluate(model, num_steps=steps, sampler="ddim", n_samples=args.n,
                                guidance_scale=args.cfg, batch_size=args.batch_size, progress=False)
                m["model"] = name if weights else f"{name} (untrained: ceiling)"
                rows.append(m)
                print(f"{m['model']} ddim{steps}: FD {m.get('fd_fmnist', float('nan')):.2f} acc {m.get('class_accuracy', 0):.3f} "
                      f"({time.time() - t0:.0f} s)", flush=True)
                atomic_write_text(out / "dense_baselines.json", json.dumps(rows, indent=1))
                atomic_write_text(out / "dense_baselines.md", format_table(rows, COLUMNS) + "\n")
    print(format_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
