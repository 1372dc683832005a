"""The repository's docker-compose.yml as a Compose project under test.

Everything is read from the real files, so the test follows them as they
change: the services, which of them are built and from which base images
(the Dockerfiles' `ARG *_IMAGE=` defaults), the ports and metrics
addresses. The only addition is a generated override with what a build on
these machines needs: host networking (no NAT here) and, when a copy of
CRS lies beside the checkout, a local mirror of it with its own checksum.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import json
import pathlib
import re
import tarfile
import threading
import time
from dataclasses import dataclass

import yaml

from tests.compose.engine import COMPOSE, client_env, docker, inspect, run

ROOT = pathlib.Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
NUMBER_LABEL = "com.docker.compose.container-number"
# The parts of a CRS release tree that its -minimal tarball carries.
CRS_PARTS = ("LICENSE", "crs-setup.conf.example", "rules", "plugins")


def compose_file() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def base_images(services: dict) -> dict[str, str]:
    """service -> the image it starts from: its own `image:` when it is not
    built, else the Dockerfile's default base (`ARG X_IMAGE=...`)."""
    out = {}
    for name, service in services.items():
        build = service.get("build")
        if not build:
            out[name] = service["image"]
            continue
        dockerfile = ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
        bases = re.findall(r"^ARG \w+_IMAGE=(\S+)$", dockerfile.read_text(), re.M)
        assert len(bases) == 1, f"{dockerfile}: expected one ARG *_IMAGE= default, found {bases}"
        out[name] = bases[0]
    return out


# ------------------------------------------------------------- CRS mirror --

def local_crs(version: str) -> pathlib.Path | None:
    """The CRS release beside the checkout (../shared; two levels up from a worktree)."""
    for base in (ROOT.parent, ROOT.parent.parent):
        candidate = base / "shared" / "crs" / f"v{version}"
        if candidate.is_dir():
            return candidate
    return None


def crs_tarball(source: pathlib.Path, version: str, dest_dir: pathlib.Path) -> tuple[pathlib.Path, str]:
    """A -minimal style tarball (one top directory) of a CRS tree, byte for
    byte the same on every run; returns it and its sha256."""
    top = f"coreruleset-{version}"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        paths = [source / part for part in CRS_PARTS if (source / part).exists()]
        for path in sorted(p for root in paths for p in [root, *root.rglob("*")]):
            if not (path.is_file() or path.is_dir()) or path.is_symlink():
                continue
            info = tar.gettarinfo(str(path), f"{top}/{path.relative_to(source)}")
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            info.mode = 0o755 if path.is_dir() else 0o644
            if path.is_file():
                with open(path, "rb") as fh:
                    tar.addfile(info, fh)
            else:
                tar.addfile(info)
    data = gzip.compress(buf.getvalue(), mtime=0)
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / f"{top}-minimal.tar.gz"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


class Mirror:
    """Serves one directory on 127.0.0.1; builds reach it over the host network."""

    def __init__(self, directory: pathlib.Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


# -------------------------------------------------------------- the project --

@dataclass(frozen=True)
class Container:
    id: str
    service: str
    number: int
    running: bool
    pid: int
    ip: str
    network: str
    restarts: int
    started_at: str
    health: str


class Project:
    """`ports`: the Compose variables of the host ports (HTTP_PORT...), so the
    test runs beside anything that holds the defaults. `runnable`: the
    services this run starts (those whose images could be had)."""

    def __init__(self, name: str, work_dir: pathlib.Path, ports: dict[str, int], runnable: list[str]) -> None:
        self.name = name
        self.work_dir = work_dir
        self.ports = dict(ports)
        self.runnable = list(runnable)
        self.env = {variable: str(port) for variable, port in ports.items()}
        self.services = compose_file()["services"]
        self.override = work_dir / "docker-compose.test.yml"

    # -- the build override ------------------------------------------------
    def write_override(self, build_args: dict[str, str]) -> dict:
        """Host networking for every build; the CRS mirror for the builds
        that take CRS_VERSION."""
        services = {}
        for name, service in self.services.items():
            if "build" not in service:
                continue
            build = {"network": "host"}
            if "CRS_VERSION" in (service["build"].get("args") or {}):
                build["args"] = build_args
            services[name] = {"build": build}
        override = {"services": services}
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.override.write_text(yaml.safe_dump(override, sort_keys=True))
        return override

    # -- docker-compose ----------------------------------------------------
    def compose(self, *args: str, timeout: float = 300) -> str:
        argv = [COMPOSE, "--ansi", "never", "-p", self.name, "-f", str(COMPOSE_FILE), "-f", str(self.override), *args]
        return run(argv, timeout=timeout, env=client_env(self.env), cwd=ROOT)

    def containers(self, service: str | None = None) -> list[Container]:
        filters = ["--filter", f"label={PROJECT_LABEL}={self.name}"]
        if service:
            filters += ["--filter", f"label={SERVICE_LABEL}={service}"]
        ids = docker("ps", "-aq", "--no-trunc", *filters).split()
        found = [c for c in (self.container(i) for i in ids) if c is not None]
        return sorted(found, key=lambda c: (c.service, c.number))

    def container(self, container_id: str) -> Container | None:
        data = inspect("container", container_id)
        if data is None:
            return None
        labels, state = data["Config"]["Labels"], data["State"]
        networks = [(name, n["IPAddress"]) for name, n in data["NetworkSettings"]["Networks"].items()
                    if n["IPAddress"]]
        return Container(id=data["Id"], service=labels[SERVICE_LABEL], number=int(labels[NUMBER_LABEL]),
                         running=state["Running"], pid=state["Pid"], ip=networks[0][1] if networks else "",
                         network=networks[0][0] if networks else "",
                         restarts=data["RestartCount"], started_at=state["StartedAt"],
                         health=(state.get("Health") or {}).get("Status", ""))

    def placeholder(self, network: str) -> str:
        """A container that only holds an address on `network`. Labelled as
        part of the project, so `down --remove-orphans` removes it too."""
        image = next(s["image"] for s in self.services.values() if "build" in s)
        return docker("run", "-d", "--network", network, "--label", f"{PROJECT_LABEL}={self.name}",
                      "--label", f"{SERVICE_LABEL}=address-placeholder", "--label", f"{NUMBER_LABEL}=1",
                      "--label", "com.docker.compose.oneoff=False", "--entrypoint", "sleep", image, "600").split()[-1]

    def remove(self, container_id: str) -> None:
        docker("rm", "-f", container_id)

    def networks(self) -> list[str]:
        return docker("network", "ls", "-q", "--filter", f"label={PROJECT_LABEL}={self.name}").split()

    def exec_python(self, container: Container, code: str, timeout: float = 30) -> str:
        return docker("exec", container.id, "python", "-c", code, timeout=timeout)

    def scrape(self, container: Container, address: str) -> str:
        """/metrics of a container, fetched from inside it (the metrics
        ports are not published)."""
        port = address.rsplit(":", 1)[1]
        return self.exec_python(container, "import urllib.request; print(urllib.request.urlopen("
                                           f"'http://127.0.0.1:{port}/metrics', timeout=5).read().decode())")

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--timestamps", timeout=120)

    def down(self) -> str:
        return self.compose("down", "--volumes", "--remove-orphans", "--timeout", "20", timeout=300)


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def prometheus_json(port: int, path: str) -> dict:
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return json.loads(resp.read())
