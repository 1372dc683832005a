"""The versions a benchmark ran with, recorded in latest.json: a figure means
little without the engines that produced it."""

from __future__ import annotations

import importlib.metadata
import pathlib
import re
import subprocess


def _run(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return (proc.stdout + proc.stderr).strip().splitlines()[0] if (proc.stdout + proc.stderr).strip() else "unknown"


def _deb(package: str) -> str:
    out = _run(["dpkg-query", "-W", "-f", "${Version}", package])
    return out if out and "no packages" not in out else "not installed"


def _pypi(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def crs_version(crs_dir: str) -> str:
    """From the rules' own "OWASP CRS ver." header."""
    for path in sorted(pathlib.Path(crs_dir, "rules").glob("REQUEST-901-*.conf")):
        match = re.search(r"OWASP (?:ModSecurity Core Rule Set|CRS) ver\.(\S+)", path.read_text())
        if match:
            return match.group(1)
    return "unknown"


def collect(crs_dir: str, haproxy_bin: str) -> dict[str, str]:
    import libmodsecurity

    return {
        "libmodsecurity_wheel": f"{_pypi('libmodsecurity')} ({libmodsecurity.ModSecurity().who_am_i()})",
        "libmodsecurity_debian": _deb("libmodsecurity3"),      # what nginx's module links
        "modsecurity_nginx": _deb("libnginx-mod-http-modsecurity"),
        "nginx": _run(["nginx", "-v"]),
        "haproxy": _run([haproxy_bin, "-v"]),
        "crs": crs_version(crs_dir),
        "grpcio": _pypi("grpcio"),
        "protobuf": _pypi("protobuf"),
        "uvloop": _pypi("uvloop"),
        "wrk": _deb("wrk"),
        "gcc": _run(["gcc", "--version"]),
    }
