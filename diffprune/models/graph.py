"""The one description of a denoiser's units: names, execution order, data flow, and MACs.

MACs accounting, the dependency cascade, the schedule runtime, the pruner's shape and the plots all read
this object, so they cannot disagree about what a unit is or what it feeds.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import numpy as np

OUTPUT = "<output>"


@dataclasses.dataclass
class UnitGraph:
    family: str
    granularity: str
    units: list[str]                       # in execution order
    consumers: dict[str, list[str]]        # unit -> units (or OUTPUT) that read its output
    macs: dict[str, int]                   # unit -> MACs of one call at the graph's input shape
    always_run_macs: int                   # everything outside the units (embeddings, conv_in/out, ...)
    params: dict[str, int]                 # unit -> parameter count
    always_run_params: int
    input_shape: tuple                     # (batch, C, H, W) the MACs were counted at

    # ----- sizes -------------------------------------------------------------------------------
    @property
    def n_units(self) -> int:
        return len(self.units)

    @property
    def total_macs(self) -> int:
        return self.always_run_macs + sum(self.macs.values())

    @property
    def total_params(self) -> int:
        return self.always_run_params + sum(self.params.values())

    def producers(self, unit: str) -> list[str]:
        return [u for u in self.units if unit in self.consumers[u]]

    # ----- the dependency cascade --------------------------------------------------------------
    def live_units(self, keep: Sequence[bool]) -> np.ndarray:
        """Which units are really computed at a step with the given keep flags.

        A kept unit is live only if some live unit (or the model output) reads its output; a skipped unit
        returns its cached output and needs none of its inputs. Walked in reverse execution order, which is a
        topological order of the data flow.
        """
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (self.n_units,):
            raise ValueError(f"keep has shape {keep.shape}, expected ({self.n_units},)")
        index = {u: i for i, u in enumerate(self.units)}
        live = np.zeros(self.n_units, dtype=bool)
        for i in reversed(range(self.n_units)):
            if not keep[i]:
                continue
            live[i] = any(c == OUTPUT or live[index[c]] for c in self.consumers[self.units[i]])
        return live

    def step_macs(self, keep: Sequence[bool]) -> int:
        """MACs of one denoiser call with these keep flags, the cascade applied; always-run part included."""
        live = self.live_units(keep)
        return self.always_run_macs + int(sum(self.macs[u] for u, l in zip(self.units, live) if l))

    def schedule_macs(self, table: np.ndarray) -> int:
        """Total MACs of a rollout whose step s keeps table[s] (steps x units)."""
        return int(sum(self.step_macs(row) for row in np.asarray(table, dtype=bool)))

    # ----- identity ----------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        return {"family": self.family, "granularity": self.granularity, "units": self.units}

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["input_shape"] = list(self.input_shape)
        return json.dumps(d, indent=1)
