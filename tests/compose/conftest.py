"""Fixtures of the Compose test: an engine, the base images (pulled, or local
stand-ins), the images built from the real Dockerfiles, and the real
docker-compose.yml up with three wafsvc replicas.

Progress goes to the terminal as it happens; the measurements (build time,
image sizes, spread, failures, join times, time to the first 200) are
printed at the end and written to run/compose/report.json.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import time
import urllib.error
import urllib.request

import pytest

from stack import free_port
from tests.compose import standins
from tests.compose.engine import Engine, docker, inspect
from tests.compose.project import (Mirror, Project, base_images, compose_file, crs_tarball, env_of,
                                   local_crs, wait_until)

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORK = ROOT / "run" / "compose"
PROJECT_NAME = "modsecspoatest"
REPLICAS = 3
REPORT: dict = {}
SESSION_START: list[float] = []
# Published ports, chosen free so the test runs beside `make up`.
PORT_VARIABLES = ("HTTP_PORT", "HTTP_ALT_PORT", "PROMETHEUS_PORT", "GRAFANA_PORT")


@pytest.fixture(scope="session")
def say(request):
    """Progress to the terminal as it happens, past pytest's capture: the
    build and the faults take minutes."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")

    def write(text: str) -> None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"[compose] {text}")
    return write


@pytest.fixture(scope="session")
def engine(say):
    REPORT["started_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    REPORT["load_average_at_start"] = [round(x, 1) for x in os.getloadavg()]
    SESSION_START.append(time.monotonic())
    e = Engine(WORK).start()
    say("Docker engine: " + ("started here (dockerd --iptables=false), stopped at the end"
                             if e.started_here else "already running, left running"))
    REPORT["engine_started_here"] = e.started_here
    yield e
    if e.started_here:
        # An engine of the test's own (CI): drop the images each rebuild
        # superseded, so runs do not pile them up. A running engine's are
        # someone else's to manage.
        docker("image", "prune", "-f", timeout=300)
    e.stop()


@pytest.fixture(scope="session")
def runnable(engine, say) -> list[str]:
    """The services to run: every service of docker-compose.yml whose base
    image is here, pullable, or has a stand-in."""
    services = compose_file()["services"]
    started = time.monotonic()
    images = {name: standins.ensure(name, log=say) for name in sorted(set(base_images(services).values()))}
    REPORT["base_images_seconds"] = round(time.monotonic() - started, 1)
    REPORT["base_images"] = {name: image.source.value for name, image in images.items()}
    stand_ins = [f"{name} ({image.what})" for name, image in images.items() if image.stand_in]
    if stand_ins:
        say("STAND-INS USED for official base images that cannot be pulled here: " + "; ".join(stand_ins))
    REPORT["stand_ins"] = stand_ins
    left_out = sorted(s for s, base in base_images(services).items()
                      if images[base].source is standins.Source.UNAVAILABLE)
    if left_out:
        say(f"LEFT OUT (image neither local nor pullable, no stand-in): {', '.join(left_out)}")
    REPORT["services_left_out"] = left_out
    return [name for name in services if name not in left_out]


@pytest.fixture(scope="session")
def project(engine, runnable, say):
    p = Project(PROJECT_NAME, WORK, ports={name: free_port() for name in PORT_VARIABLES}, runnable=runnable)
    mirror = None
    try:
        build_args = {}
        version = str(p.services["wafsvc"]["build"]["args"]["CRS_VERSION"])
        crs = local_crs(version)
        if crs is not None:
            tarball, sha256 = crs_tarball(crs, version, WORK / "crs-mirror")
            mirror = Mirror(tarball.parent)
            build_args = {"CRS_URL": mirror.url(tarball.name), "CRS_SHA256": sha256}
            say(f"CRS {version} served to the build from a local mirror of {crs} (sha256 {sha256[:12]}...)")
            REPORT["crs_mirror"] = {"source": str(crs), "sha256": sha256}
        p.write_override(build_args)
        p.down()  # whatever an interrupted run left behind
        built = [name for name in runnable if "build" in p.services[name]]
        say(f"building {', '.join(built)} (classic builder, host network)")
        started = time.monotonic()
        p.compose("build", *built, timeout=900)
        REPORT["build_seconds"] = round(time.monotonic() - started, 1)
        REPORT["image_mb"] = {p.services[name]["image"]: round(inspect("image", p.services[name]["image"])["Size"]
                                                              / 1e6) for name in built}
        say(f"built in {REPORT['build_seconds']} s: {REPORT['image_mb']} MB")
        started, wall = time.monotonic(), time.time()
        p.compose("up", "-d", "--no-build", "--scale", f"wafsvc={REPLICAS}", *runnable, timeout=300)
        first = wait_until(lambda: status(p.ports["HTTP_PORT"], "/") == 200, timeout=120,
                           what="the first 200 through HAProxy", interval=0.1)
        REPORT["up_to_first_200_seconds"] = round(time.monotonic() - started, 1)
        assert first
        REPORT["up_timeline_seconds"] = startup_timeline(p, wall)
        say(f"up --scale wafsvc={REPLICAS}: first 200 after {REPORT['up_to_first_200_seconds']} s")
        yield p
    finally:
        if p.containers():  # not yet down: a test failed on the way
            save_logs(p, say)
        p.down()
        if mirror is not None:
            mirror.close()


def docker_time(stamp: str) -> float:
    """Docker's RFC 3339 times carry nanoseconds; datetime takes micro."""
    head, _, frac = stamp.rstrip("Z").partition(".")
    return datetime.datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00").timestamp()


def startup_timeline(p: Project, since: float) -> dict[str, float]:
    """When each service started, and when wafsvc first passed its health
    check, in seconds after `up` was called: where the cold start goes."""
    out = {}
    for name in ("backend", "wafsvc", "gateway", "haproxy"):
        containers = p.containers(name)
        if not containers:
            continue
        data = [inspect("container", c.id)["State"] for c in containers]
        out[f"{name}_started"] = round(max(docker_time(s["StartedAt"]) for s in data) - since, 1)
        healthy = [min((docker_time(probe["End"]) for probe in (s.get("Health") or {}).get("Log", [])
                        if probe["ExitCode"] == 0), default=None) for s in data]
        if name == "wafsvc" and None not in healthy:
            out["wafsvc_all_healthy"] = round(max(healthy) - since, 1)
    return out


def save_logs(p: Project, say=print) -> None:
    """Every container's output, for a look after the run (run/compose/compose.log)."""
    try:
        (WORK / "compose.log").write_text(p.logs())
    except Exception as exc:  # noqa: BLE001 - the logs are a courtesy; down must still run
        say(f"could not save the logs: {exc}")


def status(port: int, path: str, headers: dict[str, str] | None = None) -> int | None:
    """HTTP status of one GET, None when the connection failed."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def waf_metrics_address(p: Project) -> str:
    return env_of(p.services["wafsvc"])["WAF_METRICS"]


def evaluations(p: Project, container) -> float | None:
    """modsec_waf_evaluations_total of one replica, all labels; None while
    its metrics do not answer (starting, killed)."""
    from prometheus_client.parser import text_string_to_metric_families
    try:
        text = p.scrape(container, waf_metrics_address(p))
    except Exception:  # noqa: BLE001 - a replica being killed or started does not answer
        return None
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == "modsec_waf_evaluations_total")


def pytest_terminal_summary(terminalreporter):
    if not REPORT:
        return
    if SESSION_START:
        REPORT["session_seconds"] = round(time.monotonic() - SESSION_START[0], 1)
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "report.json").write_text(json.dumps(REPORT, indent=2) + "\n")
    terminalreporter.section("make test-compose: measurements (run/compose/report.json)")
    if REPORT.get("stand_ins"):
        terminalreporter.write_line("STAND-INS USED (official base images not pullable here): "
                                    + "; ".join(REPORT["stand_ins"]))
    for key, value in REPORT.items():
        terminalreporter.write_line(f"{key}: {value}")
