"""Shared fixtures: a real `mlflow server` (one per test session) and a TCP proxy that can simulate its outage.

Helpers for tests that need their own server: `free_port()`, `start_mlflow_server(root, port=None)`,
`stop_mlflow_server(server)`, `TcpProxy(target_port, port=None)`. Stdlib only, so collecting tests stays cheap.
"""
import os
# Before torch loads: idle OpenMP threads must sleep, not spin. On these shared 2-core machines spinning threads
# made small forward passes 5-300x slower whenever another process (a notebook, the CLI, a server) was busy.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
import signal, socket, subprocess, sys, threading, time, urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

SERVER_READY_TIMEOUT = 90  # seconds; the server is ready in ~10-35 s on a 2-core machine


def free_port() -> int:
    "A TCP port on 127.0.0.1 that nothing listens on right now."
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


@dataclass
class MlflowServer:
    proc: subprocess.Popen
    port: int
    root: Path
    log: Path
    @property
    def uri(self) -> str: return f"http://127.0.0.1:{self.port}"


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r: return r.status == 200
    except OSError: return False


def start_mlflow_server(root, port=None, timeout=SERVER_READY_TIMEOUT) -> MlflowServer:
    "Start `mlflow server` (sqlite + served artifacts under `root`) in its own process group; wait for /health."
    root = Path(root); root.mkdir(parents=True, exist_ok=True)
    port, log = port or free_port(), root / 'server.log'
    cmd = [str(Path(sys.executable).parent / 'mlflow'), 'server',
           '--backend-store-uri', f"sqlite:///{root.resolve()}/mlflow.db",
           '--artifacts-destination', str(root.resolve() / 'artifacts'), '--serve-artifacts',
           '--host', '127.0.0.1', '--port', str(port), '--workers', '1']
    env = {**os.environ, 'MLFLOW_SERVER_ENABLE_JOB_EXECUTION': 'false'}
    with open(log, 'ab') as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=root)
    server, deadline = MlflowServer(proc, port, root, log), time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None: break
        if _healthy(port): return server
        time.sleep(0.5)
    stop_mlflow_server(server)
    raise RuntimeError(f"mlflow server on port {port} not healthy after {timeout}s; log tail:\n{log.read_text()[-3000:]}")


def stop_mlflow_server(server: MlflowServer, grace: float = 5.0):
    "Stop the server's whole process group: SIGTERM, then SIGKILL after `grace` seconds."
    if server.proc.poll() is not None: return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
        try: os.killpg(server.proc.pid, sig)
        except ProcessLookupError: return
        try: server.proc.wait(wait); break
        except subprocess.TimeoutExpired: pass
    try: os.killpg(server.proc.pid, signal.SIGKILL)  # workers left behind by a parent that exited
    except ProcessLookupError: pass


class TcpProxy:
    "Forwards 127.0.0.1:`port` to `target_port`. `stop()` is an outage (connections dropped, port refused); `start()` ends it."
    def __init__(self, target_port: int, port: int = None):
        self.target_port, self.port = target_port, port or free_port()
        self._srv, self._conns, self._lock = None, [], threading.Lock()

    @property
    def uri(self) -> str: return f"http://127.0.0.1:{self.port}"

    def start(self):
        srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(('127.0.0.1', self.port)); srv.listen(64); srv.settimeout(0.2)
        self._srv = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()
        return self

    def _accept(self, srv):
        while self._srv is srv:
            try: client, _ = srv.accept()
            except socket.timeout: continue
            except OSError: return
            client.settimeout(None)
            try: upstream = socket.create_connection(('127.0.0.1', self.target_port))
            except OSError: client.close(); continue
            with self._lock: self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a, b):
        try:
            while data := a.recv(65536): b.sendall(data)
        except OSError: pass
        finally:
            for s in (a, b):
                try: s.shutdown(socket.SHUT_RDWR)
                except OSError: pass

    def stop(self):
        srv, self._srv = self._srv, None
        if srv: srv.close()
        with self._lock: conns, self._conns = self._conns, []
        for s in conns:
            try: s.shutdown(socket.SHUT_RDWR)
            except OSError: pass
            s.close()


@pytest.fixture(scope='session')
def mlflow_server(tmp_path_factory):
    "The http URI of a real `mlflow server` shared by the whole test session (sqlite + served artifacts)."
    server = start_mlflow_server(tmp_path_factory.mktemp('mlflow_server'))
    try: yield server.uri
    finally: stop_mlflow_server(server)
