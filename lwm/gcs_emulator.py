"""A GCS API emulator on 127.0.0.1 for tests and benchmarks: the real gcsfs client talks to it.

    bucket = start_emulator()   # 'gs://lwm-test'; STORAGE_EMULATOR_HOST set for this process and its children

`gcp-storage-emulator` (PyPI) serves the JSON API in memory; gcsfs finds it through
STORAGE_EMULATOR_HOST and needs no credentials then. GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
(set here if unset, before gcsfs is first imported) skips a gRPC bucket-type probe the emulator does not
answer, which would otherwise cost 60 s per first touch of a bucket.
"""
import atexit
import os
import socket
import subprocess
import sys
import time

BUCKET = "lwm-test"
_started = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_emulator() -> str:
    """Start the emulator once per process (`pip install gcp-storage-emulator`); returns the bucket URL."""
    if "url" in _started:
        return _started["url"]
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host=127.0.0.1",
                             f"--port={port}", "--in-memory", f"--default-bucket={BUCKET}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    atexit.register(proc.terminate)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the GCS emulator did not start (exit {proc.poll()})")
            time.sleep(0.1)
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    _started.update(url=f"gs://{BUCKET}", proc=proc)
    return _started["url"]
