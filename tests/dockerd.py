"""Session fixtures for a real Docker engine and small local images built without any registry.

`docker_engine` uses a running engine (DOCKER_HOST, then /var/run/docker.sock) or starts `dockerd` as root
with its own data and exec roots under /tmp and its own socket, exported as DOCKER_HOST for the session.
Sessions share that daemon through a lock file; the last one out stops it
(DSTACK_TEST_KEEP_DOCKERD=1 keeps it).
Images are `docker import`s of root filesystems made from this host's own binaries, so nothing is pulled:
`busybox_image` (static busybox, plus bash when the host has it) and `python_image` (this interpreter and its
standard library, no site-packages). Both are rebuilt only when their inputs change.
"""

from __future__ import annotations

import fcntl
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import docker

STATE_DIR = Path(os.environ.get("DSTACK_TEST_DOCKERD_DIR", "/tmp/dstack-test-dockerd"))
OWN_SOCKET = f"unix://{STATE_DIR}/docker.sock"
SYSTEM_SOCKET = "unix:///var/run/docker.sock"
BUSYBOX_IMAGE = "dstack-test/busybox:latest"
PYTHON_IMAGE = "dstack-test/python:latest"
ML_IMAGE = "dstack-test/python-ml:latest"
# what the digits example imports: the image gets every site-packages module these load
ML_IMPORTS = "numpy, sklearn.datasets, sklearn.linear_model, sklearn.metrics, sklearn.model_selection"
START_TIMEOUT_S = 60.0
IMAGE_FORMAT = "2"  # bump to force rebuilding the test images
KEY_LABEL = "dstack.test.key"


class EngineUnavailable(Exception):
    """dockerd is not running here and could not be started."""


def _answers(url: str) -> bool:
    """Whether an engine answers `GET /_ping` at `url` (a raw socket: docker-py leaks one on failure)."""
    import socket

    if url.startswith("unix://"):
        family, address = socket.AF_UNIX, url[len("unix://") :]
        if not os.path.exists(address):
            return False
    elif url.startswith(("tcp://", "http://")):
        host, _, port = url.split("://", 1)[1].rstrip("/").rpartition(":")
        family, address = socket.AF_INET, (host, int(port))  # type: ignore[assignment]
    else:
        return False
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(address)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return sock.recv(64).startswith((b"HTTP/1.0 200", b"HTTP/1.1 200"))
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _log_tail(log: Path, lines: int = 6) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def _start_dockerd() -> None:
    """Start our own dockerd on OWN_SOCKET (detached) and wait until it answers, or EngineUnavailable."""
    if os.geteuid() != 0:
        raise EngineUnavailable("no Docker engine running and starting dockerd needs root")
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise EngineUnavailable(
            "no Docker engine running and no `dockerd` on PATH (apt-get install docker.io)"
        )
    pidfile = STATE_DIR / "dockerd.pid"
    log = STATE_DIR / "dockerd.log"
    reasons = []
    deadline = time.monotonic() + START_TIMEOUT_S
    # Full networking first; a sandbox without iptables/bridges gets a daemon with networking off.
    for extra in ([], ["--iptables=false", "--ip6tables=false", "--bridge=none"]):
        old = _read_pid(pidfile)
        if old is not None and not _pid_alive(old):
            pidfile.unlink(missing_ok=True)
        argv = [
            dockerd,
            f"--data-root={STATE_DIR}/data",
            f"--exec-root={STATE_DIR}/exec",
            f"--pidfile={pidfile}",
            f"-H={OWN_SOCKET}",
            *extra,
        ]
        with open(log, "ab") as out:
            out.write(f"\n=== {time.ctime()} {' '.join(argv)}\n".encode())
            out.flush()
            # Detached in its own session: it may outlive this pytest (another session may still use it).
            proc = subprocess.Popen(
                ["sh", "-c", '"$@" </dev/null >&2 & echo $!', "sh", *argv],
                stdout=subprocess.PIPE,
                stderr=out,
                start_new_session=True,
            )
            pid_text, _ = proc.communicate(timeout=10)
        pid = int(pid_text.strip() or 0)
        while time.monotonic() < deadline:
            if _answers(OWN_SOCKET):
                return
            if not _pid_alive(pid):
                break
            time.sleep(0.2)
        else:
            if pid and _pid_alive(pid):
                os.kill(pid, signal.SIGTERM)
            raise EngineUnavailable(f"dockerd did not answer within {START_TIMEOUT_S:.0f}s: {_log_tail(log)}")
        reasons.append(f"dockerd {' '.join(extra) or '(default flags)'} exited: {_log_tail(log, 3)}")
    raise EngineUnavailable("; ".join(reasons) + f" (full log: {log})")


def _stop_own_dockerd() -> None:
    """Stop the dockerd this module started (by its pidfile), waiting up to 20 s."""
    pid = _read_pid(STATE_DIR / "dockerd.pid")
    if pid is None or not _pid_alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _pid_alive(pid):
        time.sleep(0.1)
    if _pid_alive(pid):
        os.kill(pid, signal.SIGKILL)


def _unavailable(reason: str) -> None:
    """Skip here; in CI (CI=true), where docker.io is installed, fail instead: CI skips nothing."""
    message = f"Docker engine unavailable: {reason}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[docker.DockerClient]:
    """A docker client on a running engine; DOCKER_HOST points at it for the whole session."""
    import docker

    old_host = os.environ.get("DOCKER_HOST")
    users = None
    url = None
    for candidate in (old_host, SYSTEM_SOCKET, OWN_SOCKET):
        if candidate and _answers(candidate):
            url = candidate
            break
    if url is None or url == OWN_SOCKET:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        users = open(STATE_DIR / "users.lock", "a")  # noqa: SIM115  (held for the session)
        fcntl.flock(users, fcntl.LOCK_SH)
        with open(STATE_DIR / "start.lock", "a") as start_lock:
            fcntl.flock(start_lock, fcntl.LOCK_EX)
            try:
                if not _answers(OWN_SOCKET):
                    _start_dockerd()
            except EngineUnavailable as e:
                users.close()
                _unavailable(str(e))
        url = OWN_SOCKET
    os.environ["DOCKER_HOST"] = url
    client = docker.DockerClient(base_url=url, timeout=120)
    try:
        yield client
    finally:
        client.close()
        if old_host is None:
            os.environ.pop("DOCKER_HOST", None)
        else:
            os.environ["DOCKER_HOST"] = old_host
        if users is not None:
            with open(STATE_DIR / "start.lock", "a") as start_lock:
                fcntl.flock(start_lock, fcntl.LOCK_EX)  # no session starts or joins while we decide
                try:
                    fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pass  # another session still uses the daemon
                else:
                    if not os.environ.get("DSTACK_TEST_KEEP_DOCKERD"):
                        _stop_own_dockerd()
                users.close()


# --- root filesystems made from this host's files -------------------------------------------------


class RootFs:
    """A root filesystem being assembled: absolute paths in the image mapped to host files, links, dirs."""

    def __init__(self) -> None:
        self.files: dict[str, Path] = {}
        self.links: dict[str, str] = {}
        self.dirs: dict[str, int] = {"/tmp": 0o1777, "/root": 0o755}
        self.texts: dict[str, str] = {
            "/etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
            "/etc/group": "root:x:0:\nnogroup:x:65534:\n",
        }
        for d in ("/bin", "/dev", "/etc", "/proc", "/sys", "/usr/bin", "/usr/local/bin"):
            self.dirs[d] = 0o755

    def add_file(self, src: Path, dest: str | None = None) -> None:
        """Copy a host file (following links) to `dest` (default: the same path)."""
        self.files[dest or str(src)] = src

    def add_binary(self, path: Path) -> None:
        """Copy an executable or shared object and every library `ldd` says it loads."""
        self.add_file(path)
        for lib in _shared_libraries(path):
            self.add_file(lib)

    def add_link(self, dest: str, target: str) -> None:
        self.links[dest] = target

    def digest_material(self) -> str:
        """What decides the image's contents: paths with sizes and mtimes of every source."""
        parts = [IMAGE_FORMAT]
        for dest, src in sorted(self.files.items()):
            st = src.stat()
            parts.append(f"{dest}={src}:{st.st_size}:{int(st.st_mtime)}")
        parts += [f"{d}->{t}" for d, t in sorted(self.links.items())]
        parts += [f"{p}:{len(t)}" for p, t in sorted(self.texts.items())]
        parts += [f"{d}:{oct(mode)}" for d, mode in sorted(self.dirs.items())]
        return "\n".join(parts)

    def write_tar(self, out: Path) -> None:
        """Write the filesystem as an uncompressed tar for `docker import`."""
        entries: set[str] = set(self.files) | set(self.links) | set(self.texts)
        dirs = dict(self.dirs)
        for path in entries | set(self.dirs):
            parent = os.path.dirname(path)
            while parent not in ("/", ""):
                dirs.setdefault(parent, 0o755)
                parent = os.path.dirname(parent)
        with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
            for d in sorted(dirs):
                info = tarfile.TarInfo(d.lstrip("/"))
                info.type = tarfile.DIRTYPE
                info.mode = dirs[d]
                tar.addfile(info)
            for dest, src in sorted(self.files.items()):
                if dest in self.links:
                    continue
                st = src.stat()
                info = tarfile.TarInfo(dest.lstrip("/"))
                info.size = st.st_size
                info.mode = st.st_mode & 0o7777
                info.mtime = int(st.st_mtime)
                with open(src, "rb") as f:
                    tar.addfile(info, f)
            for dest, target in sorted(self.links.items()):
                info = tarfile.TarInfo(dest.lstrip("/"))
                info.type = tarfile.SYMTYPE
                info.linkname = target
                tar.addfile(info)
            for dest, text in sorted(self.texts.items()):
                data = text.encode()
                info = tarfile.TarInfo(dest.lstrip("/"))
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))


_LDD_LINE = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x[0-9a-f]+\)")


def _shared_libraries(path: Path) -> list[Path]:
    """The shared libraries `ldd` lists for `path` (none for a static binary)."""
    proc = subprocess.run(["ldd", str(path)], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return []  # "not a dynamic executable"
    return [Path(m.group(1)) for m in map(_LDD_LINE.search, proc.stdout.splitlines()) if m]


def _add_busybox(fs: RootFs, with_bash: bool = True) -> None:
    """Static busybox with its applets in /bin, and bash (+ libraries) as /bin/bash when the host has it."""
    busybox = shutil.which("busybox")
    if busybox is None or _shared_libraries(Path(busybox)):
        raise EngineUnavailable("no static busybox on this host (apt-get install busybox-static)")
    fs.add_file(Path(busybox), "/bin/busybox")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, timeout=10, check=True)
    for applet in applets.stdout.split():
        if applet not in ("busybox", "bash"):
            fs.add_link(f"/bin/{applet}", "busybox")
    bash = shutil.which("bash")
    if with_bash and bash:
        real = Path(os.path.realpath(bash))
        fs.add_binary(real)
        fs.add_file(real, "/bin/bash")
        fs.links.pop("/bin/bash", None)


_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "idlelib", "tkinter", "turtledemo", "lib2to3"}


def _add_python(fs: RootFs) -> str:
    """This interpreter and its standard library at their host paths; returns the interpreter's path."""
    exe = Path(os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable))
    fs.add_binary(exe)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for dirpath, dirnames, filenames in os.walk(stdlib):
        if Path(dirpath) == stdlib:
            dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP and not d.startswith("config-")]
        for name in filenames:
            if ".opt-" in name:
                continue
            path = Path(dirpath) / name
            fs.add_file(path)
            if name.endswith(".so"):
                for lib in _shared_libraries(path):
                    fs.add_file(lib)
    for name in ("python3", "python"):
        if f"/usr/local/bin/{name}" != str(exe):
            fs.add_link(f"/usr/local/bin/{name}", str(exe))
    return str(exe)


def _import_image(client: docker.DockerClient, fs: RootFs, tag: str, changes: list[str]) -> str:
    """`docker import` the filesystem as `tag` unless an image with the same inputs is already there."""
    import hashlib

    import docker

    key = hashlib.sha256("\n".join([fs.digest_material(), *changes]).encode()).hexdigest()[:32]
    try:
        if client.images.get(tag).labels.get(KEY_LABEL) == key:
            return tag
    except docker.errors.ImageNotFound:
        pass
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    tar_path = STATE_DIR / f"rootfs-{os.getpid()}-{key}.tar"
    try:
        fs.write_tar(tar_path)
        repository, _, version = tag.partition(":")
        client.api.import_image_from_file(
            str(tar_path),
            repository=repository,
            tag=version or "latest",
            changes=[*changes, f"LABEL {KEY_LABEL}={key}"],
        )
    finally:
        tar_path.unlink(missing_ok=True)
    if client.images.get(tag).labels.get(KEY_LABEL) != key:
        raise EngineUnavailable(f"`docker import` did not produce {tag}")
    return tag


_BASE_CHANGES = [
    "ENV PATH=/usr/local/bin:/usr/bin:/bin",
    "ENV LANG=C.UTF-8",
    "WORKDIR /root",
    'CMD ["/bin/sh"]',
]


@pytest.fixture(scope="session")
def busybox_image(docker_engine: docker.DockerClient) -> str:
    """Tag of a local image with static busybox (all applets, `sh`) and bash, imported from this host."""
    fs = RootFs()
    try:
        _add_busybox(fs)
        return _import_image(docker_engine, fs, BUSYBOX_IMAGE, _BASE_CHANGES)
    except EngineUnavailable as e:
        _unavailable(str(e))
        raise


@pytest.fixture(scope="session")
def python_image(docker_engine: docker.DockerClient) -> str:
    """Tag of a local image with this host's Python (stdlib only: no pip packages) as `python`/`python3`,
    plus busybox and bash."""
    fs = RootFs()
    try:
        _add_busybox(fs)
        fs.links["/bin/sh"] = "bash" if "/bin/bash" in fs.files else "busybox"
        _add_python(fs)
        return _import_image(docker_engine, fs, PYTHON_IMAGE, _BASE_CHANGES)
    except EngineUnavailable as e:
        _unavailable(str(e))
        raise


def _site_modules(imports: str) -> list[tuple[str, str]]:
    """(site folder, top-level entry) for each package, module or bundled `.libs` that `import …` loads
    in this interpreter: from every site-packages folder on its sys.path, a virtualenv's included."""
    probe = (
        f"import sys, os; import {imports}\n"
        "sites = [p for p in sys.path if os.path.basename(p) in ('site-packages', 'dist-packages')"
        " and os.path.isdir(p)]\n"
        "found = set()\n"
        "for m in list(sys.modules.values()):\n"
        "    f = getattr(m, '__file__', None) or ''\n"
        "    for site in sites:\n"
        "        if f.startswith(site + os.sep):\n"
        "            found.add((site, f[len(site) + 1:].split(os.sep)[0]))\n"
        "            break\n"
        "for site in sites:\n"
        "    found |= {(site, n) for n in os.listdir(site) if n.endswith('.libs')}\n"
        "print('\\n'.join(sorted(site + '\\t' + name for site, name in found)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise EngineUnavailable(f"this Python can't import {imports}: {proc.stderr.strip()[-200:]}")
    return [(site, name) for site, _, name in (row.partition("\t") for row in proc.stdout.splitlines())]


def _add_site_packages(fs: RootFs, entries: list[tuple[str, str]]) -> None:
    """Packages from this interpreter's site folders at their host paths (and the system libraries their
    extensions need), on the image's Python path through a `.pth` file in the base interpreter's own
    site-packages (the image runs the base interpreter, not a virtualenv's)."""
    for site_dir, name in entries:
        site = Path(site_dir)
        root = site / name
        if root.is_file():
            fs.add_file(root)
            continue
        if not root.is_dir():
            if name.endswith(".libs"):
                continue  # not every wheel bundles libraries
            raise EngineUnavailable(f"{name} is not installed here (pip install scikit-learn)")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in ("tests", "__pycache__")]
            for filename in filenames:
                path = Path(dirpath) / filename
                fs.add_file(path)
                if ".so" in filename:
                    for lib in _shared_libraries(path):
                        if not str(lib).startswith(str(site)):
                            fs.add_file(lib)
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}
    base_site = sysconfig.get_paths(vars=base)["purelib"]
    sites = sorted({site for site, _ in entries})
    fs.texts[str(Path(base_site) / "dstack-test-ml.pth")] = "".join(f"{s}\n" for s in sites)


@pytest.fixture(scope="session")
def ml_image(docker_engine: docker.DockerClient) -> str:
    """Tag of a local image with this host's Python plus numpy, scipy and scikit-learn (for the digits
    example in a container), built from this host's own files: nothing is pulled."""
    fs = RootFs()
    try:
        _add_busybox(fs)
        fs.links["/bin/sh"] = "bash" if "/bin/bash" in fs.files else "busybox"
        _add_python(fs)
        _add_site_packages(fs, _site_modules(ML_IMPORTS))
        return _import_image(docker_engine, fs, ML_IMAGE, _BASE_CHANGES)
    except EngineUnavailable as e:
        _unavailable(str(e))
        raise
