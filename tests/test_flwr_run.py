"""The same ServerApp/ClientApp outside ``run_simulation``: ``flwr run`` against real Flower processes.

1. a SuperLink in simulation mode (Flower's supported local path);
2. Flower's Deployment Engine: a SuperLink and two SuperNodes on loopback, each SuperNode hosting
   one partition (``--node-config "partition-id=i num-partitions=2"``) — the multi-machine setup,
   on one machine. Each test stops every process it started, by its id.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.test_run_output import assert_png
from tests.flower_procs import BIN, flower_env, flwr_run, free_ports, processes, wait_port

TINY = ("federation.num_nodes=2 federation.rounds=2 dataset.n_users=60 dataset.n_items=50 "
        "model.dims=[16,32] model.steps=5 model.optim.batch_size=16")

pytestmark = pytest.mark.skipif(not (BIN / "flower-superlink").exists(), reason="Flower CLI not installed")


def _check(run_dir, summary, mode):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2]
    assert all(x["train"]["clients"] == 2 for x in lines)
    assert summary["federation"] == mode and summary["test"]["ndcg@20"] > 0
    deadline = time.monotonic() + 30  # the ServerApp draws curves.png just after summary.json
    while not (run_dir / "curves.png").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert_png(run_dir / "curves.png")  # written by the ServerApp process too


def test_flwr_run_simulation_superlink(tmp_path):
    port, health = free_ports(2)  # Flower 1.42 serves Control, Fleet and Runtime APIs on one HTTP port
    env = flower_env(tmp_path / "home", port)
    with processes() as start:
        start([str(BIN / "flower-superlink"), "--insecure", "--simulation", "--disable-runtime-dependency-installation",
               "--host", "127.0.0.1", "--port", str(port), "--health-server-address", f"127.0.0.1:{health}",
               "--database", str(tmp_path / "state.db")], env, tmp_path / "superlink.log")
        wait_port(port)
        summary = flwr_run(env, TINY, tmp_path / "run", ["--federation-config", "num-supernodes=2"])
    _check(tmp_path / "run", summary, "silo")


@pytest.mark.parametrize("mode", ["device"])
def test_deployment_engine_superlink_two_supernodes(tmp_path, mode):
    link, link_health, n0, n0_health, n1, n1_health = free_ports(6)
    env = flower_env(tmp_path / "home", link)
    with processes() as start:
        start([str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
               "--host", "127.0.0.1", "--port", str(link), "--health-server-address", f"127.0.0.1:{link_health}",
               "--database", str(tmp_path / "state.db")], env, tmp_path / "superlink.log")
        wait_port(link)
        for pid, (port, health) in enumerate([(n0, n0_health), (n1, n1_health)]):
            start([str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}",
                   "--host", "127.0.0.1", "--port", str(port), "--health-server-address", f"127.0.0.1:{health}",
                   "--node-config", f"partition-id={pid} num-partitions=2"], env, tmp_path / f"supernode{pid}.log")
        summary = flwr_run(env, f"{TINY} federation={mode} federation.user_fraction=0.5", tmp_path / "run")
    _check(tmp_path / "run", summary, mode)
