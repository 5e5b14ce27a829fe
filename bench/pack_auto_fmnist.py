#!/usr/bin/env python3
"""Packs one GPU call's results of bench/auto_fmnist.py and bench/auto_latency.py (WORK/CONFIG/*.json) into at
most four files under DEST, the only ones that come back from the call: auto_partP.json (every row and latency),
auto_partP.md (its tables, bench/merge_auto_fmnist.py), auto_partP_logs.txt (the tail of each log) and
auto_partP_schedules.tar.gz (the schedule files).
  python bench/pack_auto_fmnist.py --part 1 --work /tmp/auto_work --dest $OUT
"""
from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from merge_auto_fmnist import tables  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--dest", required=True)
    args = ap.parse_args()
    work, dest = Path(args.work), Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    doc = {"part": args.part, "configs": {}}
    for folder in sorted(p for p in work.iterdir() if p.is_dir()):
        jobs, latency = {}, None
        for f in sorted(folder.glob("*.json")):
            try:
                d = json.loads(f.read_text())
            except ValueError as e:  # a file cut by the time limit: say so, keep the rest
                d = {"stopped": f"unreadable ({e})"}
            if f.name == "latency.json":
                latency = d
            else:
                jobs[f.stem] = d
        doc["configs"][folder.name] = {"jobs": jobs, "latency": latency}
    stem = dest / f"auto_part{args.part}"
    Path(f"{stem}.json").write_text(json.dumps(doc, indent=1))
    Path(f"{stem}.md").write_text(tables([f"{stem}.json"]))
    logs = []
    for log in sorted(work.glob("*.log")):
        text = log.read_text(errors="replace").replace("\r", "\n").splitlines()
        logs.append(f"== {log.name}\n" + "\n".join(ln for ln in text[-15:] if not ln.startswith("{")))
    Path(f"{stem}_logs.txt").write_text("\n".join(logs) + "\n")
    with tarfile.open(f"{stem}_schedules.tar.gz", "w:gz") as tar:
        for f in sorted(work.glob("*/schedules/*.json")):
            tar.add(f, arcname=f"{f.parent.parent.name}/{f.name}")
    print(Path(f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
