"""Tests for rlprim._sandbox_child, the python tool's bootstrap: its path logic against
posixpath, and the whole bootstrap run as the tool runs it (``python -I -S -c SOURCE CONFIG``)
in a temporary directory, without bubblewrap, so each step is seen on its own."""

from __future__ import annotations

import ast
import json
import os
import posixpath
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlprim import _sandbox_child as child

SOURCE_FILE = child.__file__
IS_ROOT = os.geteuid() == 0


# =========================================================================== pure helpers


def test_lexical_absolute_hand_cases():
    assert child.lexical_absolute("a/b", "/w") == ("/w/a/b", False)
    assert child.lexical_absolute("./a//b/.", "/w") == ("/w/a/b", False)
    assert child.lexical_absolute("/x/../y", "/w") == ("/y", False)  # absolute: no climb flag
    assert child.lexical_absolute("../tmp/f", "/w/s") == ("/w/tmp/f", True)
    assert child.lexical_absolute("/../../etc", "/w") == ("/etc", False)
    assert child.lexical_absolute("", "/w") == ("/w", False)


_COMPONENT = st.sampled_from(["a", "b", ".", "..", "", "ü"])


@given(st.lists(_COMPONENT, max_size=8), st.booleans())
def test_lexical_absolute_matches_posixpath(parts, absolute):
    path = ("/" if absolute else "") + "/".join(parts)
    full, climbed = child.lexical_absolute(path, "/w/s")
    expected = posixpath.normpath(posixpath.join("/w/s", path))
    if expected.startswith("//"):  # POSIX keeps a leading "//"; the kernel treats it as "/"
        expected = expected[1:]
    assert full == expected
    assert climbed == (not path.startswith("/") and ".." in path.split("/"))


def test_under_is_by_whole_components():
    assert child.under("/w/s", ("/w/s",)) and child.under("/w/s/f", ("/x", "/w/s"))
    assert not child.under("/w/sx", ("/w/s",)) and not child.under("/w", ("/w/s",))
    assert child.under("/anything", ("/",))


def test_the_bootstrap_imports_only_the_standard_library():
    tree = ast.parse(open(SOURCE_FILE, encoding="utf-8").read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0])
    assert names <= set(sys.stdlib_module_names) | {"__future__"}, names


# =========================================================================== the bootstrap run


def _config(**overrides):
    config = {"uid": None, "memory_bytes": 256 * 2**20, "cpu_seconds": 10,
              "file_bytes": 2**20, "max_processes": None, "unshare_net": False, "preload": [],
              "audit_guard": True, "ready_fd": None, "close_fds": [], "setup_exit": 120,
              "memory_exit": 121}
    config.update(overrides)
    return config


def _run(tmp_path, program, pass_fds=(), **overrides):
    (tmp_path / "main.py").write_text(program)
    with open(SOURCE_FILE, encoding="utf-8") as handle:
        source = handle.read()
    return subprocess.run(
        [sys.executable, "-I", "-S", "-B", "-c", source, json.dumps(_config(**overrides))],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, pass_fds=pass_fds,
        env={"PATH": "/usr/bin:/bin"})


def test_runs_main_py_as_main_and_sets_the_limits(tmp_path):
    program = ("import resource, sys\nprint(__name__, sys.argv)\n"
               "print(resource.getrlimit(resource.RLIMIT_AS)[0] // 2**20,\n"
               "      resource.getrlimit(resource.RLIMIT_CPU),\n"
               "      resource.getrlimit(resource.RLIMIT_FSIZE)[0],\n"
               "      resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n")
    result = _run(tmp_path, program)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "__main__ ['main.py']\n256 (10, 11) 1048576 64\n"


def test_traceback_leaves_out_the_bootstrap_frames(tmp_path):
    result = _run(tmp_path, "def f():\n    1 / 0\nf()\n")
    assert result.returncode == 1
    assert 'File "main.py", line 2, in f' in result.stderr
    assert "<string>" not in result.stderr and "ZeroDivisionError" in result.stderr


def test_memory_error_exits_with_the_memory_status(tmp_path):
    result = _run(tmp_path, "x = bytearray(2**31)\n", memory_bytes=128 * 2**20)
    assert result.returncode == 121 and result.stderr == "MemoryError\n"


def test_ready_fd_gets_one_byte_and_inherited_fds_are_closed(tmp_path):
    ready_read, ready_write = os.pipe()
    other_read, other_write = os.pipe()
    try:
        result = _run(tmp_path, "import os\nprint(sorted(os.listdir('/proc/self/fd')))\n",
                      pass_fds=(ready_write, other_read), ready_fd=ready_write,
                      close_fds=[other_read], audit_guard=False)
        assert result.returncode == 0, result.stderr
        assert os.read(ready_read, 16) == b"1"
        assert result.stdout == "['0', '1', '2', '3']\n"  # 3: the listing's own descriptor
    finally:
        for fd in (ready_read, ready_write, other_read, other_write):
            os.close(fd)


def test_the_guard_refuses_writes_outside_and_survives_tampering(tmp_path):
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    program = ("import sys\nm = sys.modules['__main__']\nm.under = lambda *a: True\n"
               f"open({str(outside)!r}, 'w')\n")
    result = _run(tmp_path, program)
    assert result.returncode == 1 and "python_tool sandbox: writing" in result.stderr
    assert not outside.exists()
    result = _run(tmp_path, "open('inside', 'w').write('x')\nprint(open('inside').read())\n")
    assert result.stdout == "x\n"


@pytest.mark.skipif(IS_ROOT, reason="root may change its uid")
def test_a_failed_privilege_drop_exits_with_the_setup_status(tmp_path):
    result = _run(tmp_path, "print('ran')\n", uid=os.getuid() + 1)
    assert result.returncode == 120 and "sandbox setup failed" in result.stderr
    assert "ran" not in result.stdout


@pytest.mark.skipif(not IS_ROOT, reason="dropping to another uid needs root")
def test_root_drops_to_the_uid_with_no_groups(tmp_path):
    uid = 2_000_000_321
    os.chmod(tmp_path, 0o777)
    result = _run(tmp_path, "import os\nprint(os.getresuid(), os.getresgid(), os.getgroups())\n",
                  uid=uid, max_processes=8)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{(uid,) * 3} {(uid,) * 3} []\n"
