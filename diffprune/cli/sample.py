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
    p.add_argument("--overwrite", action="store_true", help="replace --out / --npz if they exist")
    from ._common import add_sampling_args
    add_sampling_args(p)
    return p


def _captured_pipeline(pipe, schedule, args):
    """A Stable Diffusion pipeline's images from one captured rollout (encode, capture, replay, decode)."""
    import torch

    from ..capture import capture_rollout
    from ..sampling import decode_latents, encode_prompts
    cond, uncond = encode_prompts(pipe, args.prompt)
    rollout = capture_rollout(pipe, schedule, steps=args.steps, sampler=args.sampler, batch=len(args.prompt),
                              cond=cond, uncond=uncond, guidance_scale=args.guidance_scale)
    with torch.no_grad():
        return decode_latents(pipe, rollout(seed=args.seed))


def run(args):
    import contextlib
    import io

    import numpy as np
    import torch

    from ..data import CLASSES
    from ..distributed import processes
    from ..errors import DiffpruneError
    from ..images import save_grid
    from ..models import get_adapter
    from ..capture import capture_rollout
    from ..sampling import generate
    from ..util import atomic_write_bytes, denoiser_of, positive_int
    from ._common import (default_guidance, load_for_sampling, load_schedule, parse_classes, resolve_device,
                          resolve_rollout)

    args.device = resolve_device(args.device)
    positive_int(args.per_class, "--per-class")
    if args.n is not None:
        positive_int(args.n, "--n")
    if not str(args.out).lower().endswith(".png"):
        raise DiffpruneError(f"--out must name a .png file, got {args.out}")
    classes = parse_classes(args.classes) if args.classes else None
    schedule = load_schedule(args.schedule)
    resolve_rollout(args, schedule)
    grid = schedule.grid if schedule is not None else None
    procs = processes(args.device)  # first: under accelerate launch it makes "cuda" this process's GPU
    if args.compile and procs.num_processes > 1:
        raise DiffpruneError("--compile runs in one process; run without accelerate launch")
    obj = load_for_sampling(args.model, args.device, args.dtype)
    model = denoiser_of(obj)
    adapter = get_adapter(model)
    if args.guidance_scale is None:
        args.guidance_scale = default_guidance(obj)
    labels, rows = None, None
    if args.compile and not str(args.device).startswith("cuda"):
        raise DiffpruneError("--compile captures the rollout as a CUDA graph and needs --device cuda")
    from ..evaluate import schedule_context
    with schedule_context(obj, schedule) if not args.compile else contextlib.nullcontext():
        if obj is not model:  # a pipeline
            if not args.prompt:
                raise DiffpruneError("a pipeline needs at least one --prompt")
            if procs.num_processes > 1:
                raise DiffpruneError("pipelines sample in one process for now; run without accelerate launch")
            _claim(args, procs)
            if args.compile:
                images = _captured_pipeline(obj, schedule, args)
            else:
                images = generate(obj, args.prompt, num_steps=args.steps, sampler=args.sampler,
                                  guidance_scale=args.guidance_scale, seed=args.seed, grid=grid)
            ncol = len(args.prompt)
        elif adapter.is_class_conditional(model):
            k = adapter.num_classes(model)
            classes = classes or list(range(k))
            bad = [c for c in classes if not 0 <= c < k]
            if bad:
                raise DiffpruneError(f"--classes {bad} out of range: the model has classes 0..{k - 1}")
            _claim(args, procs)
            labels = torch.tensor(classes).repeat_interleave(args.per_class)
            if args.compile:
                images = capture_rollout(model, schedule, steps=args.steps, sampler=args.sampler,
                                         batch=len(labels), labels=labels.to(args.device),
                                         guidance_scale=args.guidance_scale)(seed=args.seed)
            else:
                images = _sample_shared(model, args, len(labels), labels, procs, grid)
            ncol = args.per_class
            rows = [CLASSES[c] if k == len(CLASSES) else str(c) for c in classes]
        elif adapter.conditioning == "text":
            raise DiffpruneError("a bare text-conditional denoiser cannot be sampled without its text encoder; "
                                 "point at the pipeline directory instead (or try the zoo's tiny-sd-pipe)")
        else:
            n = args.n or 16
            _claim(args, procs)
            if args.compile:
                images = capture_rollout(model, schedule, steps=args.steps, sampler=args.sampler,
                                         batch=n)(seed=args.seed)
            else:
                images = _sample_shared(model, args, n, None, procs, grid)
            ncol = min(n, 8)
    if images.shape[1] not in (1, 3):
        raise DiffpruneError("these are latents (the model is a latent denoiser); point at a pipeline directory "
                             "to decode them into images")
    if not procs.is_main_process:
        return 0
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


def _sample_shared(model, args, n, labels, procs, grid=None):
    """n samples from one seed's noise; under `accelerate launch` each process runs a contiguous share of the
    batch and all are gathered, so the grid matches a one-process run (up to batch-size rounding in the kernels)."""
    import torch

    from ..errors import DiffpruneError
    from ..sampling import make_noise, sample
    if procs.num_processes > 1 and args.sampler.lower() in ("ddpm", "lcm"):
        raise DiffpruneError(f"the {args.sampler} sampler draws step noise for the whole batch, so a share of it "
                             f"cannot match a one-process run; use a deterministic sampler (ddim, plms, "
                             f"dpm-solver++) with several processes, or run one")
    if n < procs.num_processes:
        raise DiffpruneError(f"{n} samples cannot be shared by {procs.num_processes} processes; ask for more")
    noise = make_noise(model, n, seed=args.seed)  # the whole batch's noise, as one process would draw it
    part = torch.arange(n).tensor_split(procs.num_processes)[procs.process_index]
    mine = sample(model, args.steps, args.sampler, noise=noise[part],
                  labels=labels[part].to(args.device) if labels is not None else None,
                  guidance_scale=args.guidance_scale, seed=args.seed, grid=grid,
                  progress=procs.is_main_process).cpu()
    if procs.num_processes == 1:
        return mine
    parts = [None] * procs.num_processes
    torch.distributed.all_gather_object(parts, mine)
    return torch.cat(parts)


def _claim(args, procs):
    """The outputs, claimed before sampling (the long part): same --overwrite rule as prune and search; under
    accelerate launch only the main process writes them."""
    from ._common import claim
    if not procs.is_main_process:
        return
    claim(args, args.out, "--out", overwrite=args.overwrite)
    if args.npz:
        claim(args, args.npz, "--npz", overwrite=args.overwrite)
