"""Test-only launcher: run ``python ...`` command lines in fresh processes that skip the ~8 s import of the libraries.

A cold ``python -m lightning_dpzero.train`` on the 2-core CI machine spends about 8 s importing Lightning (which
imports torchmetrics, transformers, scipy and torch._dynamo), DeepSpeed and Hydra before its first line runs, and a
2-process test pays that twice. The tests start their commands through one warm process instead: a zygote that has
done those imports (nothing else: single-threaded, no tensor computed) and forks a fresh child per command. The
child does what an interpreter does at start-up with the command's environment (working directory, ``sys.path``
from the script's folder and PYTHONPATH, a ``sitecustomize.py`` found there, PYTHONWARNINGS, the intra-op thread
count from OMP_NUM_THREADS), then runs the module or script as ``__main__`` and exits the usual way. What runs is
the command's own code in a process of its own; only the imported libraries are shared.

``run`` stands for ``subprocess.run(capture_output=True, text=True)``, ``start`` for ``subprocess.Popen`` and
``run_ranks`` for ``torchrun --standalone --nproc_per_node N``. ``submit`` runs a command in the background, two at
a time: the end-to-end tests submit theirs when the session starts (``start_commands`` in their modules, called by
conftest.py), so that they run beside the single-threaded unit tests, on the core those leave idle. With
``LIGHTNING_DPZERO_COLD_TESTS=1`` every command runs in a plain subprocess instead (the same tests, to compare
against).

    python -m tests._warm SOCKET    # the zygote itself (started by the first command)
"""

from __future__ import annotations

import atexit
import json
import os
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLD = os.environ.get("LIGHTNING_DPZERO_COLD_TESTS") == "1"
# what every test command imports; each costs the zygote once instead of every command
PRELOAD = (
    "torch",
    "torch.distributed",
    "torch.distributed.fsdp",
    "lightning.pytorch",
    "deepspeed",
    "deepspeed.comm.torch",
    "hydra",
    "omegaconf",
    "dp_accounting",
    "lightning_dpzero",
    "lightning_dpzero.train",
    "lightning_dpzero.audit",
    "lightning_dpzero.strategies",
)


# ---------------------------------------------------------------------------------------------------- the zygote
def _serve(path: str) -> None:
    import importlib
    import warnings

    for name in PRELOAD:
        importlib.import_module(name)
    try:
        importlib.import_module("transformers")
    except ImportError:  # the hf extra is optional
        pass
    import torch

    threads = torch.get_num_threads()
    base_path = sys.path[1:]
    base_filters = list(warnings.filters)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the supervisors are reaped by the kernel
    while True:
        conn, _ = server.accept()
        request = json.loads(_read_line(conn, None))
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:  # supervisor: forks the command's process, reports its pid, then its exit status
            server.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            pid = os.fork()
            if pid == 0:
                conn.close()
                _child(request, threads, base_path, base_filters)
            conn.sendall(f"{pid}\n".encode())
            _, status = os.waitpid(pid, 0)
            conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
            os._exit(0)
        conn.close()


def _child(request: dict, threads: int, base_path: list[str], base_filters: list) -> None:
    """Become the command's process: what ``python ARGV`` does at start-up, then run it. Never returns."""
    import runpy
    import traceback
    import warnings

    import torch

    os.setsid()  # its own process group: a timeout kills it and whatever it started
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stdin = os.open(os.devnull, os.O_RDONLY)
    out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    err = out if request["stderr"] == request["stdout"] else os.open(request["stderr"], os.O_WRONLY | os.O_CREAT)
    os.dup2(stdin, 0), os.dup2(out, 1), os.dup2(err, 2)
    os.chdir(request["cwd"])
    env = request["env"]
    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS") or threads))
    argv = request["argv"]
    module = argv[1] if argv[0] == "-m" else None
    main_dir = os.getcwd() if module else os.path.dirname(os.path.abspath(argv[0]))
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [main_dir, *extra, *base_path]
    warnings.filters[:] = base_filters
    for option in reversed([o for o in env.get("PYTHONWARNINGS", "").split(",") if o]):
        if ":" in option:
            raise ValueError(f"tests/_warm.py takes PYTHONWARNINGS actions only, not {option!r}")
        warnings.simplefilter(option)  # type: ignore[arg-type]
    code: object = 0
    try:
        for folder in extra:
            if os.path.isfile(os.path.join(folder, "sitecustomize.py")):
                runpy.run_path(os.path.join(folder, "sitecustomize.py"), run_name="sitecustomize")
                break
        if module:
            sys.argv = [module, *argv[2:]]
            sys.modules.pop(module, None)  # the zygote imported it; `python -m` runs a module not yet imported
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # noqa: BLE001 - what the interpreter prints for an uncaught exception
        traceback.print_exc()
        code = 1
    sys.exit(code)  # the interpreter's own exit: atexit handlers, flushed streams


def _read_line(conn: socket.socket, deadline: float | None) -> str:
    data = b""
    while not data.endswith(b"\n"):
        if deadline is not None:
            conn.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            chunk = conn.recv(4096)
        except TimeoutError:
            raise subprocess.TimeoutExpired("warm command", 0) from None
        if not chunk:
            raise ConnectionError("the warm launcher's supervisor ended without a status")
        data += chunk
    return data.decode()


# --------------------------------------------------------------------------------------------------- the client
@dataclass
class _Zygote:
    proc: subprocess.Popen
    path: str
    log: str


_zygote: _Zygote | None = None
_folder: str | None = None
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_running: set[Process] = set()
_submitted: list[Future] = []


def _scratch() -> str:
    """This session's folder for the zygote's socket and the commands' output; removed at exit."""
    global _folder
    if _folder is None:
        _folder = tempfile.mkdtemp(prefix="dpz-warm-")
        atexit.register(shutil.rmtree, _folder, True)
    return _folder


def _server() -> _Zygote:
    with _lock:
        return _zygote if _zygote is not None and _zygote.proc.poll() is None else _start_server()


def _start_server() -> _Zygote:
    global _zygote
    folder = tempfile.mkdtemp(dir=_scratch())
    path, log = os.path.join(folder, "socket"), os.path.join(folder, "zygote.log")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONWARNINGS")}
    env["OPENBLAS_NUM_THREADS"] = "1"  # numpy's BLAS would otherwise start its threads at import: no fork then
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests._warm", path], cwd=ROOT, env=env, stdout=f, stderr=f, start_new_session=True
        )
    deadline = time.monotonic() + 300
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the warm launcher did not start:\n{Path(log).read_text()[-4000:]}")
        time.sleep(0.05)
    _zygote = _Zygote(proc, path, log)
    atexit.register(_stop, _zygote)
    return _zygote


def _stop(zygote: _Zygote) -> None:
    if zygote.proc.poll() is None:
        zygote.proc.kill()
        zygote.proc.wait()


def _argv(args: list[str] | str) -> list[str]:
    """A Python command line without its interpreter: ``["-m", "pkg.mod", ...]`` or ``["script.py", ...]``."""
    argv = shlex.split(args) if isinstance(args, str) else [str(a) for a in args]
    if argv and (argv[0] == sys.executable or argv[0] in ("python", "python3")):
        argv = argv[1:]
    if not argv or argv[0].startswith("-") and argv[0] != "-m":
        raise ValueError(f"not a python command line that tests/_warm.py runs: {args!r}")
    return argv


@dataclass(eq=False)
class Process:
    """One command started by ``start``: ``communicate``, ``wait`` and ``kill`` as on ``subprocess.Popen``."""

    args: list[str]
    _out: str
    _err: str
    _conn: socket.socket | None = None
    _popen: subprocess.Popen | None = None
    pid: int = 0
    returncode: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if self._popen is not None:
                self.returncode = self._popen.wait(timeout)
            else:
                assert self._conn is not None
                deadline = None if timeout is None else time.monotonic() + timeout
                self.returncode = int(_read_line(self._conn, deadline))
                self._conn.close()
            _running.discard(self)
        return self.returncode

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, sig: signal.Signals) -> None:  # to the command's process group: it and what it started
        if self.returncode is None:
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass

    def fileno(self) -> int:  # for select: readable once the status line (or EOF) arrives
        assert self._conn is not None
        return self._conn.fileno()

    def output(self) -> tuple[str, str]:
        out = Path(self._out).read_text(errors="replace")
        return out, ("" if self._err == self._out else Path(self._err).read_text(errors="replace"))

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return self.output()


def start(
    args: list[str] | str,
    *,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    merge_stderr: bool = False,
) -> Process:
    """Start ``python ARGS`` (``subprocess.Popen`` with both streams captured)."""
    argv = _argv(args)
    folder = tempfile.mkdtemp(dir=_scratch())
    out = os.path.join(folder, "stdout")
    err = out if merge_stderr else os.path.join(folder, "stderr")
    cwd = str(cwd or os.getcwd())
    env = dict(os.environ if env is None else env)
    if COLD:
        with open(out, "w") as fo, open(err, "a") as fe:
            popen = subprocess.Popen(
                [sys.executable, *argv], cwd=cwd, env=env, stdout=fo, stderr=fe, start_new_session=True
            )
        proc = Process(argv, out, err, _popen=popen, pid=popen.pid)
    else:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(_server().path)
        request = {"argv": argv, "cwd": cwd, "env": env, "stdout": out, "stderr": err}
        conn.sendall(json.dumps(request).encode() + b"\n")
        proc = Process(argv, out, err, _conn=conn, pid=int(_read_line(conn, time.monotonic() + 60)))
    _running.add(proc)
    return proc


def run(
    args: list[str] | str,
    *,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess:
    """``subprocess.run([python, *ARGS], capture_output=True, text=True, timeout=...)``."""
    proc = start(args, cwd=cwd, env=env)
    try:
        stdout, stderr = proc.communicate(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        stdout, stderr = proc.output()
        raise subprocess.TimeoutExpired(proc.args, timeout or 0, stdout, stderr) from None
    return subprocess.CompletedProcess(proc.args, proc.wait(), stdout, stderr)


def workdir(name: str) -> Path:
    """A new empty folder for a background command (under this session's scratch folder, removed at exit)."""
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=_scratch()))


def submit(
    args: list[str] | str,
    *,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
) -> Future[subprocess.CompletedProcess]:
    """``run`` in the background, two commands at a time; ``.result()`` gives its CompletedProcess (or raises)."""
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="warm")
        future = _pool.submit(run, args, cwd=cwd, env=env, timeout=timeout)
        _submitted.append(future)
    return future


def drain() -> None:
    """Waits until every submitted command has ended (their results stay with their futures)."""
    with _lock:
        pending = list(_submitted)
    futures_wait(pending)


def shutdown() -> None:
    """End of the session: drop the background commands not started, kill those still running, stop the zygote."""
    if _pool is not None:
        _pool.shutdown(wait=False, cancel_futures=True)
    for proc in list(_running):
        proc.kill()
    if _zygote is not None:
        _stop(_zygote)


@dataclass
class Ranks:
    """What ``run_ranks`` saw: each rank's exit code (negative: the signal that ended it) and their output."""

    codes: list[int]
    log: str

    @property
    def ok(self) -> bool:
        return all(code == 0 for code in self.codes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(
    script: str | Path, args: list[str], *, nproc: int = 2, env: dict[str, str] | None = None, timeout: float = 240
) -> Ranks:
    """``torchrun --standalone --nproc_per_node NPROC SCRIPT ARGS``: the ranks get torchrun's environment (rank,
    world size, a free local port for the rendezvous, OMP_NUM_THREADS=1). As torchrun does, once a rank fails the
    others are stopped (SIGTERM, then SIGKILL after 5 s); past the timeout every rank is killed and TimeoutExpired
    raised with their output."""
    base = dict(os.environ if env is None else env)
    base.setdefault("OMP_NUM_THREADS", "1")
    port, run_id = str(_free_port()), f"warm-{os.getpid()}-{time.monotonic_ns()}"
    procs = []
    for rank in range(nproc):
        rank_env = {
            **base,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "GROUP_RANK": "0",
            "ROLE_RANK": str(rank),
            "ROLE_NAME": "default",
            "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
            "ROLE_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "TORCHELASTIC_RUN_ID": run_id,
            "TORCHELASTIC_RESTART_COUNT": "0",
            "TORCHELASTIC_MAX_RESTARTS": "0",
            "TORCHELASTIC_USE_AGENT_STORE": "False",
        }
        procs.append(start([str(script), *args], env=rank_env, merge_stderr=True))
    deadline, stop_at = time.monotonic() + timeout, None
    try:
        while any(p.returncode is None for p in procs):
            now = time.monotonic()
            if now > deadline:
                for p in procs:
                    p.kill()
                for p in procs:
                    p.wait()
                raise subprocess.TimeoutExpired(f"{script} {args}", timeout, _log(procs))
            if stop_at is not None and now > stop_at:
                for p in procs:
                    p.kill()
            waiting = [p for p in procs if p.returncode is None]
            if COLD:
                time.sleep(0.05)
                ready = [p for p in waiting if p._popen is not None and p._popen.poll() is not None]
            else:
                ready, _, _ = select.select(waiting, [], [], 0.5)
            for p in ready:
                if p.wait() != 0 and stop_at is None:
                    for other in procs:
                        other.terminate()
                    stop_at = time.monotonic() + 5
    finally:
        for p in procs:
            p.kill()
    return Ranks([p.wait() for p in procs], _log(procs))


def _log(procs: list[Process]) -> str:
    parts = []
    for rank, p in enumerate(procs):
        status = "running" if p.returncode is None else _status(p.returncode)
        parts.append(f"---- rank {rank} ({status}) ----\n{p.output()[0]}")
    return "\n".join(parts)


def _status(code: int) -> str:
    return f"ended by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


if __name__ == "__main__":
    _serve(sys.argv[1])
