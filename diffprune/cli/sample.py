"""diffprune sample: generate images (a PNG grid and/or an .npz of the raw samples)."""
from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("sample", help="generate images as a PNG grid and/or .npz",
                       description="Generate images with MODEL (optionally under a --schedule). Class-conditional "
                                   "models draw --per-class samples of each class in --classes (one grid row per "
                                   "class); Stable Diffusion pipelines take --prompt.")
    p.add_argument("model", help="zoo name (e.g. fmnist-unet) or local diffusers model/pipeline directory")
    p.add_argument("--classes", help="comma-separated class indices (default: all classes)")
    p.add_argument("--per-class", type=int, default=8, help="samples per class (default 8)")
    p.add_argument("--n", type=int, help="number of samples for unconditional models (default 16)")
    p.add_argument("--prompt", action="append", help="text prompt (pipelines; repeat for several)")
    p.add_argument("--out", default="samples.png", help="PNG grid to write (default samples.png)")
    p.add_argument("--npz", help="also write the samples as float32 arrays (images, labels) to this .npz")
    p.add_argument("--compile", action="store_true",
                   help="CUDA only: capture the whole rollout (every denoiser call, the sampler and the guidance "
                        "arithmetic) as one CUDA graph and replay it; same samples, no Python per step "
                        "(deterministic samplers: ddim, plms, dpm-solver++)")
    p.add_argument("--compile-units", action="store_true",
                   help="--compile, with every unit (block) compiled by torch.compile inside the graph: faster "
                        "kernels (DiT-XL/2 on an H200: 1.29x over --compile, BENCHMARKS.md) for a compilation of "
                        "seconds to minutes; worth it for long jobs")
    p.add_argument("--overwrite", action="store_true", help="replace --out / --npz if they exist")
    from ._common import add_sampling_args
    add_sampling_args(p)
    return p


def run(args):
    from ..distributed import processes
    from ..errors import DiffpruneError
    from ..gallery import draw
    from ..sampling import default_guidance
    from ..util import positive_int
    from ..zoo import load_for_sampling
    from ._common import claim, load_schedule, parse_classes, resolve_device, resolve_rollout

    args.device = resolve_device(args.device)
    positive_int(args.per_class, "--per-class")
    if args.n is not None:
        positive_int(args.n, "--n")
    if not str(args.out).lower().endswith(".png"):
        raise DiffpruneError(f"--out must name a .png file, got {args.out}")
    classes = parse_classes(args.classes) if args.classes else None
    schedule = load_schedule(args.schedule)
    resolve_rollout(args, schedule)
    procs = processes(args.device)  # first: under accelerate launch it makes "cuda" this process's GPU
    if (args.compile or args.compile_units) and procs.num_processes > 1:
        raise DiffpruneError("--compile runs in one process; run without accelerate launch")
    obj = load_for_sampling(args.model, args.device, args.dtype)
    if args.guidance_scale is None:
        args.guidance_scale = default_guidance(obj)

    def claim_outputs():  # same --overwrite rule as prune and search; only the main process writes
        if procs.is_main_process:
            claim(args, args.out, "--out", overwrite=args.overwrite)
            if args.npz:
                claim(args, args.npz, "--npz", overwrite=args.overwrite)

    gallery = draw(obj, steps=args.steps, sampler=args.sampler, guidance_scale=args.guidance_scale, seed=args.seed,
                   schedule=schedule, prompts=args.prompt, classes=classes, per_class=args.per_class, n=args.n,
                   compile=args.compile, compile_units=args.compile_units, device=args.device, procs=procs, before=claim_outputs)
    if not procs.is_main_process:
        return 0
    title = f"{args.model}: {args.sampler} {args.steps} steps, cfg {args.guidance_scale:g}, seed {args.seed}"
    if schedule is not None:
        title += f", schedule {schedule.meta.get('method', '')}"
    for path in gallery.save(args.out, args.npz, title):
        print(f"wrote {path}" + (f" ({len(gallery.images)} images)" if path == str(args.out) else ""))
    return 0
