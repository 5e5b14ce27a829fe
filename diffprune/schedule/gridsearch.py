"""The searched timestep grid: the K-call grid whose final samples best match the dense rollout's.

Fewer sampler steps fixes where its K evaluations go (the sampler's own uniform spacing); where they go matters,
above all at the low-noise end where the final image's detail is decided. The search scores the uniform spacings
diffusers offers (the sampler's own, leading, trailing, linspace) and two non-uniform ones (quadratic, as in the
DDIM paper, and Karras et al.'s sigma spacing), then coordinate descent moves one timestep at a time by a step that
starts at the dense grid's spacing and halves when no move helps. Moves only ever replace the incumbent by a
strictly better grid, so the result is never worse (on the calibration samples) than the best spacing it started
from, and with K = all dense calls it is the dense grid itself. Timesteps are any training timesteps: DDIM runs
them on GridDDIMScheduler, DDPM and DPM-Solver++ take them through set_timesteps(timesteps=...).
"""
from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from ..errors import DiffpruneError
from ..grid import base_timesteps
from ..sampling import canonical_sampler

GRID_SAMPLERS = ("ddim", "dpm-solver++", "ddpm")


def check_sampler(sampler: str):
    if canonical_sampler(sampler) not in GRID_SAMPLERS:
        raise DiffpruneError(f"a searched grid needs a sampler that runs any timestep grid ({', '.join(GRID_SAMPLERS)}"
                             f"); {sampler} runs only its own uniform grids: use --method steps, or another sampler")


def spacings(scheduler, k: int) -> dict[str, list[int] | None]:
    """k-timestep grids (descending) by name; None where a spacing has fewer than k distinct timesteps."""
    n = int(scheduler.config.num_train_timesteps)
    alphas = np.asarray(scheduler.alphas_cumprod, dtype=np.float64)
    sigmas = np.sqrt((1 - alphas) / alphas)
    rho, lo, hi = 7.0, sigmas[0], sigmas[-1]
    ramp = np.linspace(0, 1, k)
    karras = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    raw = {
        "own": base_timesteps(scheduler, k),
        "leading": np.arange(k) * (n // k),
        "trailing": np.round(np.arange(n, 0, -n / k)) - 1,
        "linspace": np.round(np.linspace(0, n - 1, k)),
        "quadratic": np.floor(np.linspace(0, np.sqrt(n * 0.8), k) ** 2),
        "karras": np.abs(sigmas[None, :] - karras[:, None]).argmin(axis=1),
    }
    out = {}
    for name, ts in raw.items():
        ts = sorted({int(np.clip(t, 0, n - 1)) for t in np.asarray(ts).tolist()}, reverse=True)
        out[name] = ts if len(ts) == k else None
    return out


def grid_search(evaluate, scheduler, k: int, num_steps: int, budget: int = 32, progress: bool = True):
    """The best k-timestep grid found with `budget` evaluations of evaluate.grid_score (after the starting
    spacings, which are always scored). Returns (timesteps, ssim, candidates: name -> {timesteps, ssim})."""
    n = int(scheduler.config.num_train_timesteps)
    start_evals = evaluate.evaluations
    bar = tqdm(total=budget, desc="grid search", disable=not progress)

    def score(ts):
        value = evaluate.grid_score(ts)
        bar.n = evaluate.evaluations - start_evals
        bar.refresh()
        return value

    candidates, best, best_score = {}, None, -np.inf
    for name, ts in spacings(scheduler, k).items():
        if ts is None:
            candidates[name] = {"timesteps": None, "ssim": None, "note": f"fewer than {k} distinct timesteps"}
            continue
        value = score(ts)
        candidates[name] = {"timesteps": ts, "ssim": value}
        if value > best_score:
            best, best_score = list(ts), value
    if best is None:
        raise DiffpruneError(f"no {k}-step grid can be made from {n} training timesteps")
    delta = max(1, n // num_steps)
    while delta >= 1 and evaluate.evaluations - start_evals < budget:
        improved = False
        for i in range(k):
            for d in (-delta, delta):
                if evaluate.evaluations - start_evals >= budget:
                    break
                t = best[i] + d
                upper = best[i - 1] if i > 0 else n
                lower = best[i + 1] if i + 1 < k else -1
                if not lower < t < upper:
                    continue
                cand = best[:i] + [t] + best[i + 1:]
                value = score(cand)
                if value > best_score:  # strictly better only: ties keep the incumbent
                    best, best_score, improved = cand, value, True
                    break
        if not improved:
            delta //= 2
    bar.close()
    return best, best_score, candidates
