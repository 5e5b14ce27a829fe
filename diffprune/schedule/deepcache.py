"""DeepCache with DeepCache's own knobs (cache_interval, cache_branch_id, uniform / non-uniform), as a schedule.

The official package (`DeepCache`, DeepCacheSDHelper) wraps every resnet, attention, resampler and block of a UNet.
On a full step everything runs; on the others the mid block and every block deeper than the branch return their
cached output, and inside the branch's own blocks only the outer layers run. cache_branch_id = 3 * block + layer
(block counted from the outermost down/up pair, layer from the outermost layer of that pair). Over diffprune's
fine units (every resnet, attention and resampler) that is one keep row, and the runtime's per-unit cache holds
what DeepCache's wrappers hold, so the outputs are the same.

Which steps are full: DeepCacheSDHelper counts a call by the index of its timestep in scheduler.timesteps (the
first occurrence), so with PNDM/PLMS (whose calls 1 and 2 share a timestep) it counts calls 0, 1, 1, 3, 4, ...: with
cache_interval 2 the full calls are 0, 4, 6, 8, ... and not 0, 2, 4, .... diffprune counts calls; this helper
reproduces DeepCache's count.
Non-uniform steps follow DeepCache's own pipelines (sample_from_quad_center: full steps denser around `center`).
"""
from __future__ import annotations

import copy

import numpy as np

from ..errors import DiffpruneError
from ..models import UnitGraph, build_graph, get_adapter
from ..sampling import make_scheduler
from ..util import denoiser_of
from .baselines import deepcache_row, describe, table_with_full_steps
from .runtime import registry_hooks_bypassed
from .schedule import Schedule

SKIP_MODES = ("uniform", "non-uniform")
_SAMPLER_NAMES = {"PNDMScheduler": "plms", "DDIMScheduler": "ddim", "DDPMScheduler": "ddpm",
                  "DPMSolverMultistepScheduler": "dpm-solver++", "LCMScheduler": "lcm"}


def deepcache_schedule(model_or_pipeline, num_inference_steps: int, *, cache_interval: int = 3,
                       cache_branch_id: int = 0, skip_mode: str = "uniform", scheduler=None, center: int = 15,
                       pow: float = 1.4, graph: UnitGraph | None = None) -> Schedule:
    """The schedule DeepCache runs for `num_inference_steps` steps of the pipeline's scheduler (or `scheduler`: a
    diffusers scheduler or a sampler name, needed for a bare UNet). Apply it with apply_schedule(pipe, sched).
    skip_mode "non-uniform" takes DeepCache's `center` and `pow`. graph: the UNet's fine UnitGraph (built when
    omitted)."""
    unet = denoiser_of(model_or_pipeline)
    pipe = model_or_pipeline if unet is not model_or_pipeline else None
    if get_adapter(unet).family not in ("unet2d", "unet2d-condition"):
        raise DiffpruneError(f"DeepCache's branches are a UNet's skip branches; this is a {get_adapter(unet).family} "
                             f"model. For transformers use `diffprune search --method deepcache --depth N`")
    cache_interval = _positive(cache_interval, "cache_interval")
    if skip_mode not in SKIP_MODES:
        raise DiffpruneError(f"skip_mode must be one of {', '.join(SKIP_MODES)}, got {skip_mode!r}")
    sched, sampler = _scheduler(pipe, scheduler)
    sched.set_timesteps(_positive(num_inference_steps, "num_inference_steps"))
    timesteps = [float(t) for t in sched.timesteps]
    if graph is None:
        with registry_hooks_bypassed(unet):
            graph = build_graph(unet, "fine")
    row = branch_row(graph, unet, cache_branch_id)
    full = full_steps(timesteps, cache_interval, skip_mode=skip_mode, num_inference_steps=num_inference_steps,
                      center=center, pow=pow)
    table = table_with_full_steps(len(timesteps), full, row)
    meta = describe(table, graph, method="deepcache", cache_interval=cache_interval, cache_branch_id=cache_branch_id,
                    skip_mode=skip_mode, full_steps=[int(s) for s in full],
                    **({"center": center, "pow": pow} if skip_mode == "non-uniform" else {}))
    return Schedule.from_table(graph, table, sampler=sampler, num_steps=num_inference_steps, model=unet, meta=meta)


def max_branch_id(unet) -> int:
    return 3 * len(unet.down_blocks) - 1


def branch_row(graph: UnitGraph, unet, cache_branch_id: int) -> np.ndarray:
    """The fine units a skipped step of DeepCache computes for `cache_branch_id` (DeepCacheSDHelper.is_skip_step
    applied to every unit); the mid block and everything deeper are read from the caches."""
    if graph.granularity != "fine":
        raise DiffpruneError(f"DeepCache's branches need the fine graph (resnets, attentions), got {graph.granularity}")
    top = max_branch_id(unet)
    if isinstance(cache_branch_id, bool) or not isinstance(cache_branch_id, (int, np.integer)) \
            or not 0 <= cache_branch_id <= top:
        raise DiffpruneError(f"cache_branch_id must be an integer from 0 to {top} for this UNet "
                             f"({len(unet.down_blocks)} down blocks, 3 branch ids each), got {cache_branch_id!r}")
    block, layer = divmod(int(cache_branch_id), 3)
    n_up = len(unet.up_blocks)
    row = np.zeros(graph.n_units, dtype=bool)
    for k, name in enumerate(graph.units):
        parts = name.split(".")
        if parts[0] == "mid_block":
            continue  # DeepCache always caches the mid block on a skipped step
        i, kind, j = int(parts[1]), parts[2], int(parts[3])
        if parts[0] == "down_blocks":
            # the down block of the branch runs only when layer > 0 (layer 0 caches the whole block), and then
            # only its layers before `layer`; resamplers count as layer len(resnets)
            n_res = len(unet.down_blocks[i].resnets)
            index = n_res if kind == "downsamplers" else j
            row[k] = i < block or (i == block and layer > 0 and index < layer)
        else:
            depth = n_up - 1 - i  # up blocks pair with down blocks from the outside in
            n_res = len(unet.up_blocks[i].resnets)
            index = 0 if kind == "upsamplers" else n_res - 1 - j  # layers counted from the block's output end
            row[k] = depth < block or (depth == block and index <= layer)
    return row


def full_steps(timesteps, cache_interval: int, *, skip_mode: str = "uniform", num_inference_steps: int | None = None,
               center: int = 15, pow: float = 1.4) -> np.ndarray:
    """The denoiser calls DeepCache runs in full. uniform: DeepCacheSDHelper's rule (a call's index is the first
    index of its timestep, so repeated timesteps share one). non-uniform: DeepCache pipelines' quadratic spacing."""
    n_calls = len(timesteps)
    if cache_interval == 1:
        return np.arange(n_calls)
    if skip_mode == "uniform":
        first = [list(timesteps).index(t) for t in timesteps]
        return np.array([c for c in range(n_calls) if (first[c] - first[0]) % cache_interval == 0])
    steps = num_inference_steps or n_calls
    n_full = -(-steps // cache_interval)
    return np.array(sorted(quad_center_steps(steps, n_full, center, pow)))


def quad_center_steps(total: int, n_samples: int, center: int, pow: float = 1.4) -> list[int]:
    """DeepCache's sample_from_quad_center: n_samples indices in [0, total), quadratically denser around center,
    lowering pow by 0.02 until the count comes out exact."""
    if not 0 < center < total:
        raise DiffpruneError(f"center must lie between 0 and the step count {total}, got {center}")
    while pow > 1:
        x = np.linspace((-center) ** (1 / pow), (total - center) ** (1 / pow), n_samples + 1)
        indices = [0] + [int(v) + center for v in np.unique(np.int32(x ** pow))[1:-1]]
        if len(indices) == n_samples:
            return indices
        pow -= 0.02
    raise DiffpruneError(f"DeepCache's non-uniform spacing finds no pow for {n_samples} full steps of {total} around "
                         f"center {center}; move center or change cache_interval")


def branch_equivalents(unet, graphs: dict[str, UnitGraph] | None = None) -> dict[int, str]:
    """For each cache_branch_id, the baselines.deepcache_row setting (`granularity depth N`) whose skipped steps
    compute the same live units (so give the same output), or "" where none does (the README's table)."""
    graphs = graphs or {g: build_graph(unet, g) for g in ("coarse", "fine")}
    fine = graphs["fine"]

    def live(row) -> set:
        return {u for u, v in zip(fine.units, fine.live_units(row)) if v}
    out = {}
    for b in range(max_branch_id(unet) + 1):
        want, out[b] = live(branch_row(fine, unet, b)), ""
        for g in ("coarse", "fine"):
            graph = graphs[g]
            for depth in range(1, (graph.n_units - 1) // 2 + 1):
                kept = [u for u, k in zip(graph.units, deepcache_row(graph, depth)) if k]
                # a coarse unit computes all its fine units; those with no live consumer do not change the output
                if live(np.array([any(f == u or f.startswith(u + ".") for u in kept) for f in fine.units])) == want:
                    out[b] = f"{g} depth {depth}"
                    break
            if out[b]:
                break
    return out


def _scheduler(pipe, scheduler):
    if isinstance(scheduler, str):
        config = pipe.scheduler.config if pipe is not None else None
        return make_scheduler(scheduler, config), scheduler
    sched = scheduler if scheduler is not None else getattr(pipe, "scheduler", None)
    if sched is None:
        raise DiffpruneError("give the pipeline, or a scheduler (a diffusers scheduler or a sampler name) with a "
                             "bare UNet: DeepCache's full steps depend on the scheduler's timesteps")
    sched = copy.deepcopy(sched)
    return sched, _SAMPLER_NAMES.get(type(sched).__name__, type(sched).__name__)


def _positive(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DiffpruneError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
