"""lwm.storage against a real GCS API (an emulator on 127.0.0.1, the real gcsfs client) and
a local folder: the same operations, the same guarantees, errors that name the URL."""
import pytest

from lwm import storage


@pytest.fixture(params=["local", "bucket"])
def folder(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("bucket_dir")


def test_operations_agree_on_disk_and_in_a_bucket(folder):
    storage.makedirs(folder)
    assert storage.listdir(folder) == []
    path = storage.join(folder, "a.bin")
    storage.write_bytes(path, b"first")
    storage.write_bytes(path, b"second")  # replaced whole
    assert storage.read_bytes(path) == b"second" and storage.size(path) == 6
    assert storage.exists(path) and storage.isfile(path) and not storage.isfile(storage.join(folder, "b"))
    with storage.open_file(path, "rb") as f:
        f.seek(2)
        assert f.read(3) == b"con"
    storage.rename(path, storage.join(folder, "b.bin"))
    assert storage.listdir(folder) == ["b.bin"]
    assert storage.read_text(storage.join(folder, "b.bin")) == "second"
    with storage.local_copy(storage.join(folder, "b.bin")) as local:
        assert open(local, "rb").read() == b"second"
    storage.remove(storage.join(folder, "b.bin"))
    storage.remove(storage.join(folder, "b.bin"))  # already gone: fine
    assert storage.listdir(folder) == []


def test_a_write_that_fails_leaves_the_previous_object(folder):
    path = storage.join(folder, "state")
    storage.write_bytes(path, b"committed")

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with storage.AtomicWriter(path) as f:
            f.write(b"x" * (6 << 20))  # past gcsfs's 5 MiB block: a multi-part upload was started
            raise Boom()
    assert storage.read_bytes(path) == b"committed"
    assert storage.listdir(folder) == ["state"]


def test_a_missing_object_is_one_line_naming_the_url(bucket_dir):
    missing = f"{bucket_dir}/nope/streaming_params"
    with pytest.raises(FileNotFoundError) as error:
        storage.read_bytes(missing)
    assert str(error.value) == f"{missing}: no such file or object"
    from lwm.checkpoint import load_checkpoint

    with pytest.raises(FileNotFoundError, match=f"checkpoint file not found: {missing}"):
        load_checkpoint(f"params::{missing}")
    from lwm.cli import check_input_files

    with pytest.raises(FileNotFoundError, match=f"--load_checkpoint: no such object: {missing}"):
        check_input_files([("--load_checkpoint", missing)])


def test_a_missing_client_library_names_the_extra(monkeypatch):
    import fsspec

    def no_client(url, **kwargs):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec.core, "url_to_fs", no_client)
    with pytest.raises(ImportError, match=r"s3://b/x: s3:// paths need a client library .*pip install -e '\.\[s3\]'"):
        storage.exists("s3://b/x")


def test_paths_join_and_split_like_their_kind():
    assert storage.join("gs://b/runs/", "r", "streaming_params") == "gs://b/runs/r/streaming_params"
    assert storage.basename("gs://b/runs/r/metadata.pkl") == "metadata.pkl"
    assert storage.dirname("gs://b/runs/r/metadata.pkl") == "gs://b/runs/r"
    assert storage.join("runs", "r") == "runs/r" and not storage.is_remote("file:///x") and storage.is_remote("s3://b")


def test_a_read_sees_an_object_rewritten_by_another_process(bucket_dir):
    """gcsfs caches listings with sizes: a read after another host rewrote an object (longer)
    must see all of it, not the cached length."""
    import subprocess
    import sys

    path = f"{bucket_dir}/metrics.jsonl"
    storage.write_text(path, "one\n")
    assert storage.listdir(bucket_dir) == ["metrics.jsonl"]  # caches the listing, size 4
    subprocess.run([sys.executable, "-c", f"from lwm import storage; storage.write_text({path!r}, 'one\\ntwo\\n')"],
                   check=True, timeout=120)
    assert storage.read_text(path) == "one\ntwo\n" and storage.size(path) == 8


def test_missing_credentials_are_one_line_naming_the_url(monkeypatch):
    """What google-auth raises on a machine without credentials becomes a PermissionError that
    names the URL and what to do (the client itself cannot be made to fail so without a network)."""
    import fsspec
    from google.auth.exceptions import DefaultCredentialsError

    class NoCredentials:
        def invalidate_cache(self, path=None):
            pass

        def exists(self, path):
            raise DefaultCredentialsError("Your default credentials were not found.")

    monkeypatch.setattr(fsspec.core, "url_to_fs", lambda url, **kw: (NoCredentials(), url.split("://", 1)[1]))
    with pytest.raises(PermissionError, match=r"^gs://b/run/x: no usable credentials \(DefaultCredentialsError: "
                                              r"Your default credentials were not found\.\); run gcloud auth"):
        storage.exists("gs://b/run/x")


def test_a_read_gets_one_version_of_an_object_being_replaced(bucket_dir):
    # A lease renewed by another host while this one reads it: every read is the old object or the
    # new one whole (an open file sizes itself from the metadata, then reads ranges of whichever
    # version is there by then: a longer version came back cut, a JSON lease unparseable).
    import threading

    path = storage.join(bucket_dir, "lease.json")
    versions = ['{"id": "a"}', '{"id": "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"}']
    storage.write_text(path, versions[0])
    done = threading.Event()

    def renew():
        i = 0
        while not done.is_set():
            i += 1
            storage.write_text(path, versions[i % 2])

    writer = threading.Thread(target=renew)
    writer.start()
    try:
        seen = [storage.read_text(path) for _ in range(300)]
    finally:
        done.set()
        writer.join()
    assert set(seen) <= set(versions), [s for s in seen if s not in versions][:3]
    assert set(seen) == set(versions)  # the writer did race the reads
