"""Make the DiP-GO schedules `diffprune demo` ships with, by the CLI's default DiP-GO recipe, and record how.

For each of the demo's default ratios: one `diffprune search MODEL --method dipgo` on the dense model at that ratio,
and one on the Diff-Pruning model at the ratio that gives the same total MACs (demo.composed_ratio). Everything else
is the CLI's default recipe; only the rollout the demo runs (DDIM, its CPU step count, CFG 2, seed 0) is given.
manifest.json beside the schedules records each command, its time and the code's commit; the demo uses the shipped
schedules only when they were made for its settings, and `diffprune demo --retrain` trains on the spot instead.

    PYTHONPATH=$PWD python scripts/make_demo_schedules.py                 # CPU: 4 x 200 iterations, slow
    PYTHONPATH=$PWD python scripts/make_demo_schedules.py --device cuda   # minutes on a GPU
    ... --iterations 30   # a shorter run (recorded in the manifest as such)
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffprune import demo  # noqa: E402
from diffprune.util import atomic_write_text  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(demo.SHIPPED_SCHEDULES), help="directory to write (default: the package's)")
    p.add_argument("--device", default="cpu", help="device of the searches (default cpu)")
    p.add_argument("--iterations", type=int, help="DiP-GO iterations (default: the CLI's)")
    p.add_argument("--jobs", type=int, default=1, help="searches run at once (default 1)")
    args = p.parse_args(argv)
    s = demo.default_settings("cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    share = demo.pruned_macs_share()
    jobs = []
    for model in (demo.DENSE_MODEL, demo.PRUNED_MODEL):
        for level in s.ratios:
            ratio = level if model == demo.DENSE_MODEL else demo.composed_ratio(level, share)
            if ratio <= 0.01:
                continue
            name = demo.shipped_name(model, level)
            cli = ["search", model, "--method", "dipgo", "--ratio", f"{ratio:.6f}", "--steps", str(s.steps),
                   "--sampler", demo.SAMPLER, "--cfg", f"{demo.GUIDANCE:g}", "--seed", str(s.seed),
                   "--device", args.device]
            if args.iterations is not None:
                cli += ["--iterations", str(args.iterations)]
            jobs.append((model, level, ratio, name, cli))

    def run(job):
        model, level, ratio, name, cli = job
        print("+ diffprune", shlex.join(cli), flush=True)
        t = time.perf_counter()
        with open(out / f"{name}.log", "w") as log:
            subprocess.run([sys.executable, "-m", "diffprune", *cli, "--out", str(out / name), "--overwrite"],
                           check=True, cwd=ROOT, stderr=log)
        (out / name).with_suffix(".png").unlink(missing_ok=True)  # the demo draws its own heatmaps
        (out / f"{name}.log").unlink()
        for lock in out.glob(f".{Path(name).stem}.*.lock"):  # the finished search's output claims
            lock.unlink(missing_ok=True)
        return {"model": model, "level": level, "ratio": ratio, "file": name,
                "command": "diffprune " + shlex.join([*cli, "--out", name]),
                "seconds": round(time.perf_counter() - t, 1)}

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        entries = list(pool.map(run, jobs))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    manifest = {"format": "diffprune-demo-schedules", "version": 1,
                "settings": {"steps": s.steps, "sampler": demo.SAMPLER, "guidance_scale": demo.GUIDANCE,
                             "seed": s.seed, "ratios": list(s.ratios)},
                "made_by": "python scripts/make_demo_schedules.py"
                           + (f" --device {args.device}" if args.device != "cpu" else "")
                           + (f" --iterations {args.iterations}" if args.iterations is not None else "")
                           + f" (on {args.device})",
                "commit": commit or None, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "schedules": entries}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {len(entries)} schedules and {out / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
