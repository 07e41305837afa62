"""Statistics and reporting of benchmarks/quality.py: the Student-t interval of paired
differences (no scipy), verdicts, the markdown table and the FD-vs-step plot."""
from __future__ import annotations

import json
from collections.abc import Mapping
import math
from pathlib import Path

import numpy as np

from quality_presets import BASELINES, CONFIGS

METRICS = ("fd", "precision", "recall")
LOWER_IS_BETTER = {"fd": True, "precision": False, "recall": False}
CONFIDENCE = 0.95


# ----------------------------------------------------------------------------- statistics


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(x: float, df: float) -> float:
    """CDF of Student's t distribution with ``df`` degrees of freedom."""
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df}")
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + x * x))
    return 1.0 - tail if x >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t (bisection on :func:`t_cdf`, |error| < 1e-10)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2


def paired_difference(values: dict, baseline: dict, confidence: float = CONFIDENCE) -> dict:
    """Mean paired difference (values - baseline, matched by seed) with a two-sided Student-t
    confidence interval. ``values`` / ``baseline``: {seed: number}."""
    for name, arg in (("values", values), ("baseline", baseline)):
        if not isinstance(arg, Mapping):  # a list's entries would be matched as seeds
            raise TypeError(f"{name}: expected a {{seed: number}} mapping, got "
                            f"{type(arg).__name__}")
    seeds = sorted(set(values) & set(baseline))
    diffs = np.array([values[s] - baseline[s] for s in seeds], dtype=np.float64)
    out = {"seeds": seeds, "n_pairs": len(seeds), "differences": diffs.tolist(),
           "confidence": confidence, "method": "paired by seed, Student-t interval"}
    if len(seeds) == 0:
        return {**out, "mean_diff": None, "ci_low": None, "ci_high": None}
    mean = float(diffs.mean())
    if len(seeds) < 2 or not np.isfinite(diffs).all():  # a NaN metric (diverged run): no CI
        return {**out, "mean_diff": mean, "ci_low": None, "ci_high": None, "sd": None}
    sd = float(diffs.std(ddof=1))
    tq = t_quantile(0.5 + confidence / 2, len(seeds) - 1)
    half = tq * sd / math.sqrt(len(seeds))
    return {**out, "mean_diff": mean, "sd": sd, "df": len(seeds) - 1, "t_quantile": tq,
            "half_width": half, "ci_low": mean - half, "ci_high": mean + half}


def verdict(diff: dict, lower_is_better: bool = True) -> str:
    if diff.get("ci_low") is None:
        if diff["n_pairs"] >= 2:
            return "not available (a non-finite metric: diverged run?)"
        return "insufficient seeds (need >= 2 paired)"
    if diff["ci_high"] < 0:
        return "better" if lower_is_better else "worse"
    if diff["ci_low"] > 0:
        return "worse" if lower_is_better else "better"
    return "no significant difference"


# ----------------------------------------------------------------------------- output


def _pm(stat) -> str:
    if stat["mean"] is None:
        return "–"
    if stat["std"] is None:
        return f"{stat['mean']:.4g}"
    return f"{stat['mean']:.4g} ± {stat['std']:.2g}"


def _diff(stat) -> str:
    d = stat.get("vs_vanilla")
    if d is None:
        return "(baseline)"
    if d["mean_diff"] is None:
        return "–"
    if d["ci_low"] is None:
        return f"{d['mean_diff']:+.4g} (n={d['n_pairs']}, no CI)"
    return f"{d['mean_diff']:+.4g} [{d['ci_low']:+.4g}, {d['ci_high']:+.4g}]"


def summary_table(summary: dict) -> str:
    rows = ["| configuration | seeds | FD | precision | recall | ΔFD vs vanilla (95% CI) | "
            "Δprecision | Δrecall | verdict (FD) | wall s / run |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name in CONFIGS:
        entry = summary["configs"].get(name)
        if entry is None:
            continue
        f = entry["final"]
        walls = list(entry["wall_seconds"].values())
        rows.append(
            f"| {entry['label']} | {','.join(map(str, entry['seeds']))} | {_pm(f['fd'])} | "
            f"{_pm(f['precision'])} | {_pm(f['recall'])} | {_diff(f['fd'])} | "
            f"{_diff(f['precision'])} | {_diff(f['recall'])} | {entry.get('verdict', '–')} | "
            f"{np.mean(walls):.1f} |")
    return "\n".join(rows)


def curve_table(summary: dict) -> str:
    steps = summary["preset"]["eval_steps"]
    rows = ["| configuration | " + " | ".join(f"FD @ {s}" for s in steps) + " |",
            "|---|" + "---|" * len(steps)]
    for name in CONFIGS:
        entry = summary["configs"].get(name)
        if entry is not None:
            rows.append(f"| {entry['label']} | " + " | ".join(
                _pm(entry["by_step"][str(s)]["fd"]) for s in steps) + " |")
    return "\n".join(rows)


def verdict_lines(summary: dict) -> list:
    lines = []
    for name in CONFIGS:
        entry = summary["configs"].get(name)
        if entry is None or name == "vanilla":
            continue
        d = entry["final"]["fd"].get("vs_vanilla")
        if d is None:
            lines.append(f"{entry['label']}: no vanilla results to compare with")
            continue
        ci = "" if d["ci_low"] is None else \
            f", 95% CI [{d['ci_low']:+.4g}, {d['ci_high']:+.4g}]"
        mean = "–" if d["mean_diff"] is None else f"{d['mean_diff']:+.4g}"
        lines.append(f"{entry['label']}: {entry['verdict']} vs vanilla "
                     f"(ΔFD {mean}{ci}, {d['n_pairs']} paired seeds)")
    return lines


def write_markdown(summary: dict, path: Path) -> None:
    rec, p = summary["record"], summary["preset"]
    floor = summary["reference_floor"]
    model = p["model"] + (" " + json.dumps(p["model_config"]) if p["model_config"] else "")
    text = [
        f"# Sample quality: ANT vs vanilla (preset `{p['name']}`)", "",
        f"Final step {p['steps']}; {p['num_eval']} samples per run (DDIM {p['sample_steps']} "
        f"steps, eta 0) vs {p['num_eval']} held-out ProceduralShapes {p['image_size']} px; "
        f"model {model}; batch {p['batch_size']}; K = {p['k']}. "
        "FD uses random-conv features (relative, not Inception FID); lower is better.", "",
        f"Versions: {json.dumps(rec['versions'])}. Machine: {json.dumps(rec['machine'])}. "
        f"Wall time of this invocation: {rec['wall_seconds_this_invocation']:.1f} s; per-run "
        "wall times in the last column and, with every number's seed, in "
        "`results/<config>/seed<S>.json` (runs share the machine with --jobs: vanilla runs "
        "first, at most one per seed at a time, so its wall time is not comparable).", "",
        summary_table(summary), "",
        f"Statistics: {summary['statistics']['spread']}; Δ = {summary['statistics']['difference']}"
        f"; verdict on {summary['statistics']['verdict_metric']}.", "",
        f"Reference floor (real training images vs held-out): FD {floor['fd']:.4g}, precision "
        f"{floor['precision']:.3f}, recall {floor['recall']:.3f}.", "",
        "## FD vs training step (mean ± std over seeds)", "", curve_table(summary), "",
        "## Verdicts", "", *[f"- {line}" for line in verdict_lines(summary)], ""]
    path.write_text("\n".join(text))


def plot_curves(summary: dict, path: Path):
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array(summary["preset"]["eval_steps"])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    # more configurations than the default 10 colours: tab20's dark shades, then its light ones
    colours = plt.get_cmap("tab20").colors
    for index, name in enumerate(CONFIGS):
        entry = summary["configs"].get(name)
        if entry is None:
            continue
        stats = [entry["by_step"][str(s)]["fd"] for s in steps]
        mean = np.array([s["mean"] if s["mean"] is not None else np.nan for s in stats])
        std = np.array([s["std"] if s["std"] is not None else 0.0 for s in stats])
        line, = ax.plot(steps, mean, marker="o", lw=1.5, label=entry["label"],
                        color=colours[(2 * index) % 20 + (index // 10) % 2],
                        ls="--" if name in BASELINES else "-")
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("training step")
    ax.set_ylabel("FD (random-conv features)")
    means = np.array([y for line in ax.get_lines() for y in line.get_ydata()], dtype=float)
    means = means[np.isfinite(means) & (means > 0)]
    if means.size and means.max() > 10 * means.min():  # keep the final spread readable
        ax.set_yscale("log")
        ax.set_ylabel("FD (random-conv features, log scale)")
    ax.set_title(f"FD vs step, mean ± std over seeds (preset {summary['preset']['name']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
