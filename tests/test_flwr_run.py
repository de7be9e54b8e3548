"""The same ServerApp/ClientApp under ``flwr run .`` (the supported Flower path), not only run_simulation.

The test starts its own SuperLink in simulation mode on free loopback ports, points a private
FLWR_HOME at it, runs two rounds with ``flwr run . --stream`` and stops the SuperLink it started
(by its process id; never ``ray stop``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"SuperLink HTTP API on port {port} did not open")


@pytest.mark.skipif(not (BIN / "flower-superlink").exists(), reason="flower-superlink not installed")
def test_flwr_run_two_rounds(tmp_path):
    port, health = _free_ports(2)  # Flower 1.42 serves Control, Fleet and Runtime APIs on one HTTP port
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "test"\n\n[superlink.test]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_DISABLE_UPDATE_CHECK="1")
    link = subprocess.Popen(
        [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--disable-runtime-dependency-installation",
         "--host", "127.0.0.1", "--port", str(port), "--health-server-address", f"127.0.0.1:{health}",
         "--database", str(tmp_path / "state.db")],
        env=env, stdout=open(tmp_path / "superlink.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    run_dir = tmp_path / "run"
    overrides = ("federation.num_nodes=2 federation.rounds=2 dataset.n_users=60 dataset.n_items=50 "
                 "model.dims=[16,32] model.steps=5 model.optim.batch_size=16")
    try:
        _wait_port(port)
        res = subprocess.run(
            [str(BIN / "flwr"), "run", str(REPO), "test", "--stream",
             "--federation-config", "num-supernodes=2",
             "--run-config", f'overrides="{overrides}" run-dir="{run_dir}"'],
            env=env, capture_output=True, text=True, timeout=400)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        deadline = time.monotonic() + 60  # --stream may return just before the summary lands
        while not (run_dir / "summary.json").exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        summary = json.loads((run_dir / "summary.json").read_text())
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [x["round"] for x in lines] == [1, 2]
        assert all(x["train"]["clients"] == 2 for x in lines)
        assert summary["federation"] == "silo" and summary["test"]["ndcg@20"] > 0
    finally:
        os.killpg(link.pid, signal.SIGTERM)  # the SuperLink and the simulation it spawned
        try:
            link.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(link.pid, signal.SIGKILL)
