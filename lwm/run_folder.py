"""A training run's folder, shared by every process of the run and by no other live run.

    token = shared_token()                       # the same random hex on every process
    check_shared_folder(folder, token)           # every process sees what process 0 wrote, or all stop
    lock = RunLock(folder, ttl_seconds=120)      # process 0: one live copy of a run per folder
    print(lock.acquire()); ...; lock.verify()    # before each commit; lock.release() at the end

The lock is `lwm.lock` in the run folder. On a local (or NFS) folder it is an flock, which the
kernel releases when its process ends, however it ends. A bucket has no locks, so there it is a
lease: a small object naming its owner (host, pid, boot id, a random id) and the time, rewritten
every ttl/4 seconds by a thread of the owner. A new copy of the run finds the lease and
  - takes it at once when its owner is provably dead (same host and boot, pid gone; or the host
    rebooted), or when it was last renewed more than ttl seconds ago;
  - otherwise watches it for up to ttl seconds: renewed meanwhile means a live copy (a requeued job
    whose old process still runs), and the new copy stops with one line naming it; not renewed
    means a dead owner, and the lease is taken over.
`--checkpointer.take_over_lock=True` takes it regardless (from a holder that may be alive it watches the
lease for ttl/2, rewriting it over a renewal that was in flight, as a bucket has no compare-and-swap).
The old copy, if it is alive after all, finds the lease no longer its own at its next commit and stops
without committing.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid

import jax
import numpy as np

from lwm import storage
from lwm.checkpoint import CheckpointWriteError

log = logging.getLogger("lwm.run_folder")
LOCK_NAME = "lwm.lock"
FOLDER_CHECK = ".lwm-folder-check"


class RunFolderError(OSError):
    """The run folder cannot be used (not shared by every process, or held by a live run)."""


def shared_token(nbytes: int = 8) -> str:
    """A random hex token of `nbytes` (at most 16), the same on every process (process 0's)."""
    token = np.frombuffer(uuid.uuid4().bytes[:nbytes], np.uint32).copy()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        token = np.asarray(multihost_utils.broadcast_one_to_all(token))
    return token.astype(np.uint32).tobytes().hex()


def check_shared_folder(folder: str, token: str) -> None:
    """With several processes: process 0 writes a file into `folder`, the others read it back;
    if one cannot, every process raises RunFolderError naming the host that cannot see it (a
    folder under $HOME is on each TPU VM's own disk). Every process calls it."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    path = storage.join(folder, f"{FOLDER_CHECK}.{token}")
    if jax.process_index() == 0:
        storage.makedirs(folder)
        storage.write_text(path, token)
    multihost_utils.sync_global_devices("lwm-run-folder-written")
    try:
        seen = storage.read_text(path) == token
    except OSError:
        seen = False
    host = np.frombuffer(socket.gethostname().encode()[:64].ljust(64, b"\0"), np.uint8)
    report = np.concatenate([np.array([int(seen)], np.uint8), host])
    reports = np.asarray(multihost_utils.process_allgather(report)).reshape(jax.process_count(), -1)
    if jax.process_index() == 0:
        storage.remove(path)
    blind = [(i, bytes(r[1:]).rstrip(b"\0").decode(errors="replace")) for i, r in enumerate(reports) if not r[0]]
    if blind:
        who = ", ".join(f"process {i} on host {h}" for i, h in blind)
        raise RunFolderError(f"run folder {storage.display(folder)}: {who} cannot see the file process 0 wrote there; "
                             "every process must use one shared folder for --logger.output_dir (a bucket URL such "
                             "as gs://bucket/runs, or a shared file system), not a folder on each host's own disk")


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """One live copy of a run per folder (see the module docstring). Process 0 holds it."""

    def __init__(self, folder: str, ttl_seconds: float = 120, take_over: bool = False):
        self.folder = str(folder)
        self.path = storage.join(self.folder, LOCK_NAME)
        self.ttl = float(ttl_seconds)
        self.take_over = take_over
        self.owner = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                      "boot_id": _boot_id()}
        self._fd = None
        self._thread = None
        self._stop = threading.Event()
        self._lost = None  # the lease that replaced ours, once seen
        self._taken_from = None  # the id of a live holder we took the lock over from

    # ---- acquire / verify / release ----------------------------------------------------------

    def acquire(self) -> str:
        """Take the lock or raise RunFolderError naming its live holder; returns a log line."""
        if storage.is_remote(self.folder):
            return self._acquire_lease()
        import fcntl

        storage.makedirs(self.folder)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip()
            os.close(fd)
            raise RunFolderError(f"run folder {storage.display(self.folder)} is in use by another live copy of this "
                                 f"run ({_describe(holder)}); stop it first (its lock is released when it ends)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(dict(self.owner, time=time.time())).encode(), 0)
        self._fd = fd
        return f"holding the run lock {self.path}"

    def verify(self) -> None:
        """Raise CheckpointWriteError if another copy of the run has taken the lock over."""
        if self._fd is not None or not storage.is_remote(self.folder):
            return  # an flock cannot be taken from a live process
        current = self._lost or self._reclaimed(self._read())
        if current is None or current.get("id") != self.owner["id"]:
            self._lost = current or {"id": "?"}  # never renew or delete a lease that is not ours again
            self._stop.set()
            raise CheckpointWriteError(f"the run lock {self.path} was taken over by another copy of this run "
                                       f"({_describe(json.dumps(current or {}))}); this copy stops without committing")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._fd is not None:
            os.close(self._fd)  # the flock goes with it; the file stays (deleting it would race a new holder)
            self._fd = None
        elif storage.is_remote(self.folder) and self._lost is None:
            with contextlib.suppress(OSError):
                current = self._read()
                if current is not None and current.get("id") == self.owner["id"]:
                    storage.remove(self.path)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False

    # ---- the bucket lease ----------------------------------------------------------------------

    def _read(self) -> dict | None:
        try:
            return json.loads(storage.read_text(self.path))
        except FileNotFoundError:
            return None
        except ValueError:  # written by something else: treat as a lease that never renews
            return {"id": "?", "time": 0}

    def _write(self) -> None:
        storage.write_text(self.path, json.dumps(dict(self.owner, time=time.time(), ttl=self.ttl)))

    def _dead(self, lease: dict) -> bool:
        if lease.get("host") != self.owner["host"]:
            return False
        if lease.get("boot_id") and lease.get("boot_id") != self.owner["boot_id"]:
            return True  # the same host rebooted since
        return not _pid_alive(int(lease.get("pid", -1)))

    def _acquire_lease(self) -> str:
        lease = self._read()
        note = f"took the run lock {self.path}"
        if lease is not None and not self.take_over:
            age = time.time() - float(lease.get("time", 0))
            if not self._dead(lease) and age < self.ttl:
                self._wait_for_expiry(lease, age)
            note += f" (its previous holder, {_describe(json.dumps(lease))}, is gone)"
        elif lease is not None:
            note += f" over from {_describe(json.dumps(lease))} (--checkpointer.take_over_lock=True)"
        self._write()
        maybe_alive = lease is not None and not self._dead(lease) and time.time() - float(lease.get("time", 0)) < self.ttl
        self._confirm(lease if self.take_over and maybe_alive else None)
        if self.take_over and maybe_alive:
            self._taken_from = lease.get("id")
        self._thread = threading.Thread(target=self._renew, name="lwm-run-lease", daemon=True)
        self._thread.start()
        return note

    def _confirm(self, taken_from: dict | None) -> None:
        """Make sure our lease stands: on a bucket the last writer wins. Another starter writing at the same
        moment stops us with one line. A live holder we took over from (`taken_from`) may have read the lease
        just before our write and renew just after it; it stops renewing once it reads ours, so rewrite ours
        whenever its renewal lands, until half a lease period (two of its renewals) passes with ours intact."""
        settle = max(self.ttl, float((taken_from or {}).get("ttl", 0))) / 2 if taken_from else min(1.0, self.ttl / 10)
        deadline, rewrites = time.time() + settle, 0
        while True:
            time.sleep(min(settle / 8, max(0.01, deadline - time.time())))
            current = self._read()
            mine = current is not None and current.get("id") == self.owner["id"]
            if not mine and taken_from and current is not None and current.get("id") == taken_from.get("id"):
                rewrites += 1
                if rewrites > 4:
                    raise RunFolderError(f"run folder {self.folder}: the lock's previous holder "
                                         f"({_describe(json.dumps(current))}) keeps renewing it over ours; stop it")
                self._write()
                deadline = time.time() + settle
                continue
            if not mine:
                raise RunFolderError(f"run folder {self.folder}: another copy of this run took the lock at the same "
                                     f"moment ({_describe(json.dumps(current or {}))}); start only one")
            if time.time() >= deadline:
                return

    def _reclaimed(self, current: dict | None) -> dict | None:
        """The lease as it stands, after rewriting ours over a late renewal of the holder we took
        over from: a renewal it began before it saw our lease can land at any time after (a slow
        bucket write); that copy stops renewing once it has read ours, so ours must win."""
        if current is not None and self._taken_from and current.get("id") == self._taken_from:
            log.warning("the run lock %s: a late renewal of the copy it was taken over from; rewriting ours",
                        self.path)
            self._write()
            return dict(self.owner)
        return current

    def _wait_for_expiry(self, lease: dict, age: float) -> None:
        log.warning("run folder %s: waiting up to %.0f s to see whether the run lock's holder (%s, renewed %.0f s "
                    "ago) is alive", self.folder, self.ttl - age, _describe(json.dumps(lease)), age)
        deadline = time.time() + self.ttl - age
        while time.time() < deadline:
            time.sleep(min(self.ttl / 8, max(0.1, deadline - time.time())))
            current = self._read()
            if current is None:
                return
            if current.get("time") != lease.get("time") or current.get("id") != lease.get("id"):
                raise RunFolderError(f"run folder {self.folder} is in use by another live copy of this run "
                                     f"({_describe(json.dumps(current))}, it renewed its lock just now); stop it, or "
                                     "pass --checkpointer.take_over_lock=True if it is gone")

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                current = self._reclaimed(self._read())
                if current is not None and current.get("id") != self.owner["id"]:
                    self._lost = current
                    log.error("the run lock %s was taken over by %s", self.path, _describe(json.dumps(current)))
                    return
                self._write()
            except OSError as e:  # a network blip: try again at the next period
                log.warning("renewing the run lock %s failed: %s", self.path, e)


def _describe(holder: str) -> str:
    try:
        lease = json.loads(holder)
    except ValueError:
        return holder[:200] or "holder unknown"
    when = lease.get("time")
    since = f", last renewed {time.time() - float(when):.0f} s ago" if when else ""
    return f"host {lease.get('host', '?')}, pid {lease.get('pid', '?')}{since}"
