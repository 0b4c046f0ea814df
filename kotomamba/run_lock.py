"""One training run per ``--save`` directory: a lock file that a second run (a job submitted twice)
refuses to share, and that a crashed run's successor takes over.

``SAVE/run.lock`` is JSON: host, pid, start time, the launcher's job id and a lease time that the
running job renews every ``RENEW_SECONDS``. It is created with ``O_CREAT | O_EXCL``, which is atomic on
local filesystems and on the shared ones clusters use (NFSv3 and later, Lustre, GPFS); ``flock`` is
not relied on, since it is often a no-op or node-local on NFS. A lock is stale, and is taken over
with a warning, when its holder ran on this host and that process is gone, or when its lease has not
been renewed for ``LEASE_SECONDS`` (a holder on another host that died, or a host that went away).
Only rank 0 touches the file; every rank learns its verdict. ``--dry-run`` and inference never take it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kotomamba.errors import KotomambaError

logger = logging.getLogger("kotomamba")

LOCK_FILE = "run.lock"
RENEW_SECONDS = 60.0
LEASE_SECONDS = 600.0  # ten missed renewals: the holder is gone
_JOB_ID_VARIABLES = ("SLURM_JOB_ID", "JOB_ID", "PBS_JOBID", "LSB_JOBID", "TORCHELASTIC_RUN_ID")


class RunLockError(KotomambaError, RuntimeError):
    """Another live run holds the save directory; the message names it."""


def _job_id() -> str | None:
    for variable in _JOB_ID_VARIABLES:
        if os.environ.get(variable):
            return f"{variable}={os.environ[variable]}"
    return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def describe_holder(holder: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    job = f", job {holder['job']}" if holder.get("job") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, started {started}"


class RunLock:
    """The save directory's lock, held from ``acquire()`` to ``release()`` and renewed in between."""

    def __init__(self, save_dir: str | os.PathLike, renew_seconds: float = RENEW_SECONDS,
                 lease_seconds: float = LEASE_SECONDS) -> None:
        self.path = Path(save_dir) / LOCK_FILE
        self.renew_seconds = renew_seconds
        self.lease_seconds = lease_seconds
        self.token = secrets.token_hex(8)
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "job": _job_id(),
                       "token": self.token}
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # --- taking and giving back ------------------------------------------------------------------

    def acquire(self) -> None:
        for _ in range(3):  # a stale lock removed by someone else in between: try again
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                created = self._create()
            except OSError as error:
                raise RunLockError(f"--save {self.path.parent}: cannot write there "
                                   f"({error.strerror or error})") from None
            if created:
                self._renewer = threading.Thread(target=self._renew_until_stopped, name="run-lock-lease", daemon=True)
                self._renewer.start()
                return
            holder = self._read()
            if holder is None:
                continue
            reason = self._stale_because(holder)
            if reason is None:
                raise RunLockError(
                    f"--save {self.path.parent} is in use by another run ({describe_holder(holder)}; lock file "
                    f"{self.path}). Two runs writing one save directory interleave their checkpoints: wait for "
                    f"it to end, or use another --save. If that run is certainly gone, delete {self.path}")
            logger.warning("taking over the save directory's lock from a run that is gone (%s): %s",
                           describe_holder(holder), reason)
            self._remove_if(holder.get("token"))
        raise RunLockError(f"could not take the lock {self.path}: other runs keep taking it")

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
        self._remove_if(self.token)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    # --- the file --------------------------------------------------------------------------------

    def _create(self) -> bool:
        try:
            descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "w") as file:
            json.dump({**self.record, "renewed": time.time()}, file)
        return True

    def _read(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            # written half by a holder killed mid-write, or damaged: judge it by its age alone
            return {"host": "?", "pid": None, "renewed": self.path.stat().st_mtime, "token": None}
        return holder if isinstance(holder, dict) else {"renewed": self.path.stat().st_mtime, "token": None}

    def _stale_because(self, holder: dict[str, Any]) -> str | None:
        pid = holder.get("pid")
        if holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _process_alive(pid):
            return f"process {pid} no longer exists on this host"
        age = time.time() - float(holder.get("renewed", 0))
        if age > self.lease_seconds:
            return f"its lease was last renewed {age:.0f} s ago (more than {self.lease_seconds:.0f} s)"
        return None

    def _remove_if(self, token: str | None) -> None:
        holder = self._read()
        if holder is not None and holder.get("token") == token:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self.renew_seconds):
            holder = self._read()
            if holder is None or holder.get("token") != self.token:
                logger.warning("the lock %s is no longer this run's (taken over or removed); not renewing it",
                               self.path)
                return
            temporary = self.path.with_name(f".{LOCK_FILE}.{self.token}")
            try:
                temporary.write_text(json.dumps({**self.record, "renewed": time.time()}))
                temporary.replace(self.path)
            except OSError as error:
                logger.warning("could not renew the lock %s: %s", self.path, error)


@contextlib.contextmanager
def save_directory_locked(save_dir: str | None, ctx: Any) -> Iterator[None]:
    """The run's lock on ``save_dir`` (None: no --save, no lock) for the body; rank 0 holds it, every rank
    stops when it cannot be had."""
    from kotomamba.distributed import raise_on_every_rank

    if save_dir is None:
        yield
        return
    lock, error = (RunLock(save_dir), None) if ctx.is_main else (None, None)
    if lock is not None:
        try:
            lock.acquire()
        except RunLockError as caught:
            error = caught
    raise_on_every_rank(error, RunLockError(f"rank 0 could not take the lock of --save {save_dir}; see its log"),
                        ctx.device)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
