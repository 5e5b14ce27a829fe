"""The noise of the demo's quality numbers and what it lets one say: FD-FMNIST's bootstrap s.d. and SSIM's standard
error per variant, paired differences between variants (the same resample of sample indices for both, since every
variant starts from the same noise and labels), and which variant beats which beyond that noise."""
from __future__ import annotations

import numpy as np

from ..metrics import classifier, quality
from ..metrics.quality import frechet_distance
from ..metrics.significance import verdict
from ..schedule.ratios import RATIO_TOLERANCE
from .settings import BOOTSTRAP, DemoSettings


def add_noise_estimates(variants, art, s: DemoSettings):
    """FD-FMNIST's bootstrap s.d. and SSIM's standard error over the samples, per variant."""
    ref = classifier.reference_statistics()
    dense = art["images"]["dense"]
    rng = np.random.default_rng(s.seed)
    art["resamples"] = [rng.integers(0, s.n_samples, s.n_samples) for _ in range(BOOTSTRAP)]
    for v in variants:
        if not v["available"]:
            continue
        imgs = art["images"][v["key"]]
        feats = classifier.features(imgs).double().numpy()
        art["features"][v["key"]] = feats
        per = quality.ssim(imgs, dense, reduction="none").double().numpy()
        art["ssim"][v["key"]] = per
        v["ssim_se"] = float(per.std(ddof=1) / np.sqrt(len(per))) if len(per) > 1 else 0.0
        boots = [frechet_distance(feats[idx], ref) for idx in art["resamples"]]
        v["fd_sd"] = float(np.std(boots, ddof=1))
    art["reference_stats"] = ref


def comparisons(variants, art, s: DemoSettings) -> list[dict]:
    """Paired differences between the variants at each matched MACs level (same noise and labels, so the same
    resample of sample indices is applied to both): FD and SSIM differences with their bootstrap s.d."""
    ref = art["reference_stats"]
    out = []
    groups = {}
    for v in variants:
        if v["available"] and v.get("level") is not None:
            groups.setdefault(v["level"], []).append(v)
    pairs = [(level, a, b) for level, group in groups.items() for i, a in enumerate(group) for b in group[i + 1:]]
    by_key = {v["key"]: v for v in variants if v["available"]}
    # across levels: structural pruning against dense, and what a schedule costs the pruned model
    pairs += [(None, by_key["pruned"], v) for v in variants
              if v["available"] and v["method"] in ("dense", "pruned+dipgo")]
    for level, a, b in pairs:
        fa, fb = art["features"][a["key"]], art["features"][b["key"]]
        fd_diffs = [frechet_distance(fa[idx], ref) - frechet_distance(fb[idx], ref) for idx in art["resamples"]]
        d_ssim = art["ssim"][a["key"]] - art["ssim"][b["key"]]
        out.append({"level": level, "a": a["key"], "b": b["key"],
                    "fd_diff": a["fd_fmnist"] - b["fd_fmnist"], "fd_diff_sd": float(np.std(fd_diffs, ddof=1)),
                    "ssim_diff": a["ssim_to_dense"] - b["ssim_to_dense"],
                    "ssim_diff_se": float(d_ssim.std(ddof=1) / np.sqrt(len(d_ssim)))})
    return out


# ----- verdicts: beyond noise or within it (metrics.significance.verdict) ---------------------------------------

def pair(results, a, b):
    for c in results["comparisons"]:
        if (c["a"], c["b"]) == (a, b):
            return c
        if (c["a"], c["b"]) == (b, a):  # flip so that the differences read a - b
            return {**c, "a": a, "b": b, "fd_diff": -c["fd_diff"], "ssim_diff": -c["ssim_diff"]}
    return None


def beats(results, a: dict, b: dict) -> bool:
    """a is better than b beyond noise in FD-FMNIST or SSIM to dense, and worse beyond noise in neither."""
    c = pair(results, a["key"], b["key"])
    verdicts = (verdict(c["fd_diff"], c["fd_diff_sd"], True), verdict(c["ssim_diff"], c["ssim_diff_se"], False))
    return "better" in verdicts and "worse" not in verdicts


def level_verdict(results: dict, level: float) -> dict:
    """The winner at one matched MACs level: the variant that beats (see beats) every other one there. Capped rows
    prune less than the level, so they are not in the contest. Without a winner, "front" holds the variants no
    other one beats: what the noise (or a trade-off between the two metrics) leaves standing."""
    group = [v for v in results["variants"] if v["available"] and v.get("level") == level]
    contest = [v for v in group if not short_of(v, level)]
    out = {"level": level, "contest": contest, "out": [v for v in group if short_of(v, level)], "winner": None,
           "front": []}
    for a in contest:
        if len(contest) > 1 and all(beats(results, a, b) for b in contest if b is not a):
            out["winner"] = a
            return out
    out["front"] = [a for a in contest if not any(beats(results, b, a) for b in contest if b is not a)]
    return out


def achieved(v: dict) -> float:
    """The share of the dense rollout's MACs the variant prunes."""
    return v["reached_ratio"] if v.get("reached_ratio") is not None else 1 - 1 / v["macs_speedup"]


def short_of(v: dict, level: float) -> bool:
    """Prunes less than its level by a visible amount (RATIO_TOLERANCE): cheaper to beat, so not in the contest."""
    return bool(v.get("capped")) or achieved(v) < level - RATIO_TOLERANCE
