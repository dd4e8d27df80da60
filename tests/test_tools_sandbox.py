"""A hostile corpus against the python tool's sandbox (rlprim.tools.python_tool under bwrap).

Each payload tries to change or read something outside the sandbox: files on the host (through
every family of system calls that creates one), the host's /proc, /sys and environment,
processes (signals, ptrace), listeners on 127.0.0.1, the machine's resources (fork, thread,
memory, disk and output bombs, all bounded), time (work after the timeout), and the Python
escapes (ctypes, ``__subclasses__``, tampering with the guard). After every payload the test
checks the host, not the program's own report: no file appeared under the targets, the
world-writable host directory and its files are unchanged, no listener got a connection or a
datagram, the victim process and this process are alive and not stopped, /etc/passwd and the
host name are unchanged, no process of the payload is left, and no secret (from this
process's environment or a world-readable host file) reached the output.

Every payload runs three ways: as this user with the audit guard (the default tool), as this
user with ``audit_guard=False`` (bubblewrap and the kernel limits alone), and — when the suite
runs as root — as a throwaway unprivileged user created for the test (``useradd``), again
without the guard, so the non-root path (bwrap in a user namespace) faces the same corpus.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pytest

from rlprim.tools import python_tool

IS_ROOT = os.geteuid() == 0
RUNNER = os.path.join(os.path.dirname(__file__), "scripts", "sandbox_runner.py")
MAX_PROCESSES = 16
DISK_MB = 8


class Host(NamedTuple):
    """What the payloads aim at, and what the checks compare against."""

    tag: str
    secret: str
    open_dir: str  # world-writable host directory (mode 0777) holding the files below
    sentinel: str  # a world-writable file with known content
    secret_file: str  # a world-readable file holding the secret
    tcp: socket.socket
    udp: socket.socket
    abstract: socket.socket
    unix: socket.socket
    unix_path: str
    hostname: str
    marker: str  # a number only payload processes would carry on their command line


class Payload(NamedTuple):
    code: str
    timeout: float = 3.0
    settle: float = 0.0  # seconds to wait before checking the host (work after the timeout)
    kwargs: dict[str, Any] = {}
    expect: Callable[[str], None] | None = None  # extra checks of the output


def _count_at_most(label: str, limit: int) -> Callable[[str], None]:
    def expect(output: str) -> None:
        if "python_tool sandbox:" in output:
            return  # the guard refused the first step: nothing to count
        lines = [line for line in output.splitlines() if line.startswith(label + " ")]
        assert lines and int(lines[-1].split()[1]) <= limit, output
    return expect


def _truncated(output: str) -> None:
    assert len(output) <= 2000 + 200 and "[output truncated to" in output


def _only_standard_fds(output: str) -> None:
    if "python_tool sandbox:" not in output:  # 3 is the listing's own descriptor
        assert set(json.loads(output.replace("'", '"'))) == {"0", "1", "2", "3"}, output


def _memory_limit(output: str) -> None:
    assert output.startswith("error: memory limit exceeded (256 MB)"), output


def _refused_with(first_line: str) -> Callable[[str], None]:
    def expect(output: str) -> None:
        if "python_tool sandbox:" not in output:  # without the guard: the kernel's answer
            assert output.splitlines()[0] == first_line, output
    return expect


def _no_shadow(output: str) -> None:
    assert "root:" not in output


# T, D: host paths under /tmp and /dev/shm; H: the world-writable host directory; SENTINEL,
# SECRET_FILE, UNIX: files in it; PORT, UPORT: TCP and UDP listeners on 127.0.0.1 (TCP on
# 0.0.0.0); ABSTRACT: an abstract unix socket; VICTIM, PARENT: pids on the host; MARKER: see Host;
# PREFIX: the Python installation.
PAYLOADS: dict[str, Payload] = {
    # ---- creating files, one syscall family each
    "open_tmp": Payload("open(T, 'w').write('x')"),
    "open_dev_shm": Payload("open(D, 'w').write('x')"),
    "os_open": Payload("import os\nos.close(os.open(T, os.O_CREAT | os.O_WRONLY, 0o666))"),
    "os_open_dir_fd": Payload(
        "import os\nfd = os.open('/tmp', os.O_RDONLY)\n"
        "os.open(os.path.basename(T), os.O_CREAT | os.O_WRONLY, dir_fd=fd)"),
    "io_fileio": Payload("import io\nio.FileIO(T, 'w').write(b'x')"),
    "pathlib": Payload("import pathlib\npathlib.Path(T).write_text('x')"),
    "shutil_copy": Payload("import shutil\nshutil.copy('main.py', T)"),
    "mkdir": Payload("import os\nos.mkdir(T)"),
    "mknod_tmp": Payload("import os, stat\nos.mknod(T, stat.S_IFREG | 0o666)"),
    "mknod_dev_shm": Payload("import os, stat\nos.mknod(D, stat.S_IFREG | 0o666)"),
    "mknod_device": Payload("import os, stat\nos.mknod(T, stat.S_IFCHR | 0o666, os.makedev(1, 3))"),
    "mkfifo_tmp": Payload("import os\nos.mkfifo(T)"),
    "mkfifo_dev_shm": Payload("import os\nos.mkfifo(D)"),
    "mkfifo_dir_fd": Payload("import os\nfd = os.open('/tmp', os.O_RDONLY)\n"
                             "os.mkfifo(os.path.basename(T), dir_fd=fd)"),
    "symlink": Payload("import os\nos.symlink('/etc/passwd', T)"),
    "hard_link": Payload("import os\nopen('a', 'w').write('x')\nos.link('a', T)"),
    "rename": Payload("import os\nopen('a', 'w').write('x')\nos.rename('a', T)"),
    "replace": Payload("import os\nopen('a', 'w').write('x')\nos.replace('a', D)"),
    "unix_socket_bind": Payload("import socket\ns = socket.socket(socket.AF_UNIX)\ns.bind(T)"),
    "shared_memory": Payload(
        "from multiprocessing import shared_memory\n"
        "m = shared_memory.SharedMemory(name='rlprim-escape-' + TAG, create=True, size=4096)\n"
        "m.buf[:1] = b'x'"),
    "relative_dotdot": Payload("import os\nopen('../tmp/' + os.path.basename(T), 'w')"),
    "chdir_then_relative": Payload("import os\nos.chdir('/tmp')\nopen(os.path.basename(T), 'w')"),
    "proc_self_cwd": Payload("import os\nopen('/proc/self/cwd/../tmp/' + os.path.basename(T), 'w')"),
    "proc_1_root": Payload("open('/proc/1/root' + T, 'w')"),
    "proc_parent_root": Payload("open(f'/proc/{PARENT}/root' + T, 'w')"),
    "chdir_thread_race": Payload(
        "import os, threading, time\nhome = os.getcwd()\nstop = []\n"
        "def flip():\n    while not stop:\n        os.chdir('/tmp')\n        os.chdir(home)\n"
        "threading.Thread(target=flip, daemon=True).start()\nwins = 0\n"
        "end = time.time() + 1.0\nwhile time.time() < end:\n    try:\n"
        "        open(os.path.basename(T), 'w').write('x')\n        wins += 1\n"
        "    except OSError:\n        pass\nstop.append(1)\nprint('wins', wins)"),
    # ---- changing what is on the host
    "write_open_dir": Payload("open(H + '/new', 'w').write('x')"),
    "truncate_sentinel": Payload("import os\nos.truncate(SENTINEL, 0)"),
    "append_sentinel": Payload("open(SENTINEL, 'a').write('changed')"),
    "remove_sentinel": Payload("import os\nos.remove(SENTINEL)"),
    "chmod_sentinel": Payload("import os\nos.chmod(SENTINEL, 0o600)"),
    "write_etc_passwd": Payload("open('/etc/passwd', 'a').write('evil::0:0::/:/bin/sh\\n')"),
    "chmod_etc_passwd": Payload("import os\nos.chmod('/etc/passwd', 0o666)"),
    "write_usr": Payload("open('/usr/lib/rlprim-escape-' + TAG, 'w').write('x')"),
    "write_python_prefix": Payload("open(PREFIX + '/rlprim-escape-' + TAG, 'w').write('x')"),
    "proc_sys_hostname": Payload("open('/proc/sys/kernel/hostname', 'w').write('pwned')"),
    "sethostname": Payload("import socket\nsocket.sethostname('pwned')"),
    # ---- reading the host
    "parent_environ": Payload("print(open(f'/proc/{PARENT}/environ').read())"),
    "ppid_environ": Payload("import os\nprint(open(f'/proc/{os.getppid()}/environ').read())"),
    "every_environ_and_cmdline": Payload(
        "import os\nfor pid in os.listdir('/proc'):\n    if pid.isdigit():\n"
        "        for name in ('environ', 'cmdline'):\n            try:\n"
        "                print(pid, open(f'/proc/{pid}/{name}', 'rb').read())\n"
        "            except OSError as e:\n                print(pid, name, e)\n"
        "print('pids', sum(p.isdigit() for p in os.listdir('/proc')))",
        kwargs={"max_output_chars": 100_000}, expect=_count_at_most("pids", 3)),
    "parent_mem": Payload("print(open(f'/proc/{PARENT}/mem', 'rb').read(16))"),
    "environment": Payload("import os\nprint(dict(os.environ))\n"
                           "print(open('/proc/self/environ').read())"),
    "secret_file": Payload("print(open(SECRET_FILE).read())"),
    "etc_shadow": Payload("print(open('/etc/shadow').read())", expect=_no_shadow),
    "sys_tree": Payload("import os\nprint(os.listdir('/sys/class/net'))\n"
                        "print(open('/sys/kernel/hostname').read())"),
    "list_root_home": Payload("import os\nprint(os.listdir('/root'), os.listdir('/home'))"),
    "inherited_fds": Payload("import os\nprint(sorted(os.listdir('/proc/self/fd')))",
                             expect=_only_standard_fds),
    # ---- processes
    "kill_victim": Payload("import os\nos.kill(VICTIM, 9)"),
    "killpg_victim": Payload("import os\nos.killpg(os.getpgid(VICTIM), 9)"),
    "kill_everything": Payload("import os\nos.kill(-1, 9)"),
    "kill_parent": Payload("import os, signal\nos.kill(PARENT, signal.SIGSTOP)\n"
                           "os.kill(PARENT, signal.SIGKILL)"),
    "pidfd_victim": Payload("import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(VICTIM), 9)"),
    "ptrace_victim": Payload(
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.ptrace(16, VICTIM, 0, 0), ctypes.get_errno())"),
    "daemon_survives": Payload(
        "import os\nif os.fork() == 0:\n    os.setsid()\n"
        "    os.execv('/bin/sleep', ['sleep', MARKER])\nprint('parent done')", settle=0.5),
    "sleep_past_timeout_then_write": Payload(
        "import time\ntime.sleep(1.5)\nopen(T, 'w').write('late')", timeout=0.5, settle=1.5),
    "child_writes_after_timeout": Payload(
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1.5)\n"
        "    open(H + '/late', 'w').write('late')\n    os._exit(0)\ntime.sleep(10)",
        timeout=0.5, settle=1.5),
    # ---- bombs, bounded
    "fork_bomb": Payload(
        "import os, time\nmade = 0\nfor _ in range(200):\n    try:\n        pid = os.fork()\n"
        "    except OSError as e:\n        print('refused', e)\n        break\n    if pid == 0:\n"
        "        time.sleep(5)\n        os._exit(0)\n    made += 1\nprint('children', made)",
        expect=_count_at_most("children", MAX_PROCESSES)),
    "thread_bomb": Payload(
        "import threading\nevent = threading.Event()\nmade = 0\ntry:\n    for _ in range(200):\n"
        "        threading.Thread(target=event.wait, daemon=True).start()\n        made += 1\n"
        "except RuntimeError as e:\n    print('refused', e)\nprint('threads', made)\nevent.set()",
        expect=_count_at_most("threads", MAX_PROCESSES)),
    "memory_bomb": Payload("chunks = []\nfor _ in range(256):\n    chunks.append(bytearray(2**24))",
                           expect=_memory_limit),
    "disk_bomb_cwd": Payload(
        "import os\ntotal = 0\ntry:\n    for i in range(100):\n"
        "        open(f'f{i}', 'wb').write(b'0' * 2**20)\n        total += 1\n"
        "except OSError as e:\n    print('stopped', e)\nprint('mib', total)",
        expect=_count_at_most("mib", DISK_MB)),
    "disk_bomb_tmp": Payload(
        "total = 0\ntry:\n    for i in range(100):\n"
        "        open(f'/tmp/f{i}', 'wb').write(b'0' * 2**20)\n        total += 1\n"
        "except OSError as e:\n    print('stopped', e)\nprint('mib', total)",
        expect=_count_at_most("mib", DISK_MB)),
    "disk_bomb_dev_shm": Payload(
        "total = 0\ntry:\n    for i in range(100):\n"
        "        open(f'/dev/shm/f{i}', 'wb').write(b'0' * 2**20)\n        total += 1\n"
        "except OSError as e:\n    print('stopped', e)\nprint('mib', total)",
        expect=_count_at_most("mib", DISK_MB)),
    "output_bomb": Payload("import sys\nfor _ in range(64):\n    sys.stdout.write('y' * 2**20)",
                           expect=_truncated),
    "stderr_bomb": Payload("import sys\nfor _ in range(64):\n    sys.stderr.write('z' * 2**20)",
                           expect=_truncated),
    # ---- network
    "tcp_loopback": Payload("import socket\nsocket.create_connection(('127.0.0.1', PORT), 1)"),
    "tcp_any_address": Payload("import socket\nsocket.create_connection(('0.0.0.0', PORT), 1)"),
    "udp_loopback": Payload("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                            "s.sendto(b'x', ('127.0.0.1', UPORT))"),
    "abstract_unix": Payload("import socket\ns = socket.socket(socket.AF_UNIX)\n"
                             "s.connect('\\0' + ABSTRACT)"),
    "unix_socket_file": Payload("import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect(UNIX)"),
    # ---- Python-level escapes
    "ctypes_mknod": Payload(
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.mknod(T.encode(), 0o010666, 0), ctypes.get_errno())"),
    "ctypes_remount_root_rw": Payload(
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.mount(None, b'/', None, 32 | 4096, None), ctypes.get_errno())\n"
        "open('/usr/lib/rlprim-escape-' + TAG, 'w').write('x')"),
    "ctypes_new_user_namespace": Payload(
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.unshare(0x10000000 | 0x20000), ctypes.get_errno())\n"
        "print(libc.mount(b'none', b'/tmp', b'tmpfs', 0, None))\nopen(T, 'w')",
        expect=_refused_with("-1 1")),  # EPERM from the seccomp filter
    "ctypes_clone3": Payload(
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.syscall(435, None, 0), ctypes.get_errno())", expect=_refused_with("-1 38")),
    "ctypes_bpf": Payload(
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "bpf = {'x86_64': 321, 'aarch64': 280}[os.uname().machine]\n"
        "print(libc.syscall(bpf, 0, 0, 0), ctypes.get_errno())",
        expect=_refused_with("-1 1")),
    "subclasses_os_system": Payload(
        "wrap = [c for c in object.__subclasses__() if c.__name__ == '_wrap_close'][0]\n"
        "wrap.__init__.__globals__['system']('touch ' + T + ' ' + D)"),
    "subclasses_builtins_import": Payload(
        "w = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'catch_warnings'][0]\n"
        "b = w()._module.__builtins__\nb['__import__']('os').mkfifo(T)"),
    "tamper_guard_module": Payload(
        "import sys\nm = sys.modules['__main__']\nm.under = lambda *a: True\n"
        "m.lexical_absolute = lambda p, c: ('/sandbox/x', False)\nopen(T, 'w')"),
    "tamper_builtins": Payload(
        "import builtins\nbuiltins.repr = lambda x: 'ok'\nbuiltins.type = lambda x: str\n"
        "open(T, 'w')"),
    "fspath_toctou": Payload(
        "class P:\n    calls = 0\n    def __fspath__(self):\n        P.calls += 1\n"
        "        return 'inside' if P.calls == 1 else T\nopen(P(), 'w').write('x')"),
}


# =========================================================================== host fixtures


def _digest(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    tag = uuid.uuid4().hex[:12]
    secret = f"rlprim-secret-{uuid.uuid4().hex}"
    open_dir = f"/tmp/rlprim-open-{tag}"
    os.mkdir(open_dir)
    os.chmod(open_dir, 0o777)
    sentinel, secret_file = f"{open_dir}/sentinel", f"{open_dir}/secret"
    for path, text, mode in ((sentinel, "unchanged", 0o666), (secret_file, secret, 0o644)):
        with open(path, "w") as handle:
            handle.write(text)
        os.chmod(path, mode)
    tcp = socket.create_server(("0.0.0.0", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(f"\0rlprim-{tag}")
    abstract.listen()
    unix_path = f"{open_dir}/listener"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(unix_path)
    os.chmod(unix_path, 0o777)
    unix.listen()
    for listener in (tcp, udp, abstract, unix):
        listener.setblocking(False)
    marker = f"{int(tag[:8], 16) % 10**6 + 1000}.{int(tag[8:], 16)}"
    old_secret = os.environ.get("RLPRIM_TEST_SECRET")
    os.environ["RLPRIM_TEST_SECRET"] = secret
    try:
        yield Host(tag, secret, open_dir, sentinel, secret_file, tcp, udp, abstract, unix,
                   unix_path, socket.gethostname(), marker)
    finally:
        if old_secret is None:
            os.environ.pop("RLPRIM_TEST_SECRET", None)
        else:
            os.environ["RLPRIM_TEST_SECRET"] = old_secret
        for listener in (tcp, udp, abstract, unix):
            listener.close()
        shutil.rmtree(open_dir, ignore_errors=True)


def _start_victim(user: tuple[int, int] | None) -> subprocess.Popen:
    command = ["sleep", "600"]
    if user is not None:
        command = ["setpriv", f"--reuid={user[0]}", f"--regid={user[1]}", "--clear-groups",
                   *command]
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGKILL)  # by its pid, nothing else
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def victim() -> Iterator[subprocess.Popen]:
    process = _start_victim(None)
    yield process
    _stop(process)


def _targets(host: Host) -> list[str]:
    prefix = os.path.realpath(sys.prefix)
    return (glob.glob(f"/tmp/rlprim-escape-{host.tag}*")
            + glob.glob(f"/dev/shm/*{host.tag}*")
            + glob.glob(f"/usr/lib/rlprim-escape-{host.tag}*")
            + glob.glob(f"{prefix}/rlprim-escape-{host.tag}*"))


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if marker.encode() in handle.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


def _remove_escapes(host: Host) -> None:
    for path in _targets(host):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(path)


def _assert_host_unchanged(host: Host, victim_pid: int, output: str, passwd: str) -> None:
    """Everything the corpus aims at, checked from the host (``passwd``: /etc/passwd's digest
    before the payload ran)."""
    problems = []
    escaped = _targets(host)
    if escaped:
        problems.append(f"files created on the host: {escaped}")
    entries = sorted(os.listdir(host.open_dir))
    if entries != ["listener", "secret", "sentinel"]:
        problems.append(f"the open host directory changed: {entries}")
    with open(host.sentinel) as handle:
        if handle.read() != "unchanged" or os.stat(host.sentinel).st_mode & 0o777 != 0o666:
            problems.append("the sentinel file changed")
    for name, listener in (("tcp", host.tcp), ("abstract", host.abstract), ("unix", host.unix)):
        try:
            connection, _ = listener.accept()
        except BlockingIOError:
            continue
        connection.close()
        problems.append(f"the {name} listener got a connection")
    try:
        host.udp.recvfrom(16)
        problems.append("the udp socket got a datagram")
    except BlockingIOError:
        pass
    try:
        with open(f"/proc/{victim_pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
        if state in "TtZX":
            problems.append(f"the victim process is in state {state}")
    except FileNotFoundError:
        problems.append("the victim process is gone")
    if _digest("/etc/passwd") != passwd:
        problems.append("/etc/passwd changed")
    if socket.gethostname() != host.hostname:
        problems.append("the host name changed")
    deadline = time.monotonic() + 3.0  # SIGKILL delivery is asynchronous
    while _processes_with(host.marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _processes_with(host.marker):
        problems.append("a payload process outlived the call")
    if host.secret in output:
        problems.append("the secret reached the output")
    if problems:
        _remove_escapes(host)
        raise AssertionError("; ".join(problems) + f"\noutput: {output[:2000]}")


def _program(name: str, host: Host, parent_pid: int, victim_pid: int, port_owner: Host) -> str:
    constants = {
        "TAG": host.tag, "T": f"/tmp/rlprim-escape-{host.tag}-{name}",
        "D": f"/dev/shm/rlprim-escape-{host.tag}-{name}", "H": host.open_dir,
        "SENTINEL": host.sentinel, "SECRET_FILE": host.secret_file, "UNIX": host.unix_path,
        "PORT": port_owner.tcp.getsockname()[1], "UPORT": port_owner.udp.getsockname()[1],
        "ABSTRACT": f"rlprim-{host.tag}", "VICTIM": victim_pid, "PARENT": parent_pid,
        "MARKER": host.marker, "PREFIX": os.path.realpath(sys.prefix),
    }
    preamble = "".join(f"{key} = {value!r}\n" for key, value in constants.items())
    return preamble + PAYLOADS[name].code + "\n"


def _settings(payload: Payload, audit_guard: bool) -> dict[str, Any]:
    return {"timeout": payload.timeout, "max_processes": MAX_PROCESSES, "max_disk_mb": DISK_MB,
            "audit_guard": audit_guard, **payload.kwargs}


def _check(name: str, host: Host, victim_pid: int, output: str, passwd: str) -> None:
    payload = PAYLOADS[name]
    print(f"[{name}] {output[:300]!r}")  # shown with -s, or on failure
    if payload.settle:
        time.sleep(payload.settle)
    _assert_host_unchanged(host, victim_pid, output, passwd)
    if payload.expect is not None:
        payload.expect(output)


# =========================================================================== the corpus


def test_the_corpus_is_big_enough():
    assert len(PAYLOADS) >= 40


@pytest.mark.parametrize("audit_guard", [True, False], ids=["guard", "bwrap-alone"])
@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_payload_changes_nothing_on_the_host(name, audit_guard, host, victim):
    payload = PAYLOADS[name]
    code = _program(name, host, os.getpid(), victim.pid, host)
    passwd = _digest("/etc/passwd")
    output = python_tool(code, **_settings(payload, audit_guard))
    _check(name, host, victim.pid, output, passwd)


# ------------------------------------------------ the same corpus as an unprivileged user


def _blocked_ancestor(path: str) -> str | None:
    """The highest directory above ``path`` that users other than its owner cannot traverse."""
    current = "/"
    for part in os.path.realpath(path).strip("/").split("/"):
        current = os.path.join(current, part)
        if os.path.isdir(current) and not os.stat(current).st_mode & 0o001:
            return current
    return None


def _as_user_command(uid: int, gid: int, staging: str) -> list[str]:
    """Runs the runner as ``uid``; if this Python sits under a directory only root can cross
    (e.g. /root), a private mount namespace shows that one directory to the user."""
    command = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
               "--inh-caps=-all", sys.executable, "-u", RUNNER]
    python_dir = os.path.realpath(sys.base_prefix)
    blocked = _blocked_ancestor(python_dir)
    if blocked is None:
        return command
    script = ('set -e; mount --bind "$1" "$2"; mount -t tmpfs -o mode=0755 tmpfs "$3"; '
              'mkdir -p "$1"; mount --bind "$2" "$1"; shift 3; exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
            python_dir, staging, blocked, *command]


class _Runner(NamedTuple):
    process: subprocess.Popen
    victim: subprocess.Popen
    uid: int


@pytest.fixture(scope="module")
def unprivileged(tmp_path_factory) -> Iterator[_Runner]:
    if not IS_ROOT:
        pytest.skip("this suite already runs as a non-root user: the corpus above is that path")
    if shutil.which("useradd") is None or shutil.which("setpriv") is None:
        pytest.fail("useradd and setpriv (util-linux) are needed to test the non-root path")
    name = f"rlprim-sbx-{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    "--user-group", name], check=True, timeout=60)
    try:
        account = pwd.getpwnam(name)
        staging = str(tmp_path_factory.mktemp("python-view"))
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8",
               "RLPRIM_TEST_SECRET": os.environ.get("RLPRIM_TEST_SECRET", ""),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        process = subprocess.Popen(
            _as_user_command(account.pw_uid, account.pw_gid, staging), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/", env=env)
        victim_process = _start_victim((account.pw_uid, account.pw_gid))
        try:
            first = process.stdout.readline()
            if not first:
                pytest.fail(f"the runner did not start as {name}: {process.stderr.read()[-3000:]}")
            assert json.loads(first) == {"ready": account.pw_uid}
            yield _Runner(process, victim_process, account.pw_uid)
        finally:
            with contextlib.suppress(BrokenPipeError):
                process.stdin.write("\n")
                process.stdin.close()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _stop(process)
            _stop(victim_process)
    finally:
        subprocess.run(["userdel", name], check=False, timeout=60)


def _run_as_user(runner: _Runner, code: str, settings: dict[str, Any]) -> str:
    runner.process.stdin.write(json.dumps({"code": code, "kwargs": settings}) + "\n")
    runner.process.stdin.flush()
    line = runner.process.stdout.readline()
    assert line, "the unprivileged runner died (did a payload kill it?)"
    reply = json.loads(line)
    assert "raised" not in reply, reply["raised"]
    return reply["output"]


def test_unprivileged_runner_is_a_plain_user_in_a_user_namespace(unprivileged, host):
    code = ("import os\nprint(os.getuid())\nprint(os.readlink('/proc/self/ns/user'))\n"
            "print(open('/proc/self/status').read())")
    output = _run_as_user(unprivileged, code, {"audit_guard": False, "max_output_chars": 10**5})
    uid_line, namespace = output.splitlines()[:2]
    assert int(uid_line) == unprivileged.uid
    assert namespace != os.readlink("/proc/self/ns/user")  # bwrap made a user namespace
    assert "CapEff:\t0000000000000000" in output and "NoNewPrivs:\t1" in output


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_payload_as_unprivileged_user_changes_nothing_on_the_host(name, unprivileged, host):
    payload = PAYLOADS[name]
    code = _program(name, host, unprivileged.process.pid, unprivileged.victim.pid, host)
    passwd = _digest("/etc/passwd")
    output = _run_as_user(unprivileged, code, _settings(payload, audit_guard=False))
    _check(name, host, unprivileged.victim.pid, output, passwd)


# =========================================================================== usefulness


def test_the_sandbox_stays_useful():
    assert python_tool("import numpy as np\nprint(int(np.arange(10).sum()))",
                       site_packages=True, timeout=20.0) == "45\n"
    code = ("import json, math, fractions, tempfile, os\n"
            "with tempfile.TemporaryDirectory() as d:\n"
            "    open(os.path.join(d, 'x'), 'w').write('1')\n"
            "print(json.dumps([math.factorial(5), str(fractions.Fraction(1, 3))]))")
    assert python_tool(code) == '[120, "1/3"]\n'


@pytest.mark.parametrize("name", ["open_tmp", "write_open_dir", "secret_file", "mkfifo_dev_shm"])
def test_the_host_checks_catch_what_the_weaker_fallback_lets_through(name, host, victim):
    # Without bubblewrap and without the guard, these payloads do reach the host: the checks
    # above must see it (else a passing corpus would prove nothing).
    code = _program(name, host, os.getpid(), victim.pid, host)
    passwd = _digest("/etc/passwd")
    with pytest.warns(RuntimeWarning, match="isolation='rlimits'"):
        output = python_tool(code, audit_guard=False, isolation="rlimits")
    with pytest.raises(AssertionError, match="created on the host|directory changed|secret"):
        _assert_host_unchanged(host, victim.pid, output, passwd)
    _remove_escapes(host)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(host.open_dir, "new"))
    _assert_host_unchanged(host, victim.pid, "", passwd)  # clean again for the next test
