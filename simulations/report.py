"""``python -m simulations.report <multirun dir>``: many run folders -> one table and a plot.

Reads every ``*/summary.json`` with its ``config.yaml`` under the folder (a Hydra multirun of
``simulations.run``), and every ``*/synthesis_report.json`` (a multirun of ``simulations.synthesize``:
mechanism ``synthetic:<generator>``, the utility model trained on the synthetic users only, evaluated on
the real held-out users), writes
``report.csv`` and ``report.md`` (one row per run: mechanism, model, target and achieved epsilon,
injected (fake) users, test metrics, wall time) and ``privacy_accuracy.png`` (epsilon vs test NDCG@20, one line per
mechanism and model; the non-private point is drawn at the right edge, labelled inf) into the folder;
runs with target metrics also give ``attack_report.md``/``.csv`` and ``attack_success.png``.

``python -m simulations.report --defense <multirun dir>`` (a multirun of ``experiment=defense_grid``):
``defense_report.md``/``.csv`` (per defense x attack: the attack's success with and without the defense,
the defense's clean NDCG@20 cost, detection AUC/precision/recall) and ``defense_heatmap.png``.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

from omegaconf import OmegaConf

COLUMNS = ["run", "mechanism", "model", "federation", "target_epsilon", "epsilon", "injected_users", "test_ndcg@20",
           "test_recall@20", "valid_ndcg@20", "best_round", "rounds", "wall_s", "stopped"]


def collect(root: Path) -> list[dict]:
    rows = []
    for summary_path in sorted(root.rglob("summary.json")):
        run = summary_path.parent
        s = json.loads(summary_path.read_text())
        cfg = OmegaConf.load(run / "config.yaml")
        priv = s.get("privacy") or {}
        target = cfg.get("sweep", {}).get("epsilon", math.inf)
        rows.append({
            "run": str(run.relative_to(root)),
            "mechanism": priv.get("mechanism", cfg.get("privacy", {}).get("name", "none")),
            "model": s.get("model"), "federation": s.get("federation"),
            "target_epsilon": float(target) if target is not None else math.inf,
            "epsilon": float(priv["epsilon"]) if priv.get("epsilon") is not None else math.inf,
            "injected_users": (s.get("dataset") or {}).get("injected_users", 0),
            "test_ndcg@20": s["test"].get("ndcg@20"), "test_recall@20": s["test"].get("recall@20"),
            "valid_ndcg@20": s["valid"].get("ndcg@20"), "best_round": s.get("best_round"),
            "rounds": s.get("rounds"), "wall_s": round(float(s.get("wall_s", 0)), 1), "stopped": s.get("stopped", ""),
        })
    for report_path in sorted(root.rglob("synthesis_report.json")):
        r = json.loads(report_path.read_text())
        gen, syn = r["generator"], r["utility"].get("synthetic")
        if syn is None:
            continue
        target = (gen.get("dp") or {}).get("target_epsilon")
        eps = r["privacy"]["epsilon"]
        rows.append({
            "run": str(report_path.parent.relative_to(root)),
            "mechanism": f"synthetic:{gen.get('model', {}).get('name') if gen['name'] == 'zoo' else gen['name']}",
            "model": r.get("utility_model"), "federation": "none",
            "target_epsilon": float(target) if target is not None else math.inf,
            "epsilon": math.inf if eps == "inf" else float(eps), "injected_users": 0,
            "test_ndcg@20": syn["test"].get("ndcg@20"), "test_recall@20": syn["test"].get("recall@20"),
            "valid_ndcg@20": syn["valid"].get("ndcg@20"), "best_round": syn.get("epoch"),
            "rounds": r.get("utility_epochs"), "wall_s": float(r.get("wall_s", 0)), "stopped": "",
        })
    return rows


def _fmt(v, key: str = "") -> str:
    if isinstance(v, float):
        return "inf" if math.isinf(v) else (f"{v:.1f}" if key == "wall_s" else f"{v:.4f}")
    return "" if v is None else str(v)


def write_csv_md(rows: list[dict], columns: list[str], root: Path, stem: str) -> Path:
    """``<stem>.csv`` and ``<stem>.md`` (a Markdown table) of ``rows`` under ``root``; returns the .md path."""
    with open(root / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r[k], k) for k in columns})
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r[k], k) for k in columns) + " |" for r in rows]
    (root / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return root / f"{stem}.md"


def write_table(rows: list[dict], root: Path) -> None:
    rows = sorted(rows, key=lambda r: (r["mechanism"], r["model"], r["target_epsilon"]))
    write_csv_md(rows, COLUMNS, root, "report")


def plot(rows: list[dict], root: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r["target_epsilon"] for r in rows if not math.isinf(r["target_epsilon"])]
    inf_x = (max(finite) * 2) if finite else 1.0
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["mechanism"], r["model"]), []).append(r)
    for (mech, model), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["target_epsilon"])
        xs = [inf_x if math.isinf(r["target_epsilon"]) else r["target_epsilon"] for r in rs]
        ax.plot(xs, [r["test_ndcg@20"] for r in rs], marker="o", label=f"{mech} / {model}")
    ax.set_xscale("log")
    ticks = sorted(set(finite)) + [inf_x]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in sorted(set(finite))] + ["inf"])
    ax.set_xlabel("privacy budget epsilon (target)")
    ax.set_ylabel("test NDCG@20")
    ax.set_title("Privacy-accuracy trade-off")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = root / "privacy_accuracy.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


ATTACK_COLUMNS = ["attack", "fraction", "victim", "er@10", "hr@10", "ndcg@10", "mean_rank", "test_ndcg@20",
                  "test_recall@20", "targets", "injected_users", "wall_s", "run"]


def collect_attacks(root: Path) -> list[dict]:
    """One row per run folder whose summary.json has an ``attack`` section with target metrics."""
    rows = []
    for summary_path in sorted(root.rglob("summary.json")):
        s = json.loads(summary_path.read_text())
        a = s.get("attack") or {}
        if "er@10" not in a:
            continue
        cfg = OmegaConf.load(summary_path.parent / "config.yaml")
        block = cfg.get("attack") or {}
        injected = int(a.get("injected_users", 0))
        fraction = float(block.get("fraction") or 0.0) if injected else 0.0
        rows.append({"attack": a.get("name", block.get("name")), "fraction": fraction, "victim": s.get("model"),
                     "er@10": a["er@10"], "hr@10": a.get("hr@10"), "ndcg@10": a.get("ndcg@10"),
                     "mean_rank": a.get("mean_rank"), "test_ndcg@20": s["test"].get("ndcg@20"),
                     "test_recall@20": s["test"].get("recall@20"), "targets": " ".join(a.get("targets", [])),
                     "injected_users": injected, "wall_s": round(float(s.get("wall_s", 0)), 1),
                     "run": str(summary_path.parent.relative_to(root))})
    return sorted(rows, key=lambda r: (str(r["victim"]), str(r["attack"]), r["fraction"]))


def write_attack_table(rows: list[dict], root: Path) -> Path:
    return write_csv_md(rows, ATTACK_COLUMNS, root, "attack_report")


def plot_attack_success(rows: list[dict], root: Path) -> Path:
    """Target ER@10 vs budget: one panel per victim, one line per attack, the clean run dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    victims = sorted({str(r["victim"]) for r in rows})
    names = sorted({str(r["attack"]) for r in rows if r["fraction"] > 0})
    colour = {a: f"C{i % 10}" for i, a in enumerate(names)}  # one colour per attack in every panel
    fig, axes = plt.subplots(1, len(victims), figsize=(5.2 * len(victims), 4.0), squeeze=False)
    for ax, victim in zip(axes[0], victims):
        mine = [r for r in rows if str(r["victim"]) == victim]
        clean = [r["er@10"] for r in mine if r["fraction"] == 0]
        for attack in sorted({str(r["attack"]) for r in mine if r["fraction"] > 0}):
            rs = sorted((r for r in mine if str(r["attack"]) == attack and r["fraction"] > 0),
                        key=lambda r: r["fraction"])
            ax.plot([r["fraction"] for r in rs], [r["er@10"] for r in rs], marker="o", label=attack,
                    color=colour[attack])
        if clean:
            ax.axhline(sum(clean) / len(clean), color="grey", linestyle="--", label="clean (fraction 0)")
        ax.set_xlabel("malicious clients per genuine user (attack.fraction)")
        ax.set_ylabel("target ER@10 (genuine users)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"victim: {victim}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = root / "attack_success.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def report_attacks(root: Path) -> str | None:
    """The attack table and plot of the folder's attack runs; a line naming them, or None without any."""
    rows = collect_attacks(root)
    if not rows:
        return None
    table = write_attack_table(rows, root)
    png = plot_attack_success(rows, root)
    print(table.read_text())
    return f"attack table: {root / 'attack_report.csv'}, {table}; plot: {png}"


# ---------------------------------------------------------------------------------------- defense report
DEFENSE_COLUMNS = ["defense", "attack", "clean_ndcg@20", "ndcg_cost", "attacked_ndcg@20", "success_undefended",
                   "success_defended", "cut", "det_auc", "det_precision", "det_recall", "dropped_users", "wall_s"]


def _attack_success(summary: dict, clean_ndcg: float | None) -> tuple[str, float | None]:
    """(kind, value): a targeted attack's final ER@10 of its target; an untargeted one's relative NDCG@20 loss
    against the same defense's clean run."""
    attack = summary.get("attack") or {}
    if "er@10" in attack:
        return "er@10", float(attack["er@10"])
    ndcg = summary["test"].get("ndcg@20")
    if clean_ndcg is None or ndcg is None or not clean_ndcg:
        return "ndcg_loss", None
    return "ndcg_loss", 1.0 - float(ndcg) / float(clean_ndcg)


def collect_defense_grid(root: Path) -> list[dict]:
    """One row per (defense, attack) run of a defense grid (``experiment=defense_grid``), with the same
    defense's clean run (attack=none) and the same attack's undefended run (defense=none) joined in."""
    runs = {}
    for summary_path in sorted(root.rglob("summary.json")):
        s = json.loads(summary_path.read_text())
        cfg = OmegaConf.load(summary_path.parent / "config.yaml")
        defense = str((cfg.get("defense") or {}).get("name", "none"))
        attack = str((cfg.get("attack") or {}).get("name", "none"))
        runs[(defense, attack)] = s
    rows = []
    for (defense, attack), s in sorted(runs.items()):
        if attack == "none":
            continue
        clean = runs.get((defense, "none"))
        base_clean = runs.get(("none", "none"))
        undefended = runs.get(("none", attack))
        clean_ndcg = clean["test"].get("ndcg@20") if clean else None
        base_ndcg = base_clean["test"].get("ndcg@20") if base_clean else None
        kind, defended = _attack_success(s, clean_ndcg)
        _, plain = _attack_success(undefended, base_ndcg) if undefended else (kind, None)
        det = ((s.get("defense") or {}).get("detection")) or {}
        rows.append({
            "defense": defense, "attack": attack, "success": kind,
            "clean_ndcg@20": clean_ndcg,
            "ndcg_cost": (1.0 - clean_ndcg / base_ndcg) if clean_ndcg is not None and base_ndcg else None,
            "attacked_ndcg@20": s["test"].get("ndcg@20"),
            "success_undefended": plain, "success_defended": defended,
            "cut": (1.0 - defended / plain) if defended is not None and plain else None,
            "det_auc": det.get("auc"), "det_precision": det.get("precision"), "det_recall": det.get("recall"),
            "dropped_users": (s.get("defense") or {}).get("dropped_users"),
            "wall_s": float(s.get("wall_s", 0)),
        })
    return rows


def write_defense_table(rows: list[dict], root: Path) -> Path:
    """``defense_report.md`` / ``.csv``: success is the target's ER@10 (targeted attacks) or the relative
    NDCG@20 loss against the defense's clean run (untargeted); cut = 1 - defended / undefended success;
    ndcg_cost = 1 - the defense's clean NDCG@20 / FedAvg's."""
    return write_csv_md(rows, DEFENSE_COLUMNS + ["success"], root, "defense_report")


def plot_defense_heatmap(rows: list[dict], root: Path) -> Path:
    """``defense_heatmap.png``: defenses x attacks, each cell the attack's success under the defense
    (ER@10, or relative NDCG@20 loss), and a last column with the defense's clean NDCG@20 cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    defenses = sorted({r["defense"] for r in rows}, key=lambda d: (d != "none", d))
    attacks = sorted({r["attack"] for r in rows})
    cols = attacks + ["clean NDCG@20 cost"]
    grid = np.full((len(defenses), len(cols)), np.nan)
    for r in rows:
        i = defenses.index(r["defense"])
        if r["success_defended"] is not None:
            grid[i, attacks.index(r["attack"])] = r["success_defended"]
        if r["ndcg_cost"] is not None:
            grid[i, -1] = r["ndcg_cost"]
    fig, ax = plt.subplots(figsize=(1.6 * len(cols) + 2, 0.45 * len(defenses) + 1.5))
    im = ax.imshow(grid, cmap="Reds", vmin=0, vmax=1, aspect="auto")
    for i in range(len(defenses)):
        for j in range(len(cols)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    kinds = {r["attack"]: r["success"] for r in rows}
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([f"{a}\n({kinds[a]})" for a in attacks] + [cols[-1]], fontsize=8)
    ax.set_yticks(range(len(defenses)))
    ax.set_yticklabels(defenses, fontsize=8)
    ax.set_title("attack success under each defense (lower is better)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    out = root / "defense_heatmap.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def defense_main(root: Path) -> int:
    rows = collect_defense_grid(root) if root.is_dir() else []
    if not rows:
        print(f"error: {root}: no attacked run (summary.json with an attack) found", file=sys.stderr)
        return 2
    table = write_defense_table(rows, root)
    png = plot_defense_heatmap(rows, root)
    print(table.read_text())
    print(f"table: {table}, {root / 'defense_report.csv'}; heatmap: {png}")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--defense":
        return defense_main(Path(argv[1]))
    if len(argv) != 1:
        print("usage: python -m simulations.report [--defense] <multirun dir>", file=sys.stderr)
        return 2
    root = Path(argv[0])
    rows = collect(root) if root.is_dir() else []
    if not rows:
        print(f"error: {root}: no run folder with summary.json found", file=sys.stderr)
        return 2
    write_table(rows, root)
    png = plot(rows, root)
    print((root / "report.md").read_text())
    print(f"table: {root / 'report.csv'}, {root / 'report.md'}; plot: {png}")
    attacks = report_attacks(root)
    if attacks:
        print(attacks)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
