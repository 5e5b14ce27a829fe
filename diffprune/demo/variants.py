"""The demo's variants besides dense, DiP-GO and Diff-Pruning: the cheap baselines at the same MACs (DeepCache,
fewer sampler steps) and `search --method auto` at each ratio, whose searched grid (and step reuse where auto picks
it) gets a row of its own. Each calls `ev` (evaluate with the demo's common settings) and `record` (a table row)."""
from __future__ import annotations

from ..errors import DiffpruneError
from ..sampling import rollout_length
from ..schedule import Schedule, search_schedule
from ..schedule.auto import SHORTFALL, Candidate, auto_search, make_candidates, row
from ..schedule.baselines import deepcache_row, fewer_steps_count, table_with_full_steps
from ..schedule.ratios import RATIO_TOLERANCE
from ..schedule.schedule import collapse_report
from .settings import DEEPCACHE_DEPTH, FAMILY_NAMES, GUIDANCE, SAMPLER, DemoSettings


def reuse_info(sched, graph) -> dict:
    """What the schedule records of its shape: whole-step reuse (every call computes all units or none)?"""
    c = collapse_report(sched.table, graph)
    return {"whole_step_reuse": bool(c["collapsed"]), "calls_full": len(c["full_steps"]),
            "calls_reused": len(c["reuse_steps"]), "calls_partial": len(c["partial_steps"])}


AUTO_FAMILIES = ("steps", "grid", "deepcache", "step-reuse")   # made here; DiP-GO's candidate is the learned schedule


def auto_variants(dense, s: DemoSettings, graph, learned, ev, record, variants, progress) -> dict:
    """search --method auto at each ratio, with the learned DiP-GO schedule as its DiP-GO candidate. The searched
    grid gets a row of its own, step reuse one where auto picks it; the row of auto's pick is marked. Returns what
    auto found per ratio (results.json "auto")."""
    out = {}
    for r in s.ratios:
        cands = make_candidates(dense, [r], graph=graph, families=AUTO_FAMILIES, progress=False,
                                budget=s.search_budget, n_samples=s.search_samples, seed=s.seed, steps=s.steps,
                                sampler=SAMPLER, guidance_scale=GUIDANCE)
        sched = learned["schedules"][r][0]
        dip = Candidate("dipgo", r, schedule=sched, pruned_ratio=float(sched.pruned_ratio(graph)),
                        macs=int(sched.macs(graph)))
        if dip.pruned_ratio < r - SHORTFALL:
            dip.skipped = f"reaches only a pruned ratio of {dip.pruned_ratio:.3f}, not {r}"
        cands.append(dip)
        try:
            res = auto_search(dense, r, steps=s.steps, sampler=SAMPLER, graph=graph, n_samples=s.search_samples,
                              guidance_scale=GUIDANCE, seed=s.seed, candidates=cands, progress=False)
            best, summary = res.best.family, res.summary
        except DiffpruneError as e:  # no family reaches the ratio (few steps): said, not fatal
            best, summary = None, str(e)
        for c in cands:  # the searched grid gets a row; step reuse only when auto picks it (time: 5 minutes)
            if c.family != "grid" and not (c.family == "step-reuse" and best == "step-reuse"):
                continue
            key, name = f"{c.family}-{r:g}", f"{FAMILY_NAMES[c.family]} {r:g}"
            if c.schedule is None or c.skipped:
                variants.append(unavailable(key, name, c.family, r, c.skipped))
                continue
            m, imgs = ev(dense, schedule=c.schedule, num_steps=s.steps)
            note = c.schedule.meta.get("ratio_note") or c.schedule.meta.get("note")
            record(key, name, c.family, "dense", dense, m, imgs, level=r, schedule=c.schedule, note=note,
                   **reuse_info(c.schedule, graph))
        for v in variants:
            if v.get("level") == r and v["method"] == best and v["available"]:
                v["auto"] = "picked"
        out[f"{r:g}"] = {"best": best, "summary": summary, "held_out_seed": s.seed + 1,
                         "n_samples": s.search_samples, "candidates": [row(c) for c in cands]}
    return out


def unavailable(key, name, method, level, note) -> dict:
    return {"key": key, "name": name, "method": method, "level": level, "available": False, "note": note}


def baseline_variants(dense, s: DemoSettings, graph, ev, record, variants):
    calls = rollout_length(SAMPLER, s.steps)
    # DeepCache's shallow branch runs at every step, which caps its ratio: one full step and the rest shallow
    cap = Schedule.from_table(graph, table_with_full_steps(calls, [0], deepcache_row(graph, DEEPCACHE_DEPTH)),
                              sampler=SAMPLER, num_steps=s.steps).pruned_ratio(graph)
    reached = []
    for r in s.ratios:
        try:
            sched = search_schedule(dense, "deepcache", ratio=r, steps=s.steps, sampler=SAMPLER, graph=graph,
                                    depth=DEEPCACHE_DEPTH, progress=False)
        except DiffpruneError:
            v = unavailable(f"deepcache-{r:g}", f"DeepCache {r:g}", "deepcache", r,
                             f"prunes at most {cap:.3f} of the MACs of a {s.steps}-step rollout here (depth "
                             f"{DEEPCACHE_DEPTH}): its shallow branch runs at every step")
            variants.append({**v, "capped": True, "reached_ratio": cap})
            continue
        got = sched.pruned_ratio(graph)
        capped = r - got >= RATIO_TOLERANCE  # DeepCache's nearest schedule prunes visibly less: it sits at its cap
        name = f"DeepCache {r:g}" + (f" (capped: {got:.3f})" if capped else "")
        m, imgs = ev(dense, schedule=sched, num_steps=s.steps)
        record(f"deepcache-{r:g}", name, "deepcache", "dense", dense, m, imgs, level=r, schedule=sched,
               note=(f"at its cap: prunes {got:.3f} of the MACs, not {r:g} (one full step in {s.steps}; its shallow "
                     f"branch runs at every step)") if capped else sched.meta.get("ratio_note"),
               capped=capped, reached_ratio=got)
        reached.append(r)
    if not reached:  # no asked ratio is reachable: show it at the most it can do, labelled as such
        sched = search_schedule(dense, "deepcache", ratio=cap, steps=s.steps, sampler=SAMPLER, graph=graph,
                                depth=DEEPCACHE_DEPTH, progress=False)
        m, imgs = ev(dense, schedule=sched, num_steps=s.steps)
        record("deepcache-cap", f"DeepCache (capped: {cap:.3f})", "deepcache", "dense", dense, m, imgs,
               schedule=sched, note="not at an asked ratio: the most DeepCache prunes here", capped=True,
               reached_ratio=cap)
    for r in s.ratios:
        k = fewer_steps_count(SAMPLER, s.steps, r)
        m, imgs = ev(dense, num_steps=k)
        name = f"{SAMPLER.upper()} {k} step{'s' if k > 1 else ''}"
        if sum(fewer_steps_count(SAMPLER, s.steps, q) == k for q in s.ratios) > 1:
            name += f" ({r:g})"  # two ratios round to the same step count
        record(f"steps-{r:g}", name, "steps", "dense", dense, m, imgs, level=r,
               steps=k)
