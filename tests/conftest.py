"""Test setup: 8 virtual CPU devices (set before jax is imported) and offline logging."""
import os

_flags = ("--xla_force_host_platform_device_count=8 --xla_cpu_collective_call_warn_stuck_timeout_seconds=300 "
          "--xla_cpu_collective_call_terminate_timeout_seconds=300")  # = lwm.mesh.cpu_xla_flags(8)
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flags).strip()
# The suite is bound by compiling (hundreds of small programs on 8 virtual devices), not by running
# them: LLVM's cheapest code generation compiles them about a third faster (measured: the two
# micro-batch tests 80 -> 54 CPU seconds). It changes no result a test checks; lwm.mesh.cpu_xla_flags
# keeps it in every subprocess a test starts. Benchmarks and studies keep the default.
_quick_compile = "--xla_backend_optimization_level=0"
if _quick_compile not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + _quick_compile
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # lwm/gcs_emulator.py: no gRPC probe of the emulator

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    # The slow end-to-end tests first, the longest (the pod rehearsal, minutes) at the very start:
    # with pytest-xdist one worker runs it while the other works through the rest, instead of
    # one long test starting last.
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None, item.path.name != "test_pod_rehearsal.py"))
    platform = jax.default_backend()
    for item in items:
        for marker, needed in (("gpu", "gpu"), ("tpu", "tpu")):
            # the marker itself, not any keyword: a parametrize id "tpu" must not skip a CPU test
            if item.get_closest_marker(marker) is not None and platform != needed:
                item.add_marker(pytest.mark.skip(reason=f"needs a {needed.upper()} (running on {platform})"))


@pytest.fixture(scope="session")
def gcs_bucket():
    """gs:// URL of a bucket in a GCS API emulator on 127.0.0.1 (lwm/gcs_emulator.py), served to the real gcsfs."""
    from lwm.gcs_emulator import start_emulator

    return start_emulator()


@pytest.fixture
def bucket_dir(gcs_bucket, request):
    """A fresh folder in the emulated bucket for one test."""
    import uuid

    return f"{gcs_bucket}/{request.node.name.replace('[', '-').replace(']', '')}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def tokenizer():
    from lwm.tokenizer import load_tokenizer

    return load_tokenizer("builtin")
