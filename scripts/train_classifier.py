"""Train the Fashion-MNIST feature network (CPU is enough) and write the files shipped under
diffprune/zoo/checkpoints/fmnist-classifier/: classifier.safetensors, classifier.json (architecture, test accuracy,
this command) and fd_reference_test.safetensors (mu, sigma of its features on the 10,000 real test images).

    .venv/bin/python scripts/train_classifier.py --overwrite          # retrain and replace the shipped files
    .venv/bin/python scripts/train_classifier.py --stats-only         # only recompute the reference statistics
"""
from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without installing

from diffprune.data import DEFAULT_DIR, load_fashion_mnist  # noqa: E402
from diffprune.errors import DiffpruneError  # noqa: E402
from diffprune.metrics import classifier as C  # noqa: E402
from diffprune.util import output_directory  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DIR), help="directory with the Fashion-MNIST IDX files")
    p.add_argument("--out", default=str(C.SHIPPED_DIR), help="output directory (default: the shipped one)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--channels", default=",".join(map(str, C.DEFAULT_CHANNELS)))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--min-accuracy", type=float, default=0.90, help="refuse to write a worse classifier")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--stats-only", action="store_true",
                   help="keep the classifier in --out and recompute only its reference statistics")
    args = p.parse_args(argv)
    command = shlex.join([".venv/bin/python", "scripts/train_classifier.py", *(sys.argv[1:] if argv is None else argv)])
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if not args.stats_only and Path(args.out).exists() and not args.overwrite:  # say so before, not after, training
            raise DiffpruneError(f"{args.out} already exists; pass --overwrite to replace it")
        test_x, test_y = load_fashion_mnist("test", args.data, pad_to=28)
        if args.stats_only:
            model = C.load_classifier(args.out)
            stats = C.statistics_of(test_x, model, progress=True)
            info = {k: v for k, v in C.read_config(Path(args.out)).items()
                    if k not in ("format", "version", "architecture", "weights_sha256", "dtype")}
            C.save_classifier(model, args.out, info, stats, {"split": "test", "n": len(test_x)})
            print(f"wrote {Path(args.out) / C.REFERENCE_FILE}")
            return 0
        train_x, train_y = load_fashion_mnist("train", args.data, pad_to=28)
        channels = tuple(int(c) for c in args.channels.split(","))
        history: list = []
        t0 = time.time()
        model = C.train_classifier(train_x, train_y, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                   channels=channels, seed=args.seed, eval_data=(test_x, test_y), history=history)
        seconds = time.time() - t0
        acc = C.accuracy(test_x, test_y, model)
        print(f"test accuracy {acc:.4f} after {seconds / 60:.1f} min")
        if acc < args.min_accuracy:
            raise DiffpruneError(f"test accuracy {acc:.4f} is below --min-accuracy {args.min_accuracy}; "
                                 f"nothing written (try more --epochs)")
        stats = C.statistics_of(test_x, model, progress=True)
        info = {"test_accuracy": round(acc, 4), "test_images": len(test_x),
                "training": {"command": command, "epochs": args.epochs, "batch_size": args.batch_size,
                             "lr": args.lr, "seed": args.seed, "optimizer": "AdamW, one-cycle lr, wd 5e-4",
                             "augmentation": "horizontal flip, +-2 px shift", "label_smoothing": 0.05,
                             "minutes": round(seconds / 60, 1), "torch": torch.__version__,
                             "threads": torch.get_num_threads(), "machine": platform.machine(),
                             "history": history}}
        with output_directory(args.out, overwrite=args.overwrite) as tmp:
            C.save_classifier(model, tmp, info, stats, {"split": "test", "n": len(test_x)})
        print(f"wrote {args.out}")
        return 0
    except DiffpruneError as e:
        print(f"train_classifier: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
