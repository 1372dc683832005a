"""Puts one OWASP CRS release into a directory, at image build time.

    python fetch_crs.py --version 4.28.0 --sha256 HEX --dest /opt/crs

Downloads the release's minimal tarball from GitHub, refuses it unless its
sha256 is the pinned one (an empty pin is an error, never a skip), unpacks
it without trusting member paths, and checks that the result is the CRS
layout wafsvc loads (rules/*.conf, crs-setup.conf.example) of the version
asked for. Standard library only: the build stage has no curl.
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.request

URL = "https://github.com/coreruleset/coreruleset/releases/download/v{v}/coreruleset-{v}-minimal.tar.gz"
# Files whose absence means this is not a CRS tree wafsvc can load.
REQUIRED = ("crs-setup.conf.example", "rules/REQUEST-901-INITIALIZATION.conf",
            "rules/REQUEST-949-BLOCKING-EVALUATION.conf")
MIN_RULE_FILES = 20  # v4.28.0 has 27


class FetchError(Exception):
    """The release could not be fetched, verified or recognised."""


def sha256_of(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 16), b""):
            digest.update(block)
    return digest.hexdigest()


def pinned(expected: str) -> str:
    expected = expected.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise FetchError(f"CRS_SHA256 must be the 64-hex sha256 of the release tarball, got {expected!r}; "
                         "take it from the release and pass --build-arg CRS_SHA256=...")
    return expected


def verify_checksum(path: pathlib.Path, expected: str) -> None:
    expected = pinned(expected)
    actual = sha256_of(path)
    if actual != expected:
        raise FetchError(f"checksum mismatch for {path.name}: expected {expected}, got {actual}")


def check_members(tar: tarfile.TarFile) -> str:
    """Returns the single top directory; refuses anything but plain files and
    directories below it. Checked by hand because tarfile's "data" filter
    only exists from Python 3.11.4 on (Debian 12 has 3.11.2)."""
    tops = set()
    for member in tar.getmembers():
        parts = pathlib.PurePosixPath(member.name).parts
        if member.name.startswith("/") or ".." in parts:
            raise FetchError(f"refusing tarball member outside its directory: {member.name!r}")
        if not (member.isfile() or member.isdir()):
            raise FetchError(f"refusing tarball member that is not a file or directory: {member.name!r}")
        tops.add(parts[0])
    if len(tops) != 1:
        raise FetchError(f"expected one top directory in the tarball, found {sorted(tops)}")
    return tops.pop()


def unpack(archive: pathlib.Path, dest: pathlib.Path) -> None:
    """Extracts the single top directory's contents into dest."""
    with tarfile.open(archive) as tar:
        top_name = check_members(tar)
        with tempfile.TemporaryDirectory() as scratch:
            # Where tarfile has the "data" filter, it checks once more.
            tar.extractall(scratch, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
            top = pathlib.Path(scratch) / top_name
            dest.mkdir(parents=True, exist_ok=True)
            for item in top.iterdir():
                shutil.move(str(item), dest / item.name)


def check_layout(crs_dir: pathlib.Path, version: str) -> int:
    """Returns the number of rule files; raises if this is not CRS `version`."""
    missing = [name for name in REQUIRED if not (crs_dir / name).is_file()]
    if missing:
        raise FetchError(f"{crs_dir} is not a CRS tree: missing {', '.join(missing)}")
    rule_files = sorted((crs_dir / "rules").glob("*.conf"))
    if len(rule_files) < MIN_RULE_FILES:
        raise FetchError(f"{crs_dir}/rules has {len(rule_files)} .conf files, expected at least {MIN_RULE_FILES}")
    init = (crs_dir / REQUIRED[1]).read_text(encoding="utf-8", errors="replace")
    if f"ver:'OWASP_CRS/{version}'" not in init:
        raise FetchError(f"{crs_dir} does not carry CRS {version} (rule versions in {REQUIRED[1]} differ)")
    return len(rule_files)


def fetch(version: str, sha256: str, dest: pathlib.Path, url: str | None = None) -> int:
    url = url or URL.format(v=version)
    pinned(sha256)  # before any download: no pin, no build
    with tempfile.TemporaryDirectory() as scratch:
        archive = pathlib.Path(scratch) / "crs.tar.gz"
        try:
            with urllib.request.urlopen(url, timeout=60) as resp, open(archive, "wb") as out:
                shutil.copyfileobj(resp, out)
        except OSError as exc:
            raise FetchError(f"cannot download {url}: {exc}") from None
        verify_checksum(archive, sha256)
        unpack(archive, dest)
    return check_layout(dest, version)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", required=True)
    parser.add_argument("--sha256", default="", help="pinned sha256 of the tarball (required)")
    parser.add_argument("--dest", required=True, type=pathlib.Path)
    parser.add_argument("--url", help="override the release URL (mirrors, tests)")
    args = parser.parse_args(argv)
    try:
        count = fetch(args.version, args.sha256, args.dest, args.url)
    except FetchError as exc:
        print(f"fetch_crs: {exc}", file=sys.stderr)
        return 1
    print(f"CRS {args.version} in {args.dest}: {count} rule files, sha256 verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
