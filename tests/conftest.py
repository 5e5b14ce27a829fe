import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path(os.environ.get("DIFFPRUNE_FMNIST", "/usr/share/datasets/fashion-mnist"))
TINY = ["tiny-unet", "tiny-sd", "tiny-sdxl", "tiny-dit", "tiny-pixart"]

# one thread per test process: the suite runs as 2 xdist workers on 2 cores, and oversubscribed threads
# make small-tensor work many times slower
torch.set_num_threads(1)

needs_fmnist = pytest.mark.skipif(not (FMNIST / "t10k-images-idx3-ubyte.gz").exists(),
                                  reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def run_cli(*args, cwd=None, timeout=600):
    """Run the real `diffprune` command in a subprocess; returns CompletedProcess (text)."""
    return subprocess.run([sys.executable, "-m", "diffprune", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd or ROOT, timeout=timeout)
