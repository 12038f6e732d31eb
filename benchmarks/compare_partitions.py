"""Does a method help under label skew? The methods table's two halves side by side.

Issue 30 asks whether CalFAT helps under label skew. One sweep ranks methods under one
partition; the question is about the interaction: does CalFAT lose less than the others when
the clients' labels are skewed? So, per cell present in both sweeps (final model, APGD-CE +
APGD-T on the sweep's fixed images; finished runs only):

- each partition's mean ± sample std over seeds;
- the cost of skew, IID − Dirichlet, with its standard error (Welch: the seeds of the two sweeps
  are independent samples);
- for the method named by --method against every other cell: its lead under IID, its lead
  under skew, and the change in lead, with standard errors. A lead that grows under skew by
  more than ~2 standard errors (t > 2) is "helps under label skew"; less does not show that it helps.

    python benchmarks/compare_partitions.py benchmarks/results/mnist-methods-iid \\
        benchmarks/results/mnist-methods-dirichlet --method calfat

Reads only the sweeps' own files (sweep.json and each run's summary.json), so it works on kept
results (benchmarks/keep_results.py) as well as on a live sweep directory.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from typing import Dict, List, NamedTuple, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ray_fedat.sweep_table import mean_std, pct, sweep_rows  # noqa: E402


class Estimate(NamedTuple):
    """A difference of means (or a mean) with its standard error; se is None below 2 seeds."""
    value: float
    se: Optional[float]

    def text(self, scale: float = 100.0) -> str:
        if self.se is None:
            return f"{self.value * scale:+.1f}"
        z = f", t = {self.value / self.se:.1f}" if self.se > 0 else ""
        return f"{self.value * scale:+.1f} ± {self.se * scale:.1f}{z}"


def cell_scores(sweep_dir: str, metric: str = "final_attack_robust") -> Dict[str, List[float]]:
    """cell name -> the metric of each finished run (seed order), from a sweep directory."""
    try:
        rows = sweep_rows(sweep_dir)
    except FileNotFoundError as e:
        raise SystemExit(f"compare_partitions: {e}")
    return {r["cell"]: [float(v[metric]) for v in r["run_values"] if v[metric] is not None] for r in rows}


def mean_se(values: Sequence[float]) -> Estimate:
    """The mean and its standard error (sample std / sqrt(n))."""
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) >= 2 else None
    return Estimate(statistics.fmean(values), se)


def difference(a: Estimate, b: Estimate) -> Estimate:
    """a − b for independent estimates: the standard errors add in quadrature (Welch's SE)."""
    se = math.hypot(a.se, b.se) if a.se is not None and b.se is not None else None
    return Estimate(a.value - b.value, se)


def spread(values: Sequence[float]) -> str:
    return f"{pct(mean_std(list(values)))} (n={len(values)})" if values else "-"


def compare(iid: Dict[str, List[float]], skew: Dict[str, List[float]], method: Optional[str]) -> str:
    """The markdown report: each cell under both partitions, then `method`'s lead over the rest."""
    cells = [c for c in iid if c in skew]
    lines = ["| cell | IID | Dirichlet | cost of skew (IID − Dirichlet) |", "|---|---|---|---|"]
    for cell in cells:
        cost = difference(mean_se(iid[cell]), mean_se(skew[cell])).text() if iid[cell] and skew[cell] else "-"
        lines.append(f"| {cell} | {spread(iid[cell])} | {spread(skew[cell])} | {cost} |")
    if method is None:
        return "\n".join(lines)
    if method not in cells:
        raise SystemExit(f"compare_partitions: no cell {method!r} in both sweeps (cells: {', '.join(cells)})")
    lines += ["", f"| {method} against | lead under IID | lead under Dirichlet | change in lead under skew |",
              "|---|---|---|---|"]
    for other in cells:
        if other == method or not all((iid[method], iid[other], skew[method], skew[other])):
            continue
        lead_iid = difference(mean_se(iid[method]), mean_se(iid[other]))
        lead_skew = difference(mean_se(skew[method]), mean_se(skew[other]))
        lines.append(f"| {other} | {lead_iid.text()} | {lead_skew.text()} | {difference(lead_skew, lead_iid).text()} |")
    lines.append("\npoints of the metric; ± one standard error (sample std / √n, added in quadrature); "
                 "t: value / standard error (Welch).")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("iid_sweep", help="the sweep directory of the IID half")
    p.add_argument("skew_sweep", help="the sweep directory of the label-skewed (Dirichlet) half")
    p.add_argument("--method", default="calfat", help="the cell whose lead is compared (default calfat)")
    p.add_argument("--metric", default="final_attack_robust",
                   choices=("final_attack_robust", "yardstick_robust", "natural", "worst_client_robust"))
    args = p.parse_args(argv)
    print(compare(cell_scores(args.iid_sweep, args.metric), cell_scores(args.skew_sweep, args.metric), args.method))


if __name__ == "__main__":
    main()
