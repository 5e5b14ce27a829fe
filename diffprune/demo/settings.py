"""What the demo runs: its models, sampler and guidance, and the settings per device (DemoSettings)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import DiffpruneError
from ..util import positive_int, ratio as check_ratio

DENSE_MODEL = "fmnist-unet"
# the structurally pruned, fine-tuned model the demo shows and composes with DiP-GO: a zoo name or a directory
PRUNED_MODEL = "fmnist-unet-dp30"
SAMPLER = "ddim"
GUIDANCE = 2.0            # what the benchmarks use for the class-conditional models
DEEPCACHE_DEPTH = 1
BOOTSTRAP = 50            # resamples for the noise of FD and of paired differences
# DiP-GO schedules for the default CPU settings, made by scripts/make_demo_schedules.py (manifest.json records the
# commands): the default run thresholds nothing and trains nothing; --retrain trains pruners on the spot instead
SHIPPED_SCHEDULES = Path(__file__).parents[1] / "demo_schedules"
# how the report names each method
FAMILY_NAMES = {"steps": "fewer steps", "grid": "searched grid", "deepcache": "DeepCache", "step-reuse": "step reuse",
                "dipgo": "DiP-GO", "pruned+dipgo": "Diff-Pruning + DiP-GO", "pruned": "Diff-Pruning", "dense": "dense"}


@dataclasses.dataclass
class DemoSettings:
    """What the demo runs; the defaults are the CPU ones (default_settings picks per device)."""
    device: str = "cpu"
    # 30 samples, 6 search evaluations and 2 latency repeats, so that the default run fits in 5 minutes on 2 idle
    # cores (measured there: 50 / 12 / 3 took 7.0 minutes, 40 / 6 / 2 took 6.0; the sampling is most of it)
    n_samples: int = 30
    steps: int = 20
    ratios: tuple = (0.6, 0.8)
    iterations: int = 10          # DiP-GO training iterations (each pruner)
    dipgo_batch: int = 1          # DiP-GO samples per iteration
    # SGD lr 0.1 at any step count: the default (scaled to the step count) is 0.039 at 20 steps and would move each
    # gate 2.6x less in the CPU run's 10 iterations; lr 0.1 at 20 steps is what the measured CPU demo ran
    dipgo_lr: float = 0.1
    seed: int = 0
    eval_batch: int = 20          # sampling batch: the same for every variant, so the noise is the same
    latency_repeats: int = 2
    curve_stride: int = 40        # the loss curve visits every curve_stride-th training timestep ...
    curve_batch: int = 12         # ... on this many Fashion-MNIST training images
    grid_columns: int = 10
    quick: bool = False
    retrain: bool = False         # train the DiP-GO pruners here even where shipped schedules fit
    search_budget: int = 6        # evaluations of each search auto runs (searched grid, step reuse) ...
    search_samples: int = 2       # ... on this many calibration samples (and auto's held-out score on as many)
    steps_reason: str = ("DDIM 20 instead of 50 so that the default run fits in 10 minutes on a 2-core CPU, "
                         "where 50 steps would take about 2.5 times as long")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ratios"] = list(self.ratios)
        return d


def default_settings(device: str, quick: bool = False) -> DemoSettings:
    """Defaults sized for the device. On a 2-core CPU the default run uses the shipped DiP-GO schedules (made for
    exactly these settings) and is meant to take under 5 minutes when the machine is otherwise idle (each report
    lists its stage times and the load it saw); --quick is a CI-sized smoke run whose numbers mean nothing."""
    if quick:
        # 5 steps: fewer steps and the searched grid reach 0.6 and 0.8 exactly (2 and 1 calls)
        return DemoSettings(device=device, n_samples=10, steps=5, iterations=1, eval_batch=10, latency_repeats=1,
                            curve_stride=200, curve_batch=4, quick=True, search_budget=4, search_samples=2,
                            steps_reason="--quick: a smoke run; its numbers mean nothing")
    if device.startswith("cuda"):
        return DemoSettings(device=device, n_samples=1000, steps=50, iterations=30, dipgo_batch=4, eval_batch=250,
                            latency_repeats=10, curve_stride=1, curve_batch=128, search_budget=32, search_samples=8,
                            steps_reason="")
    return DemoSettings(device=device)


def check_settings(s: DemoSettings) -> DemoSettings:
    positive_int(s.n_samples, "--n")
    if s.n_samples < 2:
        raise DiffpruneError(f"--n must be at least 2 (FD-FMNIST needs a covariance), got {s.n_samples}")
    positive_int(s.steps, "--steps")
    if s.steps < 3:
        raise DiffpruneError(f"--steps must be at least 3 (a schedule needs steps to skip), got {s.steps}")
    positive_int(s.iterations, "--iterations")
    if not s.ratios:
        raise DiffpruneError("--ratios needs at least one ratio, e.g. 0.6,0.8")
    s.ratios = tuple(sorted({round(check_ratio(r, "each of --ratios"), 6) for r in s.ratios}))
    return s


def parse_ratios(text: str) -> tuple:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise DiffpruneError(f"--ratios must be comma-separated numbers such as 0.6,0.8, got {text!r}") from None


def require_plotting(html: bool):
    """Fail before any work when what the report needs is missing (markdown is optional: a small built-in
    converter renders the HTML without it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DiffpruneError("the demo report draws its figures with matplotlib, which is not installed: "
                             "pip install 'diffprune[report]'") from None
