"""Reading secrets from files (tokens), shared by wafsvc and the gateway.

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
