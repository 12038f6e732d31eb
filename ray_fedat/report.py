"""Compare runs: `python -m ray_fedat.report runs/a runs/b ...` prints one row per run;
`python -m ray_fedat.report --sweep runs/GRID` (re)writes a sweep's table (mean ± std per cell)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional, Sequence

from .recorder import best_rounds, read_metrics


def summarize(run_dir: str) -> dict:
    """One run's row, from summary.json (config) and metrics.jsonl (rounds)."""
    summary_path = os.path.join(run_dir, "summary.json")
    if not os.path.isfile(summary_path):
        raise FileNotFoundError(f"{run_dir}: no summary.json (not a ray_fedat run directory)")
    with open(summary_path) as f:
        summary = json.load(f)
    records = read_metrics(run_dir)
    evaluated = [r for r in records if r.get("natural_acc") is not None]
    best = best_rounds(records)
    cfg = summary["config"]
    clients = (summary.get("client_robustness") or {}).get("robust") or {}
    attack = summary.get("final_attack") or {}
    final_strong = (attack.get("models") or {}).get("final", {}).get("robust_acc")
    return {
        "run": os.path.basename(os.path.normpath(run_dir)),
        "dataset": cfg["dataset"], "method": cfg["method"], "partition": cfg["partition"],
        "clients": cfg["clients"], "rounds": records[-1]["round"] if records else 0, "status": summary["status"],
        "final_nat": evaluated[-1]["natural_acc"] if evaluated else None,
        "final_rob": evaluated[-1]["robust_acc"] if evaluated else None,
        "best_nat": best["natural"]["natural_acc"] if best["natural"] else None,
        "best_nat_round": best["natural"]["round"] if best["natural"] else None,
        "best_rob": best["robust"]["robust_acc"] if best["robust"] else None,
        "best_rob_round": best["robust"]["round"] if best["robust"] else None,
        "chosen_on": (summary.get("selection") or {}).get("chosen_on", "test"),
        "worst_client_rob": clients.get("worst"),
        "bottom20_rob": clients.get("bottom_mean"),
        "final_attack": attack.get("attack") if final_strong is not None else None,
        "final_strong_rob": final_strong,  # the headline robust accuracy
        "final_attack_images": attack.get("images") if final_strong is not None else None,
        "wall_s": summary.get("wall_s"),
    }


def format_table(rows: List[dict]) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    header = ["run", "dataset", "method", "partition", "K", "rounds", "final nat", "final rob (yardstick)",
              "best nat (round)", "best rob (round)", "chosen on", "worst client rob", "bottom 20% rob",
              "final robust (strong attack)", "wall", "status"]
    body = [[r["run"], r["dataset"], r["method"], r["partition"], str(r["clients"]), str(r["rounds"]),
             pct(r["final_nat"]), pct(r["final_rob"]), f"{pct(r['best_nat'])} ({r['best_nat_round']})",
             f"{pct(r['best_rob'])} ({r['best_rob_round']})", r["chosen_on"], pct(r["worst_client_rob"]),
             pct(r["bottom20_rob"]),
             "-" if r["final_strong_rob"] is None else
             f"{pct(r['final_strong_rob'])} {r['final_attack']}, {r['final_attack_images']} images",
             "-" if r["wall_s"] is None else f"{r['wall_s']:.0f}s", r["status"]] for r in rows]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ray_fedat.report", description=__doc__)
    parser.add_argument("run_dirs", nargs="*", metavar="RUN_DIR")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--sweep", metavar="DIR", default=None,
                        help="a `python -m ray_fedat.sweep` directory: write its table.md, table.csv, table.png")
    args = parser.parse_args(argv)
    if args.sweep:
        report_sweep(args.sweep, args.json)
        return
    if not args.run_dirs:
        parser.error("give run directories, or --sweep DIR")
    try:
        rows = [summarize(d) for d in args.run_dirs]
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"ray_fedat.report: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))


def report_sweep(sweep_dir: str, as_json: bool = False) -> None:
    from .sweep_table import sweep_rows, write_table

    try:
        paths = write_table(sweep_dir)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"ray_fedat.report: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    if as_json:
        print(json.dumps(sweep_rows(sweep_dir), indent=1))
        return
    with open(paths["md"]) as f:
        print(f.read(), end="")
    print(f"ray_fedat.report: wrote {', '.join(paths.values())}")


if __name__ == "__main__":
    main()
