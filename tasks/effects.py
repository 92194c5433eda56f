"""Effects beyond main effects, for a grid sweep's report: a factorial ANOVA of the metric over the grid's factors
(statsmodels' OLS with every main effect and two-way interaction, type II sums of squares), each effect's share
of the variance (eta squared) and its p-value, largest first; then, for the strongest interaction, Tukey's HSD
over its cells (pairwise, family-wise adjusted). Seeds are the replicates."""
from __future__ import annotations

import itertools
import math
import re
import warnings


def ci95(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval (nan half-width for a single value)."""
    import numpy as np

    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    if len(v) == 1:
        return float(v[0]), float("nan")
    from scipy import stats

    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def _name(term: str) -> str:
    return " × ".join(re.findall(r"Q\('([^']+)'\)", term)) or term


def effects(rows: list[dict], factors: list[str], metric: str) -> list[dict]:
    """[{effect, df, F, p, eta2}] over the finished rows, largest eta squared first; [] when there is nothing to
    test (one factor with one level, or no replicate left for the residual)."""
    import pandas as pd
    import statsmodels.formula.api as smf
    from statsmodels.stats.anova import anova_lm

    factors = [f for f in factors if f != "seed"]
    ok = [r for r in rows if r["status"] == "FINISHED" and r.get(metric) is not None and math.isfinite(r[metric])]
    varied = [f for f in factors if len({str(r["levels"][f]) for r in ok}) > 1]
    cells = {tuple(str(r["levels"][f]) for f in varied) for r in ok}
    if not varied or len(ok) <= len(cells):  # no replicate left to estimate the residual
        return []
    df = pd.DataFrame([{**{f: str(r["levels"][f]) for f in varied}, "y": r[metric]} for r in ok])
    terms = [f"C(Q('{f}'))" for f in varied] + [f"C(Q('{a}')):C(Q('{b}'))" for a, b in itertools.combinations(varied, 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = anova_lm(smf.ols("y ~ " + " + ".join(terms), data=df).fit(), typ=2)
    total = table["sum_sq"].sum()
    out = [{"effect": _name(term), "df": int(row["df"]), "F": float(row["F"]), "p": float(row["PR(>F)"]),
            "eta2": float(row["sum_sq"] / total) if total else math.nan}
           for term, row in table.iterrows() if term != "Residual" and math.isfinite(row["F"])]
    return sorted(out, key=lambda e: -e["eta2"])


def pairwise(rows: list[dict], factors: list[str], metric: str) -> list[dict]:
    """Tukey's HSD between the cells (levels of `factors` together), family-wise adjusted: the pairs that differ."""
    from statsmodels.stats.multicomp import pairwise_tukeyhsd

    ok = [r for r in rows if r["status"] == "FINISHED" and r.get(metric) is not None and math.isfinite(r[metric])]
    groups = [" · ".join(f"{f}={r['levels'][f]}" for f in factors) for r in ok]
    if len(set(groups)) < 2 or len(ok) <= len(set(groups)):
        return []
    res = pairwise_tukeyhsd([r[metric] for r in ok], groups)
    data = res.summary().data[1:]  # group1, group2, meandiff, p-adj, lower, upper, reject
    return [{"a": a, "b": b, "diff": float(d), "p_adj": float(p)} for a, b, d, p, *_, reject in data if reject]


def effects_lines(rows: list[dict], factors: list[str], metric: str) -> list[str]:
    """The report's section: the ANOVA table, and the strongest interaction's significant pairs."""
    found = effects(rows, factors, metric)
    if not found:
        return []
    lines = ["## Effects and interactions", "",
             f"Factorial ANOVA of `{metric}` (type II, seeds as replicates): each main effect and two-way "
             "interaction, its share of the variance (η²) and p-value, largest first.", "",
             "| effect | df | F | p | η² |", "|---|---|---|---|---|"]
    lines += [f"| {e['effect']} | {e['df']} | {e['F']:.2f} | {e['p']:.3g} | {e['eta2']:.3f} |" for e in found]
    top = next((e for e in found if " × " in e["effect"] and e["p"] < 0.05), None)
    if top is not None:
        pairs = pairwise(rows, top["effect"].split(" × "), metric)[:10]
        lines += ["", f"The interaction {top['effect']} matters (p = {top['p']:.3g}): its cells that differ "
                      "(Tukey's HSD, family-wise adjusted):", ""]
        lines += [f"- {p['a']} vs {p['b']}: {p['diff']:+.4f} (p = {p['p_adj']:.3g})" for p in pairs] or ["- none"]
    return [*lines, ""]
