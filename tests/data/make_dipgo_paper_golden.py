"""Writes dipgo_paper_golden.json: the DiP-GO schedule and keep scores the paper recipe gave before the refined
recipe existed (run with the code of commit de52912 on PYTHONPATH), for test_dipgo_recipes.py to compare with.
  PYTHONPATH=/path/to/checkout-at-de52912 python tests/data/make_dipgo_paper_golden.py"""
import json
import subprocess
import sys
from pathlib import Path

import torch

from diffprune import zoo
from diffprune.models import build_graph
from diffprune.schedule import search_schedule

SETTINGS = dict(ratio=0.5, steps=6, iterations=8, dim=16, hidden=8, batch_size=2, seed=3, guidance_scale=1.0,
                warmup=1, lr=3.0)


def make():
    model = zoo.build("tiny-unet", seed=0).eval()
    graph = build_graph(model)
    sched = search_schedule(model, "dipgo", graph=graph, progress=False, **SETTINGS)
    return sched


if __name__ == "__main__":
    import diffprune
    sched = make()
    src = Path(diffprune.__file__).resolve().parents[1]
    commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    doc = {"commit": commit, "settings": SETTINGS, "table": sched.table.astype(int).tolist(),
           "threshold": sched.meta["threshold"], "kept_macs": [h["kept_macs"] for h in sched.meta["training"]["history"]]
           if "history" in sched.meta["training"] else None, "last": sched.meta["training"]["last"],
           "torch": torch.__version__}
    out = Path(__file__).with_name("dipgo_paper_golden.json")
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out} from {src} at {commit}", file=sys.stderr)
