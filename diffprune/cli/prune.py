"""diffprune prune: structural pruning (Diff-Pruning) of a denoiser into a pruned-model directory."""
from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub):
    from ..structural import CRITERIA, HEAD_MODES, MODES, REDUCTIONS, RULES, WIDTHS
    from ..structural.calibration import SOURCES
    p = sub.add_parser(
        "prune", help="remove channels/heads (Diff-Pruning and baselines) and write a pruned model",
        description="Remove the same ratio of channels from every dependency group of MODEL's denoiser (channels, "
                    "attention head dims, MLP hidden units), scored by --criterion, and write OUT: model.safetensors "
                    "+ diffprune_pruned.json (loadable anywhere a MODEL is taken), prune_report.json (sizes, "
                    "groups, timesteps used), and timestep_loss.png for the gradient criteria. Fine-tune the result "
                    "with `diffprune finetune OUT`.")
    p.add_argument("model", help="zoo name or local diffusers model/pipeline directory")
    p.add_argument("--ratio", type=float, required=True,
                   help="fraction to remove, in (0, 1): of the channels of every group (--mode width, both), or of "
                        "the removable units (--mode depth)")
    p.add_argument("--mode", default="width", choices=MODES,
                   help="width: channels, head dims, MLP units (default); depth: whole units (UNet resnet/attention "
                        "pairs and mid block, transformer blocks), lowest importance first; both: width by --ratio, "
                        "then depth by --depth-ratio (one timestep walk scores both)")
    p.add_argument("--depth-ratio", type=float, help="--mode both: fraction of the removable units to remove")
    p.add_argument("--widths", default="auto", choices=WIDTHS,
                   help="gpu: round kept widths to GPU matrix-unit shapes (channels/MLP multiples of 64, head dims "
                        "multiples of 16); exact: the ratio's widths (the paper's architecture); auto: gpu with "
                        "--device cuda, exact otherwise (default)")
    p.add_argument("--criterion", default="diff-pruning", metavar="{" + ",".join(CRITERIA) + "}",
                   help="diff-pruning: Taylor over the informative timesteps (default); taylor: all timesteps; "
                        "magnitude: weight norm (--norm); random; reinit: random then fresh weights (scratch)")
    p.add_argument("--threshold", type=float, default=0.05,
                   help="diff-pruning: stop accumulating at the first t with L_t < T * max L (default 0.05; "
                        "0 = all timesteps)")
    p.add_argument("--norm", type=int, default=2, choices=[1, 2], help="magnitude: L2 (default) or L1")
    p.add_argument("--rule", default="paper", choices=RULES,
                   help="paper: floor(n/G) channels removed inside each of the G GroupNorm groups (default); "
                        "tp: torch-pruning 1.6's rule (count per group, same positions in every group)")
    p.add_argument("--reduction", default="paper", choices=REDUCTIONS,
                   help="per-channel reduction over coupled layers: paper (sum of (w*g)^2, GroupNorm terms, "
                        "plain sum; default) or port (sum |w*g|, mean over layers, divided by the mean)")
    p.add_argument("--heads", default="dims", choices=HEAD_MODES,
                   help="multi-head attention: shrink every head's dim alike (default) or remove whole heads (FLUX and "
                        "SD3 always lose whole heads)")
    p.add_argument("--width-multiple", type=int, default=1, metavar="N",
                   help="round every width pruning keeps (each head's dim, MLP hidden units, channels without "
                        "GroupNorm) to a multiple of N instead of --widths; a layer narrower than N is refused")
    p.add_argument("--data", default="auto", choices=SOURCES,
                   help="calibration batch: Fashion-MNIST for 1x32x32 pixel models, synthetic otherwise (auto)")
    p.add_argument("--data-dir", help="directory with the Fashion-MNIST IDX files")
    p.add_argument("--batch", type=int, help="calibration batch size (default 128 at 32x32, 64 at 64x64, 4 for "
                                             "latent text models)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration batch, noise and random scores")
    from ._common import add_device_arg
    add_device_arg(p)
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args):
    import torch

    from .. import zoo
    from ..errors import DiffpruneError
    from ..structural.importance import make_importance
    from ..structural.job import prune_to_directory
    from ..structural.timesteps import check_threshold
    from ..util import denoiser_of, positive_int, ratio
    from ._common import resolve_device

    # ---- cheap checks first, before anything is loaded ----
    ratio(args.ratio)
    if args.mode == "both":
        if args.depth_ratio is None:
            raise DiffpruneError("--mode both needs --depth-ratio (the fraction of removable units to remove)")
        ratio(args.depth_ratio)
    elif args.depth_ratio is not None:
        raise DiffpruneError("--depth-ratio is for --mode both; with --mode depth, --ratio is the depth ratio")
    check_threshold(args.threshold)
    make_importance(args.criterion, args.reduction, args.norm)  # checks the criterion's options
    if args.mode != "width":
        from ..structural.depth import DEPTH_CRITERIA
        if args.criterion not in DEPTH_CRITERIA:
            raise DiffpruneError(f"criterion {args.criterion!r} has no depth version; --mode {args.mode} takes "
                                 f"{', '.join(DEPTH_CRITERIA)}")
    if args.batch is not None:
        positive_int(args.batch, "--batch")
    from ._common import claim
    out = claim(args, args.out, "--out", overwrite=args.overwrite)
    args.device = resolve_device(args.device)

    _check_memory(args.model)
    obj = zoo.load_model(args.model)
    model = denoiser_of(obj)
    scheduler_config = dict(obj.scheduler.config) if model is not obj else None
    if model is not obj:
        print(f"diffprune prune: pruning the pipeline's {type(model).__name__}; OUT holds the denoiser only",
              file=sys.stderr)
    torch.nn.Module.to(model, args.device, torch.float32)  # scores and pruned weights in full precision
    _announce_walk(args, model, scheduler_config)
    source = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model  # a teacher for --distill
    report = prune_to_directory(
        model, out, source=source, overwrite=args.overwrite, ratio=args.ratio, criterion=args.criterion,
        threshold=args.threshold, data=args.data, mode=args.mode, depth_ratio=args.depth_ratio, rule=args.rule,
        reduction=args.reduction, norm=args.norm, heads=args.heads, widths=args.widths,
        width_multiple=args.width_multiple, seed=args.seed, batch=args.batch, data_dir=args.data_dir,
        scheduler_config=scheduler_config, progress=not args.quiet)
    _summary(report, out, told=not args.quiet)
    return 0


def _check_memory(name: str):
    """A zoo architecture with random weights is built here in float32: refuse one that cannot fit this machine's
    memory (FLUX.1-dev: 12B parameters, 48 GB) instead of letting the kernel kill the run without a word."""
    from .. import zoo
    from ..errors import DiffpruneError
    from ..models import count_params
    if name not in zoo.CONFIGS or (zoo.CHECKPOINTS / name / "config.json").exists():
        return
    try:
        avail = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return  # not Linux: no estimate
    need = 4 * count_params(zoo.build(name, weights=False, device="meta"))
    if need > 0.8 * avail:
        raise DiffpruneError(f"{name} needs about {need / 2 ** 30:.0f} GiB to build in float32 and this machine has "
                             f"{avail / 2 ** 30:.0f} GiB available: prune it on a larger machine, or count its pruned "
                             f"architectures without weights: python3 bench/flux_sd3_structural.py --device meta "
                             f"--models {name}")


def _announce_walk(args, model, scheduler_config):
    """Say how far the gradient criteria's timestep walk can go, and what it may cost here, before it starts."""
    from .. import zoo
    from ..models import get_adapter
    from ..noise import alphas_cumprod, flow_sigmas
    from ..structural.calibration import default_batch_size
    from ..structural.importance import make_importance
    from ..latency import estimate_seconds
    from ..util import duration
    scorer = make_importance(args.criterion, args.reduction, args.norm)
    if not scorer.needs_gradients:
        return
    flow = get_adapter(model).prediction == "flow"  # FLUX, SD3: the rectified-flow sigmas
    n = len(flow_sigmas(scheduler_config) if flow else alphas_cumprod(model, scheduler_config))
    batch = args.batch or default_batch_size(model)
    walk = (f"from t=0 until L_t < {args.threshold:g} x its running max, at most {n} timesteps"
            if scorer.walks_to_threshold and args.threshold > 0 else f"over all {n} timesteps")
    cost = ""
    if args.device == "cpu":  # a forward and a backward pass per timestep: about three forward passes
        cost = f"; up to about {duration(estimate_seconds(model, calls=3 * n, batch=batch, guided=False))} here"
    print(f"diffprune prune: {args.criterion} accumulates gradients {walk} (batch {batch}{cost})", file=sys.stderr)
    if (scorer.walks_to_threshold and args.threshold > 0 and args.model in zoo.CONFIGS
            and not (zoo.CHECKPOINTS / args.model / "config.json").exists()):
        print(f"diffprune prune: {args.model} has random weights (no trained checkpoint): its loss does not fall "
              f"with t, so the walk will likely cover all {n} timesteps (--criterion magnitude is instant)",
              file=sys.stderr)


def _summary(r: dict, out: Path, told: bool = False):
    how = r["criterion"]
    if "timesteps" in r:
        ts = r["timesteps"]
        t = f"T={ts['threshold']:g}, " if r["criterion"] == "diff-pruning" else ""
        how += f" ({t}{ts['selected']} of {ts['num_train_timesteps']} timesteps)"
    elif "norm" in r:
        how += f" ({r['norm']})"
    shape = "x".join(map(str, r["macs_input_shape"]))
    what = {"width": f"{r['rule']} channel rule", "depth": "whole units",
            "both": f"{r['rule']} channel rule, then whole units by {r.get('depth_ratio', 0):g}"}[r.get("mode", "width")]
    print(f"pruned {r['source']} ({r['class']}) by {r['ratio']:g} with {how}, {what}")
    print(f"params {r['params_before'] / 1e6:.4f}M -> {r['params_after'] / 1e6:.4f}M; "
          f"MACs {r['macs_before'] / 1e9:.4f}G -> {r['macs_after'] / 1e9:.4f}G (input {shape})")
    if not told:  # already printed as they happened (pruning tells them unless --quiet)
        for note in r.get("notes", []):
            print(f"note: {note}")
    files = sorted(p.name for p in out.iterdir())
    print(f"wrote {out}/ ({', '.join(files)})")
