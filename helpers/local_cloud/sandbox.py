"""One run of the function's code in a process of its own, fenced in like Lambda's.

An execution environment (:class:`Environments.prepare`) is a fresh folder per run:

- ``task/``: the zip extracted anew and made read-only (``/var/task`` on AWS), so code
  written there by one run is never imported by the next;
- ``tmp/``: the function's scratch space (``/tmp``, ``TMPDIR``), the only place it may
  write, limited to the function's ``EphemeralStorage`` when that is enforced.

:func:`run_process` starts the runtime's bootstrap there and watches it: the timeout
(from the handler's call), the memory size (resident memory, polled), the ephemeral
storage, and CPU shares when they are emulated (pinned to cores and duty-cycled with
SIGSTOP/SIGCONT, as Lambda gives CPU in proportion to memory). When the handler returns
the run ends at once: every process it left behind is killed (Lambda freezes the
environment).

When the local cloud runs as root (tests, CI), the function runs as the unprivileged user
``nobody``: it cannot read the server's environment, its state folder or key files, nor
write its own code. Without root it runs as the user who started the local cloud, and
permission bits protect the code (see ``docs/local_cloud.md``).
"""
from __future__ import annotations

import ctypes
import io
import itertools
import json
import math
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any, Iterator

import psutil

BOOTSTRAP = Path(__file__).with_name("bootstrap.py")
# What the Lambda Python runtime provides besides the standard library.
RUNTIME_PACKAGES = ("boto3", "botocore", "s3transfer", "jmespath", "dateutil", "urllib3", "six")
FUNCTION_USER = "nobody"
POLL_S = 0.01
STORAGE_POLL_S = 0.05
# As on AWS, the Init phase (importing the handler) may take up to 10 s; the function's
# timeout runs from the handler's call.
INIT_LIMIT_S = 10.0
LAMBDA_MB_PER_VCPU = 1769  # Lambda: one full vCPU at 1,769 MB, in proportion below
CPU_PERIOD_S = 0.1  # duty cycle of the CPU-share emulation
PR_SET_CHILD_SUBREAPER = 36  # Linux prctl: orphans of our children become our children

_active_lock = threading.Lock()
_active: dict[int, str] = {}  # bootstrap pid -> request id, for every run in flight
_core_turn = itertools.count()


@dataclass(frozen=True)
class Limits:
    """What one run may use.

    Attributes
    ----------
    timeout_s : float
        From the handler's call (s).
    memory_mb : int
        Resident memory of the process and its children (MB).
    ephemeral_mb : int or None
        Size of ``tmp/`` (MB); None: not enforced.
    cpu_vcpus : float or None
        CPU share in vCPUs (memory / 1,769 MB); None: not emulated.
    """

    timeout_s: float
    memory_mb: int
    ephemeral_mb: int | None = None
    cpu_vcpus: float | None = None


@dataclass
class Outcome:
    """What the process did: its output lines and how it ended."""

    start_ms: int
    output: list[tuple[int, str]] = field(default_factory=list)
    result: dict | None = None  # the bootstrap's outcome (payload or error)
    invoked: bool = False
    timed_out: bool = False
    out_of_memory: bool = False
    storage_used_mb: int | None = None  # set when the run was stopped for using too much
    stopped: bool = False  # killed because the local cloud is stopping
    exit_code: int | None = None
    max_rss_mb: int = 0


@dataclass(frozen=True)
class RunDir:
    """One execution environment's folders."""

    root: Path
    task: Path
    scratch: Path
    event_file: Path


class Environments:
    """The local cloud's execution environments, under one private folder of the server.

    Parameters
    ----------
    ca_bundle : Path
        The local cloud's certificate; a copy the function's user can read is made here.
    parent : Path, optional
        Where to make the folder (default: the system's temporary folder, which every user
        can traverse: the function's user must reach its own environment).
    """

    def __init__(self, ca_bundle: Path, parent: Path | None = None):
        self.root = Path(tempfile.mkdtemp(prefix="lambda-envs-", dir=parent))
        self.root.chmod(0o711)  # others may enter a run's folder, not list them
        self.user = _function_user()
        self.python = _runtime_python(self.user is not None)
        self.runtime_dir = _runtime_dir(self.root / "runtime", copy=self.user is not None)
        self.bootstrap = self.root / "bootstrap.py"
        shutil.copyfile(BOOTSTRAP, self.bootstrap)
        self.bootstrap.chmod(0o644)
        self.ca_bundle = self.root / "cert.pem"  # public; the state folder is private
        shutil.copyfile(ca_bundle, self.ca_bundle)
        self.ca_bundle.chmod(0o644)

    def prepare(self, request_id: str, code: bytes, event: dict) -> RunDir:
        """A fresh environment for one run: the zip extracted read-only, an empty /tmp."""
        root = self.root / request_id
        root.mkdir(mode=0o711)
        run = RunDir(root, root / "task", root / "tmp", root / "event.json")
        with zipfile.ZipFile(io.BytesIO(code)) as archive:
            archive.extractall(run.task)
        _make_read_only(run.task)
        run.scratch.mkdir(mode=0o700)
        run.event_file.write_text(json.dumps(event))
        run.event_file.chmod(0o400)
        if self.user is not None:
            for path in (run.scratch, run.event_file):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
        return run

    def remove(self, run: RunDir) -> None:
        remove_tree(run.root)

    def close(self) -> None:
        """Remove every environment (the local cloud is stopping)."""
        remove_tree(self.root)


def _function_user() -> pwd.struct_passwd | None:
    """The unprivileged user the function runs as when we are root, else None."""
    if os.geteuid() != 0:
        return None
    return pwd.getpwnam(FUNCTION_USER)


def _reachable_by_others(path: Path) -> bool:
    """Can a user who is neither owner nor in the group read ``path`` (and reach it)?"""
    path = path.resolve()
    if not path.stat().st_mode & stat.S_IROTH:
        return False
    return all(parent.stat().st_mode & stat.S_IXOTH for parent in path.parents)


def _runtime_python(unprivileged: bool) -> str:
    """The interpreter for the function: this Python's version, runnable by its user.

    Lambda's runtime is "Python X.Y", not a particular build. As root the function's user
    may not reach this interpreter (e.g. under /root); then a system interpreter of the
    same version is used.
    """
    own = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    if not unprivileged:
        return own
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [own, shutil.which(version, path="/usr/local/bin:/usr/bin:/bin")]
    for candidate in filter(None, candidates):
        if _reachable_by_others(Path(candidate)):
            return os.path.realpath(candidate)
    raise RuntimeError(
        f"The local cloud runs the function as the unprivileged user {FUNCTION_USER!r} "
        f"(it was started as root), but that user cannot run {own} and there is no "
        f"{version} in /usr/local/bin or /usr/bin. Install {version} system-wide (e.g. "
        f"apt-get install {version}), or start the local cloud as an ordinary user.")


def _runtime_dir(runtime: Path, *, copy: bool) -> Path:
    """A folder holding what the Lambda runtime provides (boto3 and its dependencies).

    Links to this environment's packages; copies when the function's user could not read
    them (a private home folder).
    """
    runtime.mkdir()
    for name in RUNTIME_PACKAGES:
        source = Path(import_module(name).__file__)
        source = source.parent if source.name == "__init__.py" else source
        target = runtime / source.name
        if copy and not _reachable_by_others(source):
            if source.is_dir():
                shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copyfile(source, target)
        else:
            target.symlink_to(source)
    _make_read_only(runtime, follow=False)
    return runtime


def _make_read_only(tree: Path, *, follow: bool = True) -> None:
    """Files 0444, folders 0555 (bottom-up, so the walk can still enter them)."""
    for here, dirs, files in os.walk(tree, topdown=False):
        for name in files:
            path = os.path.join(here, name)
            if not os.path.islink(path):
                os.chmod(path, 0o444)
        for name in dirs:
            path = os.path.join(here, name)
            if not os.path.islink(path):
                os.chmod(path, 0o555)
    os.chmod(tree, 0o555)


def remove_tree(tree: Path) -> None:
    """Remove a folder even where it was made read-only (not needed as root)."""
    def writable_then_retry(function: Any, path: str, _: Any) -> None:
        parent = os.path.dirname(path)
        for target in (parent, path):
            if os.path.isdir(target) and not os.path.islink(target):
                os.chmod(target, 0o700)
        function(path)

    if tree.exists():
        shutil.rmtree(tree, onerror=writable_then_retry)


def become_subreaper() -> None:
    """Make orphaned descendants of our runs our children (Linux), so none escapes."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the process group is all we end


def run_process(envs: Environments, run: RunDir, env: dict[str, str], limits: Limits,
                request_id: str) -> Outcome:
    """Run the bootstrap in ``run`` and watch it until the handler returns or is stopped.

    Parameters
    ----------
    envs : Environments
        Where the interpreter, bootstrap and runtime are.
    run : RunDir
        This run's folders (from :meth:`Environments.prepare`).
    env : dict
        The function's whole environment.
    limits : Limits
    request_id : str
        Marks the run's processes, to find the ones left behind.

    Returns
    -------
    Outcome
    """
    outcome = Outcome(start_ms=now_ms())
    read_end, write_end = os.pipe()
    with _started(envs, run, env, write_end, request_id) as proc:
        os.close(write_end)
        messages: list[dict] = []
        readers = [threading.Thread(target=_read_lines, args=(proc.stdout, outcome.output),
                                    daemon=True),
                   threading.Thread(target=_read_messages, args=(read_end, messages),
                                    daemon=True)]
        for reader in readers:
            reader.start()
        _watch(proc, run, limits, outcome, messages)
        _end(proc)
        for reader in readers:
            reader.join(timeout=5)
    outcome.result = next((m["outcome"] for m in messages if "outcome" in m), None)
    return outcome


@contextmanager
def _started(envs: Environments, run: RunDir, env: dict, result_fd: int,
             request_id: str) -> Iterator[subprocess.Popen]:
    """Start the bootstrap (as the function's user) and keep it registered while it runs."""
    user = envs.user
    with _active_lock:  # a sweep must never see a run that is not registered yet
        proc = subprocess.Popen(
            [envs.python, "-I", "-S", "-u", "-B", str(envs.bootstrap), str(run.event_file),
             str(result_fd)], cwd=run.task, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, pass_fds=(result_fd,),
            start_new_session=True, umask=0o077,
            user=user.pw_uid if user else None, group=user.pw_gid if user else None,
            extra_groups=[] if user else None)
        _active[proc.pid] = request_id
    try:
        yield proc
    finally:
        with _active_lock:
            _active.pop(proc.pid, None)
        end_leftovers()


def _watch(proc: subprocess.Popen, run: RunDir, limits: Limits, outcome: Outcome,
           messages: list[dict]) -> None:
    """Poll until the handler returned, the process ended, or a limit was crossed."""
    limit_bytes = limits.memory_mb * 2**20
    init_deadline = time.monotonic() + INIT_LIMIT_S + limits.timeout_s
    deadline = None
    next_storage_check = 0.0
    cpu: _CpuShare | None = None
    peak = 0
    try:
        while True:
            pid, wait_status = os.waitpid(proc.pid, os.WNOHANG)
            if pid:
                outcome.exit_code = proc.returncode = os.waitstatus_to_exitcode(wait_status)
                break
            if any("outcome" in m for m in messages):
                break  # the handler returned: the invocation is over
            peak = max(peak, _tree_rss(proc.pid))
            if not outcome.invoked and any("invoked" in m for m in messages):
                outcome.invoked = True
                deadline = time.monotonic() + limits.timeout_s
                if limits.cpu_vcpus is not None:
                    cpu = _CpuShare(proc.pid, limits.cpu_vcpus)
                    cpu.start()
            now = time.monotonic()
            if limits.ephemeral_mb is not None and now >= next_storage_check:
                next_storage_check = now + STORAGE_POLL_S
                used = disk_usage_mb(run.scratch)
                if used > limits.ephemeral_mb:
                    outcome.storage_used_mb = used
            if peak > limit_bytes:
                outcome.out_of_memory = True
            elif now > (deadline or init_deadline):
                outcome.timed_out = True
            if outcome.out_of_memory or outcome.timed_out or outcome.storage_used_mb:
                break
            if proc.pid not in _active:
                outcome.stopped = True  # the local cloud is stopping
                break
            time.sleep(POLL_S)
    finally:
        if cpu is not None:
            cpu.stop()
    outcome.max_rss_mb = math.ceil(peak / 2**20)
    if outcome.out_of_memory:
        outcome.max_rss_mb = min(outcome.max_rss_mb, limits.memory_mb)


def _end(proc: subprocess.Popen) -> None:
    """Kill the run's process group and wait for the bootstrap."""
    _kill_group(proc.pid)
    if proc.returncode is None:
        try:
            _, wait_status = os.waitpid(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(wait_status)
        except ChildProcessError:
            pass


def end_leftovers() -> None:
    """Kill every process our runs left behind (orphans reparented to this server).

    This process is their subreaper, so a child of ours that is no run in flight is one
    (or a descendant of one) whose invocation ended. A leftover of a run still in flight
    keeps running until that run ends (it carries the run's ``AWS_REQUEST_ID``).
    """
    for _ in range(3):  # a killed leftover's own children are reparented to us in turn
        with _active_lock:
            running = set(_active.values())
            busy = set(_active)
            leftovers = [child for child in _children() if child.pid not in busy
                         and _request_of(child) not in running]
        if not leftovers:
            return
        for child in leftovers:
            for process in [*_descendants(child), child]:
                _kill(process.pid)
            try:
                os.waitpid(child.pid, 0)
            except ChildProcessError:
                pass


def _children() -> list[psutil.Process]:
    try:
        return psutil.Process().children()
    except psutil.Error:
        return []


def _descendants(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.Error:
        return []


def _request_of(process: psutil.Process) -> str | None:
    try:
        return process.environ().get("AWS_REQUEST_ID")
    except psutil.Error:
        return None


def stop_all() -> None:
    """Make every run in flight stop (the local cloud is stopping)."""
    with _active_lock:
        pids = list(_active)
        _active.clear()
    for pid in pids:
        _kill_group(pid)


def _read_lines(stream: Any, out: list) -> None:
    for raw in iter(stream.readline, b""):
        out.append((now_ms(), raw.decode("utf-8", "replace").rstrip("\n")))
    stream.close()


def _read_messages(fd: int, out: list) -> None:
    with os.fdopen(fd, "rb") as channel:
        for raw in channel:
            try:
                out.append(json.loads(raw))
            except ValueError:
                pass  # the function wrote to our channel: ignore its lines


def _tree_rss(pid: int) -> int:
    """Peak resident memory of a process plus its children's current, in bytes (0 once gone).

    On Linux the kernel's high-water mark (VmHWM) catches peaks between two polls.
    (``ru_maxrss`` from wait4 would not do: it counts the server's memory copied at fork.)
    """
    try:
        proc = psutil.Process(pid)
        own = proc.memory_info().rss
        try:
            with open(f"/proc/{pid}/status") as status:
                hwm = next(line for line in status if line.startswith("VmHWM:"))
            own = max(own, int(hwm.split()[1]) * 1024)
        except (OSError, StopIteration):
            pass  # not Linux: polled RSS only
        return own + sum(p.memory_info().rss for p in proc.children(recursive=True))
    except psutil.Error:
        return 0


def disk_usage_mb(tree: Path) -> int:
    """Space the files under ``tree`` occupy (allocated blocks, as ``du``), in MB."""
    total = 0
    stack = [str(tree)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
            except OSError:
                pass  # removed while we looked
    return math.ceil(total / 2**20)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class _CpuShare(threading.Thread):
    """Lambda's CPU share for one run: pinned to cores, and duty-cycled below a full core.

    ``vcpus`` = memory / 1,769 MB. The run gets ``ceil(vcpus)`` cores (of this machine's)
    and, within each period of :data:`CPU_PERIOD_S`, runs for the fraction
    ``vcpus / ceil(vcpus)`` of it and is stopped (SIGSTOP) for the rest.
    """

    def __init__(self, pid: int, vcpus: float):
        super().__init__(daemon=True)
        self._pid = pid
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        count = max(1, min(len(cores) or 1, math.ceil(vcpus)))
        self.fraction = min(1.0, vcpus / count)
        first = next(_core_turn)
        self._cores = {cores[(first + i) % len(cores)] for i in range(count)} if cores else set()
        self._done = threading.Event()

    def run(self) -> None:
        self._pin()
        on = CPU_PERIOD_S * self.fraction
        while self.fraction < 1.0 and not self._done.is_set():
            _signal_group(self._pid, signal.SIGCONT)
            if self._done.wait(on):
                break
            _signal_group(self._pid, signal.SIGSTOP)
            self._done.wait(CPU_PERIOD_S - on)
        _signal_group(self._pid, signal.SIGCONT)

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=1)

    def _pin(self) -> None:
        """Pin every thread of the run's processes (affinity is per thread on Linux)."""
        if not self._cores:
            return
        try:
            processes = [psutil.Process(self._pid), *psutil.Process(self._pid).children(True)]
        except psutil.Error:
            return
        for process in processes:
            try:
                for thread in process.threads():
                    os.sched_setaffinity(thread.id, self._cores)
            except (psutil.Error, OSError):
                pass


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def now_ms() -> int:
    return int(time.time() * 1000)
