"""DDPM training and fine-tuning of pixel-space denoisers (the Fashion-MNIST reference models; pruned models with
the Diff-Pruning recipe, TrainConfig.finetune()).

config: TrainConfig and its recipes; step: the pieces of one step (timesteps, label dropout, loss, schedules);
loop: train_diffusion, readable top to bottom; checkpoint: what a run saves and resumes from; logs: loss.csv,
loss.png and sample grids. The noise schedule and the noising formula are diffprune.noise's."""
from .checkpoint import has_checkpoint, saved_run, started_run, training_status
from .config import NUM_TRAIN_TIMESTEPS, TrainConfig, TrainingInterrupted
from .logs import read_loss_log, write_image_grid
from .loop import save_diffusers_fp16, train_diffusion
from .step import diffusion_loss, drop_labels, ema_decay_at, lr_at, sample_timesteps

__all__ = ["NUM_TRAIN_TIMESTEPS", "TrainConfig", "TrainingInterrupted", "diffusion_loss", "drop_labels",
           "ema_decay_at", "has_checkpoint", "lr_at", "read_loss_log", "sample_timesteps", "save_diffusers_fp16",
           "saved_run", "started_run", "train_diffusion", "training_status", "write_image_grid"]
