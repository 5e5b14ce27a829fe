"""diffprune bench: latency and peak memory of a denoiser, per call and end to end, dense and under a schedule."""
from __future__ import annotations

import json
import sys


def add_parser(sub):
    p = sub.add_parser(
        "bench", help="time a denoiser (per call and whole rollouts), dense and under a schedule",
        description="Time MODEL: one denoiser call, and whole sampler rollouts (scheduler steps included), dense "
                    "and, with --schedule, under the schedule; report median/p10/p90 ms, the measured speedup next "
                    "to the ideal (FLOPs that run, attention included; torch-pruning's MACs convention beside it), "
                    "and peak memory. On a GPU the default modes are 'capture' (the whole rollout, sampler and "
                    "guidance arithmetic included, as one CUDA graph) and 'graph' (the denoiser captured once per "
                    "distinct step pattern, the sampler eager): eager PyTorch is launch-bound on fast GPUs, so "
                    "compare dense and pruned captured; on a CPU, eager wall time.")
    p.add_argument("model", help="zoo name (e.g. sd15, dit-xl-2, fmnist-unet) or local diffusers model/pipeline "
                                 "directory")
    p.add_argument("--schedule", help="a schedule JSON (diffprune search): also time rollouts under it")
    p.add_argument("--steps", type=int, help="sampler steps (default: the schedule's, else 50)")
    p.add_argument("--sampler", help="ddim, ddpm, plms, dpm-solver++ or lcm (default: the schedule's, else ddim)")
    p.add_argument("--batch", type=int, default=1, help="samples per rollout (default 1)")
    p.add_argument("--cfg", action="store_true",
                   help="classifier-free guidance: the denoiser runs on the doubled batch [uncond; cond]")
    p.add_argument("--guidance", type=float,
                   help="guidance scale used with --cfg (default: the model's, as `diffprune sample` uses it)")
    p.add_argument("--height", type=int, help="input height in model pixels (latents for latent models)")
    p.add_argument("--width", type=int)
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"],
                   help="model precision (default fp16 on cuda, fp32 on cpu)")
    from ._common import add_device_arg
    add_device_arg(p)
    p.add_argument("--mode", help="comma-separated: capture (whole rollout as one CUDA graph), graph (one CUDA graph "
                                  "per step pattern), eager, static (the graph path without capture) (default "
                                  "capture,graph on cuda, eager on cpu)")
    p.add_argument("--repeats", type=int, help="timed rollouts per setting (default 5 on cuda, 10 on cpu)")
    p.add_argument("--call-repeats", type=int, default=30, help="timed single calls (default 30)")
    p.add_argument("--warmup", type=int,
                   help="untimed rollouts before timing (default 1 on cuda; 3 on cpu, where the first rollouts run "
                        "slow while allocator and thread pool settle)")
    p.add_argument("--no-call", action="store_true", help="skip the single-call timing")
    p.add_argument("--no-dense", action="store_true", help="with --schedule: skip the dense rollouts")
    p.add_argument("--no-strict", action="store_true",
                   help="accept a schedule made for another architecture with the same units (e.g. the dense "
                        "model that a structurally pruned one came from)")
    p.add_argument("--json", metavar="OUT", help="write all results to this JSON file")
    return p


def run(args):
    from ..benchmark import bench, check_modes, default_modes
    from ..errors import DiffpruneError
    from ..latency import format_table
    from ..sampling import default_guidance
    from ..util import atomic_write_text, denoiser_of, positive_int
    from ..zoo import load_for_sampling
    from ._common import claim, load_schedule, resolve_device

    device = resolve_device(args.device)
    on_cpu = device == "cpu"
    args.repeats = args.repeats if args.repeats is not None else (10 if on_cpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if on_cpu else 1)
    for name in ("batch", "repeats", "call_repeats"):
        positive_int(getattr(args, name), "--" + name.replace("_", "-"))
    if args.steps is not None:
        positive_int(args.steps, "--steps")
    if args.warmup < 0:
        raise DiffpruneError(f"--warmup must be >= 0, got {args.warmup}")
    dtype = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    modes = check_modes([m.strip() for m in (args.mode or default_modes(device)).split(",")], device)
    if args.no_dense and not args.schedule:
        raise DiffpruneError("--no-dense needs --schedule (otherwise there is nothing to time)")

    schedule = load_schedule(args.schedule)
    if args.json:  # an unwritable place fails now, not after the timings
        claim(args, args.json, "--json")
    steps = args.steps or (schedule.num_steps if schedule is not None else 50)
    sampler = args.sampler or (schedule.sampler if schedule is not None else "ddim")
    obj = load_for_sampling(args.model, device, dtype)
    if args.guidance is None:
        args.guidance = default_guidance(obj)
    out = bench(obj, schedule, device=device, modes=modes, steps=steps, sampler=sampler, batch=args.batch,
                cfg=args.cfg, guidance_scale=args.guidance, height=args.height, width=args.width,
                repeats=args.repeats, call_repeats=args.call_repeats, warmup=args.warmup, call=not args.no_call,
                dense=not args.no_dense, strict=not args.no_strict)
    results, noise = out["results"], out["warnings"]
    print(f"{args.model}: {type(denoiser_of(obj)).__name__}, {dtype} on {device}, batch {args.batch}"
          f"{' (CFG: denoiser batch ' + str(2 * args.batch) + ')' if args.cfg else ''}, {sampler} {steps} steps"
          f"{', schedule ' + args.schedule if schedule is not None else ''}")
    print(format_table(results))
    for w in noise:
        print(f"diffprune bench: warning: {w}", file=sys.stderr)
    if noise:
        print("diffprune bench: these timings are noisy; time again on an idle machine, with more --repeats and "
              "--warmup", file=sys.stderr)
    if args.json:
        doc = {"model": args.model, "device": device, "dtype": dtype, "schedule": args.schedule,
               "steps": steps, "sampler": sampler, "results": results, "warnings": noise,
               "load_average": out["load_average"]}
        atomic_write_text(args.json, json.dumps(doc, indent=1))
        print(f"wrote {args.json}")
    return 0
