"""diffprune info: units, per-unit MACs and params of a model."""
from __future__ import annotations

import json


def add_parser(sub):
    p = sub.add_parser("info", help="print a model's units with their MACs and parameters",
                       description="Print the units of MODEL (the blocks a schedule can skip), the data flow "
                                   "between them, and per-unit MACs and parameters at batch 1 and the model's "
                                   "native resolution (or --height/--width).")
    p.add_argument("model", nargs="?", help="zoo name or local diffusers model/pipeline directory")
    p.add_argument("--granularity", choices=["coarse", "fine"], default="coarse",
                   help="coarse: down/mid/up blocks or transformer blocks; fine: resnet/attention/resampler "
                        "branches or attention/feed-forward branches (default: coarse)")
    p.add_argument("--height", type=int, help="input height in model pixels (latents for latent models)")
    p.add_argument("--width", type=int)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--attention-macs", action="store_true",
                   help="also count attention score/value products (not counted by the usual convention)")
    p.add_argument("--json", action="store_true", help="print the unit graph as JSON")
    p.add_argument("--list", action="store_true", help="list the zoo models and exit")
    return p


def run(args):
    from .. import zoo
    from ..util import positive_int

    if args.list or not args.model:
        for name in zoo.names():
            print(f"{name:14s} {zoo.describe(name)}")
        return 0
    positive_int(args.batch, "--batch")
    model, graph = zoo.unit_graph(args.model, args.granularity, batch=args.batch, height=args.height,
                                  width=args.width, include_attention=args.attention_macs)
    if args.json:
        print(graph.to_json())
        return 0
    b, c, h, w = graph.input_shape
    print(f"{args.model}: {type(model).__name__} ({graph.family}), input {b}x{c}x{h}x{w}, "
          f"{graph.n_units} {args.granularity} units")
    print(f"{'unit':36s} {'GMACs':>10s} {'share':>7s} {'params(M)':>10s}  feeds")
    total = graph.total_macs
    for u in graph.units:
        feeds = ", ".join(graph.consumers[u])
        print(f"{u:36s} {graph.macs[u] / 1e9:10.4f} {graph.macs[u] / total:7.2%} {graph.params[u] / 1e6:10.4f}  {feeds}")
    print(f"{'(always run)':36s} {graph.always_run_macs / 1e9:10.4f} {graph.always_run_macs / total:7.2%} "
          f"{graph.always_run_params / 1e6:10.4f}")
    print(f"{'total':36s} {total / 1e9:10.4f} {1:7.2%} {graph.total_params / 1e6:10.4f}")
    print(f"MACs: {total / 1e9:.4f} G per call; params: {graph.total_params / 1e6:.4f} M")
    return 0
