"""The applications file (WAF_CONFIG): strict YAML, every mistake reported
with the file and line it is on. README, "Several sites", documents it:

    default_application: shop          # needed when there are several
    unknown_application: default       # or refuse
    defaults:                          # every application starts from these
      rules: {crs_dir: /usr/share/modsecurity-crs, paranoia: 1}
    applications:
      - name: shop
        mode: block
      - name: blog
        mode: detect
        request_body: {truncated: block}

Unknown keys, wrong types, duplicate keys or names, and values out of range
are errors: a typo must never quietly turn a protection off. Relative paths
are relative to the file's own directory. Settings the file leaves out come
from `defaults:`, then from the environment (the template application).
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import replace
from typing import Any, Callable

import yaml

from common.options import ConfigError
from wafsvc.apps import (FAILURE_POLICIES, MISS_POLICIES, TRUNCATED_POLICIES, UNKNOWN_POLICIES, Application,
                         Applications, check)

# libyaml when PyYAML has it: a file of 10,000 applications reads in a fraction of the time.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class AppFileError(ConfigError):
    """The file is not a valid applications file; the message starts with
    "<file>:<line>:"."""


class _Reader:
    def __init__(self, path: str) -> None:
        self.path = path
        self.dir = os.path.dirname(os.path.abspath(path))
        self._constructor = yaml.SafeLoader("")   # turns scalar nodes into values

    def fail(self, node: yaml.Node | None, message: str) -> AppFileError:
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        return AppFileError(f"{self.path}{line}: {message}")

    def where(self, node: yaml.Node) -> str:
        return f"{self.path}:{node.start_mark.line + 1}"

    def mapping(self, node: yaml.Node, allowed, what: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what} must be a mapping (key: value)")
        found: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            if not isinstance(name, str) or key.tag != "tag:yaml.org,2002:str":
                raise self.fail(key, f"{what}: keys must be names")
            if name not in allowed:
                close = difflib.get_close_matches(name, list(allowed), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f"; allowed: {', '.join(sorted(allowed))}"
                raise self.fail(key, f"{what}: unknown key {name!r}{hint}")
            if name in found:
                raise self.fail(key, f"{what}: {name!r} is given twice")
            found[name] = (key, value)
        return found

    def scalar(self, node: yaml.Node, what: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, f"{what} must be a single value")
        return self._constructor.construct_object(node)

    def string(self, node: yaml.Node, what: str, empty_ok: bool = False) -> str:
        value = self.scalar(node, what)
        if value is None and empty_ok:
            return ""
        if not isinstance(value, str) or (not value and not empty_ok):
            raise self.fail(node, f"{what} must be a {'' if empty_ok else 'non-empty '}string")
        return value

    def integer(self, node: yaml.Node, what: str, low: int, high: int | None = None) -> int:
        value = self.scalar(node, what)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(node, f"{what} must be a whole number")
        if value < low or (high is not None and value > high):
            raise self.fail(node, f"{what} must be {low} to {high}" if high is not None
                            else f"{what} must be at least {low}")
        return value

    def boolean(self, node: yaml.Node, what: str) -> bool:
        value = self.scalar(node, what)
        if not isinstance(value, bool):
            raise self.fail(node, f"{what} must be true or false")
        return value

    def choice(self, node: yaml.Node, what: str, choices) -> str:
        value = self.scalar(node, what)
        if value not in choices:
            raise self.fail(node, f"{what} must be {' or '.join(choices)}, got {value!r}")
        return value

    def existing(self, node: yaml.Node, what: str, empty_ok: bool = False) -> str:
        value = self.string(node, what, empty_ok)
        if not value:
            return ""
        full = os.path.normpath(os.path.join(self.dir, os.path.expanduser(value)))
        if not os.path.exists(full):
            raise self.fail(node, f"{what}: {full} does not exist")
        return full

    def sequence(self, node: yaml.Node, what: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, f"{what} must be a list")
        return node.value

    def rule_ids(self, node: yaml.Node, what: str) -> tuple[int, ...]:
        """'942100 920350', 942100 or [942100, 920350]."""
        items = self.sequence(node, what) if isinstance(node, yaml.SequenceNode) else [node]
        ids = []
        for item in items:
            value = self.scalar(item, what)
            tokens = value.replace(",", " ").split() if isinstance(value, str) else [value]
            for token in tokens:
                if isinstance(token, bool) or not (isinstance(token, int) or str(token).isdigit()) \
                        or int(token) <= 0:
                    raise self.fail(item, f"{what}: rule ids are whole numbers above 0, got {token!r}")
                ids.append(int(token))
        if not ids:
            raise self.fail(node, f"{what}: an empty list of rule ids")
        return tuple(sorted(set(ids)))


def _directives(reader: _Reader, node: yaml.Node, what: str) -> tuple[str, tuple[str, int]]:
    text = reader.string(node, what, empty_ok=True)
    # Block scalars (| or >) start on the line after their indicator.
    first = node.start_mark.line + (2 if node.style in ("|", ">") else 1)
    return text, (reader.path, first)


# Every setting of an application: YAML path -> how to read it and where it
# goes ("app" for Application fields, "rules" for its RuleSetSpec).
Field = tuple[Callable[[_Reader, yaml.Node, str], Any], str, str]
FIELDS: dict[str, Field] = {
    "mode": (lambda r, n, w: r.choice(n, w, ("block", "detect")), "rules", "mode"),
    "failure_policy": (lambda r, n, w: r.choice(n, w, FAILURE_POLICIES), "app", "failure_policy"),
    "rules.crs_dir": (lambda r, n, w: r.existing(n, w, empty_ok=True), "rules", "crs_dir"),
    "rules.crs_setup": (lambda r, n, w: r.existing(n, w, empty_ok=True), "rules", "crs_setup"),
    "rules.paranoia": (lambda r, n, w: r.integer(n, w, 1, 4), "rules", "paranoia"),
    "rules.files": (lambda r, n, w: tuple(r.existing(i, w) for i in r.sequence(n, w)), "rules", "rules_files"),
    "rules.directives": (_directives, "rules", "extra_directives"),
    "request_body.truncated": (lambda r, n, w: r.choice(n, w, TRUNCATED_POLICIES), "app", "truncated_body"),
    "request_body.min_inspected": (lambda r, n, w: r.integer(n, w, 0), "app", "min_inspected"),
    "request_body.limit": (lambda r, n, w: r.integer(n, w, 1), "rules", "request_body_limit"),
    "request_body.no_files_limit": (lambda r, n, w: r.integer(n, w, 1), "rules", "request_body_no_files_limit"),
    "response_body.truncated": (lambda r, n, w: r.choice(n, w, TRUNCATED_POLICIES), "app",
                                "truncated_response_body"),
    "response_body.limit": (lambda r, n, w: r.integer(n, w, 1), "rules", "response_body_limit"),
    "response_inspection.enabled": (lambda r, n, w: r.boolean(n, w), "app", "response_inspection"),
    "response_inspection.transaction_ttl_ms": (lambda r, n, w: r.integer(n, w, 1, 2**32 - 1), "app",
                                               "transaction_ttl_ms"),
    "response_inspection.miss_policy": (lambda r, n, w: r.choice(n, w, MISS_POLICIES), "app",
                                        "response_miss_policy"),
    "ignore_lists": (lambda r, n, w: tuple(dict.fromkeys(r.rule_ids(i, w) for i in r.sequence(n, w))), "app",
                     "ignore_lists"),
}
SECTIONS = {path.split(".")[0] for path in FIELDS if "." in path}


def _settings(reader: _Reader, node: yaml.Node, what: str, named: bool) -> tuple[dict[str, Any], str]:
    """The settings one mapping gives, as {FIELDS path: value}, and its name."""
    top = {path.split(".")[0] for path in FIELDS} | ({"name"} if named else set())
    found = reader.mapping(node, top, what)
    values: dict[str, Any] = {}
    name = ""
    for key, (key_node, value_node) in found.items():
        if key == "name":
            name = reader.string(value_node, f"{what}: name")
            if not NAME.match(name):
                raise reader.fail(value_node, f"application names are letters, digits, '.', '_' and '-' "
                                              f"(64 at most, starting with a letter or digit), got {name!r}")
        elif key in SECTIONS:
            inner = {path.split(".", 1)[1] for path in FIELDS if path.startswith(key + ".")}
            for sub, (_, sub_node) in reader.mapping(value_node, inner, f"{what}: {key}").items():
                path = f"{key}.{sub}"
                values[path] = FIELDS[path][0](reader, sub_node, f"{what}: {path}")
        else:
            values[key] = FIELDS[key][0](reader, value_node, f"{what}: {key}")
    if named and not name:
        raise reader.fail(node, f"{what}: every application needs a name")
    return values, name


def _apply(template: Application, values: dict[str, Any], name: str, origin: str) -> Application:
    app_changes = {attr: values[path] for path, (_, target, attr) in FIELDS.items()
                   if target == "app" and path in values}
    rule_changes = {attr: values[path] for path, (_, target, attr) in FIELDS.items()
                    if target == "rules" and path in values}
    if "rules.directives" in values:
        rule_changes["extra_directives"], rule_changes["directives_origin"] = values["rules.directives"]
    if "rules.files" in values:
        rule_changes["rules_file"] = ""     # the file's list replaces the environment's RULES
    return replace(template, name=name, origin=origin, rules=replace(template.rules, **rule_changes),
                   **app_changes)


def parse(text: str, path: str, template: Application, unknown: str = "default",
          extra_preload: tuple = ()) -> Applications:
    """Applications from the file's text; `template` carries the defaults
    (the environment's settings), `unknown` the default for
    unknown_application."""
    reader = _Reader(path)
    try:
        root = yaml.compose(text, Loader=_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise AppFileError(f"{path}{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if root is None:
        raise AppFileError(f"{path}: the file is empty; it needs an 'applications' list")
    top = reader.mapping(root, {"default_application", "unknown_application", "defaults", "applications"},
                         "the file")
    if "applications" not in top:
        raise reader.fail(root, "an 'applications' list is required")
    if "unknown_application" in top:
        unknown = reader.choice(top["unknown_application"][1], "unknown_application", UNKNOWN_POLICIES)
    if "defaults" in top:
        values, _ = _settings(reader, top["defaults"][1], "defaults", named=False)
        template = _apply(template, values, "", reader.where(top["defaults"][1]))
    apps: dict[str, Application] = {}
    items = reader.sequence(top["applications"][1], "applications")
    if not items:
        raise reader.fail(top["applications"][1], "applications: at least one is needed")
    for index, item in enumerate(items):
        values, name = _settings(reader, item, f"applications[{index}]", named=True)
        if name in apps:
            raise reader.fail(item, f"application {name!r} is declared twice (first at {apps[name].origin})")
        app = _apply(template, values, name, reader.where(item))
        try:
            check(app, app.origin)
        except ConfigError as exc:
            raise AppFileError(str(exc)) from None
        apps[name] = app
    if "default_application" in top:
        node = top["default_application"][1]
        default = reader.string(node, "default_application")
        if default not in apps:
            raise reader.fail(node, f"default_application {default!r} is not among the applications "
                                    f"({', '.join(apps)})")
    elif len(apps) == 1:
        default = next(iter(apps))
    else:
        raise reader.fail(root, "several applications: name the default one with default_application")
    for app_name, _ in extra_preload:
        if app_name and app_name not in apps:
            raise AppFileError(f"WAF_IGNORE_PRELOAD: no application named {app_name!r} in {path}")
    return Applications(apps, default, unknown, source=path, extra_preload=tuple(extra_preload))


def load(path: str, template: Application, unknown: str = "default", extra_preload: tuple = ()) -> Applications:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise AppFileError(f"{path}: cannot read it: {exc}") from None
    return parse(text, path, template, unknown, extra_preload)
