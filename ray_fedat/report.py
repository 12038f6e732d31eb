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
    cfg = summary.get("config") or {}  # a sweep run that failed before it started has none
    clients = (summary.get("client_robustness") or {}).get("robust") or {}
    attack = summary.get("final_attack") or {}
    final_strong = (attack.get("models") or {}).get("final", {}).get("robust_acc")
    return {
        "run": os.path.basename(os.path.normpath(run_dir)),
        "dataset": cfg.get("dataset"), "method": cfg.get("method"), "partition": cfg.get("partition"),
        "clients": cfg.get("clients"), "rounds": records[-1]["round"] if records else 0, "status": summary["status"],
        "final_nat": evaluated[-1]["natural_acc"] if evaluated else None,
        "final_rob": evaluated[-1]["robust_acc"] if evaluated else None,
        "test_images": evaluated[-1].get("eval_images") if evaluated else None,  # behind every test robust number
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
        "final_attack_checks": check_lines(attack),
        "error": summary.get("error"),
    }


def check_lines(final_attack: Optional[dict]) -> List[str]:
    """AutoAttack's check warnings of the final attack, one line each with the models it
    warned on: `AutoAttack check (final, best_robust): ...` (none: no lines). A check says
    the robust number may overstate (zero gradients, a randomised model, ...): it belongs
    beside the number, not only in summary.json."""
    models: dict = {}
    for name, r in ((final_attack or {}).get("models") or {}).items():
        for check in r.get("checks") or []:
            models.setdefault(check, []).append(name)
    return [f"AutoAttack check ({', '.join(names)}): {check}" for check, names in models.items()]


def format_table(rows: List[dict]) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    def rob(v, images):  # a robust number and the test images behind it
        return pct(v) if v is None or not images else f"{pct(v)} ({images} img)"

    header = ["run", "dataset", "method", "partition", "K", "rounds", "final nat", "final rob (yardstick)",
              "best nat (round)", "best rob (round)", "chosen on", "worst client rob", "bottom 20% rob",
              "final robust (strong attack)", "wall", "status"]
    body = [[r["run"], str(r["dataset"]), str(r["method"]), str(r["partition"]), str(r["clients"]), str(r["rounds"]),
             pct(r["final_nat"]), rob(r["final_rob"], r["test_images"]),
             f"{pct(r['best_nat'])} ({r['best_nat_round']})",
             f"{rob(r['best_rob'], r['test_images'])} ({r['best_rob_round']})", r["chosen_on"],
             rob(r["worst_client_rob"], r["test_images"]), rob(r["bottom20_rob"], r["test_images"]),
             "-" if r["final_strong_rob"] is None else
             f"{pct(r['final_strong_rob'])} {r['final_attack']}, {r['final_attack_images']} images",
             "-" if r["wall_s"] is None else f"{r['wall_s']:.0f}s", r["status"]] for r in rows]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in rows:  # below the table: what a number cannot say
        lines += [f"{r['run']}: {line}" for line in r["final_attack_checks"]]
        if r["status"] == "failed" and r["error"]:
            lines.append(f"{r['run']}: failed: {r['error']}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ray_fedat.report", description=__doc__)
    parser.add_argument("run_dirs", nargs="*", metavar="RUN_DIR")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--sweep", metavar="DIR", default=None,
                        help="a `python -m ray_fedat.sweep` directory: write its table.md, table.csv, table.png")
    args = parser.parse_args(argv)
    if not args.sweep and not args.run_dirs:
        parser.error("give run directories, or --sweep DIR")
    try:
        if args.sweep:
            report_sweep(args.sweep, args.json)
            return
        rows = [summarize(d) for d in args.run_dirs]
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"ray_fedat.report: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))


def report_sweep(sweep_dir: str, as_json: bool = False) -> None:
    from .sweep_table import sweep_rows, write_table

    paths = write_table(sweep_dir)
    if as_json:
        print(json.dumps(sweep_rows(sweep_dir), indent=1))
        return
    with open(paths["md"]) as f:
        print(f.read(), end="")
    print(f"ray_fedat.report: wrote {', '.join(paths.values())}")


if __name__ == "__main__":
    main()
