"""Start and stop Flower processes (SuperLink, SuperNodes) on loopback for tests.

Every process is started in its own session and stopped by its process group id; nothing here
runs ``ray stop`` or touches processes it did not start.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def flower_env(home: Path, link_port: int) -> dict:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n')
    # Flower's processes start their helpers (flower-superexec, ...) by name: put this venv first.
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    return dict(os.environ, PATH=path, FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
                FLWR_DISABLE_UPDATE_CHECK="1")


@contextmanager
def processes():
    """Yields ``start(cmd, env, log)``; on exit stops every started process group."""
    started: list[subprocess.Popen] = []

    def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
        p = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        started.append(p)
        return p

    try:
        yield start
    finally:
        for p in reversed(started):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        for p in started:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def flwr_run(env: dict, overrides: str, run_dir: Path, extra: list[str] = (), timeout: float = 300) -> dict:
    res = subprocess.run(
        [str(BIN / "flwr"), "run", str(REPO), "test", "--stream", *extra,
         "--run-config", f'overrides="{overrides}" run-dir="{run_dir}"'],
        env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    deadline = time.monotonic() + 60  # --stream may return just before the summary lands
    while not (run_dir / "summary.json").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert (run_dir / "summary.json").exists(), res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())
