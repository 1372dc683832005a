"""modsec-spoa: ask wafsvc about requests from the command line.

    modsec-spoa evaluate 'http://shop/?q=1' -X POST -H 'Content-Type: text/plain' -d 'hello'
    modsec-spoa evaluate --raw request.http
    modsec-spoa evaluate --har capture.har --entry 3 --json
    modsec-spoa replay capture.har

Exit status of evaluate: 0 allowed, 1 blocked, 2 bad usage or input,
3 no verdict (wafsvc unreachable, too slow, refused the request), 4 a bug.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib
import sys
from collections import Counter

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from modsec_spoa_client.client import Client
from modsec_spoa_client.config import TLS, ClientConfig, token_from
from modsec_spoa_client.errors import WafError
from modsec_spoa_client.har import InputError, requests_in
from modsec_spoa_client.models import HttpRequest, Verdict
from modsec_spoa_client.rawhttp import request_from_url

EXIT_ALLOWED, EXIT_BLOCKED, EXIT_USAGE, EXIT_NO_VERDICT, EXIT_BUG = 0, 1, 2, 3, 4


def _config(target, app_settings) -> ClientConfig:
    overrides = {k: v for k, v in app_settings.items() if v not in (None, "")}
    tls_fields = {k[4:]: overrides.pop(k) for k in list(overrides) if k.startswith("tls_")}
    try:
        config = ClientConfig.from_env(**({"target": target} if target else {}))
        if "deadline_ms" in overrides:
            config = config.replace(deadline=overrides.pop("deadline_ms") / 1000)
        if "token_file" in overrides:
            config = config.replace(token=token_from(overrides.pop("token_file")))
        if tls_fields:
            base = config.tls or TLS()
            config = config.replace(tls=TLS(**{**base.__dict__, **tls_fields}))
        return config.replace(**overrides)
    except (ValueError, OSError) as exc:
        raise click.UsageError(f"client settings: {exc}") from None


def connection_options(command):
    """--target and friends: the client's settings (docs/configuration.md), each also read from its MODSEC_SPOA_* variable."""
    for decorator in reversed([
        click.option("--target", envvar="MODSEC_SPOA_TARGET", show_envvar=True,
                     help="wafsvc: HOST:PORT, dns:///NAME:PORT or ipv4:IP:PORT,IP:PORT [default 127.0.0.1:50051]"),
        click.option("--deadline-ms", type=click.IntRange(min=1), help="time allowed per verdict, retries included"),
        click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False), help="CA that signed wafsvc (PEM)"),
        click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), help="client certificate (mTLS)"),
        click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="client key (mTLS)"),
        click.option("--tls-server-name", help="name to verify in wafsvc's certificate"),
        click.option("--token-file", type=click.Path(exists=True, dir_okay=False), help="wafsvc's bearer token"),
        click.option("--retries", type=click.IntRange(min=0), help="more attempts on another replica [2]"),
        click.option("--max-body-bytes", type=click.IntRange(min=0),
                     help="cut longer bodies and flag them truncated [131072; 0 = whole]"),
    ]):
        command = decorator(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Evaluate HTTP requests with modsec-spoa's wafsvc (ModSecurity)."""


@main.command()
@click.argument("url", required=False)
@click.option("-X", "--request", "method", default=None, help="method [GET, or POST with data]")
@click.option("-H", "--header", "headers", multiple=True, help="'Name: value', repeatable")
@click.option("-d", "--data", help="request body; @FILE reads a file")
@click.option("--data-binary", help="request body, byte for byte; @FILE reads a file")
@click.option("--raw", "raw_file", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
              help="a raw HTTP/1.x request in a file")
@click.option("--har", "har_file", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
              help="a HAR capture; --entry picks the request")
@click.option("--entry", default=0, show_default=True, help="which HAR entry (0 = first)")
@click.option("--app", "application", default="", help="application (rule set) to judge with")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@connection_options
def evaluate(url, method, headers, data, data_binary, raw_file, har_file, entry, application, as_json,
             target, **settings) -> None:
    """Evaluate one request: a URL with curl-like options, --raw or --har.

    Exits 0 when allowed, 1 when blocked, 2 on bad usage, 3 without a verdict."""
    request = _one_request(url, method, headers, data, data_binary, raw_file, har_file, entry)
    if application:
        request = dataclasses.replace(request, application=application)
    console = Console()
    with Client(_config(target, settings)) as client:
        try:
            verdict = client.evaluate(request)
        except WafError as exc:
            _print_error(console, exc, as_json)
            sys.exit(EXIT_NO_VERDICT)
    if as_json:
        print(json.dumps(verdict.to_dict(), indent=2))
    else:
        _print_verdict(console, request, verdict)
    sys.exit(EXIT_BLOCKED if verdict.blocked else EXIT_ALLOWED)


def _one_request(url, method, headers, data, data_binary, raw_file, har_file, entry) -> HttpRequest:
    sources = [s for s in (url, raw_file, har_file) if s]
    if len(sources) != 1:
        raise click.UsageError("give exactly one of URL, --raw FILE or --har FILE")
    if (raw_file or har_file) and (method or headers or data or data_binary):
        raise click.UsageError("-X, -H, -d and --data-binary go with a URL, not with --raw or --har")
    try:
        if raw_file or har_file:
            found = list(itertools.islice(requests_in(raw_file or har_file), entry + 1))
            if len(found) <= entry:
                raise click.UsageError(f"{raw_file or har_file} has {len(found)} request(s), no entry {entry}")
            return found[entry]
        if data is not None and data_binary is not None:
            raise click.UsageError("use -d or --data-binary, not both")
        body = _body(data, binary=False) if data is not None else _body(data_binary, binary=True)
        pairs = []
        for header in headers:
            name, colon, value = header.partition(":")
            if not colon or not name.strip():
                raise click.UsageError(f"a header is 'Name: value', got {header!r}")
            pairs.append((name.strip(), value.strip()))
        if data is not None and not any(n.lower() == "content-type" for n, _ in pairs):
            pairs.append(("Content-Type", "application/x-www-form-urlencoded"))  # as curl -d does
        return request_from_url(url, method or ("POST" if body else "GET"), pairs, body)
    except (InputError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None


def _body(value: str | None, binary: bool) -> bytes:
    if value is None:
        return b""
    if value.startswith("@"):
        try:
            data = pathlib.Path(value[1:]).read_bytes()
        except OSError as exc:
            raise click.UsageError(f"{value[1:]}: {exc.strerror}") from None
        return data if binary else data.replace(b"\r", b"").replace(b"\n", b"")  # curl -d strips newlines
    return value.encode("utf-8")


def _print_verdict(console: Console, request: HttpRequest, verdict: Verdict) -> None:
    uri = request.uri.decode("latin-1") if isinstance(request.uri, bytes) else request.uri
    word = "[bold red]BLOCKED[/]" if verdict.blocked else "[bold green]allowed[/]"
    console.print(f"{word} {request.method} {uri}  action={verdict.action.name.lower()}"
                  + (f" status={verdict.status}" if verdict.status else "")
                  + f"  engine={verdict.engine_time_us} µs", highlight=False)
    if verdict.matches:
        table = Table("rule", "phase", "severity", "message", "matched data")
        for m in verdict.matches:
            table.add_row(str(m.id), str(m.phase), str(m.severity), m.message, m.matched_data)
        console.print(table)


def _print_error(console: Console, exc: WafError, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"error": type(exc).__name__, "code": exc.code, "reason": exc.reason.name,
                          "message": exc.message}, indent=2))
    else:
        Console(stderr=True).print(f"[bold red]no verdict[/]: {type(exc).__name__} ({exc.code}, "
                                   f"{exc.reason.name}): {exc.message}", highlight=False)


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path))
@click.option("--app", "application", default="", help="application (rule set) to judge with")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@connection_options
def replay(file, application, as_json, target, **settings) -> None:
    """Send every request of FILE (HAR, a raw request, or URLs one per line)
    over a batched stream and summarise what was blocked, per rule.

    Exits 0 when every request got a verdict, 3 when some did not."""
    try:
        requests = list(requests_in(file))
    except InputError as exc:
        raise click.UsageError(str(exc)) from None
    if application:
        requests = [dataclasses.replace(r, application=application) for r in requests]
    counts: Counter = Counter()
    rules: dict[int, list] = {}
    errors: Counter = Counter()
    console = Console(stderr=True)
    with Client(_config(target, settings)) as client, client.stream() as stream, Progress(
            TextColumn("replaying"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, disable=as_json or not console.is_terminal) as progress:
        task = progress.add_task("replay", total=len(requests))
        for outcome in stream.evaluate_many(requests):
            progress.advance(task)
            if isinstance(outcome, WafError):
                counts["no verdict"] += 1
                errors[f"{type(outcome).__name__} ({outcome.reason.name})"] += 1
                continue
            counts["blocked" if outcome.blocked else "allowed"] += 1
            for match in outcome.matches:
                row = rules.setdefault(match.id, [match.message, 0, 0])
                row[1 if outcome.blocked else 2] += 1
    summary = {"requests": len(requests), "allowed": counts["allowed"], "blocked": counts["blocked"],
               "no_verdict": counts["no verdict"], "errors": dict(errors),
               "rules": [{"id": rid, "message": msg, "in_blocked": b, "in_allowed": a}
                         for rid, (msg, b, a) in sorted(rules.items(), key=lambda kv: (-kv[1][1], kv[0]))]}
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(Console(), summary)
    sys.exit(EXIT_NO_VERDICT if counts["no verdict"] else 0)


def _print_summary(console: Console, summary: dict) -> None:
    console.print(f"{summary['requests']} requests: [green]{summary['allowed']} allowed[/], "
                  f"[red]{summary['blocked']} blocked[/], {summary['no_verdict']} without a verdict",
                  highlight=False)
    for error, count in summary["errors"].items():
        console.print(f"  no verdict: {error} × {count}", highlight=False)
    if summary["rules"]:
        table = Table("rule", "in blocked requests", "in allowed requests", "message")
        for rule in summary["rules"]:
            table.add_row(str(rule["id"]), str(rule["in_blocked"]), str(rule["in_allowed"]), rule["message"])
        console.print(table)


def run() -> None:
    """The console script: an unexpected exception must not exit 1 ("blocked")."""
    try:
        main()
    except Exception:  # noqa: BLE001 - reported, then a distinct exit status
        import traceback
        traceback.print_exc()
        sys.exit(EXIT_BUG)


if __name__ == "__main__":
    run()
