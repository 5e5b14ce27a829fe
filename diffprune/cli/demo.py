"""diffprune demo: the whole story on the shipped fmnist-unet, written as a report directory."""
from __future__ import annotations


def add_parser(sub):
    from ..demo.settings import DENSE_MODEL, PRUNED_MODEL, default_settings
    cpu, cuda = default_settings("cpu"), default_settings("cuda")
    p = sub.add_parser(
        "demo", help=f"run dense, DiP-GO, DeepCache, fewer steps and Diff-Pruning on {DENSE_MODEL}; write a report",
        description=f"On the shipped {DENSE_MODEL} (DDIM, CFG 2): the dense model; DiP-GO schedules at --ratios "
                    f"(shipped with the package for the CPU defaults, else or with --retrain trained on the spot); "
                    f"`search --method auto` at each ratio (the searched grid, step reuse, DeepCache, fewer steps and "
                    f"DiP-GO scored on held-out samples); DeepCache and fewer sampler steps at the same MACs; the "
                    f"Diff-Pruning model {PRUNED_MODEL}; and that model under DiP-GO schedules at the same MACs. "
                    "Every variant is measured the same way (MACs, measured latency, FD-FMNIST, SSIM to dense from "
                    "the same noise, class accuracy). Writes --out: report.md, results.json, a sample grid, a "
                    "MACs-vs-quality plot, schedule heatmaps and Diff-Pruning's loss-vs-timestep curve. Defaults "
                    f"depend on the device: on a CPU {cpu.n_samples} samples, DDIM {cpu.steps}, the shipped DiP-GO "
                    f"schedules (about 5 minutes on 2 idle cores); on CUDA {cuda.n_samples} samples, DDIM "
                    f"{cuda.steps}, {cuda.iterations} iterations of {cuda.dipgo_batch} samples per pruner.")
    p.add_argument("--out", default="demo-report", help="report directory to write (default demo-report)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default auto: cuda when visible)")
    p.add_argument("--n", type=int, help=f"samples per variant (default: {cpu.n_samples} on cpu, {cuda.n_samples} "
                                         f"on cuda)")
    p.add_argument("--steps", type=int, help=f"DDIM steps of the dense rollout (default: {cpu.steps} on cpu, "
                                             f"{cuda.steps} on cuda)")
    p.add_argument("--ratios", default="0.6,0.8",
                   help="pruned MACs ratios to compare at, comma-separated (default 0.6,0.8)")
    p.add_argument("--iterations", type=int, help=f"DiP-GO training iterations per pruner, where one is trained "
                                                  f"(default: {cpu.iterations} on cpu, {cuda.iterations} on cuda)")
    p.add_argument("--retrain", action="store_true",
                   help="train the DiP-GO pruners here instead of using the schedules shipped for the default CPU "
                        "settings (other settings train anyway; the report says which it used)")
    p.add_argument("--seed", type=int, default=0, help="seed of noise, labels and pruner training (default 0)")
    p.add_argument("--force", action="store_true", help="replace --out if it holds an earlier report")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run (few samples and steps, 1 iteration)")
    p.add_argument("--html", action="store_true", help="also render report.html (images inlined)")
    return p


def run(args):
    import signal

    from .. import demo
    from ..distributed import resolve_device

    # a kill is handled like Ctrl-C, so the report being built is removed instead of left half-written
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    device = resolve_device(args.device)
    settings = demo.default_settings(device, quick=args.quick)
    settings.ratios = demo.parse_ratios(args.ratios)
    settings.seed = args.seed
    if args.n is not None:
        settings.n_samples = args.n
    if args.steps is not None and args.steps != settings.steps:
        settings.steps = args.steps
        settings.steps_reason = "set with --steps" if args.steps < 50 else ""
    if args.iterations is not None:
        settings.iterations = args.iterations
    settings.retrain = args.retrain
    results = demo.run_demo(args.out, settings, force=args.force, html=args.html)
    print(demo.table(results["variants"]))
    print(f"wrote {args.out}/report.md" + (" and report.html" if args.html else "")
          + f" ({results['wall_seconds'] / 60:.1f} min)")
    return 0
