"""simulations.report --defense on a synthetic defense grid: success with and without the defense, the clean
NDCG@20 cost, detection figures and the heatmap file."""

import json

import pytest

from simulations.report import collect_defense_grid, defense_main


def _run(root, name, defense, attack, ndcg, er=None, detection=None):
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(f"defense:\n  name: {defense}\nattack:\n  name: {attack}\n")
    s = {"test": {"ndcg@20": ndcg}, "wall_s": 10.0}
    if er is not None:
        s["attack"] = {"er@10": er}
    if detection is not None:
        s["defense"] = {"detection": detection, "dropped_users": 3}
    (d / "summary.json").write_text(json.dumps(s))


def test_defense_grid_rows(tmp_path):
    _run(tmp_path, "0", "none", "none", 0.20)
    _run(tmp_path, "1", "none", "fedrecattack", 0.10, er=0.8)
    _run(tmp_path, "2", "none", "scaling", 0.05)
    _run(tmp_path, "3", "update_detect", "none", 0.19)
    _run(tmp_path, "4", "update_detect", "fedrecattack", 0.18, er=0.2,
         detection={"auc": 0.9, "precision": 0.5, "recall": 1.0})
    _run(tmp_path, "5", "update_detect", "scaling", 0.171)
    rows = {(r["defense"], r["attack"]): r for r in collect_defense_grid(tmp_path)}
    assert set(rows) == {("none", "fedrecattack"), ("none", "scaling"), ("update_detect", "fedrecattack"),
                         ("update_detect", "scaling")}
    r = rows[("update_detect", "fedrecattack")]
    assert r["success"] == "er@10" and r["success_undefended"] == 0.8 and r["success_defended"] == 0.2
    assert r["cut"] == pytest.approx(0.75) and r["ndcg_cost"] == pytest.approx(0.05)
    assert (r["det_auc"], r["det_precision"], r["det_recall"], r["dropped_users"]) == (0.9, 0.5, 1.0, 3)
    s = rows[("update_detect", "scaling")]  # untargeted: relative NDCG@20 loss against the defense's clean run
    assert s["success"] == "ndcg_loss" and s["success_undefended"] == pytest.approx(0.75)
    assert s["success_defended"] == pytest.approx(0.1) and s["cut"] == pytest.approx(1 - 0.1 / 0.75)
    assert defense_main(tmp_path) == 0
    assert (tmp_path / "defense_heatmap.png").stat().st_size > 0 and (tmp_path / "defense_report.md").exists()
