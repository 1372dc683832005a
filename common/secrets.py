"""Reading secrets from files (tokens, TLS keys and certificates), shared
by wafsvc and the gateway.

Files, not environment values: they can be mounted from a secret store,
rotated, and do not leak into `ps` or crash dumps of the environment.
"""

from __future__ import annotations


def read_secret(path: str) -> str:
    """A token file's content, surrounding whitespace removed; empty is an error."""
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if not token:
        raise ValueError(f"{path} is empty")
    if any(c.isspace() or not c.isprintable() for c in token):
        raise ValueError(f"{path}: a token is one line of printable characters without spaces")
    return token


def read_pem(path: str) -> bytes | None:
    """A PEM file's bytes for gRPC's credentials; None when no path is set."""
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()
