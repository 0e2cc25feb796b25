"""The Ray session of a bulk job: started for the job, shut down when it ends, however it ends.

A job without ``--address`` starts Ray on this machine with its own temporary folder
(``fam-ray-*`` where Ray would put its sessions, :func:`temp_root`) and, when the job ends —
normally, on an error, on Ctrl-C (SIGINT) or on SIGTERM — shuts it down (``ray.shutdown``:
the GCS, the raylet and its agents, the workers), ends any process started since Ray's start
that outlives it, and removes the folder. A folder that a killed job (SIGKILL) left is removed
by the next job's start (:func:`remove_stale_sessions`). With ``--address`` the driver only
disconnects: the cluster and its files are not the job's. A Ray already running in the
process (``ray.init`` by the caller) is used and left as is.

Example:
    >>> signal_name(15)
    'SIGTERM'
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

TEMP_PREFIX = "fam-ray-"
"""The prefix of a local session's temporary folder."""
OBJECT_STORE_BYTES = 256 * 1024 * 1024
"""Object store of a local Ray session (Ray spills to disk beyond it)."""
RAY_START_ATTEMPTS = 2
"""Starts of a local Ray tried when Ray itself times out starting (below)."""
RAY_START_TIMED_OUT = "timed out during startup"
"""Ray's own error when its raylet does not register with its GCS within a fixed 30 s,
which a loaded machine can miss: nothing of the job ran, so Ray is started once more."""
_GRACE_SECONDS = 5.0


class Stopped(Exception):
    """The job was stopped by a signal (SIGTERM); its checkpoints are kept."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal_name(signum)}")
        self.signum = signum


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15."""
    return signal.Signals(signum).name


class Session:
    """A job's Ray session: its temporary folder (local sessions) and the driver threads that
    read from Ray, given a few seconds to end before the shutdown (a Ray Data iterator that
    ends while Ray runs stops its actors quietly) and joined after it."""

    def __init__(self, temp: Path | None = None):
        self.temp = temp
        self.threads: list[threading.Thread] = []

    def join_at_shutdown(self, thread: threading.Thread) -> None:
        """Join ``thread`` when the session ends (for at most a few seconds)."""
        self.threads.append(thread)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(_GRACE_SECONDS)


@contextlib.contextmanager
def ray_session(
    address: str | None, num_cpus: int | None, say: Callable[[str], None] | None = None
) -> Iterator[Session]:
    """Ray for the job's duration (``say`` tells of a local start tried once more).

    Inside, SIGTERM raises :class:`Stopped` in the main thread (and SIGINT, as always,
    ``KeyboardInterrupt``), so the shutdown runs whichever way the job ends.
    """
    import ray

    if ray.is_initialized():
        yield Session()
        return
    session = Session()
    before = _descendants()
    with _no_auto_init():
        try:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                root = temp_root()
                remove_stale_sessions(root)
                _start_local_ray(session, root, num_cpus or os.cpu_count() or 1, before, say)
            with _stop_on_sigterm():
                yield session
        finally:
            session.join()
            started = _descendants() - before
            ray.shutdown()
            session.join()
            _end(started)
            if session.temp is not None:
                shutil.rmtree(session.temp, ignore_errors=True)


def _start_local_ray(
    session: Session,
    root: Path,
    num_cpus: int,
    before: set[int],
    say: Callable[[str], None] | None,
) -> None:
    """``ray.init`` of a local cluster in a new ``fam-ray-*`` folder of ``root``; a start
    that timed out is ended (its processes, its folder) and tried once more."""
    import ray

    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        session.temp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=root))
        try:
            ray.init(
                num_cpus=num_cpus,
                include_dashboard=False,
                object_store_memory=OBJECT_STORE_BYTES,
                log_to_driver=False,
                _temp_dir=str(session.temp),
            )
            return
        except Exception as error:  # Ray raises a bare Exception for its start's timeout
            if attempt == RAY_START_ATTEMPTS or RAY_START_TIMED_OUT not in str(error):
                raise
        if say is not None:
            say("Ray timed out starting; starting it once more")
        ray.shutdown()
        _end(_descendants() - before)
        shutil.rmtree(session.temp, ignore_errors=True)


def temp_root() -> Path:
    """Where Ray itself would put its sessions: ``RAY_TMPDIR``, else ``TMPDIR`` on Linux, else
    ``/tmp`` (short paths: Ray's socket paths must fit in 107 bytes)."""
    if os.environ.get("RAY_TMPDIR"):
        return Path(os.environ["RAY_TMPDIR"])
    if sys.platform.startswith("linux") and os.environ.get("TMPDIR"):
        return Path(os.environ["TMPDIR"])
    return Path("/tmp")


def remove_stale_sessions(root: Path) -> list[Path]:
    """Remove the ``fam-ray-*`` folders in ``root`` left by jobs that were killed (SIGKILL
    gives no chance to clean up): those whose drivers (the pid ending each ``session_*``
    name) are gone and which no running process names; return them."""
    removed: list[Path] = []
    if not Path("/proc/self").is_dir():  # no way to tell a live session: leave them all
        return removed
    for folder in sorted(root.glob(f"{TEMP_PREFIX}*")):
        drivers = [s.name.rsplit("_", 1)[-1] for s in folder.glob("session_2*")]
        if any(not pid.isdigit() or _alive(int(pid)) for pid in drivers):
            continue
        if not drivers and time.time() - folder.stat().st_mtime < 3600:
            continue  # a session starting now has no folder yet
        if _named_by_a_process(folder):
            continue  # Ray processes of a killed driver, still ending
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _named_by_a_process(folder: Path) -> bool:
    needle = str(folder).encode()
    for entry in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if needle in entry.read_bytes():
                return True
        except OSError:
            continue
    return False


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """SIGTERM raises :class:`Stopped` (replacing Ray's handler) while inside."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise Stopped(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _no_auto_init() -> Iterator[None]:
    """No Ray call of a thread that outlives the session starts a new one behind our back
    (Ray starts a local cluster on a call made while none is connected)."""
    try:
        from ray._private import auto_init_hook
    except ImportError:  # another Ray: its threads are ended with the session all the same
        yield
        return
    previous = auto_init_hook.enable_auto_connect
    auto_init_hook.enable_auto_connect = False
    try:
        yield
    finally:
        auto_init_hook.enable_auto_connect = previous


def _descendants() -> set[int]:
    """The pids of this process's descendants (Linux ``/proc``; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.parent.name))
    found, queue = set(), [os.getpid()]
    while queue:
        for child in children.get(queue.pop(), []):
            if child not in found:
                found.add(child)
                queue.append(child)
    return found


def _end(pids: set[int]) -> None:
    """SIGTERM the processes of ``pids`` still running, then SIGKILL those that stay."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = {pid for pid in pids if _alive(pid)}
        for pid in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + _GRACE_SECONDS
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = {pid for pid in alive if _alive(pid)}
        if not alive:
            return


def _alive(pid: int) -> bool:
    """Running and not a zombie (a zombie of ours is reaped here)."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
