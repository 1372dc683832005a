"""The go-ftw YAML test format, loaded into plain dataclasses.

Layout contract (CRS tests/): <RULE-FILE>/<rule_id>.yaml, each holding
`rule_id` and `tests[]` of `test_id` + `stages[]` (input/output). Files that
hold no tests (commented-out placeholders) are skipped, anything else that
does not fit the schema is an error: a malformed test must never vanish.
"""

from __future__ import annotations

import base64
import pathlib
import re
from dataclasses import dataclass, field

import yaml


class FormatError(ValueError):
    """A test file does not follow the go-ftw schema."""


@dataclass(frozen=True)
class StageInput:
    dest_addr: str = "127.0.0.1"
    port: int | None = None
    method: str = "GET"
    uri: str = "/"
    version: str = "HTTP/1.1"
    headers: tuple[tuple[str, str], ...] = ()
    data: bytes | None = None
    encoded_request: bytes | None = None  # raw request bytes, sent as they are
    autocomplete_headers: bool = True


@dataclass(frozen=True)
class StageOutput:
    expect_ids: tuple[int, ...] = ()
    no_expect_ids: tuple[int, ...] = ()
    match_regex: str | None = None
    no_match_regex: str | None = None
    status: tuple[int, ...] = ()
    expect_error: bool = False

    @property
    def checks_log(self) -> bool:
        return bool(self.expect_ids or self.no_expect_ids or self.match_regex or self.no_match_regex)


@dataclass(frozen=True)
class Stage:
    input: StageInput
    output: StageOutput


@dataclass(frozen=True)
class Test:
    rule_id: int
    test_id: int
    rule_file: str  # the directory, e.g. REQUEST-920-PROTOCOL-ENFORCEMENT
    path: str
    desc: str
    stages: tuple[Stage, ...] = field(default=())
    load_error: str = ""  # the test could not be built; it fails with this reason

    @property
    def key(self) -> str:
        return f"{self.rule_id}-{self.test_id}"


def _ids(value, where: str) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise FormatError(f"{where}: expected a rule id or a list of rule ids, got {value!r}")


def _text(value) -> str:
    return "" if value is None else str(value)


# go-ftw renders `data` as a Go template (sprig functions). The suite uses
# only `repeat`; anything else is reported, never sent unexpanded.
_TEMPLATE = re.compile(r"\{\{(.*?)\}\}", re.S)
_REPEAT = re.compile(r'\s*"((?:[^"\\]|\\.)*)"\s*\|\s*repeat\s+(\d+)\s*$')


def expand_template(text: str) -> str:
    def one(m: re.Match) -> str:
        rep = _REPEAT.match(m.group(1))
        if rep is None:
            raise FormatError(f"unsupported go-ftw template {m.group(0)!r} (only '\"s\" | repeat N')")
        return rep.group(1) * int(rep.group(2))
    return _TEMPLATE.sub(one, text)


def _data(value) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, list):  # old ftw allowed a list of lines
        value = "\r\n".join(map(str, value))
    value = expand_template(str(value))
    # go-ftw is Go: a YAML string is sent as its UTF-8 bytes, so "\xE9" in a
    # test file goes on the wire as C3 A9. Do the same.
    return str(value).encode("utf-8", "surrogatepass")


def parse_input(raw: dict, where: str) -> StageInput:
    if not isinstance(raw, dict):
        raise FormatError(f"{where}: input must be a mapping")
    headers = raw.get("headers") or {}
    if isinstance(headers, dict):
        pairs = tuple((str(k), _text(v)) for k, v in headers.items())
    elif isinstance(headers, list):  # ordered list of {name: value} or [name, value]
        pairs = []
        for item in headers:
            if isinstance(item, dict):
                pairs.extend((str(k), _text(v)) for k, v in item.items())
            else:
                pairs.append((str(item[0]), _text(item[1])))
        pairs = tuple(pairs)
    else:
        raise FormatError(f"{where}: headers must be a mapping")
    encoded = raw.get("encoded_request")
    kwargs = dict(
        dest_addr=_text(raw.get("dest_addr")) or "127.0.0.1",
        port=raw.get("port"),
        headers=pairs,
        data=_data(raw.get("data")),
        encoded_request=base64.b64decode(encoded) if encoded else None,
        autocomplete_headers=raw.get("autocomplete_headers", True) is not False,
    )
    # An explicit empty method/uri/version is sent as it is (tests break HTTP
    # on purpose); only a missing one takes go-ftw's default.
    for name in ("method", "uri", "version"):
        if name in raw and raw[name] is not None:
            kwargs[name] = str(raw[name])
    return StageInput(**kwargs)


def parse_output(raw: dict, where: str) -> StageOutput:
    raw = raw or {}
    log = raw.get("log") or {}
    # Older files use expect_id / no_expect_id (singular).
    status = raw.get("status")
    return StageOutput(
        expect_ids=_ids(log.get("expect_ids", log.get("expect_id")), where),
        no_expect_ids=_ids(log.get("no_expect_ids", log.get("no_expect_id")), where),
        match_regex=log.get("match_regex") or raw.get("log_contains"),
        no_match_regex=log.get("no_match_regex") or raw.get("no_log_contains"),
        status=_ids(status, where),
        expect_error=bool(raw.get("expect_error", False)),
    )


def parse_file(path: pathlib.Path, root: pathlib.Path) -> list[Test]:
    doc = yaml.safe_load(path.read_bytes())
    if doc is None:
        return []  # a placeholder whose content is commented out
    if not isinstance(doc, dict) or "tests" not in doc:
        raise FormatError(f"{path}: no 'tests' list")
    rule_id = doc.get("rule_id")
    rel = path.relative_to(root)
    tests = []
    for t in doc["tests"]:
        where = f"{rel} test {t.get('test_id')}"
        stages, error = [], ""
        try:
            for s in t.get("stages") or []:
                s = s.get("stage", s)  # older files nest each stage under 'stage'
                stages.append(Stage(parse_input(s.get("input"), where), parse_output(s.get("output"), where)))
            if not stages:
                raise FormatError(f"{where}: no stages")
        except (FormatError, ValueError, TypeError, AttributeError) as exc:
            # One broken test fails on its own; it must not hide the others.
            stages, error = [], f"cannot load test: {exc}"
        tests.append(Test(rule_id=int(rule_id if rule_id is not None else rel.stem), test_id=int(t["test_id"]),
                          rule_file=rel.parts[0] if len(rel.parts) > 1 else "", path=str(rel),
                          desc=_text(t.get("desc")).strip(), stages=tuple(stages), load_error=error))
    return tests


def load_tests(root: pathlib.Path) -> list[Test]:
    """Every test under root/<RULE-FILE>/*.yaml, in a stable order."""
    root = pathlib.Path(root)
    files = sorted(p for p in root.glob("*/*.yaml") if p.parent.name != "regression")
    if not files:
        raise FormatError(f"{root}: no <RULE-FILE>/*.yaml test files")
    tests = [t for path in files for t in parse_file(path, root)]
    return sorted(tests, key=lambda t: (t.rule_id, t.test_id))
