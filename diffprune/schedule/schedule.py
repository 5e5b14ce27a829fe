"""Schedule: which units a rollout computes at each denoiser call.

A schedule is a boolean table with one row per denoiser call of a rollout (the step index, never the timestep
value, so Karras grids with repeated timesteps and PLMS's extra call need no special case) and one column per
unit of the model's UnitGraph at one granularity. True = compute the unit, False = reuse the output it produced
the last time it ran. Row 0 is all True: the first call fills the caches.

On disk it is plain JSON a person can read: one string of '1'/'0' per call, the unit names, the sampler and step
count it was made for, the model family and a hash of the architecture (models.architecture_hash), plus `meta`
(method, achieved ratio, collapse report, ...). A schedule is refused for another model, granularity or step count.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from ..errors import DiffpruneError
from ..models import GRANULARITIES, UnitGraph, architecture_hash
from ..util import atomic_write_text, read_json

FORMAT = "diffprune-schedule"
VERSION = 1


@dataclasses.dataclass(eq=False)
class Schedule:
    table: np.ndarray          # (n_calls, n_units) bool: True = compute
    units: list[str]           # column names, in the graph's execution order
    granularity: str
    sampler: str
    num_steps: int             # sampler steps (num_inference_steps); n_calls may differ (PLMS: steps + 1)
    family: str
    model_hash: str            # models.architecture_hash of the model it was made for ("" = not tied to one)
    meta: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        table = np.asarray(self.table)
        if table.dtype != bool:
            if not np.isin(table, (0, 1)).all():
                raise DiffpruneError("a schedule table holds only 0/1 (or booleans)")
            table = table.astype(bool)
        if table.ndim != 2 or table.shape[0] < 1:
            raise DiffpruneError(f"a schedule table is (denoiser calls x units); got shape {table.shape}")
        self.units = list(self.units)
        if table.shape[1] != len(self.units):
            raise DiffpruneError(f"schedule table has {table.shape[1]} columns but {len(self.units)} units")
        if not table[0].all():
            raise DiffpruneError("step 0 of a schedule must compute every unit (it fills the caches)")
        if self.granularity not in GRANULARITIES:
            raise DiffpruneError(f"unknown granularity {self.granularity!r}; choose one of {', '.join(GRANULARITIES)}")
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, (int, np.integer)) or self.num_steps < 1:
            raise DiffpruneError(f"num_steps must be a positive integer, got {self.num_steps!r}")
        self.num_steps = int(self.num_steps)
        self.table = table.copy()

    # ----- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_table(cls, graph: UnitGraph, table, *, sampler: str, num_steps: int, model=None,
                   model_hash: str | None = None, meta: dict | None = None) -> "Schedule":
        """A schedule over `graph`'s units; the model (or its hash) ties it to one architecture."""
        if model is not None:
            model_hash = architecture_hash(model)
        return cls(table=np.asarray(table, dtype=bool), units=graph.units, granularity=graph.granularity,
                   sampler=str(sampler), num_steps=num_steps, family=graph.family, model_hash=model_hash or "",
                   meta=dict(meta or {}))

    @classmethod
    def keep_all(cls, graph: UnitGraph, steps: int, *, sampler: str = "ddim", model=None,
                 model_hash: str | None = None, n_calls: int | None = None, meta: dict | None = None) -> "Schedule":
        """The dense schedule: every unit at every call. n_calls defaults to the sampler's rollout length."""
        n_calls = n_calls or rollout_calls(sampler, steps)
        return cls.from_table(graph, np.ones((n_calls, graph.n_units), dtype=bool), sampler=sampler,
                              num_steps=steps, model=model, model_hash=model_hash,
                              meta={"method": "dense", **(meta or {})})

    # ----- properties --------------------------------------------------------------------------------------
    @property
    def n_calls(self) -> int:
        return int(self.table.shape[0])

    @property
    def n_units(self) -> int:
        return int(self.table.shape[1])

    def live_table(self, graph: UnitGraph) -> np.ndarray:
        """(n_calls x units) of the units really computed: the keep table with the dependency cascade applied."""
        self.check(graph)
        return np.stack([graph.live_units(row) for row in self.table])

    def macs(self, graph: UnitGraph) -> int:
        """MACs of one rollout under this schedule (cascade applied, always-run part included)."""
        self.check(graph)
        return graph.schedule_macs(self.table)

    def pruned_ratio(self, graph: UnitGraph, reference_calls: int | None = None) -> float:
        """1 - MACs / MACs of the dense rollout with reference_calls calls (default: this schedule's own)."""
        dense = (reference_calls or self.n_calls) * graph.total_macs
        return 1.0 - self.macs(graph) / dense

    # ----- compatibility -----------------------------------------------------------------------------------
    def check(self, graph: UnitGraph | None = None, *, model=None, n_calls: int | None = None):
        """Raise DiffpruneError if this schedule does not fit the graph, the model or a rollout of n_calls."""
        if graph is not None:
            if graph.granularity != self.granularity:
                raise DiffpruneError(
                    f"this schedule is over {self.granularity} units but the model graph is {graph.granularity}; "
                    f"use a {graph.granularity} schedule or build the graph with granularity={self.granularity!r}")
            if graph.family != self.family or list(graph.units) != self.units:
                raise DiffpruneError(
                    f"this schedule was made for a {self.family} model with units {_short(self.units)}; this "
                    f"{graph.family} model has units {_short(graph.units)}. Make a schedule for this model "
                    f"(diffprune search)")
        if model is not None and self.model_hash:
            h = architecture_hash(model)
            if h != self.model_hash:
                raise DiffpruneError(
                    f"this schedule was made for another architecture (hash {self.model_hash}, this model {h}); "
                    f"make a schedule for this model (diffprune search), or pass strict=False to apply it to a "
                    f"model with the same units (e.g. a structurally pruned copy)")
        if n_calls is not None and n_calls != self.n_calls:
            raise DiffpruneError(
                f"this schedule is for {self.num_steps} {self.sampler} steps ({self.n_calls} denoiser calls), "
                f"but the rollout makes {n_calls} calls; sample with {self.num_steps} steps, or make a schedule "
                f"for this step count (diffprune search --steps)")

    # ----- files -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "family": self.family, "model_hash": self.model_hash,
                "granularity": self.granularity, "units": self.units, "sampler": self.sampler,
                "num_steps": self.num_steps, "n_calls": self.n_calls,
                "table": ["".join("1" if k else "0" for k in row) for row in self.table],
                "meta": _plain(self.meta)}

    @classmethod
    def from_dict(cls, d: dict, source: str = "schedule") -> "Schedule":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise DiffpruneError(f"{source} is not a diffprune schedule (no \"format\": \"{FORMAT}\")")
        if d.get("version") != VERSION:
            raise DiffpruneError(f"{source}: schedule format version {d.get('version')!r} is not supported "
                                 f"(this diffprune reads version {VERSION})")
        missing = [k for k in ("family", "model_hash", "granularity", "units", "sampler", "num_steps", "n_calls",
                               "table") if k not in d]
        if missing:
            raise DiffpruneError(f"{source}: schedule is missing {', '.join(missing)}")
        rows = d["table"]
        if (not isinstance(rows, list) or not rows or not all(isinstance(r, str) and set(r) <= {"0", "1"}
                                                               for r in rows)):
            raise DiffpruneError(f"{source}: \"table\" must be a list of strings of 0/1, one per denoiser call")
        if len({len(r) for r in rows}) != 1:
            raise DiffpruneError(f"{source}: the rows of \"table\" have different lengths")
        if len(rows) != d["n_calls"]:
            raise DiffpruneError(f"{source}: \"table\" has {len(rows)} rows but n_calls is {d['n_calls']}")
        table = np.array([[c == "1" for c in r] for r in rows], dtype=bool)
        try:
            return cls(table=table, units=d["units"], granularity=d["granularity"], sampler=d["sampler"],
                       num_steps=d["num_steps"], family=d["family"], model_hash=d["model_hash"],
                       meta=dict(d.get("meta") or {}))
        except DiffpruneError as e:
            raise DiffpruneError(f"{source}: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path):
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path) -> "Schedule":
        p = Path(path)
        if not p.is_file():
            raise DiffpruneError(f"{path}: no such schedule file")
        d = read_json(p)  # bounded size and depth; corrupt JSON is a DiffpruneError naming the file
        if isinstance(d, dict) and not isinstance(d.get("meta", {}), dict):
            raise DiffpruneError(f"{path}: not a valid schedule file ('meta' is not an object)")
        return cls.from_dict(d, source=str(path))

    def __repr__(self):
        kept = self.table.mean()
        return (f"Schedule({self.family}, {self.granularity}, {self.n_units} units x {self.n_calls} calls of "
                f"{self.num_steps}-step {self.sampler}, {kept:.1%} of cells kept, method={self.meta.get('method')})")


def rollout_calls(sampler: str, steps: int) -> int:
    """Denoiser calls of a `steps`-step rollout of `sampler` (PLMS makes one more)."""
    from ..sampling import rollout_length
    return rollout_length(sampler, steps)


def _short(names, n=4):
    return "[" + ", ".join(names[:n]) + (f", ... ({len(names)} in all)]" if len(names) > n else "]")


def _plain(obj):
    """meta made JSON-safe (numpy scalars and arrays become Python values)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def collapse_report(schedule_or_table, graph: UnitGraph) -> dict:
    """Has a schedule collapsed to whole-step reuse? Each call is classified, with the cascade applied, as
    "full" (every unit computed that a dense call computes), "reuse" (no unit computed: the call only reruns the
    always-run layers on cached features, i.e. it reuses the previous step) or "partial". A schedule with reuse
    steps and no partial step is a non-uniform step-skipping schedule in disguise (what DiP-GO's released SD-1.5
    schedule at 0.8 is), and is better compared against fewer sampler steps and whole-step reuse baselines."""
    table = schedule_or_table.table if isinstance(schedule_or_table, Schedule) else np.asarray(schedule_or_table, bool)
    dense = graph.live_units(np.ones(graph.n_units, dtype=bool))
    full, reuse, partial = [], [], []
    for s, row in enumerate(table):
        live = graph.live_units(row)
        (full if np.array_equal(live, dense) else reuse if not live.any() else partial).append(s)
    collapsed = bool(reuse) and not partial
    note = (f"collapsed to whole-step reuse: {len(full)} of {len(table)} calls run in full, the other {len(reuse)} "
            f"reuse the previous step; compare with fewer sampler steps and whole-step reuse"
            if collapsed else f"{len(partial)} of {len(table)} calls compute part of the model")
    return {"collapsed": collapsed, "full_steps": full, "reuse_steps": reuse, "partial_steps": partial,
            "note": note}
