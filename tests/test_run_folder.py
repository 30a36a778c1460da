"""One live copy of a run per folder: a local flock, a lease object in a bucket (a GCS
emulator through the real gcsfs), and what each does when the holder is alive or dead."""
import json
import threading
import time

import pytest

from lwm import storage
from lwm.checkpoint import CheckpointWriteError
from lwm.run_folder import LOCK_NAME, RunFolderError, RunLock


def test_a_local_folder_takes_one_live_copy(tmp_path):
    first = RunLock(str(tmp_path))
    first.acquire()
    with pytest.raises(RunFolderError, match=r"in use by another live copy of this run \(host .*, pid \d+"):
        RunLock(str(tmp_path)).acquire()
    first.release()  # a process that ends, however it ends, releases its flock
    second = RunLock(str(tmp_path))
    second.acquire()
    second.verify()
    second.release()


def lease(folder, **fields):
    storage.write_text(storage.join(folder, LOCK_NAME), json.dumps(fields))


def test_a_bucket_lease_of_a_dead_holder_is_taken_at_once(bucket_dir):
    import socket

    lease(bucket_dir, id="old", host=socket.gethostname(), pid=2**22 + 12345, boot_id=open(
        "/proc/sys/kernel/random/boot_id").read().strip(), time=time.time())  # same host, no such process
    start = time.time()
    lock = RunLock(bucket_dir, ttl_seconds=60)
    assert "is gone" in lock.acquire() and time.time() - start < 5
    lock.verify()
    lock.release()
    assert LOCK_NAME not in storage.listdir(bucket_dir)  # a clean end leaves no lease
    lease(bucket_dir, id="old", host="another-host", pid=1, time=time.time() - 120)  # expired
    lock = RunLock(bucket_dir, ttl_seconds=60)
    lock.acquire()
    lock.release()


def test_a_live_holder_is_refused_and_can_be_taken_over_on_request(bucket_dir):
    """The first copy renews its lease every ttl/4: a second copy watching it sees a renewal
    and stops with one line; with take_over_lock it takes the lease, and the first copy's
    next commit check fails instead of committing."""
    first = RunLock(bucket_dir, ttl_seconds=2)
    first.acquire()
    with pytest.raises(RunFolderError, match="in use by another live copy of this run .*renewed its lock just now"):
        RunLock(bucket_dir, ttl_seconds=2).acquire()
    second = RunLock(bucket_dir, ttl_seconds=2, take_over=True)
    assert "--checkpointer.take_over_lock=True" in second.acquire()
    with pytest.raises(CheckpointWriteError, match="taken over by another copy"):
        first.verify()
    time.sleep(1.0)
    # The first copy stops renewing (a renewal in flight lands before release returns) and leaves
    # the new holder's lease alone; a late renewal of the first copy is overwritten by the second.
    first.release()
    second.verify()
    assert json.loads(storage.read_text(storage.join(bucket_dir, LOCK_NAME)))["id"] == second.owner["id"]
    second.release()


def test_a_take_over_outlasts_a_renewal_of_the_old_holder_in_flight(bucket_dir):
    """A bucket has no compare-and-swap: the old holder may read the lease (its own) just before the
    take-over writes and renew just after it. The new holder rewrites its lease until the old one's
    renewals have had time to read it, so the take-over stands and the old copy cannot commit."""
    path = storage.join(bucket_dir, LOCK_NAME)
    first = RunLock(bucket_dir, ttl_seconds=2)
    first.acquire()
    first._stop.set()
    first._thread.join()  # its renewal is made by hand below, at the worst moment
    second = RunLock(bucket_dir, ttl_seconds=2, take_over=True)
    notes = []
    taker = threading.Thread(target=lambda: notes.append(second.acquire()))
    taker.start()
    while json.loads(storage.read_text(path))["id"] != second.owner["id"]:
        time.sleep(0.01)
    first._write()  # the renewal that read the lease just before the take-over
    taker.join()
    assert notes and json.loads(storage.read_text(path))["id"] == second.owner["id"]
    with pytest.raises(CheckpointWriteError, match="taken over by another copy"):
        first.verify()
    second.release()


def test_a_late_renewal_of_the_copy_taken_over_is_overwritten_and_never_deleted(bucket_dir):
    # A renewal the old holder began before it saw the new lease can land after the new holder's
    # confirmation window (a slow bucket write): the new holder's next check writes its lease back
    # instead of stopping, and the old copy, once it knows it lost, neither renews nor deletes.
    first = RunLock(bucket_dir, ttl_seconds=2)
    first.acquire()
    second = RunLock(bucket_dir, ttl_seconds=2, take_over=True)
    second.acquire()
    first._write()  # the late renewal lands
    second.verify()
    path = storage.join(bucket_dir, LOCK_NAME)
    assert json.loads(storage.read_text(path))["id"] == second.owner["id"]
    with pytest.raises(CheckpointWriteError, match="taken over by another copy"):
        first.verify()
    first.release()
    assert json.loads(storage.read_text(path))["id"] == second.owner["id"]
    second.release()
    assert not storage.exists(path)
