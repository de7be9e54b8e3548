"""simulations.report's attack table and plot on hand-made run folders (the layout simulations.run writes)."""

from __future__ import annotations

import json

from omegaconf import OmegaConf


def _run(root, name, attack, fraction, victim, er, injected, ndcg=0.1):
    d = root / name
    d.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"attack": {"name": attack, "fraction": fraction}, "model": {"name": victim}}),
                   d / "config.yaml")
    summary = {"model": victim, "federation": "device", "wall_s": 12.3,
               "test": {"ndcg@20": ndcg, "recall@20": 2 * ndcg}, "valid": {"ndcg@20": ndcg},
               "attack": {"name": attack, "injected_users": injected, "targets": ["1061"], "er@10": er,
                          "hr@10": er, "ndcg@10": er / 2, "mean_rank": 100.0 * (1 - er) + 1}}
    (d / "summary.json").write_text(json.dumps(summary))


def test_attack_rows_table_and_plot(tmp_path):
    from simulations.report import ATTACK_COLUMNS, collect_attacks, main

    _run(tmp_path, "0", "fedrecattack", 0.05, "bpr", 0.87, 47, ndcg=0.05)
    _run(tmp_path, "1", "pipattack", 0.01, "bpr", 0.2, 9)
    _run(tmp_path, "2", "pipattack", 0.05, "bpr", 0.6, 47)
    _run(tmp_path, "clean/0", "fedrecattack", 0.0, "bpr", 0.001, 0, ndcg=0.2)
    _run(tmp_path, "3", "ara", 0.05, "diffrec", 0.1, 47)
    rows = collect_attacks(tmp_path)
    assert len(rows) == 5
    by = {(r["attack"], r["fraction"], r["victim"]): r for r in rows}
    assert by[("fedrecattack", 0.0, "bpr")]["injected_users"] == 0  # the clean run is fraction 0
    assert by[("fedrecattack", 0.05, "bpr")]["test_ndcg@20"] == 0.05  # the same run's clean metrics
    assert by[("pipattack", 0.01, "bpr")]["er@10"] == 0.2
    assert main([str(tmp_path)]) == 0
    table = (tmp_path / "attack_report.md").read_text().splitlines()
    assert table[0] == "| " + " | ".join(ATTACK_COLUMNS) + " |" and len(table) == 2 + 5
    assert (tmp_path / "attack_success.png").stat().st_size > 1000
    assert (tmp_path / "attack_report.csv").exists()
