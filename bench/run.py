"""Dubhe's benchmark: what the gateway adds on top of talking to the upstream directly.

    .venv/bin/python bench/run.py [--quick] [--database-url URL] [--core-ref REF | --no-core]

Every gateway figure is measured next to the same figure taken straight against the upstream
simulator in the same run, on the same machine, so the numbers are "gateway minus direct" rather
than absolutes that depend on the box. The run starts its own simulators and gateways on free
ports with a fresh data directory, and stops every process it started, also on error or Ctrl-C.

Phases (bench/README.md explains each figure):
  1. added latency at 1 connection, non-stream (wrk, alternating rounds; hey as a cross-check)
  2. throughput and p99 at 64 connections, gateway with 1 and 2 workers
  3. gateway CPU per request during phase 2 (utime+stime over the gateway's process tree)
  4. gateway CPU per relayed stream chunk, and added time-to-first-token (bench/streams.py)
  5. gateway memory per 1,000 concurrently open streams
  6. correctness gates: non-2xx counts, streams ending in [DONE], one usage row per request
  7. billing cost: phases 1-3 (1 worker) also run against a second gateway built from the
     gateway-core commit (--core-ref, default 1440f4a, the last commit before billing), so
     "current - core" is what billing adds per request, measured in the same run
  8. the physical limit: phases 1, 3 and 4 also run against a bare pass-through proxy
     (bench/bare_proxy.py, the same server stack with nothing on top) in the same rotating
     rounds; "gateway / bare" for CPU per request, added p50 and CPU per chunk is held to
     ratio targets that do not move with the machine
  9. start and memory: cold start (spawn to first 200) and idle RSS of the gateway as ratios
     to the bare proxy's, and the CLI's start time (`dubhe --help`, `dubhe users show`)
 10. routing: CPU per request at c=64 for a model with three deployments, one refusing
     connections (its breaker opens), against the plain one-deployment model, rotating rounds
 11. the limiter with Redis: the 1-worker c=64 run again with DUBHE_REDIS_URL set (the
     machine's Redis, a prefix of the run's own), against the same run without it

Targets are printed next to the numbers; nothing here asserts on timing. The exit status is
non-zero only when the harness itself could not run.

Results: a table on stdout, all numbers in bench/results/<UTC timestamp>.json and latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import streams  # noqa: E402  (bench/ is a folder of scripts, not a package)

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
VENV_BIN = Path(sys.executable).parent
DUBHE = str(VENV_BIN / "dubhe")
BARE_PROXY = BENCH_DIR / "bare_proxy.py"

CLK_TCK = os.sysconf("SC_CLK_TCK")
KIB = 1024  # VmRSS in /proc/<pid>/status is in kB

# Which simulator serves which model: one gateway reaches all three, picked by model name.
FAST_MODEL = "dubhe-fast"  # unpaced sim: latency, throughput, TTFT
PACED_MODEL = "dubhe-code"  # sim at 50 tokens/s: CPU per relayed chunk
SLOW_MODEL = "dubhe-qwen"  # sim at 10 tokens/s: streams that stay open for the memory probe
# Three deployments: two on the fast sim, one on a port nothing listens on (phase 10).
ROUTED_MODEL = "dubhe-agent"
# Phase 11: the machine's Redis (the README's scale-out setting); skipped when it does not answer.
BENCH_REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
PACED_TOKENS_PER_S = 50
SLOW_TOKENS_PER_S = 10

TARGETS = {
    "added_p50_us": ("<=", 1000),
    "gateway_cpu_us_per_request": ("<=", 500),
    "whole_box_rps_2_workers": (">=", 3000),
    "cpu_us_per_chunk": ("<=", 70),
    "mb_per_1000_streams": ("<=", 40),
}


# Gateway / bare pass-through proxy, measured in the same run (item 8 and 9 above): absolute
# figures move 2-3x between machines of this class, ratios to the physical limit do not.
RATIO_TARGETS = {
    "cpu_per_request": 1.3,
    "added_p50": 1.3,
    "cpu_per_chunk": 1.2,
    "cold_start": 2.0,
    "idle_rss_after_start": 2.0,
    "idle_rss_after_warm_up": 2.0,
}

HEY_BUDGET_S = 20  # most a hey cross-check run may take
# The gateway-core commit: the last one before billing, whose gateway the current one is
# compared with to price billing per request.
DEFAULT_CORE_REF = "1440f4a"
TTFT_BUDGET_S = 30  # most the sequential TTFT probes may take


@dataclass(frozen=True)
class Plan:
    """How long and how hard each phase runs."""

    latency_rounds: int
    latency_round_s: int
    hey_requests: int
    throughput_rounds: int  # c=64 runs per target (1 worker), order rotating, median reported
    throughput_s: int
    ttft_rounds: int
    chunk_rounds: int  # CPU-per-chunk runs per target, order rotating, median reported
    chunk_streams: int
    chunk_tokens: int
    memory_streams: int
    memory_tokens: int  # at SLOW_TOKENS_PER_S, so streams stay open tokens/10 seconds
    start_runs: int  # cold starts per server (gateway, bare), median reported
    cli_runs: int  # runs per CLI command timed, median reported


FULL = Plan(
    latency_rounds=3,
    latency_round_s=5,
    hey_requests=2000,
    throughput_rounds=3,
    throughput_s=10,
    ttft_rounds=200,
    chunk_rounds=3,
    chunk_streams=200,
    chunk_tokens=100,
    memory_streams=1000,
    memory_tokens=20,
    start_runs=3,
    cli_runs=5,
)
QUICK = Plan(
    latency_rounds=1,
    latency_round_s=2,
    hey_requests=300,
    throughput_rounds=2,  # two, so a smoke run exercises the rotation and the medians
    throughput_s=3,
    ttft_rounds=30,
    chunk_rounds=2,
    chunk_streams=50,
    chunk_tokens=50,
    memory_streams=200,
    memory_tokens=20,
    start_runs=2,
    cli_runs=3,
)

# wrk has no flags for a POST body, so a Lua script sets it; done() prints the exact numbers
# (microseconds, error counts) as one JSON line instead of wrk's rounded human summary.
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"
{auth}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {{"requests":%d,"duration_us":%d,"non_2xx":%d,"connect_errors":%d,' ..
    '"read_errors":%d,"write_errors":%d,"timeouts":%d,"p50_us":%.1f,"p90_us":%.1f,' ..
    '"p99_us":%.1f,"mean_us":%.1f,"max_us":%.1f}}\\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
"""


# -- tools ------------------------------------------------------------------------------------


def ensure_tools() -> None:
    """Install wrk and hey from Debian when missing (the bench is meant to be one command)."""
    if shutil.which("wrk") and shutil.which("hey"):
        return
    if os.geteuid() != 0:
        raise SystemExit("bench: wrk and hey are missing; run: sudo apt-get install -y wrk hey")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "wrk", "hey"]
    print("bench: installing wrk and hey with apt-get", file=sys.stderr)
    if subprocess.run(install, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        # A fresh container often has no package lists yet.
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL, check=True)
        subprocess.run(install, env=env, stdout=subprocess.DEVNULL, check=True)


def package_version(name: str) -> str | None:
    """Neither `wrk` nor `hey` has a clean --version, so ask dpkg."""
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True
        )
    except FileNotFoundError:
        return None
    return out.stdout.strip() or None


def machine_info() -> dict[str, Any]:
    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    try:
        sha = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wrk": package_version("wrk"),
        "hey": package_version("hey"),
        "git_sha": sha,
    }


def load_average() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


# -- processes --------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Runs in the child before exec: if the harness is killed outright (SIGKILL, no cleanup),
    the kernel still sends the child SIGTERM, so no server outlives the run."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


class Processes:
    """Every server the harness started. Each gets its own process group, so uvicorn's worker
    processes are stopped along with their parent."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the child
        proc = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_die_with_parent,
        )  # fmt: skip
        log.close()  # the child has its own copy of the descriptor
        self.running.append((name, proc))
        return proc

    def log_text(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, proc: subprocess.Popen, grace_s: float = 15) -> None:
        """SIGTERM the leader only (uvicorn's supervisor stops its own workers, and a worker
        killed behind its back would be restarted), then SIGKILL whatever is left of the group."""
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        self.running = [(n, p) for n, p in self.running if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(self.running):
            self.stop(proc)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_json(url: str, method: str = "GET", timeout: float = 5) -> Any:
    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


# 180 s: on a 2-core box shared with test suites, a 2-worker gateway took over 60 s to boot.
def wait_until(
    ready, proc: subprocess.Popen, what: str, logs: Callable[[], str], timeout_s: float = 180
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; its log:\n{logs()}")
        with contextlib.suppress(OSError, ValueError):
            if ready():
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not become ready in {timeout_s:.0f}s; its log:\n{logs()}")


# -- /proc ------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (which may contain spaces and parens):
    index 0 is field 3 (state), so field N is at index N - 3."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """root and all its descendants, found by walking every process's parent pid."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            children.setdefault(int(_stat_fields(int(entry))[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def tree_cpu_seconds(root: int) -> float:
    """utime + stime (fields 14 and 15) summed over the tree."""
    ticks = 0
    for pid in process_tree(root):
        with contextlib.suppress(OSError, IndexError):
            fields = _stat_fields(pid)
            ticks += int(fields[14 - 3]) + int(fields[15 - 3])
    return ticks / CLK_TCK


def tree_rss_bytes(root: int) -> int:
    total_kb = 0
    for pid in process_tree(root):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
                    break
    return total_kb * KIB


class RssSampler:
    """Samples a process tree's RSS on a thread while streams are open; keeps the peak."""

    def __init__(self, root: int, interval_s: float = 0.05) -> None:
        self.root, self.interval_s = root, interval_s
        self.peak = 0
        self.at_all_open: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes(self.root))
            self._stop.wait(self.interval_s)

    def mark_all_open(self) -> None:
        self.at_all_open = tree_rss_bytes(self.root)
        self.peak = max(self.peak, self.at_all_open)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def cpu_delta(**roots: int) -> Iterator[dict[str, float]]:
    """CPU seconds each named process tree used inside the block."""
    before = {name: tree_cpu_seconds(pid) for name, pid in roots.items()}
    used: dict[str, float] = {}
    yield used
    for name, pid in roots.items():
        used[name] = tree_cpu_seconds(pid) - before[name]


# -- the rig: simulators, gateway, credentials ------------------------------------------------


@dataclass
class Sim:
    name: str
    proc: subprocess.Popen
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    def stats(self) -> dict[str, int]:
        return http_json(f"http://127.0.0.1:{self.port}/sim/stats")


@dataclass
class Gateway:
    proc: subprocess.Popen
    port: int
    workers: int
    log_name: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"


@dataclass
class Bare:
    """The bare pass-through proxy (bench/bare_proxy.py): one process, a path per sim."""

    proc: subprocess.Popen
    port: int

    def url(self, sim: str) -> str:
        return f"http://127.0.0.1:{self.port}/{sim}/v1/chat/completions"


@dataclass
class Ledger:
    """Requests sent through gateways, to check one usage row per request at the end."""

    client_completed: int = 0  # responses the load tools received
    upstream_received: int = 0  # requests the sims saw arrive from the gateway


@dataclass
class Tally:
    client_completed: int = 0
    direct_sent: int = 0


@dataclass
class Core:
    """The second gateway: the gateway-core commit's code, exported with `git archive` (the
    working tree is never touched), with its own data dir, account, key and usage ledger, so
    nothing it writes mixes with the current gateway's gates."""

    ref: str
    sha: str
    root: Path  # holds src/ (the export) and data/
    email: str
    key: str = ""
    gateway: Gateway | None = None
    ledger: Ledger = dataclasses.field(default_factory=Ledger)

    @property
    def src(self) -> Path:
        return self.root / "src"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"


class Rig:
    def __init__(self, work_dir: Path, database_url: str | None) -> None:
        self.work_dir = work_dir
        self.data_dir = work_dir / "data"
        self.database_url = database_url
        self.redis_url: str | None = None  # phase 11 sets it for the gateways it starts
        self.procs = Processes(work_dir)
        self.sims: dict[str, Sim] = {}
        self.gateway: Gateway | None = None
        self.key = ""
        # A unique account per run: a --database-url database outlives the run.
        self.email = f"bench-{os.getpid()}-{int(time.time())}@example.com"
        self.ledger = Ledger()
        self.gateway_logs: list[str] = []
        self.core: Core | None = None  # set by export_core(); None when the comparison is off
        self.bare: Bare | None = None  # the physical limit, while start_bare() has it running

    # environment --------------------------------------------------------------------------

    def snapshot_source(self) -> None:
        """Copy src/ into the run's directory and run every dubhe process from the copy: others
        edit the tree while a bench runs, and a gateway started later in the run must run the
        same code as the first one (PYTHONPATH comes before the venv's editable install)."""
        shutil.copytree(REPO / "src", self.work_dir / "src",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))  # fmt: skip
        shutil.copy2(BARE_PROXY, self.work_dir / BARE_PROXY.name)

    def source_digest(self) -> str:
        """Names the exact code measured: the git sha alone misses uncommitted edits."""
        digest = hashlib.sha256()
        for path in sorted((self.work_dir / "src").rglob("*")):
            if path.is_file():
                digest.update(str(path.relative_to(self.work_dir)).encode() + b"\0")
                digest.update(path.read_bytes())
        return digest.hexdigest()[:12]

    def export_core(self, ref: str, sha: str) -> None:
        """Export the gateway-core commit's src/ next to the snapshot of the current one."""
        root = self.work_dir / "core"
        root.mkdir()
        archive = subprocess.Popen(["git", "-C", str(REPO), "archive", sha, "src"],
                                   stdout=subprocess.PIPE)  # fmt: skip
        untar = subprocess.run(["tar", "-x", "-C", str(root)], stdin=archive.stdout,
                               capture_output=True)  # fmt: skip
        assert archive.stdout is not None
        archive.stdout.close()
        if archive.wait() != 0 or untar.returncode != 0:
            raise RuntimeError(f"git archive {sha} src | tar -x failed: {untar.stderr!r}")
        # The core's own account: a user of the current gateway does not exist in its database.
        self.core = Core(ref, sha, root, email=f"core-{self.email}")

    def env(self, side: str = "gateway") -> dict[str, str]:
        """The caller's environment minus any DUBHE_* (a stray DUBHE_ENV or secret in the shell
        must not change what is measured), plus this run's data dir and catalog. side="core"
        points PYTHONPATH and the data dir at the core's export; the catalog is shared (the
        core reads the same TOML format)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DUBHE_")}
        # Servers keep the bytecode they compile, as they do by default (the first start of
        # each writes it; the starts that item 9 times read it, the gateway's and the bare's).
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["DUBHE_DATA_DIR"] = str(self.data_dir)
        env["DUBHE_CONFIG"] = str(self.work_dir / "dubhe.toml")
        env["PYTHONPATH"] = str(self.work_dir / "src")
        # The TTFT probe sends one message after another on one socket, ~500 a second: far
        # past a client's flood limit (10 a second, 50 at once), which closed the socket with
        # 4429 a few times a run (and failed the [DONE] gate). The limit is not what is measured.
        env["DUBHE_WS_MESSAGES_PER_SECOND"] = "100000"
        env["DUBHE_WS_MESSAGE_BURST"] = "100000"
        if side == "core":
            assert self.core is not None
            env["DUBHE_DATA_DIR"] = str(self.core.data_dir)
            env["PYTHONPATH"] = str(self.core.src)
        elif self.database_url:
            env["DUBHE_DATABASE_URL"] = self.database_url
        if side == "gateway" and self.redis_url:
            env["DUBHE_REDIS_URL"] = self.redis_url
            env["DUBHE_REDIS_PREFIX"] = f"bench-{os.getpid()}:"
        return env

    def write_catalog(self) -> None:
        fast, paced, slow = (self.sims[n].port for n in ("fast", "paced", "slow"))
        others = ["dubhe-vision", "dubhe-reasoning"]
        dead = free_port()  # nothing listens there: every request to it is refused at connect
        (self.work_dir / "dubhe.toml").write_text(f"""
# Plan limits raised far beyond the load: the benchmark measures relaying, not rejections.
[plans.ultimate]
included_tokens = 1_000_000_000_000
requests_per_minute = 1_000_000_000
tokens_per_minute = 1_000_000_000_000
concurrent_requests = 1_000_000

# kind = "openai": serve must not start a built-in sim of its own.
[[upstreams]]
name = "sim"
kind = "openai"
base_url = "http://127.0.0.1:{fast}/v1"
models = {json.dumps([FAST_MODEL, *others])}

[[upstreams]]
name = "sim-paced"
kind = "openai"
base_url = "http://127.0.0.1:{paced}/v1"
models = ["{PACED_MODEL}"]

[[upstreams]]
name = "sim-slow"
kind = "openai"
base_url = "http://127.0.0.1:{slow}/v1"
models = ["{SLOW_MODEL}"]

# Phase 10: one public model, three deployments of equal weight, one of them down.
[[upstreams]]
name = "routed-a"
kind = "openai"
base_url = "http://127.0.0.1:{fast}/v1"
models = ["{ROUTED_MODEL}"]

[[upstreams]]
name = "routed-b"
kind = "openai"
base_url = "http://127.0.0.1:{fast}/v1"
models = ["{ROUTED_MODEL}"]

[[upstreams]]
name = "routed-down"
kind = "openai"
base_url = "http://127.0.0.1:{dead}/v1"
models = ["{ROUTED_MODEL}"]
""")

    # processes ------------------------------------------------------------------------------

    def start_sims(self) -> None:
        """Three sims, each in its own process, so pacing one never slows another."""
        rates = {"fast": None, "paced": PACED_TOKENS_PER_S, "slow": SLOW_TOKENS_PER_S}
        for name, rate in rates.items():
            port = free_port()
            argv = [DUBHE, "upstream-sim", "--host", "127.0.0.1", "--port", str(port)]
            if rate:
                argv += ["--tokens-per-second", str(rate)]
            self.sims[name] = Sim(name, self.procs.start(f"sim-{name}", argv, self.env()), port)
        for sim in self.sims.values():
            wait_until(sim.stats, sim.proc, f"sim {sim.name}",
                       lambda s=sim: self.procs.log_text(f"sim-{s.name}"))  # fmt: skip

    def _cli(self, side: str) -> list[str]:
        """The venv's `dubhe` script imports whatever PYTHONPATH puts first, but `python -m`
        says plainly that the core runs from its export."""
        return [sys.executable, "-m", "dubhe"] if side == "core" else [DUBHE]

    def create_account(self, side: str = "gateway") -> None:
        def dubhe(*args: str) -> str:
            done = subprocess.run([*self._cli(side), *args], env=self.env(side),
                                  capture_output=True, text=True)  # fmt: skip
            if done.returncode != 0:
                raise RuntimeError(f"{side}: dubhe {' '.join(args[:2])} failed:\n{done.stderr}")
            return done.stdout.strip()

        email = self.core.email if side == "core" and self.core else self.email
        dubhe("users", "create", email, "--password", "benchpass123", "--plan", "ultimate")
        key = dubhe("keys", "create", email)
        if side == "core":
            assert self.core is not None
            self.core.key = key
        else:
            self.key = key

    def start_gateway(self, workers: int, side: str = "gateway") -> Gateway:
        port = free_port()
        name = f"{side}-{workers}w" + ("-redis" if side == "gateway" and self.redis_url else "")
        if name in self.gateway_logs:  # a restart (phase 11): a log of its own
            name += f"-{sum(log.startswith(name) for log in self.gateway_logs) + 1}"
        argv = [*self._cli(side), "serve", "--host", "127.0.0.1", "--port", str(port),
                "--workers", str(workers)]  # fmt: skip
        proc = self.procs.start(name, argv, self.env(side))
        gateway = Gateway(proc, port, workers, name)

        def ready() -> bool:
            # /healthz can answer from the first worker while the second is still booting.
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                healthy = r.status == 200
            booted = self.procs.log_text(name).count("Application startup complete")
            return healthy and (workers == 1 or booted >= workers)

        wait_until(ready, proc, name, lambda: self.procs.log_text(name))
        if side == "core":
            assert self.core is not None
            self.core.gateway = gateway
        else:
            self.gateway = gateway
        self.gateway_logs.append(name)
        return gateway

    def bare_argv(self, port: int) -> list[str]:
        """The bare proxy (the run's copy of it) reaching every sim, each under its name."""
        argv = [sys.executable, str(self.work_dir / BARE_PROXY.name), "--host", "127.0.0.1",
                "--port", str(port)]  # fmt: skip
        for name, sim in self.sims.items():
            argv += ["--upstream", f"{name}=http://127.0.0.1:{sim.port}/v1"]
        return argv

    def start_bare(self) -> Bare:
        port = free_port()
        proc = self.procs.start("bare", self.bare_argv(port), self.env())

        def ready() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                return r.status == 200

        wait_until(ready, proc, "bare proxy", lambda: self.procs.log_text("bare"))
        self.bare = Bare(proc, port)
        self.gateway_logs.append("bare")  # its problems are counted too, named "bare: ..."
        return self.bare

    def stop_bare(self) -> None:
        if self.bare is not None:
            self.procs.stop(self.bare.proc)
            self.bare = None

    def pid_of(self, where: str) -> int:
        """The root of the process tree serving a target: 'gateway', 'core' or 'bare'."""
        if where == "bare":
            assert self.bare is not None, "no bare proxy running"
            return self.bare.proc.pid
        return self.gateway_of(where).proc.pid

    def stop_gateway(self, side: str = "gateway") -> None:
        if side == "core":
            if self.core is not None and self.core.gateway is not None:
                self.procs.stop(self.core.gateway.proc)
                self.core.gateway = None
        elif self.gateway is not None:
            self.procs.stop(self.gateway.proc)
            self.gateway = None

    def gateway_of(self, where: str) -> Gateway:
        """The running gateway behind a target name: 'gateway' (current) or 'core'."""
        gateway = self.core.gateway if where == "core" and self.core else self.gateway
        assert gateway is not None, f"no {where} gateway running"
        return gateway

    # requests -------------------------------------------------------------------------------

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def target(self, where: str, sim: str = "fast") -> tuple[str, dict[str, str]]:
        """(url, headers) for 'direct' (the fast sim), 'gateway' (current), 'core' or 'bare'.
        The bare proxy gets the gateway's key too, so both read the very same request bytes."""
        if where == "direct":
            return self.sims[sim].url, {}
        if where == "bare":
            assert self.bare is not None, "no bare proxy running"
            return self.bare.url(sim), self.auth
        if where == "core":
            assert self.core is not None
            return self.gateway_of("core").url, {"Authorization": f"Bearer {self.core.key}"}
        return self.gateway_of("gateway").url, self.auth

    def upstream_requests(self, sim: Sim) -> int:
        """Chat requests the sim has received, once nothing is still in flight (wrk stops with
        requests outstanding; the gateway still forwards those)."""
        time.sleep(0.3)
        deadline = time.monotonic() + 10
        stats = sim.stats()
        while stats["active"] and time.monotonic() < deadline:
            time.sleep(0.1)
            stats = sim.stats()
        return stats["requests"]

    @contextlib.contextmanager
    def through_gateway(self, sim: Sim, where: str = "gateway") -> Iterator[Tally]:
        """Adds the requests the block sends through the gateway to its ledger (the current
        gateway's, or the core's with where="core"): the sim's counter tells how many reached
        it, the block tells how many its client completed (and how many it sent to the sim
        directly meanwhile, which the counter also saw)."""
        ledger = self.core.ledger if where == "core" and self.core else self.ledger
        before = self.upstream_requests(sim)
        tally = Tally()
        yield tally
        received = self.upstream_requests(sim) - before - tally.direct_sent
        ledger.upstream_received += received
        ledger.client_completed += tally.client_completed


# -- load tools -------------------------------------------------------------------------------


def wrk(rig: Rig, where: str, *, threads: int, connections: int, seconds: int,
        target: tuple[str, dict[str, str]] | None = None, model: str = FAST_MODEL) -> dict:
    """wrk against a target name, or against (url, headers) given as target."""
    url, headers = target or rig.target(where)
    body = json.dumps(streams.chat_body(model, 16, stream=False))
    auth = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in headers.items())
    script = rig.work_dir / f"wrk-{where}.lua"
    script.write_text(WRK_SCRIPT.format(body=body, auth=auth))
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency",
            "-s", str(script), url]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    match = re.search(r"^WRK_JSON (.*)$", out.stdout, re.MULTILINE)
    if not match:
        raise RuntimeError(f"wrk printed no result:\n{out.stdout}\n{out.stderr}")
    result = json.loads(match.group(1))
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["socket_errors"] = sum(
        result[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts")
    )
    return result


def hey(rig: Rig, where: str, requests: int) -> dict:
    url, headers = rig.target(where)
    body = json.dumps(streams.chat_body(FAST_MODEL, 16, stream=False))
    argv = ["hey", "-n", str(requests), "-c", "1", "-m", "POST", "-T", "application/json",
            "-d", body]  # fmt: skip
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    out = subprocess.run(argv + [url], capture_output=True, text=True, timeout=600).stdout
    percentiles = {int(p): float(s) for p, s in re.findall(r"(\d+)% in ([\d.]+) secs", out)}
    statuses = {int(c): int(n) for c, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", out)}
    _, _, error_lines = out.partition("Error distribution:")
    return {
        "requests": requests,
        # hey prints seconds with 4 decimals: 100 us resolution, hence only a cross-check.
        "p50_us": percentiles.get(50, 0) * 1e6 if percentiles else None,
        "p99_us": percentiles.get(99, 0) * 1e6 if percentiles else None,
        "status_counts": statuses,
        "non_2xx": sum(n for code, n in statuses.items() if not 200 <= code < 300),
        "errors": error_lines.strip()[:500],
        "completed": sum(statuses.values()),
    }


# -- phases -----------------------------------------------------------------------------------


def c1_targets(rig: Rig) -> list[str]:
    """What phases 1-3 measure: direct, the current gateway, the bare proxy and, when it runs,
    the core gateway."""
    return ["direct", "gateway", *(["bare"] if rig.bare else []),
            *(["core"] if rig.core and rig.core.gateway else [])]  # fmt: skip


def warm_up(rig: Rig, targets: list[str]) -> None:
    """First requests pay for imports, key lookups and connection pools; keep them out."""
    for where in targets:
        _wrk_counted(rig, where, threads=1, connections=4, seconds=1)


def _wrk_counted(rig: Rig, where: str, **wrk_args: int) -> dict:
    """A wrk run whose gateway requests go into that gateway's usage ledger (the bare proxy
    has none: its requests reach the sim like direct ones, outside any ledger block)."""
    if where in ("direct", "bare"):
        return wrk(rig, where, **wrk_args)
    with rig.through_gateway(rig.sims["fast"], where) as tally:
        result = wrk(rig, where, **wrk_args)
        tally.client_completed = result["requests"]
    return result


def phase_latency(rig: Rig, plan: Plan) -> dict:
    """Added latency at one connection. Each round runs every target once, and the order
    rotates from round to round (direct/gateway/core, gateway/core/direct, ...) so slow drift
    on a shared box lands on all of them; the median of the round values is reported."""
    targets = c1_targets(rig)
    rounds: list[dict[str, dict]] = []
    for i in range(plan.latency_rounds):
        shift = i % len(targets)
        this_round: dict[str, dict] = {}
        for where in targets[shift:] + targets[:shift]:
            this_round[where] = _wrk_counted(rig, where, threads=1, connections=1,
                                             seconds=plan.latency_round_s)  # fmt: skip
        rounds.append(this_round)
    wrk_summary = {
        where: {
            stat: statistics.median(r[where][stat] for r in rounds)
            for stat in ("p50_us", "p99_us", "rps")
        }
        for where in targets
    }
    # hey has no time limit with -n: a gateway that stalls would hold the whole run hostage, so
    # the count shrinks to what the gateway's measured rate fits in HEY_BUDGET_S.
    requests = min(plan.hey_requests, max(20, int(wrk_summary["gateway"]["rps"] * HEY_BUDGET_S)))
    hey_runs = {"direct": hey(rig, "direct", requests)}
    with rig.through_gateway(rig.sims["fast"]) as tally:
        hey_runs["gateway"] = hey(rig, "gateway", requests)
        tally.client_completed = hey_runs["gateway"]["completed"]
    wrk_result = {**wrk_summary, "added": _added(wrk_summary), "rounds": rounds}
    hey_result = {**hey_runs, "added": _added(hey_runs)}
    if "bare" in wrk_summary:
        wrk_result["bare_added"] = _added(wrk_summary, "bare")
        hey_result["bare"] = hey(rig, "bare", requests)
        hey_result["bare_added"] = _added(hey_result, "bare")
    if "core" in wrk_summary:
        wrk_result["core_added"] = _added(wrk_summary, "core")
    return {"wrk": wrk_result, "hey": hey_result}


def _added(by_target: dict[str, dict], where: str = "gateway") -> dict:
    return {
        stat: _minus(by_target[where].get(stat), by_target["direct"].get(stat))
        for stat in ("p50_us", "p99_us")
    }


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


# What a summary of repeated runs adds up rather than takes the median of: counts the gates
# check, so that an error in any round is seen.
_SUMMED = frozenset({"non_2xx", "connect_errors", "read_errors", "write_errors", "timeouts",
                     "socket_errors", "streams", "ok_status", "ended_with_done",
                     "not_200_before_first"})  # fmt: skip


def _median_run(runs: list[dict]) -> dict:
    """One figure per key for repeated runs of one target: the median of every number (rates,
    latencies, CPU per request or chunk, each computed within its run), the sum of the counts
    in _SUMMED, error kinds merged; the runs themselves under "rounds"."""
    summary: dict[str, Any] = {}
    for key, value in runs[0].items():
        if key in _SUMMED:
            summary[key] = sum(run[key] for run in runs)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            summary[key] = statistics.median(run[key] for run in runs)
        elif key == "errors" and isinstance(value, dict):
            merged: dict[str, int] = {}
            for run in runs:
                for kind, n in run[key].items():
                    merged[kind] = merged.get(kind, 0) + n
            summary[key] = merged
        else:
            summary[key] = value
    summary["rounds"] = runs
    return summary


def _rotating_rounds(
    targets: list[str], rounds: int, measure: Callable[[str], dict]
) -> dict[str, dict]:
    """Each round measures every target once, the order rotating from round to round so slow
    drift on a shared box lands on all of them; the median run of each target."""
    runs: dict[str, list[dict]] = {where: [] for where in targets}
    for i in range(rounds):
        shift = i % len(targets)
        for where in targets[shift:] + targets[:shift]:
            runs[where].append(measure(where))
    return {where: _median_run(target_runs) for where, target_runs in runs.items()}


def phase_throughput_rounds(rig: Rig, plan: Plan) -> dict:
    """Phases 2 and 3 with 1 worker: direct, gateway, bare and core in rotating rounds, keyed
    as the results JSON names them (gateway_1w, bare_1w, core_1w)."""
    names = {"direct": "direct", "gateway": "gateway_1w", "bare": "bare_1w", "core": "core_1w"}
    medians = _rotating_rounds(c1_targets(rig), plan.throughput_rounds,
                               lambda where: phase_throughput(rig, plan, where))  # fmt: skip
    return {names[where]: summary for where, summary in medians.items()}


def phase_throughput(rig: Rig, plan: Plan, where: str, model: str = FAST_MODEL) -> dict:
    """64 connections for plan.throughput_s, with the CPU each process tree used meanwhile:
    CPU per request = CPU seconds / completed requests. where: direct, gateway, core or bare
    (the tree of the server under test is reported as "gateway" whichever it is)."""
    sim = rig.sims["fast"]
    roots = {"sim": sim.proc.pid}
    if where != "direct":
        roots["gateway"] = rig.pid_of(where)
    with contextlib.ExitStack() as stack:
        tally = (stack.enter_context(rig.through_gateway(sim, where))
                 if where in ("gateway", "core") else Tally())  # fmt: skip
        cpu = stack.enter_context(cpu_delta(**roots))
        result = wrk(rig, where, threads=2, connections=64, seconds=plan.throughput_s,
                     model=model)
        tally.client_completed = result["requests"]
    for name, seconds in cpu.items():
        result[f"{name}_cpu_s"] = seconds
        result[f"{name}_cpu_us_per_request"] = seconds / max(result["requests"], 1) * 1e6
    return result


def phase_routing(rig: Rig, plan: Plan) -> dict:
    """Phase 10: what routing costs a request that does not fail. The plain model has one
    deployment; the routed one three, one refusing connections: its first requests fail over
    (and count), then its breaker keeps it out but for a half-open trial now and then. Both
    through the same 1-worker gateway, rotating rounds, median reported."""
    models = {"plain": FAST_MODEL, "routed": ROUTED_MODEL}
    with rig.through_gateway(rig.sims["fast"]) as tally:  # its requests are billed too
        warm = wrk(rig, "gateway", threads=1, connections=4, seconds=1, model=ROUTED_MODEL)
        tally.client_completed = warm["requests"]
    medians = _rotating_rounds(
        list(models), plan.throughput_rounds,
        lambda name: phase_throughput(rig, plan, "gateway", models[name]))
    plain, routed = (medians[name]["gateway_cpu_us_per_request"] for name in models)
    return {**medians, "warm_up": warm, "cpu_ratio": routed / plain if plain else None}


def phase_redis(rig: Rig, plan: Plan) -> dict:
    """Phase 11: the 1-worker c=64 run with the limiter on Redis (DUBHE_REDIS_URL), in rounds
    alternating with the same run without it, each on a fresh gateway."""
    runs: dict[str, list[dict]] = {"local": [], "redis": []}
    for i in range(plan.throughput_rounds):
        for limiter in (("local", "redis") if i % 2 == 0 else ("redis", "local")):
            rig.redis_url = BENCH_REDIS_URL if limiter == "redis" else None
            rig.start_gateway(workers=1)
            try:
                warm_up(rig, ["gateway"])
                runs[limiter].append(phase_throughput(rig, plan, "gateway"))
            finally:
                rig.stop_gateway()
    rig.redis_url = None
    medians = {name: _median_run(limiter_runs) for name, limiter_runs in runs.items()}
    local, redis = (medians[n]["gateway_cpu_us_per_request"] for n in ("local", "redis"))
    return {**medians, "cpu_us_added": redis - local}


def redis_answers(url: str) -> bool:
    host, _, port = url.removeprefix("redis://").split("/")[0].partition(":")
    try:
        with socket.create_connection((host, int(port or 6379)), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def phase_ttft(rig: Rig, plan: Plan) -> dict:
    """Time to first token at one stream, direct, gateway and bare interleaved request by
    request."""
    body = streams.chat_body(FAST_MODEL, 16, stream=True)
    others = ["direct", *(["bare"] if rig.bare else [])]  # what reaches the sim outside a ledger
    targets = {where: rig.target(where) for where in ("direct", "gateway", *others[1:])}
    # The same gateway over /v1/ws/chat, one socket kept open, in the same interleaved rounds.
    url, headers = targets["gateway"]
    targets["gateway_ws"] = (
        url.replace("http://", "ws://").replace("/chat/completions", "/ws/chat"), headers)
    with rig.through_gateway(rig.sims["fast"]) as tally:
        result = asyncio.run(
            streams.ttft_pairs(targets, body, plan.ttft_rounds, budget_s=TTFT_BUDGET_S)
        )
        tally.client_completed = result["gateway"]["n"] + result["gateway_ws"]["n"]
        # The direct (and bare) probes hit the same sim.
        tally.direct_sent = sum(result[w]["n"] + result[w]["failures"] for w in others)
    result["added"] = _added(result)
    result["ws_added"] = _added(result, "gateway_ws")
    if rig.bare:
        result["bare_added"] = _added(result, "bare")
    return result


def phase_chunks(rig: Rig, plan: Plan) -> dict:
    """CPU per relayed chunk: many concurrent paced streams, CPU delta / events received, for
    the gateway and the bare proxy; straight to the paced sim too, for the sim's own cost per
    chunk as a reference. Rotating rounds, the median of each figure."""
    targets = ["direct", "gateway", *(["bare"] if rig.bare else [])]
    medians = _rotating_rounds(targets, plan.chunk_rounds,
                               lambda where: _chunk_run(rig, plan, where))  # fmt: skip
    return {"tokens_per_stream": plan.chunk_tokens, **medians}


def _chunk_run(rig: Rig, plan: Plan, where: str) -> dict:
    sim = rig.sims["paced"]
    body = streams.chat_body(PACED_MODEL, plan.chunk_tokens, stream=True)
    url, headers = rig.target(where, sim="paced")
    # The tree measured: the sim's when direct, else the server under test's (named "gateway"
    # for the bare proxy too, as in phase 3).
    tree = "sim" if where == "direct" else "gateway"
    pid = sim.proc.pid if where == "direct" else rig.pid_of(where)
    ledger = rig.through_gateway(sim) if where == "gateway" else contextlib.nullcontext(Tally())
    with ledger as tally, cpu_delta(**{tree: pid}) as cpu:
        result = asyncio.run(streams.run_streams(url, headers, body, plan.chunk_streams))
        tally.client_completed = result.ok_status
    return {**result.as_dict(), f"{tree}_cpu_s": cpu[tree],
            f"{tree}_cpu_us_per_chunk": cpu[tree] / max(result.events, 1) * 1e6}  # fmt: skip


def phase_memory(rig: Rig, plan: Plan, where: str = "gateway") -> dict:
    """RSS of the gateway's (or the bare proxy's) whole process tree idle, and at its peak
    while memory_streams slow streams are open; scaled to 1,000 streams."""
    body = streams.chat_body(SLOW_MODEL, plan.memory_tokens, stream=True)
    url, headers = rig.target(where, sim="slow")
    pid = rig.pid_of(where)
    time.sleep(0.5)  # let the previous phase's connections close
    idle = tree_rss_bytes(pid)
    sim = rig.sims["slow"]
    ledger = rig.through_gateway(sim) if where == "gateway" else contextlib.nullcontext(Tally())
    with ledger as tally:
        with RssSampler(pid) as sampler:
            result = asyncio.run(
                streams.run_streams(url, headers, body, plan.memory_streams,
                                    on_all_open=sampler.mark_all_open)  # fmt: skip
            )
        tally.client_completed = result.ok_status
    growth = sampler.peak - idle
    return {
        **result.as_dict(),
        "idle_rss_mb": idle / 2**20,
        "peak_rss_mb": sampler.peak / 2**20,
        "rss_when_all_open_mb": (sampler.at_all_open or 0) / 2**20,
        "mb_per_1000_streams": growth / 2**20 * 1000 / plan.memory_streams,
    }


START_BUDGET_S = 180  # most a server may take from spawn to its first 200 (a loaded box: > 60)
WARM_UP_S = 2  # load at 4 connections before the "after warm-up" RSS sample


def phase_start(rig: Rig, plan: Plan) -> dict:
    """Cold start and idle memory of a fresh 1-worker gateway and a fresh bare proxy, started
    alternately (gateway first in even runs, bare first in odd ones), median of each; then the
    CLI's start time. Runs when no other server but the sims is up."""
    runs: dict[str, list[dict]] = {"gateway": [], "bare": []}
    for i in range(plan.start_runs):
        for where in ("gateway", "bare") if i % 2 == 0 else ("bare", "gateway"):
            runs[where].append(_cold_start(rig, where, i))
    summary = {where: _median_run(server_runs) for where, server_runs in runs.items()}
    return {**summary, "cli": cli_start(rig, plan)}


def _cold_start(rig: Rig, where: str, run: int) -> dict:
    """Spawn one server (1 worker) and time it: when its port accepts a connection (RSS "after
    start", before any request), when its first chat completion answers 200 (cold start), and
    its RSS after WARM_UP_S of load at 4 connections."""
    port = free_port()
    name = f"start-{where}-{run + 1}"
    if where == "gateway":
        argv = [DUBHE, "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
    else:
        argv = rig.bare_argv(port)
        url = f"http://127.0.0.1:{port}/fast/v1/chat/completions"
    target = (url, rig.auth)
    body = json.dumps(streams.chat_body(FAST_MODEL, 16, stream=False)).encode()
    sim = rig.sims["fast"]
    ledger = rig.through_gateway(sim) if where == "gateway" else contextlib.nullcontext(Tally())
    with ledger as tally:
        started = time.monotonic()
        proc = rig.procs.start(name, argv, rig.env())
        try:
            listening_s = _wait_listening(port, proc, started, lambda: rig.procs.log_text(name))
            rss_after_start = tree_rss_bytes(proc.pid)
            refused = _first_completion(url, rig.auth, body, started)
            cold_start_s = time.monotonic() - started
            tally.client_completed += 1
            warm = wrk(rig, where, threads=1, connections=4, seconds=WARM_UP_S, target=target)
            tally.client_completed += warm["requests"]
            time.sleep(0.5)  # let the warm-up's connections close
            rss_after_warm_up = tree_rss_bytes(proc.pid)
        finally:
            rig.procs.stop(proc)
    if where == "gateway":
        rig.gateway_logs.append(name)
    return {
        "listening_s": listening_s,
        "cold_start_s": cold_start_s,
        "not_200_before_first": refused,
        "rss_after_start_mb": rss_after_start / 2**20,
        "rss_after_warm_up_mb": rss_after_warm_up / 2**20,
        "warm_up_requests": warm["requests"],
        "non_2xx": warm["non_2xx"],
        "socket_errors": warm["socket_errors"],
    }


def _wait_listening(
    port: int, proc: subprocess.Popen, started: float, logs: Callable[[], str]
) -> float:
    """Seconds from spawn until the port accepts a TCP connection (uvicorn binds it after the
    application's startup); probing with a bare connect sends no request."""
    while time.monotonic() - started < START_BUDGET_S:
        if proc.poll() is not None:
            raise RuntimeError(f"a server exited with {proc.returncode} at start:\n{logs()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return time.monotonic() - started
        time.sleep(0.01)
    raise RuntimeError(f"a server did not listen within {START_BUDGET_S}s:\n{logs()}")


def _first_completion(url: str, headers: dict[str, str], body: bytes, started: float) -> int:
    """POST until the first 200; returns how many answers were not 200 before it (0 when the
    server is ready as soon as it listens, as it should be)."""
    request_headers = {**headers, "content-type": "application/json"}
    refused = 0
    while time.monotonic() - started < START_BUDGET_S:
        request = urllib.request.Request(url, data=body, headers=request_headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                response.read()
                return refused
        except urllib.error.HTTPError as exc:  # a status, not a connection problem
            exc.close()
            refused += 1
        except OSError:
            refused += 1
            time.sleep(0.01)
    raise RuntimeError(f"no 200 from {url} within {START_BUDGET_S}s of spawning it")


def cli_start(rig: Rig, plan: Plan) -> dict:
    """Wall time of CLI calls from the run's snapshot, round-robin, median of plan.cli_runs
    each: the interpreter alone (the floor), `dubhe --help` (imports), and `dubhe users show`
    (settings, catalog and a database read)."""
    commands = {
        "python": [sys.executable, "-c", "pass"],
        "dubhe --help": [DUBHE, "--help"],
        "dubhe users show": [DUBHE, "users", "show", rig.email],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    failures: dict[str, str] = {}
    for _ in range(plan.cli_runs):
        for name, argv in commands.items():
            started = time.monotonic()
            done = subprocess.run(argv, env=rig.env(), capture_output=True, text=True)
            times[name].append(time.monotonic() - started)
            if done.returncode != 0:
                failures[name] = f"exit {done.returncode}: {done.stderr.strip()[-300:]}"
    return {
        "runs": plan.cli_runs,
        "median_s": {name: statistics.median(values) for name, values in times.items()},
        "runs_s": times,
        "failures": failures,
    }


# -- gates ------------------------------------------------------------------------------------


def count_usage_rows(database_url: str | None, data_dir: Path, email: str) -> dict:
    """Usage rows written for a bench account, by outcome (after the gateways have stopped,
    so everything queued has been flushed)."""
    query = (
        "SELECT r.outcome, r.status_code, COUNT(*) FROM usage_records r "
        "JOIN users u ON u.id = r.user_id WHERE u.email = {param} "
        "GROUP BY r.outcome, r.status_code"
    )
    if database_url:
        rows = asyncio.run(_query_sqlalchemy(database_url, query.format(param=":email"),
                                             {"email": email}))  # fmt: skip
    else:
        with contextlib.closing(sqlite3.connect(data_dir / "dubhe.db")) as db:
            rows = db.execute(query.format(param="?"), (email,)).fetchall()
    by_outcome = {f"{outcome} {status}": count for outcome, status, count in rows}
    return {"rows": sum(by_outcome.values()), "by_outcome": by_outcome}


async def _query_sqlalchemy(url: str, sql: str, params: dict) -> list[tuple]:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return [tuple(row) for row in (await conn.execute(text(sql), params)).all()]
    finally:
        await engine.dispose()


def gateway_log_problems(rig: Rig) -> dict:
    """Warnings, errors and exceptions the gateways logged, as distinct lines with counts
    (a failing write repeats the same traceback thousands of times)."""
    problem = re.compile(r"^(WARNING|ERROR|CRITICAL)\b|^[\w.]+(Error|Exception)\b.*:|Traceback")
    counts: dict[str, int] = {}
    for name in rig.gateway_logs:
        for line in rig.procs.log_text(name).splitlines():
            line = line.strip()
            if problem.search(line):
                key = f"{name}: {line[:240]}"
                counts[key] = counts.get(key, 0) + 1
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    distinct = [{"count": n, "line": line} for line, n in ranked[:15]]
    return {"lines": sum(counts.values()), "distinct": distinct}


def gates(rig: Rig, results: dict) -> dict:
    runs = _load_runs(results)
    chunks = results["chunks"]
    streams_runs = [chunks[w] for w in ("direct", "gateway", "bare") if w in chunks]
    streams_runs += [results["memory"], results["memory_bare"]]
    ttft = results["ttft"]
    probes = [ttft[w] for w in ("direct", "gateway", "gateway_ws", "bare") if w in ttft]
    usage = usage_gate(rig.database_url, rig.data_dir, rig.email, rig.ledger)
    core_usage = None
    if rig.core is not None and rig.core.key:
        # The core always runs on its own SQLite file (the brief's fresh data dir).
        core_usage = usage_gate(None, rig.core.data_dir, rig.core.email, rig.core.ledger)
    return {
        "non_2xx_by_run": {name: run["non_2xx"] for name, run in runs.items()},
        "socket_errors_by_run": {name: run.get("socket_errors", 0) for name, run in runs.items()},
        "non_2xx_total": sum(run["non_2xx"] for run in runs.values()),
        "streams_total": sum(s["streams"] for s in streams_runs)
        + sum(t["n"] + t["failures"] for t in probes),
        "streams_ended_with_done": sum(s["ended_with_done"] for s in streams_runs)
        + sum(t["n"] - t["not_ended_with_done"] for t in probes),
        "stream_errors": [s["errors"] for s in streams_runs if s["errors"]],
        "usage_records": usage,
        "core_usage_records": core_usage,
        "gateway_log_problems": gateway_log_problems(rig),
    }


def usage_gate(database_url: str | None, data_dir: Path, email: str, ledger: Ledger) -> dict:
    try:
        usage = count_usage_rows(database_url, data_dir, email)
    except Exception as exc:  # a gate reports; it never stops the report
        usage = {"rows": None, "error": f"{type(exc).__name__}: {exc}"}
    usage["expected_upstream_requests"] = ledger.upstream_received
    usage["client_completed_requests"] = ledger.client_completed
    usage["matches"] = _usage_matches(usage, ledger.upstream_received)
    return usage


def _usage_matches(usage: dict, upstream_received: int) -> bool:
    """Every request that reached an upstream has its row. Rows beyond that are allowed only as
    client_cancelled ones: wrk abandons its in-flight requests when it stops, and the gateway
    meters those even when they were cancelled before reaching the upstream."""
    rows = usage.get("rows")
    if rows is None:
        return False
    cancelled = sum(n for k, n in usage["by_outcome"].items() if k.startswith("client_cancelled"))
    return 0 <= rows - upstream_received <= cancelled


def _load_runs(results: dict) -> dict[str, dict]:
    """Every wrk and hey run by name, for the non-2xx gate."""
    runs = {}
    for i, r in enumerate(results["latency"]["wrk"]["rounds"]):
        for where, run in r.items():
            runs[f"wrk c=1 {where} round {i + 1}"] = run
    for where in ("direct", "gateway", "bare"):
        if where in results["latency"]["hey"]:
            runs[f"hey c=1 {where}"] = results["latency"]["hey"][where]
    for name, run in results["throughput"].items():
        if isinstance(run, dict):
            runs[f"wrk c=64 {name}"] = run  # summed over its rounds
    for where in ("gateway", "bare"):
        if where in results.get("start", {}):
            runs[f"wrk c=4 warm-up after start, {where}"] = results["start"][where]
    for phase in ("routing", "redis"):
        for name, run in results.get(phase, {}).items():
            if isinstance(run, dict):
                runs[f"wrk c=64 {phase} {name}"] = run
    return runs


# -- report -----------------------------------------------------------------------------------


def verdict(target: str, value: float | None) -> str:
    if value is None:
        return ""
    op, limit = TARGETS[target]
    met = value <= limit if op == "<=" else value >= limit
    return f"{op} {limit:<6} {'ok' if met else 'MISS'}"


def _us(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f} us"


def _n(v: float | None, unit: str = "") -> str:
    return "-" if v is None else f"{v:,.0f}{unit}"


def table(results: dict) -> str:
    m, lat, tp = results["machine"], results["latency"], results["throughput"]
    ttft, chunks, mem, g = results["ttft"], results["chunks"], results["memory"], results["gates"]
    plan = results["plan"]
    rows = [("", "direct", "gateway", "added/value", "target")]

    def add(label: str, direct: str, gateway: str, value: str, target: str = "") -> None:
        rows.append((label, direct, gateway, value, target))

    w = lat["wrk"]
    rounds = f"{plan['latency_rounds']}x{plan['latency_round_s']}s"
    add(f"c=1 p50, wrk (median of {rounds})", _us(w["direct"]["p50_us"]),
        _us(w["gateway"]["p50_us"]), _us(w["added"]["p50_us"]),
        verdict("added_p50_us", w["added"]["p50_us"]))  # fmt: skip
    add("c=1 p99, wrk", _us(w["direct"]["p99_us"]), _us(w["gateway"]["p99_us"]),
        _us(w["added"]["p99_us"]))  # fmt: skip
    h = lat["hey"]
    add(f"c=1 p50, hey ({h['gateway']['requests']} req)", _us(h["direct"]["p50_us"]),
        _us(h["gateway"]["p50_us"]), _us(h["added"]["p50_us"]))  # fmt: skip
    add("c=1 p99, hey", _us(h["direct"]["p99_us"]), _us(h["gateway"]["p99_us"]),
        _us(h["added"]["p99_us"]))  # fmt: skip
    add(f"TTFT p50, 1 stream ({plan['ttft_rounds']} each)", _us(ttft["direct"]["p50_us"]),
        _us(ttft["gateway"]["p50_us"]), _us(ttft["added"]["p50_us"]))  # fmt: skip
    if "gateway_ws" in ttft:
        add("TTFT p50, 1 stream over /v1/ws/chat", _us(ttft["direct"]["p50_us"]),
            _us(ttft["gateway_ws"]["p50_us"]), _us(ttft["ws_added"]["p50_us"]))  # fmt: skip
    d, g1, g2 = tp["direct"], tp["gateway_1w"], tp["gateway_2w"]
    add(f"c=64 req/s, 1 worker ({plan['throughput_s']}s)", _n(d["rps"]), _n(g1["rps"]),
        f"{g1['rps'] / d['rps']:.0%} of direct")  # fmt: skip
    add("c=64 req/s, 2 workers", _n(d["rps"]), _n(g2["rps"]),
        f"{g2['rps'] / d['rps']:.0%} of direct",
        verdict("whole_box_rps_2_workers", g2["rps"]))  # fmt: skip
    add("c=64 p99, 1 worker / 2 workers", _us(d["p99_us"]),
        f"{_us(g1['p99_us'])} / {_us(g2['p99_us'])}", "")  # fmt: skip
    add("CPU per request, 1 worker", _us(d["sim_cpu_us_per_request"]) + " sim", "",
        _us(g1["gateway_cpu_us_per_request"]),
        verdict("gateway_cpu_us_per_request", g1["gateway_cpu_us_per_request"]))  # fmt: skip
    add("CPU per request, 2 workers", "", "", _us(g2["gateway_cpu_us_per_request"]),
        verdict("gateway_cpu_us_per_request", g2["gateway_cpu_us_per_request"]))  # fmt: skip
    cg = chunks["gateway"]
    add(f"CPU per chunk ({plan['chunk_streams']} streams x {chunks['tokens_per_stream']} tok)",
        _us(chunks["direct"]["sim_cpu_us_per_chunk"]) + " sim", "",
        _us(cg["gateway_cpu_us_per_chunk"]),
        verdict("cpu_us_per_chunk", cg["gateway_cpu_us_per_chunk"]))  # fmt: skip
    add(f"RSS per 1,000 streams ({mem['max_open']} open at once)", "",
        f"{mem['idle_rss_mb']:.0f} -> {mem['peak_rss_mb']:.0f} MB",
        f"{mem['mb_per_1000_streams']:.1f} MB",
        verdict("mb_per_1000_streams", mem["mb_per_1000_streams"]))  # fmt: skip

    routing = results.get("routing")
    if routing:
        add("CPU per request: 1 deployment / 3, one down", "",
            f"{_us(routing['plain']['gateway_cpu_us_per_request'])} / "
            f"{_us(routing['routed']['gateway_cpu_us_per_request'])}",
            f"{routing['cpu_ratio']:.2f}x", f"non-2xx {routing['routed']['non_2xx']}")
    redis = results.get("redis")
    if redis:
        add("CPU per request: limiter local / Redis", "",
            f"{_us(redis['local']['gateway_cpu_us_per_request'])} / "
            f"{_us(redis['redis']['gateway_cpu_us_per_request'])}",
            f"{redis['cpu_us_added']:+.0f} us")

    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [
        f"Dubhe bench {results['timestamp']}  sha {m['git_sha']} (src {m.get('src_digest')})  "
        f"{m['nproc']} cores  "
        f"{m['cpu_model']}  db {results['database']}{'  QUICK' if results['quick'] else ''}",
        f"load {results['load_before']} -> {results['load_after']}  python {m['python']}  "
        f"wrk {m['wrk']}  hey {m['hey']}  took {results['duration_s']:.0f}s",
    ]
    if results["busy_before"]:
        lines.append(
            f"BUSY MACHINE: load {results['load_before'][0]} before the run on {m['nproc']} "
            "cores: other work shared them and inflates every figure, ratios included, unevenly; "
            "this run checks the harness, its numbers are not to be quoted"
        )
    lines.append("")
    for r in rows:
        lines.append(
            f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  "
            f"{r[3]:>{widths[3]}}  {r[4]}".rstrip()
        )
    usage = g["usage_records"]
    lines += [
        "",
        f"rig-bound: {'YES' if tp['rig_bound'] else 'no'} (gateway 1 worker at "
        f"{g1['rps'] / d['rps']:.0%} of the sim's direct req/s; > 50% means the load generator "
        "and sim share the cores the gateway needs)",
        f"gates: non-2xx {g['non_2xx_total']} over {len(g['non_2xx_by_run'])} wrk/hey runs "
        f"(socket errors/timeouts {sum(g['socket_errors_by_run'].values())}); "
        f"streams ending in [DONE] {g['streams_ended_with_done']}/{g['streams_total']}; "
        f"usage rows {usage.get('rows')} for {usage['expected_upstream_requests']} upstream "
        f"requests ({'ok' if usage['matches'] else 'MISMATCH'}; by outcome "
        f"{usage.get('by_outcome', usage.get('error'))}); gateway log problem lines "
        f"{g['gateway_log_problems']['lines']}",
    ]
    for problem in g["gateway_log_problems"]["distinct"][:5]:
        lines.append(f"  {problem['count']:>6} x {problem['line'][:150]}")
    lines += ["", *billing_block(results["billing_cost"], g.get("core_usage_records"))]
    lines += ["", *ratios_block(results)]
    return "\n".join(lines)


def billing_cost(results: dict) -> dict:
    """What billing costs per request: the current gateway minus the gateway-core commit's,
    both with 1 worker and measured in the same run (phase 1 rounds interleave both)."""
    core = results["core"]
    if core.get("skipped"):
        return {"skipped": core["skipped"], "core_ref": core["ref"]}
    w, tp = results["latency"]["wrk"], results["throughput"]
    current_tp, core_tp = tp["gateway_1w"], tp["core_1w"]

    def pair(core_value: float | None, current_value: float | None) -> dict:
        return {"core": core_value, "current": current_value,
                "billing": _minus(current_value, core_value)}  # fmt: skip

    rps = pair(core_tp["rps"], current_tp["rps"])
    rps["change"] = current_tp["rps"] / core_tp["rps"] - 1 if core_tp["rps"] else None
    return {
        "core_ref": core["ref"],
        "core_sha": core["sha"],
        "workers": 1,
        "c1_added_p50_us": pair(w["core_added"]["p50_us"], w["added"]["p50_us"]),
        "c1_added_p99_us": pair(w["core_added"]["p99_us"], w["added"]["p99_us"]),
        "cpu_us_per_request": pair(core_tp["gateway_cpu_us_per_request"],
                                   current_tp["gateway_cpu_us_per_request"]),  # fmt: skip
        "c64_rps": rps,
        "c64_p99_us": pair(core_tp["p99_us"], current_tp["p99_us"]),
    }


def billing_block(cost: dict, core_usage: dict | None) -> list[str]:
    if cost.get("skipped"):
        return [f"billing cost: comparison with {cost['core_ref']} skipped: {cost['skipped']}"]

    def us(v: float | None, sign: bool = False) -> str:
        return "-" if v is None else f"{v:+,.0f} us" if sign else f"{v:,.0f} us"

    def line(label: str, p: dict, last: str | None = None) -> str:
        tail = last if last is not None else f"billing {us(p['billing'], sign=True):>9}"
        fmt = _n if label.startswith("c=64 req/s") else us
        return (f"  {label:<22} core {fmt(p['core']):>9}   current {fmt(p['current']):>9}   "
                f"{tail}")  # fmt: skip

    rps = cost["c64_rps"]
    change = "-" if rps["change"] is None else f"({rps['change']:+.0%})"
    lines = [
        f"billing cost (current - core {cost['core_ref']}, 1 worker)",
        line("c=1 added p50", cost["c1_added_p50_us"]),
        line("c=1 added p99", cost["c1_added_p99_us"]),
        line("CPU per request", cost["cpu_us_per_request"]),
        line("c=64 req/s", rps, change),
        line("c=64 p99", cost["c64_p99_us"]),
    ]
    if core_usage is not None:
        lines.append(
            f"  core gates: usage rows {core_usage.get('rows')} for "
            f"{core_usage['expected_upstream_requests']} upstream requests "
            f"({'ok' if core_usage['matches'] else 'MISMATCH'})"
        )
    return lines


def ratios(results: dict) -> dict:
    """Gateway / bare pass-through proxy for every figure with a RATIO_TARGETS entry, each side
    the median over its rounds (or starts) in this run; "pass" when the ratio is within its
    target. A ratio whose bare figure is not positive (an added p50 lost in noise) is None and
    does not pass. The core gateway's ratios ride along where it was measured."""
    lat, tp, chunks = results["latency"]["wrk"], results["throughput"], results["chunks"]
    hey, ttft, start = results["latency"]["hey"], results["ttft"], results["start"]
    mem, mem_bare = results["memory"], results["memory_bare"]

    def entry(name: str, gateway: float | None, bare: float | None, unit: str) -> dict:
        ratio = gateway / bare if gateway is not None and bare else None
        if ratio is not None and bare is not None and bare < 0:
            ratio = None
        target = RATIO_TARGETS.get(name)
        if target is None:  # shown for reference, held to nothing
            return {"gateway": gateway, "bare": bare, "unit": unit, "ratio": ratio,
                    "target": None, "pass": None, "verdict": ""}
        met = ratio is not None and ratio <= target
        return {"gateway": gateway, "bare": bare, "unit": unit, "ratio": ratio,
                "target": f"<= {target}", "pass": met, "verdict": "PASS" if met else "FAIL"}

    cpu_key = "gateway_cpu_us_per_request"
    out = {
        "cpu_per_request": entry("cpu_per_request", tp["gateway_1w"][cpu_key],
                                 tp["bare_1w"][cpu_key], "us"),
        "added_p50": entry("added_p50", lat["added"]["p50_us"], lat["bare_added"]["p50_us"],
                           "us"),
        "cpu_per_chunk": entry("cpu_per_chunk", chunks["gateway"]["gateway_cpu_us_per_chunk"],
                               chunks["bare"]["gateway_cpu_us_per_chunk"], "us"),
        "added_p50_hey": entry("added_p50_hey", hey["added"]["p50_us"],
                               hey["bare_added"]["p50_us"], "us"),
        "added_ttft_p50": entry("added_ttft_p50", ttft["added"]["p50_us"],
                                ttft["bare_added"]["p50_us"], "us"),
        "mb_per_1000_streams": entry("mb_per_1000_streams", mem["mb_per_1000_streams"],
                                     mem_bare["mb_per_1000_streams"], "MB"),
        "cold_start": entry("cold_start", start["gateway"]["cold_start_s"],
                            start["bare"]["cold_start_s"], "s"),
        "listening": entry("listening", start["gateway"]["listening_s"],
                           start["bare"]["listening_s"], "s"),
        "idle_rss_after_start": entry("idle_rss_after_start",
                                      start["gateway"]["rss_after_start_mb"],
                                      start["bare"]["rss_after_start_mb"], "MB"),
        "idle_rss_after_warm_up": entry("idle_rss_after_warm_up",
                                        start["gateway"]["rss_after_warm_up_mb"],
                                        start["bare"]["rss_after_warm_up_mb"], "MB"),
    }  # fmt: skip
    if "core_1w" in tp:
        core = {"cpu_per_request": tp["core_1w"][cpu_key], "added_p50": lat["core_added"]["p50_us"]}
        for name, value in core.items():
            bare = out[name]["bare"]
            out[name]["core"] = value
            out[name]["core_ratio"] = value / bare if value is not None and bare and bare > 0 \
                else None
    return out


def ratios_block(results: dict) -> list[str]:
    r, plan, start = results["ratios"], results["plan"], results["start"]

    def fmt(value: float | None, unit: str) -> str:
        if value is None:
            return "-"
        if unit == "s":
            return f"{value:,.2f} s"
        return f"{value:,.1f} MB" if unit == "MB" else f"{value:,.0f} {unit}"

    def line(label: str, name: str) -> str:
        e = r[name]
        ratio = "-" if e["ratio"] is None else f"{e['ratio']:.2f}x"
        target = f"{e['target']}x  {e['verdict']}" if e["target"] else "(no target)"
        core = f"   (core {e['core_ratio']:.2f}x)" if e.get("core_ratio") is not None else ""
        return (f"  {label:<31} bare {fmt(e['bare'], e['unit']):>9}   gateway "
                f"{fmt(e['gateway'], e['unit']):>9}   {ratio:>6}  {target}{core}").rstrip()

    cli = start["cli"]
    median = cli["median_s"]
    rounds = (f"{plan['latency_rounds']} / {plan['throughput_rounds']} / "
              f"{plan['chunk_rounds']}")  # fmt: skip
    lines = [
        "physical limit: gateway / bare pass-through proxy (bench/bare_proxy.py), 1 worker, "
        f"same run; median of {rounds} rounds (latency / c=64 / chunks)",
        line("c=1 added p50 (wrk)", "added_p50"),
        line("CPU per request (c=64)", "cpu_per_request"),
        line("CPU per relayed chunk", "cpu_per_chunk"),
        line("c=1 added p50 (hey)", "added_p50_hey"),
        line("added TTFT p50, 1 stream", "added_ttft_p50"),
        line("RSS per 1,000 streams", "mb_per_1000_streams"),
        f"start and memory: gateway / bare, 1 worker, median of {plan['start_runs']} starts each",
        line("cold start (spawn to first 200)", "cold_start"),
        line("  of which: spawn to listening", "listening"),
        line("idle RSS after start", "idle_rss_after_start"),
        line(f"idle RSS after {WARM_UP_S}s of c=4", "idle_rss_after_warm_up"),
        f"CLI start, median of {cli['runs']}: python -c pass {median['python']:.2f} s, "
        f"dubhe --help {median['dubhe --help']:.2f} s, dubhe users show "
        f"{median['dubhe users show']:.2f} s",
    ]
    for name, failure in cli["failures"].items():
        lines.append(f"  CLI FAILED: {name}: {failure}")
    return lines


def write_results(results: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"{stamp}.json"
    text = json.dumps(results, indent=2, sort_keys=False) + "\n"
    path.write_text(text)
    (RESULTS_DIR / "latest.json").write_text(text)
    return path


# -- the core comparison ----------------------------------------------------------------------


def resolve_core(ref: str, no_core: bool, database_url: str | None) -> tuple[str | None, str]:
    """(full sha, "") when the core gateway can be benched, else (None, why not)."""
    if no_core:
        return None, "--no-core given"
    if database_url:
        # The core's migrations predate billing's: it cannot share the current gateway's
        # database, and on SQLite beside a PostgreSQL gateway the difference would not be billing.
        return None, "not with --database-url (the core would need a database of its own)"
    try:
        check = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{ref}^{{commit}}"],
                               capture_output=True, text=True, timeout=30)  # fmt: skip
        if check.returncode != 0:
            detail = check.stderr.strip().splitlines()[-1:] or [""]
            return None, (f"{ref} is not a commit in this clone ({detail[0]}); a shallow "
                          "clone or an export without history? git fetch --unshallow, or "
                          "pass --no-core")  # fmt: skip
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", f"{ref}^{{commit}}"],
                             capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"git could not be asked about {ref}: {exc}"
    return sha.stdout.strip(), ""


def start_core(rig: Rig, ref: str, sha: str) -> str:
    """Export, create the account and start the core gateway (1 worker); "" or why it failed.
    A core that cannot start costs the comparison, not the rest of the run."""
    try:
        rig.export_core(ref, sha)
        rig.create_account("core")
        rig.start_gateway(workers=1, side="core")
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        rig.stop_gateway("core")
        rig.core = None
        return f"the {ref} gateway did not start: {str(exc)[:1500]}"
    return ""


# -- main -------------------------------------------------------------------------------------


def run(plan: Plan, database_url: str | None, quick: bool, core_ref: str, no_core: bool) -> dict:
    started = time.monotonic()
    fd_limit = streams.raise_fd_limit()  # before spawning anything: the servers inherit it
    load_before = load_average()
    results: dict[str, Any] = {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "plan": dataclasses.asdict(plan),
        "database": database_url.split(":", 1)[0] if database_url else "sqlite",
        "machine": machine_info(),
        "fd_limit": fd_limit,
        "load_before": load_before,
        # Another job on the box inflates everything, and the gateway and the bare proxy
        # unevenly: 0.75 per core (1.5 on 2) is the bar the hot-path notes set for discarding.
        "busy_before": load_before[0] > 0.75 * (os.cpu_count() or 1),
        "targets": {k: f"{op} {v}" for k, (op, v) in TARGETS.items()},
        "ratio_targets": {k: f"<= {v}" for k, v in RATIO_TARGETS.items()},
    }
    core_sha, skipped = resolve_core(core_ref, no_core, database_url)
    results["core"] = {"ref": core_ref, "sha": core_sha, "skipped": skipped}
    if skipped:
        _log(f"billing cost: comparison skipped: {skipped}")
    with tempfile.TemporaryDirectory(prefix="dubhe-bench-") as tmp:
        rig = Rig(Path(tmp), database_url)
        try:
            rig.snapshot_source()
            results["machine"]["src_digest"] = rig.source_digest()
            _log("starting simulators")
            rig.start_sims()
            rig.write_catalog()
            _log("creating the bench account")
            rig.create_account()
            _log("starting the gateway (1 worker) and the bare pass-through proxy")
            rig.start_gateway(workers=1)
            rig.start_bare()
            if core_sha:
                _log(f"starting the core gateway from {core_ref} ({core_sha[:12]}, 1 worker)")
                skipped = start_core(rig, core_ref, core_sha)
                if skipped:
                    results["core"]["skipped"] = skipped
                    _log(f"billing cost: comparison skipped: {skipped}")
            warm_up(rig, c1_targets(rig))
            _log("phase 1: latency at 1 connection")
            results["latency"] = phase_latency(rig, plan)
            _log("phase 2: throughput at 64 connections, direct, bare and 1 worker")
            throughput = phase_throughput_rounds(rig, plan)
            if rig.core is not None:
                # Only phases 1-3 compare with the core; the rest runs without it.
                rig.stop_gateway("core")
            _log("phase 4: streams (TTFT, CPU per chunk)")
            results["ttft"] = phase_ttft(rig, plan)
            results["chunks"] = phase_chunks(rig, plan)
            _log(f"phase 5: memory with {plan.memory_streams} open streams")
            results["memory"] = phase_memory(rig, plan)
            results["memory_bare"] = phase_memory(rig, plan, "bare")
            _log("phase 10: routing, a model with three deployments, one down")
            results["routing"] = phase_routing(rig, plan)
            rig.stop_bare()  # the physical limit is measured; the rest is the gateway's alone
            rig.stop_gateway()
            _log("phase 2 again: throughput with 2 workers")
            rig.start_gateway(workers=2)
            warm_up(rig, ["direct", "gateway"])
            throughput["gateway_2w"] = phase_throughput(rig, plan, "gateway")
            rig.stop_gateway()
            if redis_answers(BENCH_REDIS_URL):
                _log(f"phase 11: the limiter on Redis ({BENCH_REDIS_URL}), 1 worker")
                results["redis"] = phase_redis(rig, plan)
            else:
                _log(f"phase 11 skipped: no Redis answers at {BENCH_REDIS_URL}")
            _log(f"start and memory: {plan.start_runs} cold starts each, and the CLI")
            results["start"] = phase_start(rig, plan)
            # Above half the sim's rate, wrk and the sim take cores the gateway would need.
            rig_bound = throughput["gateway_1w"]["rps"] > 0.5 * throughput["direct"]["rps"]
            throughput["rig_bound"] = rig_bound
            results["throughput"] = throughput
            results["gates"] = gates(rig, results)
            results["billing_cost"] = billing_cost(results)
            results["ratios"] = ratios(results)
        finally:
            rig.procs.stop_all()
    results["load_after"] = load_average()
    results["duration_s"] = time.monotonic() - started
    return results


def _log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _exit_on_signal(signum: int, frame: object) -> None:
    _log(f"got {signal.Signals(signum).name}; stopping every process it started")
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the servers


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark the Dubhe gateway vs its upstream.")
    parser.add_argument("--quick", action="store_true", help="short smoke run (about a minute)")
    parser.add_argument(
        "--database-url",
        help="bench the gateway on this database (e.g. postgresql+asyncpg://...) instead of a "
        "fresh SQLite file",
    )
    parser.add_argument(
        "--core-ref", default=DEFAULT_CORE_REF, metavar="REF",
        help="commit whose gateway is the no-billing baseline for the billing cost "
        f"(default {DEFAULT_CORE_REF}, the last commit before billing)",
    )  # fmt: skip
    parser.add_argument("--no-core", action="store_true",
                        help="skip the billing-cost comparison with --core-ref")  # fmt: skip
    args = parser.parse_args()
    # Also SIGINT: a shell starting us in the background leaves it ignored, and Ctrl-C or a
    # kill -INT must still stop the servers (which sit in their own process groups).
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    ensure_tools()
    results = run(QUICK if args.quick else FULL, args.database_url, args.quick, args.core_ref,
                  args.no_core)  # fmt: skip
    path = write_results(results)
    print(table(results))
    print(f"\nresults: {path.relative_to(REPO)} (and bench/results/latest.json)")


if __name__ == "__main__":
    main()
