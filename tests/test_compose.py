"""docker-compose.yml, its Dockerfile and .env.example: the structure an operator relies on (parsed, not run)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
ENV_EXAMPLE = {
    line.split("=", 1)[0]
    for line in (ROOT / ".env.example").read_text().splitlines()
    if line.strip() and not line.lstrip().startswith("#")
}
BILLING_SERVICES = ("migrate", "sandbox", "worker", "beat", "flower")


def _command(service: str) -> str:
    command = SERVICES[service]["command"]
    return " ".join(command) if isinstance(command, list) else str(command)


def _depends(service: str) -> dict[str, str]:
    return {name: spec["condition"] for name, spec in SERVICES[service]["depends_on"].items()}


def test_the_stack_has_every_service() -> None:
    assert set(SERVICES) == {"postgres", "redis", "migrate", "sandbox", "worker", "beat", "flower"}


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
    assert worker["command"] == ["billing-worker"]
    script = (ROOT / "deploy" / "worker.sh").read_text()
    assert "exec celery -A tasks worker" in script
    assert "COPY deploy/worker.sh /usr/local/bin/billing-worker" in (ROOT / "deploy" / "Dockerfile").read_text()


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


@pytest.mark.parametrize("service", ["beat", "flower"])
def test_beat_and_flower_get_no_database_or_gateway_secrets(service: str) -> None:
    environment = SERVICES[service]["environment"]
    assert not {"TPAGA_PRIVATE_KEY", "TPAGA_PUBLIC_KEY", "DATABASE_URL"} & set(environment)


def test_workers_reach_the_sandbox_over_loopback_for_the_try_out() -> None:
    assert SERVICES["worker"]["network_mode"] == "service:sandbox"
    assert "127.0.0.1" in SERVICES["worker"]["environment"]["TPAGA_API_URL"]
    assert "--host 0.0.0.0" in _command("sandbox")


def test_the_production_override_detaches_workers_from_the_sandbox() -> None:
    class ComposeLoader(yaml.SafeLoader):
        pass

    for tag in ("!reset", "!override"):
        ComposeLoader.add_constructor(
            tag,
            lambda loader, node, tag=tag: (
                tag,
                loader.construct_mapping(node) if isinstance(node, yaml.MappingNode) else loader.construct_scalar(node),
            ),
        )
    override = yaml.load((ROOT / "deploy" / "compose.production.yml").read_text(), Loader=ComposeLoader)
    worker = override["services"]["worker"]
    assert worker["network_mode"][0] == "!reset"
    assert "sandbox" not in worker["depends_on"][1]
    assert worker["environment"]["TPAGA_API_URL"].startswith("${TPAGA_API_URL:?")
    assert override["services"]["sandbox"]["profiles"] == ["tryout"]


def test_every_variable_the_stack_and_the_code_read_is_in_env_example() -> None:
    referenced = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", (ROOT / "docker-compose.yml").read_text()))
    code = (ROOT / "billing" / "config.py").read_text() + (ROOT / "tasks" / "config.py").read_text()
    read_by_code = set(re.findall(r"\"((?:BILLING|TPAGA|CELERY|DATABASE)_[A-Z_]+)\"", code))
    assert referenced - ENV_EXAMPLE == set()
    assert read_by_code - ENV_EXAMPLE == set()


def test_env_example_holds_no_real_secret() -> None:
    from billing.sandbox import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY

    values = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert values["TPAGA_PRIVATE_KEY"] == DEFAULT_PRIVATE_KEY
    assert values["TPAGA_PUBLIC_KEY"] == DEFAULT_PUBLIC_KEY
    assert "change-me" in values["POSTGRES_PASSWORD"]
