"""diffprune search: make a schedule (DiP-GO or a baseline) and write it as JSON with a heatmap PNG beside it."""
from __future__ import annotations

METHOD_HELP = ("dipgo: train the DiP-GO pruner and threshold it at the ratio; deepcache: shallow branch every "
               "step, everything on full steps; steps: fewer sampler steps; step-reuse: the best whole-step reuse "
               "schedule by a cheap search; random / genetic: searches at a fixed evaluation budget; grid: the "
               "searched timestep grid with as many calls as fewer steps (ddim, dpm-solver++, ddpm); auto: every "
               "family, scored on held-out samples, the best written (plus a Pareto plot and a table of all "
               "candidates beside --out)")


def add_parser(sub):
    p = sub.add_parser("search", help="make a block-skipping schedule (DiP-GO, DeepCache, fewer steps, searches)",
                       description="Make a schedule for MODEL: which units to compute at each denoiser call of a "
                                   "--steps-step --sampler rollout, at pruned MACs ratio --ratio (the dependency "
                                   "cascade counted). Writes --out (JSON) and a heatmap PNG beside it. Quality of "
                                   "searched schedules = SSIM of final images to the dense rollout from the same "
                                   "noise. " + METHOD_HELP)
    p.add_argument("model", help="zoo name or local diffusers model/pipeline directory")
    p.add_argument("--method", required=True, choices=["dipgo", "deepcache", "steps", "step-reuse", "random",
                                                       "genetic", "grid", "auto"], help="how to make the schedule")
    p.add_argument("--ratio", type=float, help="target pruned MACs ratio in (0, 1), e.g. 0.8 = 5x fewer MACs "
                                               "(DeepCache: or give --interval)")
    p.add_argument("--steps", type=int, default=50, help="sampler steps of the rollout (default 50)")
    p.add_argument("--sampler", default="ddim", help="ddim, ddpm, plms, dpm-solver++ or lcm (default ddim)")
    p.add_argument("--granularity", choices=["coarse", "fine"], default="coarse",
                   help="units: coarse = down/mid/up or transformer blocks; fine = resnet/attention branches or "
                        "attention/feed-forward branches (default coarse)")
    p.add_argument("--out", required=True, help="schedule JSON to write (the heatmap goes to the same name .png)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--fold", action="store_true",
                   help="drop the whole steps the schedule reuses instead of stepping the sampler with the reused "
                        "prediction: the same rollout for DDIM (eta 0) without x0 clipping, and faster; refused "
                        "where it is not the same rollout (see --fold-approximate)")
    p.add_argument("--fold-approximate", action="store_true",
                   help="fold even where it changes the rollout (e.g. DDIM that clips x0: the Fashion-MNIST models)")
    p.add_argument("--seed", type=int, default=0, help="seed of noise, conditions and searches (default 0)")
    from ._common import CFG_HELP
    p.add_argument("--cfg", type=float, dest="guidance_scale",
                   help="guidance scale of the rollouts the schedule is made for: " + CFG_HELP)
    p.add_argument("--classes", help="comma-separated class labels to draw from (class models; default all)")
    p.add_argument("--prompts", help="text file, one prompt per line (Stable Diffusion pipelines)")
    p.add_argument("--prompt", action="append", help="a prompt to draw from (repeat for several; with --prompts too)")
    from ._common import add_device_arg
    add_device_arg(p)
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="model precision")
    g = p.add_argument_group("searches (random, genetic, step-reuse, grid)")
    g.add_argument("--budget", type=int, default=32, help="schedule evaluations (default 32)")
    g.add_argument("--samples", type=int, default=4, help="samples per evaluation (default 4)")
    g = p.add_argument_group("auto")
    g.add_argument("--with-dipgo", action="store_true",
                   help="train DiP-GO as a candidate too (default only on a GPU: it is slow on a CPU)")
    g.add_argument("--latency-ms", type=float,
                   help="budget in measured latency of the captured rollout on this GPU (--device cuda) instead of "
                        "--ratio: the best candidate of several ratios within it")
    g = p.add_argument_group("DeepCache")
    g.add_argument("--interval", type=int, help="one full step in N (default: chosen from --ratio)")
    g.add_argument("--depth", type=int, default=1, help="units kept at each end on cheap steps (default 1)")
    g.add_argument("--non-uniform", action="store_true", help="full steps denser mid-rollout")
    g = p.add_argument_group("DiP-GO")
    g.add_argument("--iterations", type=int, default=200, help="pruner training iterations (default 200)")
    g.add_argument("--batch-size", type=int, default=1,
                   help="samples per iteration (default 1); under `accelerate launch`, the global batch, split among "
                        "the processes")
    g.add_argument("--optimizer", choices=["sgd", "adamw"], help="default: sgd (paper), adamw (refined)")
    g.add_argument("--lr", type=float,
                   help="learning rate (default: sgd 0.1 at 50 steps, scaled with the step count; adamw 1e-3)")
    g.add_argument("--alpha", type=float, default=1.0, help="sparsity loss weight (default 1)")
    g.add_argument("--dim", type=int, default=512, help="query dimension (default 512)")
    g.add_argument("--no-encoder", action="store_true", help="skip the query encoder (to measure what it does)")
    g.add_argument("--no-checkpoint", action="store_true", help="keep all activations instead of recomputing")
    g.add_argument("--recipe", choices=["refined", "paper"],
                   help="refined (default): start at the searched whole-step schedule, a loss that sees the whole "
                        "trajectory, gates held at the target ratio, the best snapshot on held-out samples (never "
                        "worse than the start); paper: the paper's all-keep start, SSIM loss and post-processing. "
                        "--init/--loss/--gates/--select replace one setting of the recipe")
    g.add_argument("--init", choices=["none", "grid"],
                   help="none: the paper's all-keep start; grid: the searched whole-step schedule (--budget "
                        "evaluations)")
    g.add_argument("--loss", choices=["ssim", "ms-ssim", "trajectory"],
                   help="ssim: 1 - SSIM of the final images (paper); ms-ssim: at three scales; trajectory: also "
                        "x_t at every step, weighted towards the low-noise end (refined)")
    g.add_argument("--gates", choices=["argmax", "target"],
                   help="argmax + sparsity loss (paper); target: train on the schedule at the target ratio")
    g.add_argument("--select", choices=["none", "calibration", "held-out"],
                   help="which schedule of the run to keep: the end (paper), or the best snapshot on the "
                        "calibration / held-out samples among those no worse than the start")
    g.add_argument("--pruner", help="a trained pruner (.safetensors) to threshold instead of training one")
    g.add_argument("--save-pruner", help="write the trained pruner's scores here (.safetensors; refined: those of "
                                          "the snapshot it keeps)")
    g.add_argument("--state", help="resumable training state file (.safetensors); resumes if it exists")
    g.add_argument("--checkpoint-minutes", type=float, default=5.0,
                   help="save --state every M minutes of training (default 5), and at the end")
    g.add_argument("--checkpoint-every", type=int, help="also save --state every N iterations")
    return p


def run(args):
    from pathlib import Path

    import torch

    from ..errors import DiffpruneError
    from ..sampling import default_guidance
    from ..util import atomic_write_bytes, positive_int, ratio
    from ..zoo import load_for_sampling
    from ._common import resolve_device

    # every argument is checked before any work
    args.device = resolve_device(args.device)
    if args.ratio is not None:
        ratio(args.ratio, "--ratio")
    elif not (args.method == "deepcache" and args.interval is not None) and \
            not (args.method == "auto" and args.latency_ms is not None):
        raise DiffpruneError(f"--method {args.method} needs --ratio (a pruned MACs ratio strictly between 0 and 1)")
    for name in ("steps", "budget", "samples", "iterations", "batch_size", "dim", "depth"):
        positive_int(getattr(args, name), "--" + name.replace("_", "-"))
    for name in ("interval", "checkpoint_every"):
        if getattr(args, name) is not None:
            positive_int(getattr(args, name), "--" + name.replace("_", "-"))
    if not args.checkpoint_minutes > 0:
        raise DiffpruneError(f"--checkpoint-minutes must be a positive number, got {args.checkpoint_minutes}")
    out = Path(args.out)
    if out.suffix.lower() != ".json":
        raise DiffpruneError(f"--out must name a .json file, got {args.out}")
    png = out.with_suffix(".png")
    if args.latency_ms is not None and args.method != "auto":
        raise DiffpruneError("--latency-ms only applies to --method auto")
    if args.latency_ms is not None and not str(args.device).startswith("cuda"):
        raise DiffpruneError("--latency-ms is measured latency of the captured rollout on a GPU: pass --device "
                             "cuda on a machine with one, or give --ratio instead")
    from ..schedule.auto import report_paths
    for f in (out, png, *(report_paths(out).values() if args.method == "auto" else ())):
        if f.exists() and not args.overwrite:
            raise DiffpruneError(f"{f} already exists; choose another --out or pass --overwrite")
    for name in ("recipe", "init", "loss", "gates", "select"):
        if getattr(args, name) and args.method not in ("dipgo", "auto"):
            raise DiffpruneError(f"--{name} only applies to --method dipgo (or auto's DiP-GO candidate)")
    if args.pruner and args.method != "dipgo":
        raise DiffpruneError("--pruner only applies to --method dipgo")
    training = [f"--{n}" for n in ("recipe", "init", "loss", "gates", "select") if getattr(args, n)]
    if args.pruner and training:
        raise DiffpruneError(f"a given --pruner is only thresholded at the ratio; {', '.join(training)} apply to "
                             f"training one: leave them out, or drop --pruner to train")
    from ._common import claim, parse_classes
    labels = torch.tensor(parse_classes(args.classes)) if args.classes else None
    prompts = None
    if args.prompts:
        try:
            prompts = [ln.strip() for ln in Path(args.prompts).read_text().splitlines() if ln.strip()]
        except OSError as e:
            raise DiffpruneError(f"--prompts {args.prompts}: {e}") from None
    if args.prompt:
        prompts = [*(prompts or []), *args.prompt]

    from ..distributed import processes
    from ..models import build_graph
    from ..schedule import search_schedule
    from ..schedule.plot import schedule_heatmap
    from ..util import denoiser_of
    # under `accelerate launch` every process runs this (DiP-GO trains data-parallel; the other methods simply
    # repeat): made before the model is loaded so that "cuda" is each process's own GPU, and every process has
    # checked --out before the main one writes it
    procs = processes(args.device)
    if procs.is_main_process:  # claimed before any work; checked again once no other run can make them
        for f in (out, png):
            claim(args, f, "--out", overwrite=args.overwrite)
        for f, what in ((args.save_pruner, "--save-pruner"), (args.state, "--state")):
            if f and args.method == "dipgo":
                claim(args, f, what)
    procs.wait_for_everyone()
    obj = load_for_sampling(args.model, args.device, args.dtype)
    model = denoiser_of(obj)
    graph = build_graph(model, args.granularity)
    if args.guidance_scale is None:
        args.guidance_scale = default_guidance(obj)
    if args.device == "cpu" and args.method in ("random", "genetic", "step-reuse"):
        _say_search_time(args, obj, model)
    options = {}
    if args.method in ("dipgo", "auto"):
        options = dict(iterations=args.iterations, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                       alpha=args.alpha, dim=args.dim, encoder=not args.no_encoder,
                       checkpoint=not args.no_checkpoint, recipe=args.recipe, init=args.init, loss=args.loss,
                       gates=args.gates, select=args.select)
        if args.method == "dipgo":
            options.update(pruner=args.pruner, save_pruner=args.save_pruner if procs.is_main_process else None,
                           state_path=args.state, checkpoint_every=args.checkpoint_every,
                           checkpoint_minutes=args.checkpoint_minutes)
    if args.method == "auto":
        from ..latency import captured_rollout_ms
        from ..schedule.auto import auto_search, write_outputs
        result = auto_search(obj, args.ratio, steps=args.steps, sampler=args.sampler, graph=graph,
                             budget=args.budget, n_samples=args.samples, guidance_scale=args.guidance_scale,
                             seed=args.seed, labels=labels, prompts=prompts, latency_ms=args.latency_ms,
                             timer=captured_rollout_ms,
                             with_dipgo=True if args.with_dipgo else None, **options)
        result.best.schedule.meta["model"] = args.model
        if procs.is_main_process:
            for path in write_outputs(result, out, graph):
                print(f"wrote {path}")
            print(result.summary)
        procs.wait_for_everyone()
        return 0
    sched = search_schedule(obj, args.method, ratio=args.ratio, steps=args.steps, sampler=args.sampler,
                            graph=graph, budget=args.budget, n_samples=args.samples,
                            guidance_scale=args.guidance_scale, seed=args.seed, labels=labels, prompts=prompts,
                            interval=args.interval, depth=args.depth, non_uniform=args.non_uniform, **options)
    if args.fold or args.fold_approximate:
        from ..schedule.rollouts import scheduler_for
        sched = sched.fold(scheduler_for(obj, args.sampler), approximate=args.fold_approximate)
    sched.meta["model"] = args.model
    if not procs.is_main_process:
        procs.wait_for_everyone()  # returns once the main process has written the files
        return 0
    image = schedule_heatmap(sched, graph)  # rendered before anything is written
    atomic_write_bytes(png, image)
    try:
        sched.save(out)
    except BaseException:
        png.unlink(missing_ok=True)  # never a heatmap without its schedule
        raise
    m = sched.meta
    visits = f" over {sched.n_visits} visited timesteps" if sched.grid is not None else ""
    print(f"wrote {out} and {png}: {sched.n_calls} calls{visits} x {sched.n_units} {sched.granularity} units, "
          f"{m.get('method')}, pruned MACs ratio {m.get('pruned_ratio', sched.pruned_ratio(graph)):.4f}"
          + (f" (target {args.ratio})" if args.ratio is not None else ""))
    if "selected" in m:  # a DiP-GO recipe that selects among its start and snapshots
        r = m["recipe"]
        print(f"DiP-GO {r['recipe']} (init {r['init']}, loss {r['loss']}, gates {r['gates']}, select "
              f"{r['select']}): kept {m['selected']}, calibration SSIM {m['ssim']:.4f}"
              + (f" (start {m['init_ssim']:.4f})" if "init_ssim" in m else "")
              + (f", held-out SSIM {m['held_out_ssim']:.4f}" if "held_out_ssim" in m else "")
              + (f" (start {m['init_held_out_ssim']:.4f})" if "init_held_out_ssim" in m else ""))
    elif "ssim" in m:
        print(f"SSIM to the dense rollout: {m['ssim']:.4f} ({m.get('evaluations')} evaluations)")
    if m.get("collapse", {}).get("collapsed") and m.get("method") != "step-reuse":
        print(f"note: {m['collapse']['note']}")
    if m.get("method") == "steps":
        print(f"note: {m['note']}")
    procs.wait_for_everyone()
    return 0


def _say_search_time(args, obj, model):
    """Before a search on a CPU: what its --budget evaluations of --samples rollouts (and the dense ones) cost."""
    import sys

    from ..sampling import rollout_length
    from ..schedule.rollouts import scheduler_for
    from ..latency import estimate_seconds
    from ..util import duration
    calls = rollout_length(scheduler_for(obj, args.sampler), args.steps) * (args.budget + 1)
    guided = args.guidance_scale > 1
    sec = estimate_seconds(model, calls=calls, batch=args.samples, guided=guided)
    print(f"diffprune search: up to about {duration(sec)} here for {args.budget} evaluations of {args.samples} "
          f"samples x {args.steps} steps (dense timing; skipped units make it less; fewer with --budget)",
          file=sys.stderr)
