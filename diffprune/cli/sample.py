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
    p.add_argument("--overwrite", action="store_true", help="replace --out / --npz if they exist")
    from ._common import add_sampling_args
    add_sampling_args(p)
    return p


def run(args):
    import io

    import numpy as np
    import torch

    from ..data import CLASSES
    from ..errors import DiffpruneError
    from ..images import save_grid
    from ..models import get_adapter
    from ..sampling import generate, sample
    from ..util import atomic_write_bytes, denoiser_of, positive_int
    from ._common import load_for_sampling, load_schedule, parse_classes

    positive_int(args.steps, "--steps")
    positive_int(args.per_class, "--per-class")
    if args.n is not None:
        positive_int(args.n, "--n")
    if not str(args.out).lower().endswith(".png"):
        raise DiffpruneError(f"--out must name a .png file, got {args.out}")
    classes = parse_classes(args.classes) if args.classes else None
    schedule = load_schedule(args.schedule)
    obj = load_for_sampling(args.model, args.device, args.dtype)
    model = denoiser_of(obj)
    adapter = get_adapter(model)
    labels, rows = None, None
    from ..evaluate import _schedule_ctx
    with _schedule_ctx(obj, schedule):
        if obj is not model:  # a pipeline
            if not args.prompt:
                raise DiffpruneError("a pipeline needs at least one --prompt")
            _claim(args)
            images = generate(obj, args.prompt, num_steps=args.steps, sampler=args.sampler,
                              guidance_scale=args.guidance_scale, seed=args.seed)
            ncol = len(args.prompt)
        elif adapter.is_class_conditional(model):
            k = adapter.num_classes(model)
            classes = classes or list(range(k))
            bad = [c for c in classes if not 0 <= c < k]
            if bad:
                raise DiffpruneError(f"--classes {bad} out of range: the model has classes 0..{k - 1}")
            _claim(args)
            labels = torch.tensor(classes).repeat_interleave(args.per_class)
            images = sample(model, args.steps, args.sampler, labels=labels.to(args.device),
                            guidance_scale=args.guidance_scale, seed=args.seed, progress=True)
            ncol = args.per_class
            rows = [CLASSES[c] if k == len(CLASSES) else str(c) for c in classes]
        elif adapter.conditioning == "text":
            raise DiffpruneError("a bare text-conditional denoiser cannot be sampled without its text encoder; "
                                 "point at the pipeline directory instead")
        else:
            n = args.n or 16
            _claim(args)
            images = sample(model, args.steps, args.sampler, batch=n, seed=args.seed, progress=True)
            ncol = min(n, 8)
    if images.shape[1] not in (1, 3):
        raise DiffpruneError("these are latents (the model is a latent denoiser); point at a pipeline directory "
                             "to decode them into images")
    title = f"{args.model}: {args.sampler} {args.steps} steps, cfg {args.guidance_scale:g}, seed {args.seed}"
    if schedule is not None:
        title += f", schedule {schedule.meta.get('method', '')}"
    save_grid(images, args.out, ncol=ncol, title=title, row_labels=rows)
    print(f"wrote {args.out} ({len(images)} images)")
    if args.npz:
        buf = io.BytesIO()
        np.savez(buf, images=images.float().cpu().numpy(),
                 labels=(labels.numpy() if labels is not None else np.zeros(0, dtype=np.int64)))
        atomic_write_bytes(args.npz, buf.getvalue())
        print(f"wrote {args.npz}")
    return 0


def _claim(args):
    """The outputs, claimed before sampling (the long part): same --overwrite rule as prune and search."""
    from ._common import claim
    claim(args, args.out, "--out", overwrite=args.overwrite)
    if args.npz:
        claim(args, args.npz, "--npz", overwrite=args.overwrite)
