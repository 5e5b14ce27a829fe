"""Schedule: which timesteps a rollout visits, and which units it computes at each denoiser call.

A schedule is a boolean table with one row per denoiser call of a rollout (the call index, never the timestep
value, so Karras grids with repeated timesteps and PLMS's extra call need no special case) and one column per
unit of the model's UnitGraph at one granularity. True = compute the unit, False = reuse the output it produced
the last time it ran. Row 0 is all True: the first call fills the caches.

Since format version 2 a schedule also owns its timestep grid (diffprune.grid): `timesteps` lists the timesteps the
sampler visits (None: the sampler's own `num_steps` grid; a base-grid timestep left out is dropped) and `reuse` marks
the visits at which the sampler steps with the previous prediction without calling the denoiser. Table rows belong to
the other visits, the denoiser calls. Fewer sampler steps, whole-step reuse and a searched grid are schedules of this
one kind; `fold()` turns reused visits into drops where the two are the same rollout (DDIM, flow Euler). `num_steps` stays
the step count of the dense rollout it is measured against, and a schedule is refused for another sampler or step
count.

On disk it is plain JSON a person can read: one string of '1'/'0' per call, the unit names, the sampler and step
count it was made for, the grid (version 2), the model family and a hash of the architecture
(models.architecture_hash), plus `meta` (method, achieved ratio, collapse report, ...). Version-1 files load as
schedules on the sampler's own grid. Every field is checked for type and range on load.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from ..errors import DiffpruneError
from ..grid import Grid, base_timesteps, fold_reason
from ..models import GRANULARITIES, UnitGraph, architecture_hash
from ..sampling import canonical_sampler, make_scheduler, rollout_length
from ..util import atomic_write_text, json_safe, read_json

FORMAT = "diffprune-schedule"
VERSION = 2
READS = (1, 2)
MAX_STEPS = 100_000          # more sampler steps than any scheduler has training timesteps


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
    timesteps: list | None = None   # visited timesteps, descending (None: the sampler's own num_steps grid)
    reuse: list | None = None       # per visit, True = step with the previous prediction (no denoiser call)
    base_calls: int | None = None   # denoiser calls of the dense num_steps rollout (default: the table's rows)

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
        if self.num_steps > MAX_STEPS:
            raise DiffpruneError(f"num_steps {self.num_steps} is beyond any sampler (at most {MAX_STEPS})")
        self.table = table.copy()
        if self.reuse is not None:
            self.reuse = [bool(r) for r in self.reuse]
            if self.reuse and self.reuse[0]:
                raise DiffpruneError("the first visit of a schedule cannot reuse: there is no prediction before it")
            if len(self.reuse) - sum(self.reuse) != self.n_calls:
                raise DiffpruneError(f"the schedule's grid makes {len(self.reuse) - sum(self.reuse)} denoiser calls "
                                     f"but its table has {self.n_calls} rows")
            if not any(self.reuse):
                self.reuse = None
        if self.timesteps is not None:
            self.timesteps = [int(t) if float(t).is_integer() else float(t) for t in self.timesteps]
            if len(self.timesteps) != self.n_visits:
                raise DiffpruneError(f"the schedule visits {self.n_visits} timesteps but lists {len(self.timesteps)}")
        if self.base_calls is None:
            self.base_calls = self.n_calls if self.timesteps is None and self.reuse is None else None
        if self.base_calls is None:
            raise DiffpruneError("a schedule with its own grid needs base_calls (the dense rollout's calls)")
        if isinstance(self.base_calls, bool) or not isinstance(self.base_calls, (int, np.integer)) \
                or not 1 <= self.base_calls <= MAX_STEPS + 1:
            raise DiffpruneError(f"base_calls must be a positive integer, got {self.base_calls!r}")
        self.base_calls = int(self.base_calls)

    # ----- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_table(cls, graph: UnitGraph, table, *, sampler: str, num_steps: int, model=None,
                   model_hash: str | None = None, meta: dict | None = None, timesteps=None, reuse=None,
                   base_calls: int | None = None) -> "Schedule":
        """A schedule over `graph`'s units; the model (or its hash) ties it to one architecture. timesteps /
        reuse / base_calls: its own grid (see the module docstring)."""
        if model is not None:
            model_hash = architecture_hash(model)
        return cls(table=np.asarray(table, dtype=bool), units=graph.units, granularity=graph.granularity,
                   sampler=str(sampler), num_steps=num_steps, family=graph.family, model_hash=model_hash or "",
                   meta=dict(meta or {}), timesteps=None if timesteps is None else list(timesteps),
                   reuse=None if reuse is None else list(reuse), base_calls=base_calls)

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

    @property
    def n_visits(self) -> int:
        """Timesteps the sampler visits: the denoiser calls plus the reused visits."""
        return len(self.reuse) if self.reuse is not None else self.n_calls

    @property
    def grid(self) -> Grid | None:
        """The rollout's grid for sampling.sample(grid=...); None on the sampler's own grid with no reuse."""
        if self.timesteps is None and self.reuse is None:
            return None
        return Grid(timesteps=None if self.timesteps is None else tuple(self.timesteps),
                    reuse=None if self.reuse is None else tuple(self.reuse))

    def visit_table(self) -> np.ndarray:
        """(n_visits x units) keep table with an all-False row at every reused visit (for plots)."""
        rows = np.zeros((self.n_visits, self.n_units), dtype=bool)
        calls = [v for v in range(self.n_visits) if not (self.reuse and self.reuse[v])]
        rows[calls] = self.table
        return rows

    def live_table(self, graph: UnitGraph) -> np.ndarray:
        """(n_calls x units) of the units really computed: the keep table with the dependency cascade applied."""
        self.check(graph)
        return np.stack([graph.live_units(row) for row in self.table])

    def macs(self, graph: UnitGraph) -> int:
        """MACs of one rollout under this schedule (cascade applied, always-run part included)."""
        self.check(graph)
        return graph.schedule_macs(self.table)

    def pruned_ratio(self, graph: UnitGraph, reference_calls: int | None = None) -> float:
        """1 - MACs / MACs of the dense rollout with reference_calls calls (default: the num_steps rollout's)."""
        dense = (reference_calls or self.base_calls) * graph.total_macs
        return 1.0 - self.macs(graph) / dense

    # ----- grids ---------------------------------------------------------------------------------------------
    def fold(self, scheduler=None, *, eta: float = 0.0, approximate: bool = False) -> "Schedule":
        """The schedule with every reused visit dropped: the sampler goes straight from the last computed timestep
        to the next visited one. The same rollout for DDIM (eta 0, no x0 clipping) and flow-matching Euler (refused
        elsewhere with the reason, unless approximate=True). scheduler: the diffusers scheduler the rollout runs (a pipeline's); default the
        sampler's training-schedule build (sampling.make_scheduler)."""
        if self.reuse is None:
            return self
        sched = scheduler if scheduler is not None else make_scheduler(self.sampler)
        reason = fold_reason(sched, eta)
        if reason is not None and not approximate:
            raise DiffpruneError(f"cannot fold this {self.sampler} schedule exactly: {reason}")
        if self.timesteps is None and getattr(sched.config, "use_dynamic_shifting", False) \
                and getattr(sched, "image_seq_len", 0) is None:
            raise DiffpruneError("this scheduler's grid depends on the image size (FLUX's shift): fold with its "
                                 "image_seq_len set (the number of image tokens you will sample at)")
        visited = self.timesteps if self.timesteps is not None else base_timesteps(sched, self.num_steps)
        if len(visited) != self.n_visits:
            raise DiffpruneError(f"the scheduler visits {len(visited)} timesteps, the schedule {self.n_visits}")
        kept = [t for t, r in zip(visited, self.reuse) if not r]
        meta = {**self.meta, "folded": {"dropped": int(sum(self.reuse)), "exact": reason is None}}
        if reason is not None:
            meta["folded"]["why_not_exact"] = reason
        return dataclasses.replace(self, timesteps=kept, reuse=None, meta=meta)

    # ----- compatibility -----------------------------------------------------------------------------------
    def check(self, graph: UnitGraph | None = None, *, model=None, n_calls: int | None = None,
              sampler: str | None = None, num_steps: int | None = None):
        """Raise DiffpruneError if this schedule does not fit the graph, the model, a rollout of n_calls, or the
        sampler and step count a rollout asks for."""
        if sampler is not None and _canonical(sampler) != _canonical(self.sampler):
            raise DiffpruneError(
                f"this schedule was made for the {self.sampler} sampler, not {sampler}: sample with --sampler "
                f"{self.sampler}, or make a schedule for {sampler} (diffprune search --sampler {sampler})")
        if num_steps is not None and int(num_steps) != self.num_steps:
            raise DiffpruneError(
                f"this schedule is for {self.num_steps} {self.sampler} steps, not {num_steps}: sample with --steps "
                f"{self.num_steps}, or make a schedule for {num_steps} steps (diffprune search --steps {num_steps})")
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
        if n_calls is not None and n_calls != self.n_calls and self.grid is not None:
            raise DiffpruneError(
                f"this schedule owns its timestep grid ({self.n_calls} denoiser calls over {self.n_visits} visits "
                f"of a {self.num_steps}-step {self.sampler} rollout), but the rollout makes {n_calls} calls on the "
                f"sampler's own grid: run it through diffprune.sample / evaluate / capture_rollout (grid="
                f"schedule.grid), or `diffprune sample --schedule`")
        if n_calls is not None and n_calls != self.n_calls:
            raise DiffpruneError(
                f"this schedule is for {self.num_steps} {self.sampler} steps ({self.n_calls} denoiser calls), "
                f"but the rollout makes {n_calls} calls; sample with {self.num_steps} steps, or make a schedule "
                f"for this step count (diffprune search --steps)")

    # ----- files -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "family": self.family, "model_hash": self.model_hash,
                "granularity": self.granularity, "units": self.units, "sampler": self.sampler,
                "num_steps": self.num_steps, "base_calls": self.base_calls, "timesteps": self.timesteps,
                "visits": None if self.reuse is None else "".join("r" if r else "c" for r in self.reuse),
                "n_calls": self.n_calls,
                "table": ["".join("1" if k else "0" for k in row) for row in self.table],
                "meta": json_safe(self.meta)}

    @classmethod
    def from_dict(cls, d: dict, source: str = "schedule") -> "Schedule":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise DiffpruneError(f"{source} is not a diffprune schedule (no \"format\": \"{FORMAT}\")")
        if d.get("version") not in READS:
            raise DiffpruneError(f"{source}: schedule format version {d.get('version')!r} is not supported "
                                 f"(this diffprune reads versions {', '.join(map(str, READS))})")
        missing = [k for k in ("family", "model_hash", "granularity", "units", "sampler", "num_steps", "n_calls",
                               "table") if k not in d]
        if missing:
            raise DiffpruneError(f"{source}: schedule is missing {', '.join(missing)}")

        def bad(what):
            return DiffpruneError(f"{source}: {what}")

        for key in ("family", "model_hash", "granularity", "sampler"):
            if not isinstance(d[key], str):
                raise bad(f"\"{key}\" must be a string, got {type(d[key]).__name__}")
        units = d["units"]
        if not isinstance(units, list) or not units or not all(isinstance(u, str) and u for u in units) \
                or len(set(units)) != len(units):
            raise bad("\"units\" must be a non-empty list of distinct unit names")
        for key in ("num_steps", "n_calls"):
            if isinstance(d[key], bool) or not isinstance(d[key], int) or not 1 <= d[key] <= MAX_STEPS + 1:
                raise bad(f"\"{key}\" must be an integer from 1 to {MAX_STEPS}, got {d[key]!r}")
        rows = d["table"]
        if (not isinstance(rows, list) or not rows or not all(isinstance(r, str) and set(r) <= {"0", "1"}
                                                               for r in rows)):
            raise bad("\"table\" must be a list of strings of 0/1, one per denoiser call")
        if len({len(r) for r in rows}) != 1:
            raise bad("the rows of \"table\" have different lengths")
        if len(rows) != d["n_calls"]:
            raise bad(f"\"table\" has {len(rows)} rows but n_calls is {d['n_calls']}")
        meta = d.get("meta") if d.get("meta") is not None else {}
        if not isinstance(meta, dict):
            raise bad(f"\"meta\" must be an object, got {type(meta).__name__}")
        timesteps, visits, base_calls = d.get("timesteps"), d.get("visits"), d.get("base_calls")
        if timesteps is not None and (not isinstance(timesteps, list) or not 0 < len(timesteps) <= MAX_STEPS + 1
                                      or not all(_timestep_value(t) for t in timesteps)):
            raise bad("\"timesteps\" must be null or a non-empty list of numbers (timesteps of the sampler)")
        if visits is not None and (not isinstance(visits, str) or not visits or set(visits) - {"c", "r"}):
            raise bad("\"visits\" must be null or a string of 'c' (call) and 'r' (reuse), one per visit")
        if base_calls is not None and (isinstance(base_calls, bool) or not isinstance(base_calls, int)):
            raise bad(f"\"base_calls\" must be an integer, got {base_calls!r}")
        table = np.array([[c == "1" for c in r] for r in rows], dtype=bool)
        try:
            return cls(table=table, units=units, granularity=d["granularity"], sampler=d["sampler"],
                       num_steps=d["num_steps"], family=d["family"], model_hash=d["model_hash"], meta=dict(meta),
                       timesteps=timesteps, reuse=None if visits is None else [c == "r" for c in visits],
                       base_calls=base_calls)
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
        return cls.from_dict(d, source=str(path))

    def __repr__(self):
        kept = self.table.mean()
        grid = "" if self.grid is None else f", own grid of {self.n_visits} visits"
        return (f"Schedule({self.family}, {self.granularity}, {self.n_units} units x {self.n_calls} calls of "
                f"{self.num_steps}-step {self.sampler}{grid}, {kept:.1%} of cells kept, "
                f"method={self.meta.get('method')})")


def rollout_calls(sampler: str, steps: int) -> int:
    """Denoiser calls of a `steps`-step rollout of `sampler` (PLMS makes one more)."""
    return rollout_length(sampler, steps)


def _timestep_value(t) -> bool:
    """A number a sampler's timestep can be (JSON allows integers of any size)."""
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        return False
    return abs(t) <= 1e6 if isinstance(t, int) else bool(np.isfinite(t)) and abs(t) <= 1e6


def _canonical(sampler: str) -> str:
    return canonical_sampler(sampler)


def _short(names, n=4):
    return "[" + ", ".join(names[:n]) + (f", ... ({len(names)} in all)]" if len(names) > n else "]")


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
