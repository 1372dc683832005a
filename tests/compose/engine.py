"""A Docker engine for the Compose test: the one already running, or Debian's
dockerd started here and stopped again afterwards.

Debian's clients are called by their full paths: another `docker` may come
first on PATH, and docker-compose 1.29 runs the first `docker` it finds for
builds, so its PATH starts with /usr/bin (../shared/FACTS.md, "Docker on
these machines").
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import time

DOCKER = "/usr/bin/docker"
COMPOSE = "/usr/bin/docker-compose"
DOCKERD = "/usr/sbin/dockerd"
# docker-compose's own PATH: Debian's docker first.
CLIENT_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"
# No NAT on these machines: containers reach nothing outside, builds use
# the host's network instead.
DOCKERD_ARGS = ("--iptables=false", "--ip6tables=false")


class DockerError(Exception):
    """A docker command failed; carries its command line and output."""

    def __init__(self, argv: list[str], returncode: int, output: str) -> None:
        super().__init__(f"{' '.join(argv)} exited {returncode}:\n{output[-4000:]}")
        self.argv, self.returncode, self.output = argv, returncode, output


def client_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    env["PATH"] = CLIENT_PATH
    return {**env, **(extra or {})}


def run(argv: list[str], timeout: float = 120, env: dict[str, str] | None = None, check: bool = True,
        cwd: pathlib.Path | None = None) -> str:
    """Runs a client command; returns stdout and stderr together."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env or client_env(),
                          cwd=cwd)
    output = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise DockerError(argv, proc.returncode, output)
    return output


def docker(*args: str, timeout: float = 120, check: bool = True) -> str:
    return run([DOCKER, *args], timeout=timeout, check=check)


def inspect(kind: str, name: str) -> dict | None:
    """`docker <kind> inspect`, or None when there is no such object."""
    proc = subprocess.run([DOCKER, kind, "inspect", name], capture_output=True, text=True, timeout=60,
                          env=client_env())
    return json.loads(proc.stdout)[0] if proc.returncode == 0 else None


def answering() -> bool:
    try:
        return subprocess.run([DOCKER, "version"], capture_output=True, timeout=20,
                              env=client_env()).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class Engine:
    """Uses a running engine, or starts dockerd and stops it in stop()."""

    def __init__(self, log_dir: pathlib.Path) -> None:
        self.log_dir = log_dir
        self.proc: subprocess.Popen | None = None

    @property
    def started_here(self) -> bool:
        return self.proc is not None

    def start(self, timeout: float = 90) -> "Engine":
        for binary in (DOCKER, COMPOSE, DOCKERD):
            if not os.access(binary, os.X_OK):
                raise DockerError([binary], -1, "missing: make test-compose installs docker.io and docker-compose")
        if answering():
            return self
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / "dockerd.log", "ab") as log:
            self.proc = subprocess.Popen([DOCKERD, *DOCKERD_ARGS], stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while not answering():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (self.log_dir / "dockerd.log").read_text(errors="replace")[-3000:]
                raise DockerError([DOCKERD, *DOCKERD_ARGS], -1, f"the engine did not come up:\n{tail}")
            time.sleep(0.5)
        return self

    def stop(self, timeout: float = 60) -> None:
        """Stops the engine this object started (and its containerd)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
