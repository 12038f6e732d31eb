"""A sweep's table: one row per cell, mean ± std over its seeds (table.md, table.csv, table.png).

Only finished runs are averaged; a cell whose run failed, diverged (NaN), was cut short or
never ran says so in its status column and in n, so a failure is never averaged away; a
number that averages fewer of them (an older run without a final attack) shows its own n.
Every robust column says on how many test images it was scored.
summary.json is read defensively: a key it lacks (an older run, no final attack) is a blank.
"""
from __future__ import annotations

import csv
import io
import json
import os
import statistics
from typing import Dict, List, Optional

from .run_config import RunConfig

SWEEP_FILE = "sweep.json"  # the sweep's own record, beside its runs (sweep.sweep_record)

METRICS = ("natural", "yardstick_robust", "final_attack_robust", "worst_client_robust")


def dig(d, *keys):
    """d[k1][k2]... or None where any level is missing."""
    for key in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def read_summary(run_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def run_outcome(summary: Optional[dict]) -> str:
    """finished, diverged (the model went NaN/inf), failed, unfinished, or not run."""
    if summary is None:
        return "not run"
    status = summary.get("status")
    if status == "finished":
        return "finished"
    if status == "failed":
        error = str(summary.get("error") or "")
        return "diverged" if "FloatingPointError" in error or "NaN" in error else "failed"
    return "unfinished"


def predicts_one_class(summary: dict) -> bool:
    """A finished run whose final model is no better than naming the test set's largest class
    (a global model that fell to one class): it still counts in its cell's mean, since that is
    what the method did on that seed, but the table says so rather than hide it in a std."""
    natural, images = dig(summary, "final", "natural_acc"), dig(summary, "final", "per_class", "images")
    if natural is None or not images or not sum(images):
        return False
    return natural <= max(images) / sum(images) + 0.005


def run_values(summary: dict) -> Dict[str, Optional[float]]:
    """One run's numbers for the table (None where the summary has no such entry)."""
    return {
        "natural": dig(summary, "final", "natural_acc"),
        "yardstick_robust": dig(summary, "final", "robust_acc"),
        "final_attack_robust": dig(summary, "final_attack", "models", "final", "robust_acc"),
        "worst_client_robust": dig(summary, "client_robustness", "robust", "worst"),
        "rounds": summary.get("rounds_completed"),
        "wall_s": summary.get("wall_s"),
    }


def mean_std(values: List[Optional[float]]) -> Dict[str, Optional[float]]:
    """Mean and sample standard deviation of the values present (std None below two)."""
    present = [float(v) for v in values if v is not None]
    return {"mean": statistics.fmean(present) if present else None,
            "std": statistics.stdev(present) if len(present) >= 2 else None, "n": len(present)}


def cell_row(cell: dict, summaries: Dict[str, Optional[dict]]) -> dict:
    """One cell's row from its runs' summaries (run name -> summary or None)."""
    outcomes = {name: run_outcome(summaries.get(name)) for name in cell["runs"]}
    finished = [summaries[name] for name, o in outcomes.items() if o == "finished"]
    values = [run_values(s) for s in finished]
    row = {"cell": cell["name"], "values": cell.get("values", {}), "runs": len(cell["runs"]), "n": len(finished),
           "run_values": values}  # each finished run's numbers, seed order (benchmarks/compare_partitions.py)
    for metric in METRICS:
        row[metric] = mean_std([v[metric] for v in values])
    rounds = sorted({v["rounds"] for v in values if v["rounds"] is not None})
    row["rounds"] = "-".join(map(str, [rounds[0], rounds[-1]] if len(rounds) > 1 else rounds))
    row["wall_s"] = mean_std([v["wall_s"] for v in values])["mean"]
    attacks = sorted({with_images(dig(s, "final_attack", "attack"), dig(s, "final_attack", "images"))
                      for s in finished if dig(s, "final_attack", "models", "final", "robust_acc") is not None} - {None})
    row["final_attack"] = ", ".join(attacks)
    yardsticks = sorted({with_images(f"PGD-{dig(s, 'config', 'eval_steps')}", dig(s, "final", "eval_images"))
                         for s in finished if dig(s, "config", "eval_steps")})
    row["yardstick"] = ", ".join(yardsticks)
    row["labels"] = {"final_attack": attacks, "yardstick": yardsticks}  # the column names (a name may hold a comma)
    problems = [f"{name.rsplit('_', 1)[-1]} {o}" for name, o in outcomes.items() if o != "finished"]
    problems += [f"{name.rsplit('_', 1)[-1]} predicts one class (counted)" for name, o in outcomes.items()
                 if o == "finished" and predicts_one_class(summaries[name])]
    row["status"] = "; ".join(problems) if problems else "ok"
    return row


def with_images(name: Optional[str], images: Optional[int]) -> Optional[str]:
    """`APGD-CE + APGD-T (1000 img)`: an attack and the number of test images it scored
    (the name alone when the summary predates the count)."""
    return f"{name} ({images} img)" if name and images else name


def sweep_rows(sweep_dir: str) -> List[dict]:
    path = os.path.join(sweep_dir, SWEEP_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{sweep_dir}: no {SWEEP_FILE} (not a ray_fedat sweep directory)")
    with open(path) as f:
        sweep = json.load(f)
    rows = []
    for cell in sweep["cells"]:
        summaries = {name: read_summary(os.path.join(sweep_dir, name)) for name in cell["runs"]}
        rows.append(cell_row(cell, summaries))
    return rows


def pct(stat: Dict[str, Optional[float]], finished: Optional[int] = None) -> str:
    """`97.1 ± 0.4` (percent); one run: `97.1`; none: blank; `61.5 ± 4.9 (n=2)` when it
    averages fewer runs than the cell's `finished` ones."""
    if stat["mean"] is None:
        return ""
    text = f"{100 * stat['mean']:.1f}" + ("" if stat["std"] is None else f" ± {100 * stat['std']:.1f}")
    return text + (f" (n={stat['n']})" if finished is not None and stat["n"] < finished else "")


def column_names(rows: List[dict]) -> Dict[str, str]:
    def names(key: str) -> str:
        return ", ".join(sorted({label for r in rows for label in r["labels"][key]}))

    yardstick = names("yardstick") or "PGD"
    attack = names("final_attack") or "final attack"
    return {"natural": "natural %", "yardstick_robust": f"robust {yardstick} %",
            "final_attack_robust": f"robust {attack} %", "worst_client_robust": f"worst client robust {yardstick} %"}


def format_markdown(rows: List[dict]) -> str:
    names = column_names(rows)
    header = ["cell", "n", *[names[m] for m in METRICS], "rounds", "wall (s)", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        cells = [r["cell"], f"{r['n']}/{r['runs']}", *[pct(r[m], r["n"]) for m in METRICS], r["rounds"],
                 "" if r["wall_s"] is None else f"{r['wall_s']:.0f}", r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nmean ± sample std over the cell's finished runs (n of its runs; (n=k): a number " \
        "from k of them only); accuracy on the test set at the last round, on (N img) test images; worst client: " \
        "the final model's robust accuracy on the client whose own label mix is hardest.\n"


def format_csv(rows: List[dict]) -> str:
    keys = sorted({k for r in rows for k in r["values"]})
    out = io.StringIO()
    writer = csv.writer(out)
    header = ["cell", *keys, "runs", "n"]
    for m in METRICS:
        header += [f"{m}_mean", f"{m}_std", f"{m}_n"]
    writer.writerow(header + ["yardstick", "final_attack", "rounds", "wall_s_mean", "status"])
    for r in rows:
        line = [r["cell"], *[r["values"].get(k, "") for k in keys], r["runs"], r["n"]]
        for m in METRICS:
            line += ["" if r[m]["mean"] is None else f"{r[m]['mean']:.4f}",
                     "" if r[m]["std"] is None else f"{r[m]['std']:.4f}", r[m]["n"]]
        writer.writerow(line + [r["yardstick"], r["final_attack"], r["rounds"],
                                "" if r["wall_s"] is None else f"{r['wall_s']:.1f}", r["status"]])
    return out.getvalue()


def plot_table(rows: List[dict], path: str, method_of: Dict[str, str]) -> None:
    """Robust against natural accuracy, one colour per method, error bars = std over seeds.
    Robust is the final attack's where every plotted cell has one, else the yardstick's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["natural"]["mean"] is not None]
    use_final = bool(shown) and all(r["final_attack_robust"]["mean"] is not None for r in shown)
    key = "final_attack_robust" if use_final else "yardstick_robust"
    label = column_names(rows)[key]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    colours = {}
    for r in shown:
        method = method_of.get(r["cell"], "?")
        colour = colours.setdefault(method, f"C{len(colours) % 10}")
        rob = r[key]
        ax.errorbar(100 * r["natural"]["mean"], 100 * (rob["mean"] or 0), xerr=100 * (r["natural"]["std"] or 0),
                    yerr=100 * (rob["std"] or 0), fmt="o", color=colour, capsize=3,
                    label=method if method not in [h.get_label() for h in ax.get_legend_handles_labels()[0]] else None)
        ax.annotate(f"{r['cell']} (n={r['n']})", (100 * r["natural"]["mean"], 100 * (rob["mean"] or 0)),
                    textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("natural accuracy (%)")
    ax.set_ylabel(label.replace(" %", " (%)"))
    ax.grid(alpha=0.3)
    if colours:
        ax.legend(title="method", fontsize=8)
    ax.set_title("mean ± std over seeds")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def write_table(sweep_dir: str) -> Dict[str, str]:
    """table.md, table.csv and table.png in the sweep directory; returns their paths."""
    from .recorder import atomic_write_text  # local: recorder imports Ray Train, the table needs none

    rows = sweep_rows(sweep_dir)
    with open(os.path.join(sweep_dir, SWEEP_FILE)) as f:
        sweep = json.load(f)

    shared_method = (sweep.get("shared") or {}).get("method", RunConfig().method)
    method_of = {c["name"]: str(c["values"].get("method", shared_method)) for c in sweep["cells"]}
    paths = {"md": os.path.join(sweep_dir, "table.md"), "csv": os.path.join(sweep_dir, "table.csv"),
             "png": os.path.join(sweep_dir, "table.png")}
    atomic_write_text(paths["md"], format_markdown(rows))  # a driver killed mid-write leaves the old table
    with open(paths["csv"], "w", newline="") as f:
        f.write(format_csv(rows))
    plot_table(rows, paths["png"], method_of)
    return paths
