"""Local stand-ins for the official base images, for hosts that cannot pull
them (no registry is reachable on these machines).

A stand-in has the official image's name and tag and does the same job,
built from Debian: a minimal bookworm made with debootstrap and imported,
then one recipe per image in tests/compose/standins/. Each carries the
label io.modsec-spoa.stand-in (what it is) and the sha256 of its recipe, so
the test can say plainly that it used stand-ins, and rebuilds one whose
recipe changed. Caches: the debootstrap tarball under .tools/compose/, the
images in the engine's own image store.

    python -m tests.compose.standins python:3.11-slim-bookworm haproxy:3.2
"""

from __future__ import annotations

import enum
import hashlib
import pathlib
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from tests.compose.engine import DockerError, docker, inspect

ROOT = pathlib.Path(__file__).resolve().parents[2]
RECIPES = pathlib.Path(__file__).resolve().parent / "standins"
CACHE = ROOT / ".tools" / "compose"
BASE_IMAGE = "modsec-spoa-standin/debian:bookworm"
MIRROR = "http://deb.debian.org/debian"
LABEL = "io.modsec-spoa.stand-in"
RECIPE_LABEL = "io.modsec-spoa.stand-in.recipe"
HOST_CA_BUNDLE = pathlib.Path("/etc/ssl/certs/ca-certificates.crt")


@dataclass(frozen=True)
class Recipe:
    dockerfile: str
    what: str                                    # said in the test's output
    files: tuple[tuple[pathlib.Path, str], ...]  # (source, name in the build context)


RECIPE_BY_REPOSITORY = {
    "python": Recipe("python.Dockerfile", "Debian bookworm's python3 3.11 with venv and pip",
                     ((HOST_CA_BUNDLE, "ca-certificates.crt"),)),
    "haproxy": Recipe("haproxy.Dockerfile", "Debian forky's HAProxy 3.2 via scripts/fetch-haproxy32.sh",
                      ((ROOT / "scripts" / "fetch-haproxy32.sh", "fetch-haproxy32.sh"),
                       (RECIPES / "haproxy-entrypoint.sh", "haproxy-entrypoint.sh"))),
    "prom/prometheus": Recipe("prometheus.Dockerfile", "Debian bookworm's prometheus 2.42", ()),
}


class Source(enum.Enum):
    LOCAL = "already in the engine"
    PULLED = "pulled"
    STAND_IN_CACHED = "stand-in, cached"
    STAND_IN_BUILT = "stand-in, built now"
    UNAVAILABLE = "not pullable, and no stand-in recipe"


@dataclass(frozen=True)
class BaseImage:
    name: str
    source: Source
    what: str = ""

    @property
    def stand_in(self) -> bool:
        return self.source in (Source.STAND_IN_CACHED, Source.STAND_IN_BUILT)


def repository(name: str) -> str:
    return name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name


def recipe_digest(recipe: Recipe) -> str:
    digest = hashlib.sha256((RECIPES / recipe.dockerfile).read_bytes())
    for source, name in recipe.files:
        digest.update(name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()


def ensure(name: str, log=print, pull_timeout: float = 60) -> BaseImage:
    """Makes image `name` available: as it is, pulled, or as a stand-in."""
    recipe = RECIPE_BY_REPOSITORY.get(repository(name))
    found = inspect("image", name)
    if found is not None:
        labels = found["Config"].get("Labels") or {}
        if LABEL not in labels:
            return BaseImage(name, Source.LOCAL)
        if recipe is not None and labels.get(RECIPE_LABEL) == recipe_digest(recipe):
            return BaseImage(name, Source.STAND_IN_CACHED, labels[LABEL])
        log(f"stand-in {name}: its recipe changed, rebuilding")
    else:
        try:
            docker("pull", "-q", name, timeout=pull_timeout)
            return BaseImage(name, Source.PULLED)
        except (DockerError, subprocess.TimeoutExpired):
            pass
    if recipe is None:
        return BaseImage(name, Source.UNAVAILABLE)
    log(f"{name} cannot be pulled: building a stand-in ({recipe.what})")
    build(name, recipe)
    return BaseImage(name, Source.STAND_IN_BUILT, recipe.what)


def build(name: str, recipe: Recipe) -> None:
    ensure_base()
    with tempfile.TemporaryDirectory(prefix="standin-") as context:
        ctx = pathlib.Path(context)
        shutil.copy(RECIPES / recipe.dockerfile, ctx / "Dockerfile")
        for source, target in recipe.files:
            shutil.copy(source, ctx / target)
        docker("build", "-q", "--network", "host", "--build-arg", f"BASE={BASE_IMAGE}",
               "--label", f"{LABEL}={recipe.what}", "--label", f"{RECIPE_LABEL}={recipe_digest(recipe)}",
               "-t", name, str(ctx), timeout=900)


def ensure_base() -> None:
    """A minimal Debian bookworm, imported from a debootstrap tarball that
    is made once and kept under .tools/compose/."""
    if inspect("image", BASE_IMAGE) is not None:
        return
    tarball = CACHE / "debian-bookworm-minbase.tar.gz"
    if not tarball.exists():
        debootstrap(tarball)
    docker("import", str(tarball), BASE_IMAGE, timeout=300)


def debootstrap(tarball: pathlib.Path) -> None:
    if shutil.which("debootstrap") is None:
        raise DockerError(["debootstrap"], -1, "debootstrap is missing: make test-compose installs it")
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="debootstrap-", dir=tarball.parent) as scratch:
        rootfs = pathlib.Path(scratch) / "rootfs"
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), MIRROR],
                       check=True, capture_output=True, timeout=600)
        # As Docker's official Debian images: package installs start no services.
        policy = rootfs / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        for leftovers in ("var/lib/apt/lists", "var/cache/apt/archives"):
            for item in (rootfs / leftovers).glob("*"):
                if item.is_file():
                    item.unlink()
        partial = tarball.with_suffix(".partial")
        subprocess.run(["tar", "-C", str(rootfs), "-czf", str(partial), "."], check=True, timeout=600)
        partial.rename(tarball)


def main(argv: list[str]) -> int:
    for name in argv:
        image = ensure(name)
        print(f"{name}: {image.source.value}{' (' + image.what + ')' if image.what else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
