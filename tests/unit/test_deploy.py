"""Packaging: Compose, the Dockerfiles and the Kubernetes manifests agree
with each other and with what the local stack runs. No Docker engine or
cluster is needed; docker-compose and kubectl are used when installed, for
`config` and `kustomize` only, which open no sockets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import io
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile

import pytest
import yaml

from common.options import dial_address, host_port
from gateway.config import OPTIONS as GATEWAY_OPTIONS
from stack import processes
from wafapi import waf_pb2
from gateway import healthcheck as gateway_healthcheck
from wafsvc import healthcheck
from wafsvc.config import OPTIONS as WAFSVC_OPTIONS
from wafsvc.config import WafConfig

DRAIN_GRACE_S = WafConfig.drain_grace_ms / 1000  # WAF_DRAIN_GRACE_MS default

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
HAPROXY_DOCKERFILE = DEPLOY / "docker" / "haproxy.Dockerfile"
HAPROXY_CFG = DEPLOY / "haproxy" / "haproxy.cfg"
IMAGE_HAPROXY_DIR = "/usr/local/etc/haproxy"  # the official image's config dir
WAF_SERVICE = waf_pb2.DESCRIPTOR.services_by_name["Waf"].full_name

sys.path.insert(0, str(DEPLOY / "docker"))
import fetch_crs  # noqa: E402  (a build-time script, not a package)


def load_all(path: pathlib.Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def gateway_envs() -> set[str]:
    return {opt.env for opt in GATEWAY_OPTIONS}


def wafsvc_envs() -> set[str]:
    return {opt.env for opt in WAFSVC_OPTIONS}


def haproxy_envs() -> set[str]:
    """Every variable haproxy.cfg reads: presetenv defaults and ${VAR} /
    defined(VAR) references."""
    text = HAPROXY_CFG.read_text()
    return (set(re.findall(r"^\s*presetenv\s+(\w+)", text, re.M))
            | set(re.findall(r"\$\{(\w+)\}", text)) | set(re.findall(r"defined\((\w+)\)", text)))


def port_of(address: str) -> int:
    return host_port(address)[1]


def stack_haproxy_env_names() -> set[str]:
    """The names the native stack (make up, the e2e tests) gives HAProxy."""
    source = inspect.getsource(processes.Stack.start_haproxy)
    return set(re.findall(r'"([A-Z][A-Z0-9_]+)":', source))


def stack_default(name: str):
    return next(f.default for f in dataclasses.fields(processes.StackSpec) if f.name == name)


# ---------------------------------------------------------------- Compose --

@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def test_compose_runs_the_whole_topology(compose):
    assert set(compose["services"]) == {"haproxy", "gateway", "wafsvc", "backend", "prometheus", "grafana"}


def test_wafsvc_can_scale(compose):
    """--scale wafsvc=N needs no fixed name and no host port."""
    wafsvc = compose["services"]["wafsvc"]
    assert "container_name" not in wafsvc
    assert "ports" not in wafsvc
    assert "wafsvc.healthcheck" in " ".join(wafsvc["healthcheck"]["test"])
    assert wafsvc["platform"] == "linux/amd64", "the libmodsecurity wheel is x86_64 only"


def test_compose_addresses_line_up(compose):
    services = compose["services"]
    haproxy, gateway, wafsvc = (env_of(services[name]) for name in ("haproxy", "gateway", "wafsvc"))
    # The gateway dials every replica through Docker's DNS.
    assert gateway["GATEWAY_WAFSVC"] == f"dns:///wafsvc:{port_of(wafsvc['WAF_LISTEN'])}"
    assert haproxy["GATEWAY_ADDR"] == f"gateway:{port_of(gateway['GATEWAY_LISTEN'])}"
    backend_host, backend_port = haproxy["BACKEND_ADDR"].split(":")
    assert backend_host in services and backend_port in services[backend_host]["expose"]
    assert str(port_of(wafsvc["WAF_LISTEN"])) in services["wafsvc"]["expose"]
    # The scrape ports the observability configs expect.
    assert port_of(gateway["GATEWAY_METRICS"]) == 9101
    assert port_of(wafsvc["WAF_METRICS"]) == 9102
    published = {entry.split(":")[-1] for entry in services["haproxy"]["ports"]}
    assert {str(port_of(haproxy["FRONTEND_ADDR"])), str(port_of(haproxy["FRONTEND_ALT_ADDR"]))} <= published


def test_compose_env_names_exist_in_the_option_tables_and_haproxy_cfg(compose):
    services = compose["services"]
    for name, known in (("gateway", gateway_envs()), ("wafsvc", wafsvc_envs()), ("haproxy", haproxy_envs())):
        unknown = set(env_of(services[name])) - known
        assert not unknown, f"{name} sets variables nothing reads: {unknown}"


def test_compose_and_local_stack_feed_haproxy_the_same_files_and_names(compose):
    haproxy = env_of(compose["services"]["haproxy"])
    assert stack_haproxy_env_names() <= set(haproxy)
    cfg, spoe = stack_default("haproxy_cfg"), stack_default("spoe_conf")
    copied = re.search(r"^COPY (.+) (\S+)/$", HAPROXY_DOCKERFILE.read_text(), re.M)
    sources, dest = copied.group(1).split(), copied.group(2)
    assert [ROOT / s for s in sources] == [cfg, spoe]
    assert dest == IMAGE_HAPROXY_DIR
    assert haproxy["SPOE_CONF"] == f"{IMAGE_HAPROXY_DIR}/{spoe.name}"


def test_compose_mounts_exist(compose):
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is missing"


def test_compose_rules_file_is_what_wafsvc_is_told_to_load(compose):
    wafsvc = compose["services"]["wafsvc"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in wafsvc["volumes"]}
    assert env_of(wafsvc)["RULES"] in mounts


def test_every_service_restarts_by_itself(compose):
    """A killed wafsvc replica, a crashed gateway or HAProxy come back without
    anyone (make test-compose SIGKILLs a replica and watches it return)."""
    for name, service in compose["services"].items():
        assert service.get("restart") in ("always", "unless-stopped"), f"{name} has no restart policy"


def test_compose_waits_only_on_services_that_have_a_healthcheck(compose):
    services = compose["services"]
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        for dependency in depends_on if isinstance(depends_on, dict) else ():
            if depends_on[dependency]["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits on {dependency}'s health"


def test_prometheus_scrapes_every_metrics_port_compose_opens(compose):
    """deploy/prometheus (the observability configs) names Compose services."""
    services = compose["services"]
    metrics = {"gateway": port_of(env_of(services["gateway"])["GATEWAY_METRICS"]),
               "wafsvc": port_of(env_of(services["wafsvc"])["WAF_METRICS"])}
    scraped = {}
    for job in yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            scraped.update({name: sd["port"] for name in sd["names"]})
    assert scraped == metrics
    for name, port in metrics.items():
        assert str(port) in services[name]["expose"]

def test_grafana_reads_the_prometheus_compose_runs(compose):
    datasources = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    url = next(d["url"] for d in datasources["datasources"] if d["type"] == "prometheus")
    host, port = url.split("//", 1)[1].rstrip("/").split(":")
    assert host in compose["services"]
    assert any(entry.split(":")[-1] == port for entry in compose["services"][host]["ports"])

def test_compose_file_passes_docker_compose_config():
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (scripts/install.sh installs it from apt)")
    result = subprocess.run([binary, "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr


def haproxy_binaries() -> list:
    found = [shutil.which("haproxy"), ROOT / ".tools" / "haproxy32" / "haproxy"]
    return [pytest.param(str(b), id=pathlib.Path(b).parent.name) for b in found if b and pathlib.Path(b).exists()]


def deployed_env(which: str, service: str) -> dict[str, str]:
    """The environment Compose or Kubernetes gives haproxy, gateway or wafsvc."""
    if which == "compose":
        return env_of(yaml.safe_load(COMPOSE.read_text())["services"][service])
    pods = {"haproxy": ("haproxy", "haproxy"), "gateway": ("haproxy", "gateway"), "wafsvc": ("wafsvc", "wafsvc")}
    deployment, name = pods[service]
    docs = load_all(DEPLOY / "k8s" / f"{deployment}.yaml")
    return env(container(next(d for d in docs if d["kind"] == "Deployment"), name))


def deployed_haproxy_env(which: str) -> dict[str, str]:
    return deployed_env(which, "haproxy")


@pytest.mark.parametrize("which", ["compose", "kubernetes"])
@pytest.mark.parametrize("binary", haproxy_binaries() or [pytest.param(None, marks=pytest.mark.skip("no haproxy"))])
def test_haproxy_accepts_the_cfg_with_the_deployed_environment(binary, which):
    """`haproxy -c` parses and checks the cfg without binding anything."""
    deployed = deployed_haproxy_env(which)
    checked = dict(deployed)
    # Service names resolve only inside Docker or the cluster; the image's
    # SPOE_CONF is a copy of the same file.
    for name in ("BACKEND_ADDR", "GATEWAY_ADDR"):
        checked[name] = "127.0.0.1:" + deployed[name].rsplit(":", 1)[1]
    assert pathlib.Path(deployed["SPOE_CONF"]).name == stack_default("spoe_conf").name
    checked["SPOE_CONF"] = str(stack_default("spoe_conf"))
    result = subprocess.run([binary, "-c", "-f", str(HAPROXY_CFG)], env={"PATH": "/usr/bin:/bin", **checked},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr

def test_haproxy_resolves_names_again_only_where_its_resolver_can():
    """Compose: a recreated gateway container gets a new address, which
    HAProxy must follow (RESOLVE_SERVERS on, the cfg's default). Kubernetes:
    HAProxy's resolver ignores search domains, so the short Service name in
    BACKEND_ADDR would stop resolving; Service addresses are stable (off)."""
    default = re.search(r"^\s*presetenv\s+RESOLVE_SERVERS\s+(\S+)", HAPROXY_CFG.read_text(), re.M).group(1)
    assert deployed_haproxy_env("compose").get("RESOLVE_SERVERS", default) == "on"
    kubernetes = deployed_haproxy_env("kubernetes")
    assert "." not in kubernetes["BACKEND_ADDR"].rsplit(":", 1)[0]
    assert kubernetes["RESOLVE_SERVERS"] == "off"


class _Captured(Exception):
    pass


@pytest.fixture()
def make_up_spec(monkeypatch) -> processes.StackSpec:
    """The StackSpec `make up` builds, caught before anything starts."""
    import stack.__main__ as make_up

    def capture(spec):
        raise _Captured(spec)

    monkeypatch.setattr(make_up, "Stack", capture)
    for name in ("WAFSVC_REPLICAS", "WAF_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(_Captured) as caught:
        make_up.main()
    return caught.value.args[0]


def test_compose_and_kubernetes_use_the_ports_of_make_up(compose, make_up_spec):
    spec = make_up_spec
    services = compose["services"]
    haproxy, gateway, wafsvc = (env_of(services[name]) for name in ("haproxy", "gateway", "wafsvc"))
    deployments = {d["metadata"]["name"]: d for d in load_all(DEPLOY / "k8s" / "haproxy.yaml")
                   + load_all(DEPLOY / "k8s" / "wafsvc.yaml") if d["kind"] == "Deployment"}
    k8s_haproxy = env(container(deployments["haproxy"], "haproxy"))
    k8s_gateway = env(container(deployments["haproxy"], "gateway"))
    k8s_wafsvc = env(container(deployments["wafsvc"], "wafsvc"))
    for label, env_haproxy, env_gateway, env_wafsvc in (("compose", haproxy, gateway, wafsvc),
                                                        ("kubernetes", k8s_haproxy, k8s_gateway, k8s_wafsvc)):
        assert (port_of(env_haproxy["FRONTEND_ADDR"]), port_of(env_haproxy["FRONTEND_ALT_ADDR"]),
                port_of(env_haproxy["BACKEND_ADDR"]), port_of(env_gateway["GATEWAY_LISTEN"]),
                port_of(env_wafsvc["WAF_LISTEN"]), port_of(env_gateway["GATEWAY_METRICS"]),
                port_of(env_wafsvc["WAF_METRICS"])) == (
            spec.frontend_port, spec.frontend_alt_port, spec.backend_port, spec.gateway_port,
            spec.wafsvc_ports[0], port_of(spec.gateway_env["GATEWAY_METRICS"]), spec.wafsvc_metrics_ports[0]), label

# ------------------------------------------------------------- Dockerfiles --

def stages(dockerfile: pathlib.Path) -> dict[str, str]:
    """Stage name -> its text."""
    text = dockerfile.read_text()
    parts = re.split(r"^(?=FROM )", text, flags=re.M)
    out = {}
    for part in parts[1:]:
        match = re.match(r"FROM (\S+)(?: AS (\S+))?", part)
        out[match.group(2) or match.group(1)] = part
    return out


def dockerignore_allows(path: str) -> bool:
    allowed = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        if pattern == "*" or path == pattern or path.startswith(pattern + "/"):
            allowed = negate
    return allowed


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, HAPROXY_DOCKERFILE], ids=lambda p: p.name)
def test_dockerfile_copies_only_files_that_exist_and_reach_the_context(dockerfile):
    for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile.read_text(), re.M):
        for source in line.split()[:-1]:
            assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source} is missing"
            assert dockerignore_allows(source.rstrip("/")), f".dockerignore drops {source}"


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, HAPROXY_DOCKERFILE], ids=lambda p: p.name)
def test_dockerfiles_build_offline(dockerfile):
    """A `# syntax=` line makes BuildKit fetch its frontend image from Docker
    Hub, even when every base image is local: mirrored builds fail."""
    assert not re.search(r"^#\s*syntax\s*=", dockerfile.read_text(), re.M | re.I)


def stage_needs(all_stages: dict[str, str], name: str) -> set[str]:
    """The stages `name` is built from (FROM, COPY --from), transitively."""
    direct = set(re.findall(r"^FROM (\S+)", all_stages[name], re.M)) | set(
        re.findall(r"^COPY --from=(\S+)", all_stages[name], re.M))
    needed = set()
    for stage in direct & set(all_stages):
        needed |= {stage} | stage_needs(all_stages, stage)
    return needed


@pytest.mark.parametrize("target", ["backend", "gateway", "wafsvc"])
def test_classic_builder_runs_only_what_the_target_needs(target):
    """The classic builder builds every stage above the target: no stage up
    there that the target does not need may install or download anything,
    so the stdlib-only backend never runs a pip install or the CRS
    download, and the gateway never fetches CRS."""
    all_stages = stages(DOCKERFILE)
    names = list(all_stages)
    needed = stage_needs(all_stages, target)
    assert needed, f"{target} is built from nothing?"
    for name in names[:names.index(target)]:
        if name not in needed:
            for costly in ("pip install", "fetch_crs", "apt-get"):
                assert costly not in all_stages[name], f"--target {target} also builds {name} ({costly})"


def test_final_images_are_slim_debian_and_non_root():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.M)
    assert "alpine" not in text.lower().replace("never alpine", "")
    for name in ("wafsvc", "gateway", "backend"):
        stage = stages(DOCKERFILE)[name]
        assert re.search(r"^USER 10001(:10001)?$", stage, re.M), f"{name} must run as uid 10001"
        assert "pip install" not in stage and "apt-get" not in stage, f"{name} must not build anything"
    # Dependencies only from wheels: no compiler needed, none shipped.
    for name in ("deps-wafsvc", "deps-gateway"):
        assert "--only-binary=:all:" in stages(DOCKERFILE)[name]
    assert "libmodsecurity" not in stages(DOCKERFILE)["gateway"]


def test_image_env_names_exist_in_the_option_tables():
    for name, known in (("wafsvc", wafsvc_envs()), ("gateway", gateway_envs())):
        for line in re.findall(r"^ENV (.+)$", stages(DOCKERFILE)[name], re.M):
            assert {pair.split("=")[0] for pair in line.split()} <= known
    for line in re.findall(r"^ENV (.+(?:\\\n.+)*)$", HAPROXY_DOCKERFILE.read_text(), re.M):
        names = set(re.findall(r"(\w+)=", line))
        assert names <= haproxy_envs()


def test_wafsvc_image_keeps_the_base_config_where_the_default_points():
    """WAF_BASE_CONF defaults to rules/modsecurity.conf beside the package."""
    base_default = next(opt.default for opt in WAFSVC_OPTIONS if opt.env == "WAF_BASE_CONF")
    assert pathlib.Path(base_default) == ROOT / "rules" / "modsecurity.conf"
    stage = stages(DOCKERFILE)["wafsvc"]
    assert "COPY rules/ /app/rules/" in stage and "COPY wafsvc/ /app/wafsvc/" in stage
    assert "CRS_DIR=/opt/crs" in stage and "COPY --from=crs /opt/crs /opt/crs" in stage


def test_crs_is_pinned_by_version_and_checksum():
    stage = stages(DOCKERFILE)["crs"]
    version = re.search(r"^ARG CRS_VERSION=(\S+)$", stage, re.M).group(1)
    sha = re.search(r"^ARG CRS_SHA256=(\S*)$", stage, re.M).group(1)
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    assert re.fullmatch(r"[0-9a-f]{64}", sha)
    assert '--sha256 "${CRS_SHA256}"' in stage and '--version "${CRS_VERSION}"' in stage


# ----------------------------------------------------------- fetch_crs.py --

def crs_tree(root: pathlib.Path, version: str, rule_files: int = fetch_crs.MIN_RULE_FILES) -> pathlib.Path:
    top = root / f"coreruleset-{version}"
    (top / "rules").mkdir(parents=True)
    (top / "crs-setup.conf.example").write_text("# setup\n")
    for i in range(rule_files - 2):
        (top / "rules" / f"REQUEST-{930 + i}-X.conf").write_text("")
    (top / "rules" / "REQUEST-901-INITIALIZATION.conf").write_text(f"SecAction \"id:901001,ver:'OWASP_CRS/{version}'\"\n")
    (top / "rules" / "REQUEST-949-BLOCKING-EVALUATION.conf").write_text("")
    return top


def tarball(source: pathlib.Path, archive: pathlib.Path) -> str:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname=source.name)
    return hashlib.sha256(archive.read_bytes()).hexdigest()


def test_fetch_crs_verifies_unpacks_and_checks_the_layout(tmp_path):
    archive = tmp_path / "crs.tar.gz"
    sha = tarball(crs_tree(tmp_path / "src", "4.28.0"), archive)
    dest = tmp_path / "opt-crs"
    count = fetch_crs.fetch("4.28.0", sha, dest, url=archive.as_uri())
    assert count == fetch_crs.MIN_RULE_FILES
    assert (dest / "crs-setup.conf.example").is_file()


@pytest.mark.parametrize("sha", ["", "abc", "x" * 64])
def test_fetch_crs_refuses_to_run_without_a_pin(tmp_path, sha):
    # The URL is never opened: a missing pin fails before any download.
    with pytest.raises(fetch_crs.FetchError, match="CRS_SHA256 must be"):
        fetch_crs.fetch("4.28.0", sha, tmp_path / "dest", url=(tmp_path / "absent").as_uri())


def test_fetch_crs_rejects_a_tarball_with_another_checksum(tmp_path):
    archive = tmp_path / "crs.tar.gz"
    tarball(crs_tree(tmp_path / "src", "4.28.0"), archive)
    with pytest.raises(fetch_crs.FetchError, match="checksum mismatch"):
        fetch_crs.fetch("4.28.0", "0" * 64, tmp_path / "dest", url=archive.as_uri())
    assert not (tmp_path / "dest").exists()


def test_fetch_crs_rejects_another_version_and_a_bare_tree(tmp_path):
    archive = tmp_path / "crs.tar.gz"
    sha = tarball(crs_tree(tmp_path / "src", "4.27.0"), archive)
    with pytest.raises(fetch_crs.FetchError, match="does not carry CRS 4.28.0"):
        fetch_crs.fetch("4.28.0", sha, tmp_path / "a", url=archive.as_uri())
    bare = tmp_path / "bare" / "coreruleset-4.28.0"
    bare.mkdir(parents=True)
    sha = tarball(bare, archive)
    with pytest.raises(fetch_crs.FetchError, match="missing crs-setup.conf.example"):
        fetch_crs.fetch("4.28.0", sha, tmp_path / "b", url=archive.as_uri())


@pytest.mark.parametrize("kind,name", [
    (tarfile.REGTYPE, "coreruleset-4.28.0/../../escaped"),
    (tarfile.REGTYPE, "/tmp/escaped"),
    (tarfile.SYMTYPE, "coreruleset-4.28.0/escaped"),
    (tarfile.CHRTYPE, "coreruleset-4.28.0/escaped"),
])
def test_fetch_crs_never_writes_outside_its_destination(tmp_path, kind, name):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        payload = b"owned\n"
        member = tarfile.TarInfo(name)
        member.type = kind
        member.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else ""
        member.size = len(payload) if kind == tarfile.REGTYPE else 0
        tar.addfile(member, io.BytesIO(payload) if kind == tarfile.REGTYPE else None)
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    with pytest.raises(fetch_crs.FetchError, match="refusing tarball member"):
        fetch_crs.fetch("4.28.0", sha, tmp_path / "dest" / "crs", url=archive.as_uri())
    assert not (tmp_path / "dest").exists()


def real_crs_dir(version: str) -> pathlib.Path | None:
    """The CRS release the project measures with (../shared beside the
    checkout in CI; two levels up from a worktree)."""
    for base in (ROOT.parent, ROOT.parent.parent):
        candidate = base / "shared" / "crs" / f"v{version}"
        if candidate.is_dir():
            return candidate
    return None


def test_the_pinned_crs_release_has_the_layout_the_build_checks():
    version = re.search(r"^ARG CRS_VERSION=(\S+)$", DOCKERFILE.read_text(), re.M).group(1)
    crs = real_crs_dir(version)
    if crs is None:
        pytest.skip(f"no copy of CRS v{version} beside the checkout (../shared/crs)")
    assert fetch_crs.check_layout(crs, version) >= fetch_crs.MIN_RULE_FILES


# ------------------------------------------------------------- healthcheck --

@pytest.mark.parametrize("listen,target", [
    ("0.0.0.0:50051", "127.0.0.1:50051"),
    (":50051", "127.0.0.1:50051"),
    ("[::]:50051", "[::1]:50051"),
    ("10.1.2.3:7000", "10.1.2.3:7000"),
])
def test_healthcheck_dials_the_listen_address_through_loopback(listen, target):
    assert healthcheck.target_for(listen) == target


def test_healthcheck_asks_for_the_waf_service_by_default():
    assert healthcheck.SERVICE == WAF_SERVICE


def test_healthcheck_rejects_a_bad_listen_address(monkeypatch, capsys):
    monkeypatch.setenv("WAF_LISTEN", "nowhere")
    assert healthcheck.main([]) == 2
    assert "WAF_LISTEN" in capsys.readouterr().err


@pytest.mark.parametrize("listen,target", [
    ("0.0.0.0:12345", ("127.0.0.1", 12345)),
    (":12345", ("127.0.0.1", 12345)),
    ("[::]:12345", ("::1", 12345)),
    ("127.0.0.1:7000", ("127.0.0.1", 7000)),
])
def test_gateway_healthcheck_dials_the_listen_address_through_loopback(listen, target):
    assert dial_address(listen) == target


def test_gateway_healthcheck_rejects_a_bad_listen_address(monkeypatch, capsys):
    monkeypatch.setenv("GATEWAY_LISTEN", "nowhere")
    assert gateway_healthcheck.main([]) == 2
    assert "GATEWAY_LISTEN" in capsys.readouterr().err


def test_the_gateway_is_probed_with_spop_hello_everywhere(compose, objects):
    """The image, Compose and the Kubernetes sidecar all ask the gateway
    itself (python -m gateway.healthcheck), not just its socket."""
    probe = ["python", "-m", "gateway.healthcheck"]
    assert compose["services"]["gateway"]["healthcheck"]["test"] == ["CMD", *probe]
    gateway_stage = stages(DOCKERFILE)["gateway"]
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD " + re.escape(str(probe).replace("'", '"')), gateway_stage, re.M)
    sidecar = container(objects[("Deployment", "haproxy")], "gateway")
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert sidecar[name]["exec"]["command"] == probe, name


# -------------------------------------------------------------- Kubernetes --

@pytest.fixture(scope="module")
def kustomization() -> dict:
    return yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())


@pytest.fixture(scope="module")
def objects(kustomization) -> dict[tuple[str, str], dict]:
    out = {}
    for resource in kustomization["resources"]:
        for doc in load_all(DEPLOY / resource):
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def of_kind(objects, kind: str) -> dict[str, dict]:
    return {name: doc for (k, name), doc in objects.items() if k == kind}


def pod_containers(deployment: dict) -> list[dict]:
    spec = deployment["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def container(deployment: dict, name: str) -> dict:
    return next(c for c in pod_containers(deployment) if c["name"] == name)


def env(c: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in c.get("env", [])}


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_kustomization_sources_exist_and_haproxy_config_is_the_shared_one(kustomization):
    for resource in kustomization["resources"]:
        assert (DEPLOY / resource).is_file()
    generated = {gen["name"]: [DEPLOY / f for f in gen["files"]] for gen in kustomization["configMapGenerator"]}
    assert generated["haproxy-config"] == [stack_default("haproxy_cfg"), stack_default("spoe_conf")]
    assert all(path.is_file() for paths in generated.values() for path in paths)


def test_selectors_match_their_pods(objects):
    deployments = of_kind(objects, "Deployment")
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selects(deployment["spec"]["selector"]["matchLabels"], labels), name
        for spread in deployment["spec"]["template"]["spec"].get("topologySpreadConstraints", []):
            assert selects(spread["labelSelector"]["matchLabels"], labels), name
    for kind in ("Service", "PodDisruptionBudget"):
        for name, doc in of_kind(objects, kind).items():
            selector = doc["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            matched = [d for d in deployments.values() if selects(selector, d["spec"]["template"]["metadata"]["labels"])]
            assert len(matched) == 1, f"{kind} {name} selects {len(matched)} Deployments"


def test_service_ports_target_named_container_ports(objects):
    deployments = of_kind(objects, "Deployment")
    for name, service in of_kind(objects, "Service").items():
        deployment = next(d for d in deployments.values()
                          if selects(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"]))
        ports = {p["name"]: p["containerPort"] for c in pod_containers(deployment) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"Service {name}: no container port named {port['targetPort']}"


def test_hpa_scales_wafsvc_on_cpu_it_requests(objects):
    hpa = of_kind(objects, "HorizontalPodAutoscaler")["wafsvc"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "wafsvc") and ("Deployment", "wafsvc") in objects
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    wafsvc = container(objects[("Deployment", "wafsvc")], "wafsvc")
    assert wafsvc["resources"]["requests"]["cpu"]
    assert hpa["spec"]["minReplicas"] >= 2, "a PDB of maxUnavailable 1 needs two replicas to allow any eviction"
    assert "replicas" not in objects[("Deployment", "wafsvc")]["spec"], "the HPA owns the replica count"


def test_wafsvc_is_headless_and_probed_over_grpc(objects):
    service = objects[("Service", "wafsvc")]
    assert service["spec"]["clusterIP"] == "None"
    wafsvc = container(objects[("Deployment", "wafsvc")], "wafsvc")
    grpc_port = next(p["containerPort"] for p in wafsvc["ports"] if p["name"] == "grpc")
    assert port_of(env(wafsvc)["WAF_LISTEN"]) == grpc_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert wafsvc[probe]["grpc"]["port"] == grpc_port, probe
    assert wafsvc["readinessProbe"]["grpc"]["service"] == WAF_SERVICE
    service_port = next(p["port"] for p in service["spec"]["ports"] if p["targetPort"] == "grpc")
    gateway = container(objects[("Deployment", "haproxy")], "gateway")
    assert env(gateway)["GATEWAY_WAFSVC"] == f"dns:///wafsvc:{service_port}"


def test_wafsvc_runs_where_its_wheel_exists(objects):
    pod = objects[("Deployment", "wafsvc")]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"kubernetes.io/arch": "amd64"}


def test_wafsvc_workers_match_its_cpu_limit(objects):
    """Inside a container "one worker per CPU" would count the node's CPUs."""
    wafsvc = container(objects[("Deployment", "wafsvc")], "wafsvc")
    assert int(env(wafsvc)["WAF_WORKERS"]) == int(wafsvc["resources"]["limits"]["cpu"])


def test_wafsvc_rules_come_from_the_configmap(objects, kustomization):
    deployment = objects[("Deployment", "wafsvc")]
    wafsvc = container(deployment, "wafsvc")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mount = next(m for m in wafsvc["volumeMounts"] if volumes[m["name"]].get("configMap"))
    config_map = volumes[mount["name"]]["configMap"]["name"]
    files = next(g["files"] for g in kustomization["configMapGenerator"] if g["name"] == config_map)
    assert env(wafsvc)["RULES"] in {f"{mount['mountPath']}/{pathlib.Path(f).name}" for f in files}


def test_haproxy_pod_reaches_its_gateway_sidecar_on_loopback(objects):
    deployment = objects[("Deployment", "haproxy")]
    gateway, haproxy = container(deployment, "gateway"), container(deployment, "haproxy")
    # A native sidecar: started before HAProxy, stopped after it.
    assert gateway in deployment["spec"]["template"]["spec"]["initContainers"]
    assert gateway["restartPolicy"] == "Always"
    assert env(gateway)["GATEWAY_LISTEN"] == "127.0.0.1:12345"
    assert env(haproxy)["GATEWAY_ADDR"] == env(gateway)["GATEWAY_LISTEN"]
    backend_host, backend_port = env(haproxy)["BACKEND_ADDR"].split(":")
    assert any(p["port"] == int(backend_port) for p in objects[("Service", backend_host)]["spec"]["ports"])
    assert {p["containerPort"] for p in haproxy["ports"]} == {
        port_of(env(haproxy)["FRONTEND_ADDR"]), port_of(env(haproxy)["FRONTEND_ALT_ADDR"])}
    assert port_of(env(gateway)["GATEWAY_METRICS"]) == 9101
    assert port_of(env(container(objects[("Deployment", "wafsvc")], "wafsvc"))["WAF_METRICS"]) == 9102


def test_haproxy_reads_the_generated_config_where_the_image_expects_it(objects):
    deployment = objects[("Deployment", "haproxy")]
    haproxy = container(deployment, "haproxy")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mount = haproxy["volumeMounts"][0]
    assert volumes[mount["name"]]["configMap"]["name"] == "haproxy-config"
    assert mount["mountPath"] == IMAGE_HAPROXY_DIR
    assert env(haproxy)["SPOE_CONF"] == f"{IMAGE_HAPROXY_DIR}/{stack_default('spoe_conf').name}"


def test_kubernetes_env_names_exist_in_the_option_tables_and_haproxy_cfg(objects):
    known = {"wafsvc": wafsvc_envs(), "gateway": gateway_envs(), "haproxy": haproxy_envs(), "backend": set()}
    for deployment in of_kind(objects, "Deployment").values():
        for c in pod_containers(deployment):
            unknown = set(env(c)) - known[c["name"]]
            assert not unknown, f"container {c['name']} sets variables nothing reads: {unknown}"
    assert stack_haproxy_env_names() <= set(env(container(objects[("Deployment", "haproxy")], "haproxy")))


# Where Kubernetes differs from Compose on purpose: the gateway is HAProxy's
# sidecar (loopback), a pod runs 2 workers (its CPU limit), the rules
# ConfigMap is a directory mount, HAProxy does not re-resolve Service names.
KUBERNETES_DIFFERS = {"GATEWAY_ADDR", "GATEWAY_LISTEN", "WAF_WORKERS", "RULES", "RESOLVE_SERVERS"}


@pytest.mark.parametrize("service", ["haproxy", "gateway", "wafsvc"])
def test_kubernetes_carries_what_compose_sets(service):
    """Same settings in both (a Compose ${VAR:-default} counts as its
    default), except where they differ by design."""
    composed = {name: re.sub(r"^\$\{\w+:-(.*)\}$", r"\1", value)
                for name, value in deployed_env("compose", service).items()}
    kubernetes = deployed_env("kubernetes", service)
    differ = {name for name in set(composed) | set(kubernetes) if composed.get(name) != kubernetes.get(name)}
    assert differ <= KUBERNETES_DIFFERS, {n: (composed.get(n), kubernetes.get(n)) for n in differ - KUBERNETES_DIFFERS}


def test_every_kubernetes_container_is_probed_for_readiness_and_liveness(objects):
    """The counterpart of Compose's restart policies: a container that stops
    answering is restarted, and gets no traffic while it is not ready."""
    for deployment in of_kind(objects, "Deployment").values():
        for c in pod_containers(deployment):
            for probe in ("readinessProbe", "livenessProbe"):
                assert probe in c, f"{c['name']} has no {probe}"


def option_value(options, env_name: str, deployed: dict[str, str]) -> str:
    default = next(opt.default for opt in options if opt.env == env_name)
    return deployed.get(env_name, str(default))


@pytest.mark.parametrize("which", ["compose", "kubernetes"])
def test_held_transactions_outlive_haproxys_wait_for_the_response(which):
    """Response inspection (frontend web): a transaction kept by its request
    must still be held when the slowest response HAProxy waits for (timeout
    server) comes back, or it misses (EXPIRED)."""
    ttl_ms = int(option_value(WAFSVC_OPTIONS, "WAF_TRANSACTION_TTL_MS", deployed_env(which, "wafsvc")))
    assert "inspect_response) bool(true)" in HAPROXY_CFG.read_text(), "the shipped cfg inspects responses"
    assert ttl_ms > haproxy_timeout_s("server") * 1000


@pytest.mark.parametrize("which", ["compose", "kubernetes"])
def test_gateway_knows_haproxys_buffer_size(which):
    """A body without Content-Length that fills tune.bufsize is judged cut
    only when the gateway knows that size (GATEWAY_HAPROXY_BUFSIZE)."""
    bufsize = int(re.search(r"^\s*tune\.bufsize\s+(\d+)$", HAPROXY_CFG.read_text(), re.M).group(1))
    assert int(option_value(GATEWAY_OPTIONS, "GATEWAY_HAPROXY_BUFSIZE", deployed_env(which, "gateway"))) == bufsize


def test_wafsvc_memory_limit_holds_its_transactions_at_their_cap(objects):
    """Each worker may hold WAF_MAX_HELD_TRANSACTIONS for their responses;
    their measured size (docs/measurements/held_memory.json) at that cap,
    on top of every process's own memory, must fit the limit."""
    import json
    measured = json.loads((ROOT / "docs" / "measurements" / "held_memory.json").read_text())
    per_transaction = max(m["bytes_per_transaction"] for m in measured["per_transaction"].values())
    process_mib = max(m["rss_start_mib"] for m in measured["per_transaction"].values())
    wafsvc = container(objects[("Deployment", "wafsvc")], "wafsvc")
    workers = int(env(wafsvc)["WAF_WORKERS"])
    held = int(option_value(WAFSVC_OPTIONS, "WAF_MAX_HELD_TRANSACTIONS", env(wafsvc)))
    limit = wafsvc["resources"]["limits"]["memory"]
    assert limit.endswith("Gi") or limit.endswith("Mi"), limit
    limit_bytes = int(limit[:-2]) * (2**30 if limit.endswith("Gi") else 2**20)
    # The workers, the supervisor and its metrics process.
    needed = workers * held * per_transaction + (workers + 2) * process_mib * 2**20
    assert needed < limit_bytes, f"{needed / 2**20:.0f} MiB needed, limit {limit}"


def prestop_seconds(c: dict) -> int:
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    return int(command[1])


def haproxy_timeout_s(name: str) -> int:
    match = re.search(rf"^\s*timeout {name}\s+(\d+)s$", HAPROXY_CFG.read_text(), re.M)
    return int(match.group(1))


def test_grace_periods_cover_prestop_and_drain(objects):
    wafsvc_pod = objects[("Deployment", "wafsvc")]["spec"]["template"]["spec"]
    wafsvc = container(objects[("Deployment", "wafsvc")], "wafsvc")
    assert wafsvc_pod["terminationGracePeriodSeconds"] > prestop_seconds(wafsvc) + DRAIN_GRACE_S
    haproxy_pod = objects[("Deployment", "haproxy")]["spec"]["template"]["spec"]
    haproxy = container(objects[("Deployment", "haproxy")], "haproxy")
    # HAProxy's soft stop waits for requests in flight, bounded by its timeouts.
    drain = max(haproxy_timeout_s("client"), haproxy_timeout_s("server"))
    assert haproxy_pod["terminationGracePeriodSeconds"] > prestop_seconds(haproxy) + drain


def test_every_container_runs_as_non_root_without_privileges(objects):
    for deployment in of_kind(objects, "Deployment").values():
        pod_security = deployment["spec"]["template"]["spec"].get("securityContext", {})
        for c in pod_containers(deployment):
            security = {**pod_security, **c.get("securityContext", {})}
            assert security.get("runAsNonRoot") is True and isinstance(security.get("runAsUser"), int), c["name"]
            assert security.get("allowPrivilegeEscalation") is False, c["name"]


def test_kustomize_builds_the_manifests():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (not in Debian 12; any kubectl with kustomize will do)")
    result = subprocess.run([kubectl, "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    config_maps = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "ConfigMap"}
    haproxy_map = next(doc for name, doc in config_maps.items() if name.startswith("haproxy-config-"))
    assert haproxy_map["data"]["haproxy.cfg"] == HAPROXY_CFG.read_text()
    deployment = next(doc for doc in docs if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "haproxy")
    mounted = {v["configMap"]["name"] for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert mounted <= set(config_maps), "volumes must reference the generated (hashed) ConfigMaps"


# ------------------------------------------------------------ shared rules --

def test_site_rules_load_in_the_real_engine_and_deny_the_smoke_test():
    from wafsvc.engine import Engine
    from wafsvc.rules import RuleSetSpec

    base_conf = next(opt.default for opt in WAFSVC_OPTIONS if opt.env == "WAF_BASE_CONF")
    engine = Engine({"": RuleSetSpec(base_conf=base_conf, rules_file=str(DEPLOY / "rules" / "site.conf"))})
    request = waf_pb2.EvaluateRequest(client_ip="10.0.0.1", client_port=40000, server_ip="10.0.0.2",
                                      server_port=8080, method="GET", uri=b"/", http_version="1.1",
                                      content_length=-1)
    request.headers.add(name=b"host", value=b"example.com")
    assert not engine.evaluate(request).intervention
    request.headers.add(name=b"x-waf-smoke-test", value=b"deny")
    verdict = engine.evaluate(request)
    assert (verdict.intervention, verdict.status) == (True, 403)
    assert [m.id for m in verdict.matches] == [1001]


def test_docs_state_the_replica_join_delay_the_gateway_has():
    """The Compose and Kubernetes sections (docs/deployment.md) promise how
    soon a new replica gets traffic: the gateway's channel recycling period."""
    recycle_ms = next(opt.default for opt in GATEWAY_OPTIONS if opt.env == "GATEWAY_RECYCLE_MS")
    text = (ROOT / "docs" / "deployment.md").read_text()
    section = " ".join(text[text.index("## Docker Compose"):text.index("## TLS and tokens")].split())
    assert section.count(f"`GATEWAY_RECYCLE_MS`, {recycle_ms // 1000} s") == 2
