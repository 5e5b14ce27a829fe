"""What the machine was like while the demo ran: device, threads and the load average sampled through the run
(other processes competing for the cores make latencies noisy; the report says so when they did)."""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import torch

from ..benchmark import load_average


def environment(device: str) -> dict:
    env = {"device": device, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count()}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    if (load := load_average(2)) is not None:
        env["load_average_start"] = load
    return env


class LoadSampler:
    """The machine's 1-minute load average every `interval` seconds through the run, from a daemon thread: a burst
    of other work in the middle of the run shows, not only the load at its start and end."""

    def __init__(self, interval: float = 5.0):
        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="diffprune-load", daemon=True)

    def _run(self):
        while True:
            load = load_average(2)
            if load is not None:
                self.samples.append([round(time.perf_counter() - self._start, 1), load])
            if self._stop.wait(self.interval):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        loads = [x for _, x in self.samples]
        if not loads:
            return {}
        return {"load_samples": list(self.samples), "load_interval_s": self.interval, "load_min": min(loads),
                "load_median": float(np.median(loads)), "load_max": max(loads)}
