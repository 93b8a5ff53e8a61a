"""docker-compose.yml, its Dockerfile and .env.example: the structure an operator relies on (parsed, not run)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
ENV_EXAMPLE_VALUES = dict(
    line.split("=", 1)
    for line in (ROOT / ".env.example").read_text().splitlines()
    if line.strip() and not line.lstrip().startswith("#")
)
ENV_EXAMPLE = set(ENV_EXAMPLE_VALUES)
BILLING_SERVICES = ("migrate", "sandbox", "worker", "events", "beat", "flower", "metrics")
MONITORING = ("prometheus", "grafana")


class _ComposeLoader(yaml.SafeLoader):
    """Keeps Compose's merge tags (!reset, !override) as (tag, value) pairs."""


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> tuple[str, Any]:
    if isinstance(node, yaml.MappingNode):
        return node.tag, loader.construct_mapping(node)
    assert isinstance(node, yaml.ScalarNode)
    return node.tag, loader.construct_scalar(node)


for _tag in ("!reset", "!override"):
    _ComposeLoader.add_constructor(_tag, _tagged)
PRODUCTION: dict[str, Any] = yaml.load((ROOT / "deploy" / "compose.production.yml").read_text(), Loader=_ComposeLoader)[
    "services"
]

_spec = importlib.util.spec_from_file_location("production_check", ROOT / "deploy" / "production_check.py")
assert _spec is not None and _spec.loader is not None
PRODUCTION_CHECK = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(PRODUCTION_CHECK)


def _interpolated(environment: dict[str, str], values: dict[str, str]) -> dict[str, str]:
    """Compose's interpolation of ${VAR}, ${VAR:-default} and ${VAR:?error} (ValueError for the last)."""

    def one(match: re.Match[str]) -> str:
        name, operator, argument = match.group(1), match.group(2), match.group(3) or ""
        value = values.get(name, "")
        if operator == ":?" and not value:
            raise ValueError(f"{name}: {argument}")
        if operator == ":-" and not value:
            return argument
        return value

    pattern = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?:(:[-?])([^}]*))?\}")
    return {key: pattern.sub(one, str(value)) for key, value in environment.items()}


def _run_production_check(environment: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The check as the container runs it: its own process, only the stack's variables for Tpaga."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPAGA_")} | environment
    return subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "production_check.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _command(service: str) -> str:
    command = SERVICES[service]["command"]
    return " ".join(command) if isinstance(command, list) else str(command)


def _depends(service: str) -> dict[str, str]:
    return {name: spec["condition"] for name, spec in SERVICES[service]["depends_on"].items()}


def test_the_stack_has_every_service() -> None:
    assert set(SERVICES) == {
        "postgres",
        "redis",
        "migrate",
        "sandbox",
        "worker",
        "events",
        "beat",
        "flower",
        "metrics",
        "prometheus",
        "grafana",
    }


@pytest.mark.parametrize("service", BILLING_SERVICES)
def test_billing_services_build_from_the_one_dockerfile(service: str) -> None:
    build = SERVICES[service]["build"]
    assert build == {"context": ".", "dockerfile": "deploy/Dockerfile"}


def test_the_dockerfile_installs_the_package_on_python_311_slim_as_a_non_root_user() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.M)
    assert "pip install ." in dockerfile
    assert re.search(r"^USER billing$", dockerfile, re.M)
    assert (ROOT / "deploy" / "Dockerfile.dockerignore").is_file()


def test_postgres_and_redis_have_health_checks() -> None:
    assert "pg_isready" in " ".join(SERVICES["postgres"]["healthcheck"]["test"])
    assert "ping" in SERVICES["redis"]["healthcheck"]["test"]


def test_redis_never_evicts_and_persists_with_aof() -> None:
    command = _command("redis")
    assert "--maxmemory-policy noeviction" in command
    assert "--appendonly yes" in command


def test_a_one_shot_migration_runs_before_workers_and_beat() -> None:
    assert SERVICES["migrate"]["command"] == ["billing", "db", "upgrade"]
    assert SERVICES["migrate"]["restart"] == "no"
    assert _depends("migrate") == {"postgres": "service_healthy"}
    for service in ("worker", "beat"):
        assert _depends(service)["migrate"] == "service_completed_successfully"
        assert _depends(service)["redis"] == "service_healthy"


def test_workers_are_scalable_and_run_celery_worker() -> None:
    worker = SERVICES["worker"]
    assert "container_name" not in worker
    assert "replicas" in worker["deploy"]
    assert worker["command"][0] == "billing-worker"
    script = (ROOT / "deploy" / "worker.sh").read_text()
    assert "exec celery -A tasks worker" in script
    assert "COPY deploy/worker.sh /usr/local/bin/billing-worker" in (ROOT / "deploy" / "Dockerfile").read_text()


def test_the_workers_consume_every_queue_but_the_events_one_which_one_events_worker_consumes() -> None:
    from tasks.config import EVENTS, QUEUE_NAMES

    # A queue added to the app and forgotten here would have no consumer: compare with the app's own list.
    assert SERVICES["worker"]["command"][1:] == ["-Q", ",".join(q for q in QUEUE_NAMES if q != EVENTS)]
    events = SERVICES["events"]
    assert events["command"] == ["billing-worker", "-Q", EVENTS]
    # One delivery loop per deployment (a lease): one replica, started after the migration like the workers.
    assert events["deploy"]["replicas"] == 1
    assert _depends("events") == {"migrate": "service_completed_successfully", "redis": "service_healthy"}
    # The worker's context builds the gateway client, so it needs the same database and keys as the workers.
    assert events["environment"] == SERVICES["worker"]["environment"]


def test_exactly_one_beat() -> None:
    beat = SERVICES["beat"]
    assert beat["deploy"]["replicas"] == 1
    assert _command("beat").startswith("celery -A tasks beat")


def test_flower_requires_basic_auth_and_is_read_only() -> None:
    flower = SERVICES["flower"]
    assert _command("flower").startswith("celery -A tasks flower")
    assert "--read_only" in flower["command"]
    # ${VAR:?message}: compose refuses to start without it.
    assert re.fullmatch(r"\$\{FLOWER_BASIC_AUTH:\?.+\}", flower["environment"]["FLOWER_BASIC_AUTH"])
    assert all(port.startswith("127.0.0.1:") for port in flower["ports"])


def test_flower_options_used_exist_in_the_installed_flower() -> None:
    from flower.options import default_options

    known = set(default_options._options)  # tornado keeps option names with dashes
    used = {m.group(1).replace("_", "-") for m in re.finditer(r"--([a-z_]+)", _command("flower"))}
    assert used <= known
    assert "basic-auth" in known  # FLOWER_BASIC_AUTH maps onto it


@pytest.mark.parametrize("service", ["beat", "flower", *MONITORING])
def test_beat_flower_and_monitoring_get_no_database_or_gateway_secrets(service: str) -> None:
    environment = SERVICES[service].get("environment", {})
    assert not {"TPAGA_PRIVATE_KEY", "TPAGA_PUBLIC_KEY", "DATABASE_URL"} & set(environment)


def test_workers_reach_the_sandbox_over_loopback_for_the_try_out() -> None:
    assert SERVICES["worker"]["network_mode"] == "service:sandbox"
    assert "127.0.0.1" in SERVICES["worker"]["environment"]["TPAGA_API_URL"]
    assert "--host 0.0.0.0" in _command("sandbox")


def test_the_production_override_detaches_workers_from_the_sandbox() -> None:
    worker = PRODUCTION["worker"]
    assert worker["network_mode"][0] == "!reset"
    assert "sandbox" not in worker["depends_on"][1]
    assert worker["environment"]["TPAGA_API_URL"].startswith("${TPAGA_API_URL:?")
    assert PRODUCTION["sandbox"]["profiles"] == ["tryout"]


# --- the production override refuses the emulator (what a plain copy of .env.example points at) ------------


def test_the_production_check_runs_before_the_migration_and_the_workers() -> None:
    check = PRODUCTION["production-check"]
    assert check["build"] == {"context": ".", "dockerfile": "deploy/Dockerfile"}
    assert check["command"] == ["billing-production-check"]
    assert check["restart"] == "no"
    assert PRODUCTION["migrate"]["depends_on"]["production-check"] == {"condition": "service_completed_successfully"}
    tag, worker_depends = PRODUCTION["worker"]["depends_on"]
    assert tag == "!override"
    assert worker_depends["production-check"] == {"condition": "service_completed_successfully"}
    # It checks exactly what the workers get.
    for name in ("TPAGA_API_URL", "TPAGA_PRIVATE_KEY"):
        assert check["environment"][name] == PRODUCTION["worker"]["environment"][name]
    assert (
        "COPY deploy/production_check.py /usr/local/bin/billing-production-check"
        in (ROOT / "deploy" / "Dockerfile").read_text()
    )
    assert "!deploy/production_check.py" in (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
    assert (ROOT / "deploy" / "production_check.py").stat().st_mode & 0o111


def test_the_production_stack_refuses_a_plain_copy_of_env_example() -> None:
    environment = _interpolated(PRODUCTION["production-check"]["environment"], ENV_EXAMPLE_VALUES)
    result = _run_production_check(environment)
    assert result.returncode == 2, result
    assert "TPAGA_API_URL=http://127.0.0.1:8090/api/ is not an https URL" in result.stderr
    assert "TPAGA_PRIVATE_KEY is the emulator's private key" in result.stderr
    assert "TPAGA_PUBLIC_KEY is the emulator's public key" in result.stderr
    assert "refusing to start" in result.stderr
    assert ENV_EXAMPLE_VALUES["TPAGA_PRIVATE_KEY"] not in result.stdout + result.stderr


def test_the_production_stack_starts_with_tpaga_s_url_and_real_keys() -> None:
    values = {
        **ENV_EXAMPLE_VALUES,
        "TPAGA_API_URL": "https://api.tpaga.co/api/",
        "TPAGA_PRIVATE_KEY": "a-real-private-key",
        "TPAGA_PUBLIC_KEY": "pk_prod_a-real-public-key",
    }
    result = _run_production_check(_interpolated(PRODUCTION["production-check"]["environment"], values))
    assert result.returncode == 0, result
    assert result.stderr == ""


def test_compose_refuses_a_production_stack_without_a_url_or_a_private_key() -> None:
    values = {k: v for k, v in ENV_EXAMPLE_VALUES.items() if k not in ("TPAGA_API_URL", "TPAGA_PRIVATE_KEY")}
    with pytest.raises(ValueError, match=r"TPAGA_API_URL: set TPAGA_API_URL \(https\) in .env"):
        _interpolated(PRODUCTION["production-check"]["environment"], values)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:8090/api/", "not an https URL"),
        ("http://api.tpaga.co/api/", "not an https URL"),
        ("127.0.0.1:8090/api/", "not an https URL"),
        ("https://127.0.0.1:8090/api/", "loopback address"),
        ("https://127.1.2.3/api/", "loopback address"),
        ("https://[::1]:8090/api/", "loopback address"),
        ("https://0.0.0.0:8090/api/", "loopback address"),
        ("https://localhost:8090/api/", "loopback address"),
        ("https://LOCALHOST./api/", "loopback address"),
        ("https://tpaga.localhost/api/", "loopback address"),
        ("https://sandbox:8090/api/", "emulator service (sandbox)"),
        ("https://tpaga-billing-sandbox-1:8090/api/", "emulator service (sandbox)"),
        ("https://tpaga_billing_sandbox_2:8090/api/", "emulator service (sandbox)"),
        ("", "empty"),
    ],
)
def test_the_production_check_refuses_every_emulator_url(url: str, why: str) -> None:
    problem = PRODUCTION_CHECK.url_problem(url)
    assert problem is not None
    assert why in problem


def test_the_production_check_never_repeats_credentials_in_a_url() -> None:
    problem = PRODUCTION_CHECK.url_problem("http://user:s3cret@127.0.0.1:8090/api/")
    assert problem == (
        "TPAGA_API_URL=http://127.0.0.1:8090/api/ is not an https URL: production talks to Tpaga over https only"
    )


@pytest.mark.parametrize(
    "url", ["https://api.tpaga.co/api/", "https://sandbox.tpaga.co/api/", "https://tpaga.internal.example:8443/"]
)
def test_the_production_check_accepts_a_remote_https_gateway(url: str) -> None:
    # Tpaga's own sandbox (sandbox.tpaga.co) is a remote gateway, not the bundled emulator.
    assert PRODUCTION_CHECK.url_problem(url) is None


def test_the_check_knows_the_emulator_service_and_keys_the_stack_and_the_docs_use() -> None:
    from billing.sandbox import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY

    emulators = {
        name for name, spec in SERVICES.items() if "command" in spec and _command(name).startswith("billing sandbox")
    }
    assert emulators == {PRODUCTION_CHECK.EMULATOR_SERVICE}
    sandbox_doc = (ROOT / "docs" / "sandbox.md").read_text()
    assert DEFAULT_PRIVATE_KEY in sandbox_doc
    assert DEFAULT_PUBLIC_KEY in sandbox_doc
    assert set(PRODUCTION_CHECK.DEMO_KEYS) == {DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY}


def test_every_variable_the_stack_and_the_code_read_is_in_env_example() -> None:
    referenced = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", (ROOT / "docker-compose.yml").read_text()))
    code = (ROOT / "billing" / "config.py").read_text() + (ROOT / "tasks" / "config.py").read_text()
    read_by_code = set(re.findall(r"\"((?:BILLING|TPAGA|CELERY|DATABASE)_[A-Z_]+)\"", code))
    assert referenced - ENV_EXAMPLE == set()
    assert read_by_code - ENV_EXAMPLE == set()


def test_every_variable_the_code_reads_reaches_the_workers() -> None:
    # Compose reads .env only to interpolate the file: a variable the file does not pass never reaches a container.
    code = (ROOT / "billing" / "config.py").read_text() + (ROOT / "tasks" / "config.py").read_text()
    read_by_code = set(re.findall(r"\"((?:BILLING|TPAGA|CELERY|DATABASE)_[A-Z_]+)\"", code))
    assert read_by_code - set(SERVICES["worker"]["environment"]) == set()


def test_env_example_holds_no_real_secret() -> None:
    from billing.sandbox import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY

    values = ENV_EXAMPLE_VALUES
    assert values["TPAGA_PRIVATE_KEY"] == DEFAULT_PRIVATE_KEY
    assert values["TPAGA_PUBLIC_KEY"] == DEFAULT_PUBLIC_KEY
    assert "change-me" in values["POSTGRES_PASSWORD"]


# --- metrics and the monitoring profile ------------------------------------------------------------------


def test_the_metrics_service_serves_on_the_documented_port_with_the_database_only() -> None:
    metrics = SERVICES["metrics"]
    assert metrics["command"] == ["billing", "metrics", "serve", "--host", "0.0.0.0", "--port", "9108"]
    assert set(metrics["environment"]) == {"DATABASE_URL", "BILLING_CLOCK"}
    assert metrics["environment"]["DATABASE_URL"] == SERVICES["worker"]["environment"]["DATABASE_URL"]
    assert metrics["ports"] == ["127.0.0.1:9108:9108"]
    assert _depends("metrics") == {"migrate": "service_completed_successfully"}
    assert "profiles" not in metrics


@pytest.mark.parametrize("service", MONITORING)
def test_prometheus_and_grafana_start_only_with_the_monitoring_profile_on_loopback(service: str) -> None:
    spec = SERVICES[service]
    assert spec["profiles"] == ["monitoring"]
    assert re.fullmatch(r"[a-z/]+:v?\d+\.\d+\.\d+", spec["image"])  # pinned, never :latest
    assert all(port.startswith("127.0.0.1:") for port in spec["ports"])


def _mounts(service: str) -> dict[str, str]:
    pairs = (volume.split(":")[:2] for volume in SERVICES[service]["volumes"])
    return {target: source for source, target in pairs}


def test_prometheus_scrapes_billing_and_flower_with_the_alert_rules() -> None:
    mounts = _mounts("prometheus")
    assert mounts["/etc/prometheus"] == "./deploy/prometheus"
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    assert "--config.file=/etc/prometheus/prometheus.yml" in SERVICES["prometheus"]["command"]
    assert config["rule_files"] == ["alerts.yml"]
    assert (ROOT / "deploy" / "prometheus" / "alerts.yml").is_file()
    targets = {
        job["job_name"]: (job.get("metrics_path", "/metrics"), job["static_configs"][0]["targets"])
        for job in config["scrape_configs"]
    }
    port = SERVICES["metrics"]["command"][-1]
    assert targets == {"billing": ("/metrics", [f"metrics:{port}"]), "flower": ("/metrics", ["flower:5555"])}
    assert "--port=5555" in SERVICES["flower"]["command"]


def test_grafana_is_provisioned_with_prometheus_and_the_billing_dashboard() -> None:
    mounts = _mounts("grafana")
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    assert mounts["/etc/grafana/dashboards/billing.json"] == "./deploy/grafana/billing.json"
    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"
    provider = yaml.safe_load((provisioning / "dashboards" / "billing.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/etc/grafana/dashboards"
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "billing.json").read_text())
    assert {panel["datasource"]["uid"] for panel in dashboard["panels"]} == {source["uid"]}
    assert SERVICES["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
