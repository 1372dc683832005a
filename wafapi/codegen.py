"""Regenerates the committed gRPC stubs from proto/waf/v1/waf.proto.

    python -m wafapi.codegen           # rewrite wafapi/waf_pb2*.py
    python -m wafapi.codegen --check   # exit 1 if the committed stubs are stale

The stubs are committed so that a fresh clone runs without grpcio-tools.
protoc names the generated modules after the proto path (waf.v1.waf_pb2);
we flatten them into this package and fix the one absolute import.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
PROTO = "waf/v1/waf.proto"
OUTPUTS = ("waf_pb2.py", "waf_pb2.pyi", "waf_pb2_grpc.py")


def generate() -> dict[str, str]:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as out:
        rc = protoc.main(
            [
                "protoc",
                f"-I{ROOT / 'proto'}",
                f"--python_out={out}",
                f"--pyi_out={out}",
                f"--grpc_python_out={out}",
                str(ROOT / "proto" / PROTO),
            ]
        )
        if rc != 0:
            raise SystemExit(f"protoc failed with exit code {rc}")
        gen = pathlib.Path(out) / "waf" / "v1"
        files = {name: (gen / name).read_text() for name in OUTPUTS}
    files["waf_pb2_grpc.py"] = files["waf_pb2_grpc.py"].replace(
        "from waf.v1 import waf_pb2", "from wafapi import waf_pb2"
    )
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if stubs are stale")
    args = parser.parse_args()
    stale = []
    for name, text in generate().items():
        path = HERE / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale generated stubs: {', '.join(stale)}; run: python -m wafapi.codegen", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
