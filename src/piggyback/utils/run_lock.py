"""One run per output folder: a lock taken before any work, refused at once when held.

Two launches in the same second get the same Hydra run folder, and a reused
``hydra.run.dir`` does the same on purpose; without a lock both runs train to the end and
write the same ``last.ckpt`` and artifacts at once. :class:`RunLock` holds an OS lock on
``<folder>/.run.lock`` for the whole run (``filelock``, which torch already depends on: an
``fcntl.flock`` on Unix, ``msvcrt`` on Windows). The kernel drops that lock when its process
dies, however it dies, so a lock left by a killed run is free again and simply taken over.
Next to it, ``.run.lock.json`` says who holds it (pid, host, start time): the second run is
refused with those, and a holder file still present when the lock was free means the last
holder was killed (a clean exit removes it), which the new run notes on stderr.

Only the first process of a distributed run locks: the other ranks run the same script into
the same folder and would otherwise refuse themselves.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType

from filelock import FileLock, Timeout

from piggyback.utils.atomic import atomic_write_text

LOCK_FILE = ".run.lock"
HOLDER_FILE = ".run.lock.json"
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK")


class RunLocked(Exception):
    """Another run holds the output folder; the message names it and the way out."""


def _is_rank_zero() -> bool:
    return all(os.environ.get(name, "0") in ("", "0") for name in _RANK_VARIABLES)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if started else "?"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {when}"


class RunLock:
    """Context manager: hold ``folder``'s run lock, or raise :class:`RunLocked` at once."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.lock_path = self.folder / LOCK_FILE
        self.holder_path = self.folder / HOLDER_FILE
        self._lock: FileLock | None = None
        self.took_over: dict | None = None  # the killed holder whose lock this run took

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.holder_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def acquire(self) -> RunLock:
        if not _is_rank_zero():
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.lock_path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            holder = self._holder() or {}
            if not self._stale(holder):
                raise RunLocked(
                    f"another run ({_describe(holder)}) is writing into {self.folder}; wait "
                    "for it to end, or pick another output folder (hydra.run.dir=...)"
                ) from None
            # a lock file the OS does not release (a soft lock on a file system without
            # flock) whose holder is a dead process on this host: take it over
            self.lock_path.unlink(missing_ok=True)
            lock = FileLock(str(self.lock_path), timeout=0)
            lock.acquire()
            self.took_over = holder
        self._lock = lock
        if self.took_over is None:
            self.took_over = self._holder()  # the lock was free but a holder never left
        if self.took_over:
            print(
                f"note: taking over {self.folder} from a run that was killed "
                f"({_describe(self.took_over)})",
                file=sys.stderr,
                flush=True,
            )
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        atomic_write_text(self.holder_path, json.dumps(me), overwrite=True)
        return self

    @staticmethod
    def _stale(holder: dict) -> bool:
        pid = holder.get("pid")
        same_host = holder.get("host") == socket.gethostname()
        return isinstance(pid, int) and same_host and pid != os.getpid() and not _alive(pid)

    def release(self) -> None:
        if self._lock is None:
            return
        holder = self._holder()
        if holder and holder.get("pid") == os.getpid():
            try:
                self.holder_path.unlink(missing_ok=True)
            except OSError:  # a read-only or vanished folder: the OS lock is what counts
                pass
        self._lock.release()  # the lock file stays: deleting it would race the next run
        self._lock = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


__all__ = ["HOLDER_FILE", "LOCK_FILE", "RunLock", "RunLocked"]
