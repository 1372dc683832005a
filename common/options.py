"""One table of options per service: each option is a flag and an environment
variable, documented once. The same table builds argparse and the
configuration reference, docs/configuration.md (python -m common --write), so
they cannot drift.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence


@dataclass(frozen=True)
class Option:
    dest: str
    env: str
    default: Any
    help: str
    type: Callable[[str], Any] = str
    choices: Sequence[str] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")


class ConfigError(ValueError):
    """A setting is missing or malformed; the message says which and why."""


def boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def host_port(text: str) -> tuple[str, int]:
    """'127.0.0.1:9101', '[::1]:9101' or ':9101' (all interfaces)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def dial_address(listen: str) -> tuple[str, int]:
    """The address to dial for a listen address: a wildcard bind is reached
    through loopback (health checks run inside the same container)."""
    host, port = host_port(listen)
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host), port


def check_addresses(pairs: Sequence[tuple[str, str]]) -> None:
    """(label, HOST:PORT or empty) pairs; the first bad one raises ConfigError."""
    for label, address in pairs:
        try:
            address and host_port(address)
        except ValueError as exc:
            raise ConfigError(f"{label}: {exc}") from None


def check_paths_exist(pairs: Sequence[tuple[str, str]]) -> None:
    """(label, path or empty) pairs; a missing file raises ConfigError."""
    for label, path in pairs:
        if path and not os.path.exists(path):
            raise ConfigError(f"{label}: {path} does not exist")


def parse(prog: str, description: str, options: Sequence[Option],
          argv: Sequence[str] | None, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Flags beat environment variables, which beat defaults."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for opt in options:
        parser.add_argument(opt.flag, dest=opt.dest, default=None, choices=opt.choices,
                            help=f"{opt.help} [env {opt.env}, default {opt.default!r}]")
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    for opt in options:
        raw, source = args[opt.dest], opt.flag
        if raw is None and opt.env in environ:
            raw, source = environ[opt.env], opt.env
        if raw is None:
            values[opt.dest] = opt.default
            continue
        if opt.choices and raw not in opt.choices:
            raise ConfigError(f"{source}: {raw!r} is not one of {', '.join(opt.choices)}")
        try:
            values[opt.dest] = opt.type(raw)
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    return values


def config_error(prog: str, message: str) -> int:
    """One clear line on stderr; exit code 2, as argparse uses for bad usage."""
    print(f"{prog}: configuration error: {message}", file=sys.stderr)
    return 2


def markdown_table(options: Sequence[Option]) -> str:
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for opt in options:
        default = "" if opt.default in (None, "") else f"`{opt.default}`"
        rows.append(f"| `{opt.flag}` | `{opt.env}` | {default} | {opt.help} |")
    return "\n".join(rows)
