"""Gradients for Taylor importance, accumulated over the informative timesteps only (Diff-Pruning).

Timesteps are visited from the clean end (t = 0, 1, 2, ...). At each one the training loss L_t is computed
on ONE fixed calibration batch with ONE fixed noise tensor, and a running maximum L_max is kept. The walk stops at the
first t with L_t < T * L_max; that step is not included. Every included step adds its gradient to the parameters'
.grad (no zero_grad in between), so the importance later sees sum_{t in S} dL_t/dw. T = 0 keeps every step.
The loss is the model's own training objective: epsilon MSE on x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps for DDPM-
family models; for flow-matching models (FLUX, SD3) the velocity MSE on x_t = (1 - s_t) x0 + s_t eps with target
eps - x0, s_t the flow scheduler's training sigmas (noise.flow_sigmas), the timestep input s_t * 1000.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import DiffpruneError
from ..figures import pyplot, save_figure
from ..models import get_adapter
from ..noise import add_flow_noise, add_noise

def check_threshold(threshold: float) -> float:
    t = float(threshold)
    if not (0.0 <= t < 1.0) or math.isnan(t):
        raise DiffpruneError(f"--threshold must lie in [0, 1) (0 keeps all timesteps), got {threshold}")
    return t


def should_stop(loss: float, loss_max: float, threshold: float) -> bool:
    """The Diff-Pruning stopping rule: L_t < T * L_max (L_max already includes L_t)."""
    return threshold > 0 and loss < threshold * loss_max


def stop_index(losses: Sequence[float], threshold: float) -> int | None:
    """The walk over a loss curve visited in order: the index of the first loss that stops it, None if none does."""
    loss_max = -math.inf
    for k, loss in enumerate(losses):
        loss_max = max(loss_max, float(loss))
        if should_stop(float(loss), loss_max, threshold):
            return k
    return None


def count_selected(losses: Sequence[float], threshold: float) -> int:
    """|S| for a loss curve L_0, L_1, ... visited in order: the index of the first step that stops the walk
    (or the curve's length if none does)."""
    stop = stop_index(losses, check_threshold(threshold))
    return len(losses) if stop is None else stop


@dataclasses.dataclass
class TimestepReport:
    threshold: float
    num_train_timesteps: int
    selected: int                 # |S|: steps whose gradients were accumulated (t = 0 .. selected-1)
    stop_t: int | None            # the step that ended the walk (its gradient is not included); None: never stopped
    losses: list[float]           # L_t of every visited step, t = 0 .. len-1 (includes stop_t)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def accumulate_gradients(model, images: torch.Tensor, cond: dict, threshold: float, *,
                         alphas_cumprod: torch.Tensor | None = None, sigmas: torch.Tensor | None = None,
                         seed: int = 0, progress: bool = True) -> TimestepReport:
    """Backward the per-timestep loss of the selected timesteps into the parameters' .grad (summed).

    `images` is the fixed clean batch (model space: pixels or latents), `cond` the adapter conditioning for it.
    alphas_cumprod: the DDPM training schedule (epsilon models); sigmas: the flow sigmas (flow models).
    The model is put in eval() mode (dropout off) while scoring and restored afterwards.
    """
    threshold = check_threshold(threshold)
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    x0 = images.to(device, dtype)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    cond = _to(cond, device, dtype)
    flow = adapter.prediction == "flow"
    levels = sigmas if flow else alphas_cumprod
    if levels is None:
        raise DiffpruneError(f"internal: a {adapter.family} model's walk needs "
                             f"{'sigmas' if flow else 'alphas_cumprod'}")
    levels = levels.to(device)
    n_steps = len(levels)
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    losses: list[float] = []
    loss_max = -math.inf
    stop_t = None
    bar = tqdm(range(n_steps), desc="accumulating gradients over timesteps", disable=not progress, leave=False)
    try:
        for t in bar:
            if flow:  # rectified flow: velocity target eps - x0, timestep input on the 0..1000 scale
                s = levels[t].expand(x0.shape[0])
                x_t, target = add_flow_noise(x0, noise, s).to(dtype), noise - x0
                pred = adapter.predict_noise(model, x_t, s * 1000, cond)
            else:
                tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=device)
                x_t, target = add_noise(x0, noise, tt, levels).to(dtype), noise
                pred = adapter.predict_noise(model, x_t, tt, cond)
            loss = F.mse_loss(pred.float(), target.float())
            value = float(loss.detach())
            if not math.isfinite(value):
                raise DiffpruneError(f"the model's loss at timestep {t} is {value}; check the weights and the data")
            losses.append(value)
            loss_max = max(loss_max, value)
            if should_stop(value, loss_max, threshold):
                stop_t = t  # not included: the walk ends here
                break
            loss.backward()
            bar.set_postfix(loss=f"{value:.4g}", refresh=False)
    finally:
        bar.close()
        model.train(was_training)
    selected = stop_t if stop_t is not None else n_steps
    if selected == 0:
        raise DiffpruneError("no timestep was selected; lower --threshold")
    return TimestepReport(threshold=threshold, num_train_timesteps=n_steps, selected=selected, stop_t=stop_t,
                          losses=losses)


def loss_curve(model, images: torch.Tensor, cond: dict, timesteps: Sequence[int], *, alphas_cumprod: torch.Tensor,
               seed: int = 0, batch_limit: int = 256) -> list[float]:
    """L_t at each of `timesteps`, forward only: the epsilon-prediction MSE of ONE fixed batch under ONE fixed noise
    (the same as accumulate_gradients sees), several timesteps per forward up to batch_limit samples. For drawing
    the curve on a subset of timesteps; walk it with stop_index. cond: class_labels or nothing."""
    adapter = get_adapter(model)
    p = next(model.parameters())
    acp = alphas_cumprod.to(p.device)
    x0 = images.to(p.device, p.dtype)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(p.device, p.dtype)
    labels = cond.get("class_labels")
    per_call = max(1, batch_limit // len(x0))  # several timesteps per forward: bigger batches run faster
    ts = list(timesteps)
    losses = []
    with torch.inference_mode():
        for i in range(0, len(ts), per_call):
            chunk = ts[i:i + per_call]
            tt = torch.tensor(chunk, device=p.device).repeat_interleave(len(x0))
            eps = torch.cat([noise] * len(chunk))
            x_t = add_noise(torch.cat([x0] * len(chunk)), eps, tt, acp).to(p.dtype)
            c = {"class_labels": torch.cat([labels] * len(chunk)).to(p.device)} if labels is not None else {}
            pred = adapter.predict_noise(model, x_t, tt, c).float()
            err = ((pred - eps.float()) ** 2).flatten(1).mean(1).view(len(chunk), len(x0)).mean(1)
            losses += [float(e) for e in err]
    return losses


def _to(obj, device, dtype):
    if torch.is_tensor(obj):
        return obj.to(device, dtype) if obj.is_floating_point() else obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


def plot_losses(report: TimestepReport, path) -> None:
    """PNG of L_t against t with the stopping level T * L_max and the selected range marked."""
    fig, ax = pyplot().subplots(figsize=(6, 3.6), dpi=120)
    ts = list(range(len(report.losses)))
    ax.plot(ts, report.losses, lw=1.2, label="$L_t$ (fixed batch, fixed noise)")
    if report.threshold > 0:
        running = []
        m = -math.inf
        for v in report.losses:
            m = max(m, v)
            running.append(report.threshold * m)
        ax.plot(ts, running, ls="--", lw=1, color="tab:red", label=f"T * running max (T={report.threshold:g})")
    ax.axvspan(0, max(report.selected - 1, 0), color="tab:green", alpha=0.12,
               label=f"selected: {report.selected} of {report.num_train_timesteps} steps")
    if report.stop_t is not None:
        ax.axvline(report.stop_t, color="tab:red", lw=0.8)
    ax.set_xlabel("timestep t")
    ax.set_ylabel("training loss (MSE)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("Diff-Pruning timestep selection", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
