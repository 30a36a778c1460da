"""Huge pages for host memory: the environment helper, and the re-exec of an entry point."""
import os
import subprocess
import sys

import pytest

from lwm import host_memory
from lwm.host_memory import HUGE_PAGES_TUNABLE, env_with_huge_pages, huge_pages_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_huge_pages = pytest.mark.skipif(not huge_pages_available(),
                                      reason="needs glibc 2.35+ and transparent huge pages not 'never'")

# Prints its pid before and after the re-exec; the second run sees the tunable.
REEXEC_SCRIPT = """
import os, sys
print("pid", os.getpid(), os.environ.get("GLIBC_TUNABLES"), flush=True)
from lwm.host_memory import reexec_with_huge_pages
reexec_with_huge_pages()
print("after", os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
"""


def test_env_keeps_the_users_glibc_tunables():
    env = env_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "1"})
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "1"}
    assert env_with_huge_pages({"GLIBC_TUNABLES": ""})["GLIBC_TUNABLES"] == ""  # empty: glibc's defaults


def test_env_adds_the_tunable_only_where_huge_pages_work(monkeypatch):
    monkeypatch.setattr(host_memory, "huge_pages_available", lambda: False)
    assert "GLIBC_TUNABLES" not in env_with_huge_pages({"A": "1"})
    monkeypatch.setattr(host_memory, "huge_pages_available", lambda: True)
    assert env_with_huge_pages({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": HUGE_PAGES_TUNABLE}


def test_no_huge_pages_without_glibc_or_with_thp_off(monkeypatch, tmp_path):
    monkeypatch.setattr(host_memory.platform, "system", lambda: "Linux")
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("glibc", "2.31"))
    assert not huge_pages_available()  # the hugetlb tunable came with glibc 2.35
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))
    assert not huge_pages_available()
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("glibc", "2.36"))
    setting = tmp_path / "enabled"
    monkeypatch.setattr(host_memory, "THP_SETTING", str(setting))
    setting.write_text("always madvise [never]\n")
    assert not huge_pages_available()
    setting.write_text("always [madvise] never\n")
    assert huge_pages_available()
    monkeypatch.setattr(host_memory, "THP_SETTING", str(tmp_path / "missing"))
    assert not huge_pages_available()


def run_script(env_updates):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.update(env_updates)
    proc = subprocess.run([sys.executable, "-c", REEXEC_SCRIPT, "--flag=1"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


@needs_huge_pages
def test_reexec_restarts_the_same_process_with_the_tunable():
    first, second, after = run_script({})
    pid = first.split()[1]
    assert first == f"pid {pid} None"
    assert second == f"pid {pid} {HUGE_PAGES_TUNABLE}"  # same pid, started again with the tunable
    assert after == f"after {pid} {HUGE_PAGES_TUNABLE} ['--flag=1']"  # once, with its arguments


def test_reexec_leaves_a_process_with_its_own_tunables_alone():
    lines = run_script({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert len(lines) == 2 and lines[1].startswith("after ") and "glibc.malloc.arena_max=2" in lines[1]
