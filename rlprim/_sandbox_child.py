"""The python tool's child: sets up limits, drops privileges, installs the guard, runs main.py.

``rlprim.tools`` passes this file's source to ``python -I -B -u [-S] -c SOURCE CONFIG`` inside
the sandbox (under bubblewrap, or directly with ``isolation="rlimits"``), so it must import
nothing but the standard library, and never rlprim: inside the sandbox rlprim is not mounted.
``CONFIG`` is a JSON object (``rlprim.tools._child_config`` writes it):

  uid              drop to this uid/gid after setup (``None``: keep the current one)
  memory_bytes     RLIMIT_AS
  cpu_seconds      RLIMIT_CPU (soft; the hard limit is one second more)
  file_bytes       RLIMIT_FSIZE
  max_processes    RLIMIT_NPROC, or ``None`` to leave it (the kernel counts it per user, so it
                   only bounds the program when its user runs nothing else: a fresh uid, or a
                   fresh user namespace)
  unshare_net      create a network namespace first (root without bubblewrap)
  preload          modules imported before the limits and the guard
  audit_guard      install the audit-hook guard (``install_guard``)
  ready_fd         a pipe to write one byte to once set up (``None``: none), so the parent can
                   tell a sandbox that failed to start from a program that failed
  close_fds        inherited descriptors to close before the program runs (e.g. the one
                   bubblewrap copied main.py from)
  setup_exit, memory_exit   exit statuses that report those failures

Everything the guard relies on is bound to local names when it is installed, so a program
that rebinds builtins or ``os.*`` cannot change it. The module is importable (the parent's
tests call ``lexical_absolute`` and ``under``); it runs only as ``__main__``.
"""

from __future__ import annotations

import json
import os
import posixpath
import resource
import stat
import sys
import traceback

# Opening a file with any of these flags counts as writing it.
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# Files outside the working directory and the Python installation that the guard lets a
# program read (the rest of /proc and /dev are refused).
READABLE_FILES = frozenset([
    "/dev/null", "/dev/zero", "/dev/random", "/dev/urandom", "/etc/localtime",
    "/proc/cpuinfo", "/proc/meminfo", "/proc/self/stat", "/proc/self/statm",
    "/proc/self/status", "/proc/self/limits",
])
# Audit events refused outright, and prefixes of event names refused outright.
REFUSED_EVENTS = frozenset([
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
    "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill", "os.symlink",
    "os.link", "gc.get_referrers", "gc.get_referents", "gc.get_objects", "os.startfile",
])
REFUSED_PREFIXES = ("ctypes.", "socket.")
REFUSED_IMPORTS = frozenset(["ctypes", "_ctypes", "_posixsubprocess"])
# Events whose first argument is a path the program changes.
PATH_WRITES = frozenset([
    "os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.utime",
    "os.truncate", "os.setxattr", "os.removexattr", "os.chflags", "os.lchflags", "os.lchmod",
])


def fail(config: dict, message: str) -> None:
    os.write(2, ("sandbox setup failed: " + message + "\n").encode())
    os._exit(config["setup_exit"])


def limit(which: int, value: int, hard: int | None = None) -> None:
    """``setrlimit`` never above the current hard limit (which an unprivileged user cannot raise)."""
    hard = value if hard is None else hard
    current_hard = resource.getrlimit(which)[1]
    if current_hard != resource.RLIM_INFINITY:
        value, hard = min(value, current_hard), min(hard, current_hard)
    resource.setrlimit(which, (value, hard))


def keep_import_paths_reachable(directory_fds: dict[str, int]) -> None:
    """Rewrites import paths the dropped uid cannot traverse to ``/proc/self/fd/N`` aliases.

    The sandbox uid may not be able to reach the interpreter (e.g. a Python installed under
    /root, mode 0700). A directory fd opened before the drop stays usable through
    /proc/self/fd/N, which the kernel resolves without re-checking the parent directories.
    """
    aliases = {}
    for entry, fd in directory_fds.items():
        if os.access(entry, os.R_OK | os.X_OK):
            os.close(fd)
        else:
            aliases[entry] = f"/proc/self/fd/{fd}"

    def alias(path: str) -> str:
        for entry, replacement in aliases.items():
            if path == entry or path.startswith(entry + "/"):
                return replacement + path[len(entry):]
        return path

    sys.path[:] = [alias(p) if isinstance(p, str) else p for p in sys.path]
    for module in list(sys.modules.values()):
        search = getattr(module, "__path__", None)
        if isinstance(search, list):
            search[:] = [alias(p) if isinstance(p, str) else p for p in search]


def setup(config: dict) -> None:
    """Network namespace (if asked), no-new-privs, preloads, rlimits, uid drop, guard."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if config["unshare_net"]:
            libc.unshare(0x40000000)  # CLONE_NEWNET: a network namespace with no interface up
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: setuid programs gain nothing
    except Exception:  # best effort; bubblewrap sets no-new-privs itself
        pass
    for name in config["preload"]:
        try:
            __import__(name)
        except Exception:
            pass
    for name in ("ctypes", "ctypes._endian", "_ctypes", "_posixsubprocess"):
        sys.modules.pop(name, None)  # re-importing them meets the guard
    uid = config["uid"]
    directory_fds = {}
    try:
        limit(resource.RLIMIT_AS, config["memory_bytes"])
        limit(resource.RLIMIT_CPU, config["cpu_seconds"], config["cpu_seconds"] + 1)
        limit(resource.RLIMIT_FSIZE, config["file_bytes"])
        limit(resource.RLIMIT_NOFILE, 64)
        limit(resource.RLIMIT_CORE, 0)
        if config["max_processes"] is not None:
            limit(resource.RLIMIT_NPROC, config["max_processes"])
        if uid is not None:
            for entry in sys.path:
                if isinstance(entry, str) and posixpath.isabs(entry) and posixpath.isdir(entry):
                    directory_fds[entry] = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            if os.getuid() != uid or os.geteuid() != uid or os.getegid() != uid:
                fail(config, "could not drop privileges")
            keep_import_paths_reachable(directory_fds)
    except (OSError, ValueError) as exc:
        fail(config, repr(exc))
    for fd in config["close_fds"]:
        try:
            os.close(fd)
        except OSError:
            pass
    if config["ready_fd"] is not None:
        try:
            os.write(config["ready_fd"], b"1")
            os.close(config["ready_fd"])
        except OSError as exc:
            fail(config, "cannot report readiness: " + repr(exc))
    if config["audit_guard"]:
        install_guard(os.getcwd())


def lexical_absolute(path: str, cwd: str) -> tuple[str, bool]:
    """``(absolute path, climbed)``: ``path`` made absolute against ``cwd`` without the file
    system (no symlinks resolved); ``climbed`` says a *relative* path used ``..``."""
    relative = not path.startswith("/")
    if relative:
        path = cwd + "/" + path
    parts: list[str] = []
    climbed = False
    for part in path.split("/"):
        if part == "" or part == ".":
            continue
        if part == "..":
            climbed = climbed or relative
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return "/" + "/".join(parts), climbed


def under(path: str, prefixes: tuple[str, ...] | list[str]) -> bool:
    """Whether ``path`` is one of ``prefixes`` or inside one of them (all absolute, normal)."""
    for prefix in prefixes:
        if path == prefix or path.startswith(prefix if prefix == "/" else prefix + "/"):
            return True
    return False


def install_guard(root: str) -> None:
    """The audit-hook guard: the second layer, never the boundary (see ``python_tool``).

    Refuses with PermissionError: writes outside ``root`` (lexical check; relative paths with
    ``..`` refused because audit events do not report ``dir_fd``), reads outside ``root`` and
    the Python installation, opening a directory outside ``root``, fork/exec/spawn/kill,
    sockets, symlinks and hard links, ctypes, and gc object walking.
    """
    _str, _bytes, _int, _type = str, bytes, int, type
    _fspath, _getcwd, _stat, _isdir = os.fspath, os.getcwd, os.stat, stat.S_ISDIR
    _PermissionError, _ImportError, _OSError = PermissionError, ImportError, OSError
    _decode, _startswith = _bytes.decode, _str.startswith
    _getitem, _whole = _str.__getitem__, slice(None)
    _lexical, _under = lexical_absolute, under
    write_flags, readable_files = WRITE_FLAGS, READABLE_FILES
    refused, refused_prefixes = REFUSED_EVENTS, REFUSED_PREFIXES
    refused_imports, path_writes = REFUSED_IMPORTS, PATH_WRITES
    readable = {root}
    for entry in [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sys.path]:
        if isinstance(entry, str) and posixpath.isabs(entry):
            readable.add(posixpath.normpath(entry))
    readable = tuple(sorted(readable))
    roots = (root,)

    def deny(what: str, why: str = "") -> None:
        raise _PermissionError("python_tool sandbox: " + what + " is not allowed" + why)

    def absolute(event: str, path: object) -> str:
        kind = _type(path)
        if kind is not _str and kind is not _bytes:
            path = _fspath(path)
            kind = _type(path)
        if kind is not _str:
            path = _decode(path, "utf-8", "surrogateescape")
        else:
            path = _getitem(path, _whole)  # a plain str copy: a subclass cannot lie later
        full, climbed = _lexical(path, _getcwd())
        if climbed:
            deny(event + " a relative path with '..'")
        return full

    def check_write(event: str, path: object) -> None:
        if _type(path) is _int:
            if event == "os.truncate":
                return
            deny(event + " on a file descriptor")
        full = absolute(event, path)
        if not _under(full, roots):
            deny(event + " " + repr(full), " (outside the working directory)")

    def check_read(event: str, path: object) -> None:
        full = absolute(event, path)
        if _under(full, roots):
            return
        if full not in readable_files and not _under(full, readable):
            deny(event + " " + repr(full), " (only the working directory and the Python "
                 "installation are readable)")
        if event == "reading":
            try:
                is_dir = _isdir(_stat(full).st_mode)
            except _OSError:
                return
            if is_dir:  # a directory fd outside would allow *at() calls relative to it
                deny("opening the directory " + repr(full))

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, flags = args[0], args[2]
            if _type(path) is _int:
                return
            if flags is not None and flags & write_flags:
                check_write("writing", path)
            else:
                check_read("reading", path)
        elif event in refused or _startswith(event, refused_prefixes):
            deny(event)
        elif event in path_writes:
            check_write(event, args[0])
        elif event == "os.rename":
            check_write(event, args[0])
            check_write(event, args[1])
        elif event == "os.listdir" or event == "os.scandir":
            path = args[0]
            if _type(path) is not _int:
                check_read("listing", "." if path is None else path)
        elif event == "import":
            name = args[0]
            if _type(name) is _str and (name in refused_imports or _startswith(name, "ctypes.")):
                raise _ImportError("python_tool sandbox: importing " + name + " is not allowed")

    sys.addaudithook(hook)


def run(config: dict) -> None:
    """Compiles and runs ./main.py as ``__main__``; a traceback without this file's frames."""
    try:
        with open("main.py", "rb") as handle:
            source = handle.read()
        code = compile(source, "main.py", "exec", dont_inherit=True)
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit:
        raise
    except MemoryError:
        os.write(2, b"MemoryError\n")
        os._exit(config["memory_exit"])
    except BaseException as exc:
        report = traceback.TracebackException(type(exc), exc, exc.__traceback__)
        for part in report.format(chain=True):
            if '  File "<string>"' not in part:  # this bootstrap's own frames
                sys.stderr.write(part)
        sys.stderr.flush()
        os._exit(1)


def main(argv: list[str]) -> None:
    config = json.loads(argv[1])
    sys.argv = ["main.py"]
    setup(config)
    run(config)


if __name__ == "__main__":
    main(sys.argv)
