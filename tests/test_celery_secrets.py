"""No card token in any log line of a real worker at DEBUG, however compactly a sender sends `attach_card`.

A bare kombu publish of a protocol-2 message (what a non-Python client sends: no `argsrepr`/`kwargsrepr`
headers) puts the token in the raw body, and Celery logs raw bodies: the pool's `TaskPool: Apply` DEBUG line,
the consumer's dump of a message for an unregistered task. Every line of the worker's output and of its log
file is searched for the tokens.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Exchange, Producer
from sqlalchemy import select

from billing.bootstrap import build_context
from billing.config import Settings
from billing.db import migrate
from billing.db.models import Card
from billing.gateway import TpagaClient
from billing.sandbox import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY
from billing.services import catalog
from billing.services.context import Context
from tasks.testing import CeleryProcess, private_redis_db, process_env, worker

pytestmark = [pytest.mark.celery, pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

BOGUS_TOKEN = "tok_SECRET_xyz_5f1e0c9a7b"
POSITIONAL_TOKEN = "tok_SECRET_positional_3d9b"
MISSPELLED_TOKEN = "tok_SECRET_misspelled_81c2"


@pytest.fixture
def redis_db_url(redis_server_url: str) -> Iterator[str]:
    with private_redis_db(redis_server_url) as url:
        yield url


@pytest.fixture
def world(pg_url: str, sandbox: Any) -> Iterator[tuple[Context, TpagaClient]]:
    migrate.upgrade(pg_url)
    settings = Settings(
        database_url=pg_url,
        tpaga_api_url=sandbox.api_url,
        tpaga_private_key=DEFAULT_PRIVATE_KEY,
        tpaga_public_key=DEFAULT_PUBLIC_KEY,
    )
    gateway = TpagaClient(sandbox.api_url, DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY)
    ctx = build_context(settings, gateway=gateway)
    yield ctx, gateway
    gateway.close()
    ctx.sessions.kw["bind"].dispose()


def publish_compact(broker_url: str, name: str, args: list[Any], kwargs: dict[str, Any]) -> str:
    """A protocol-2 message as a minimal non-Python client writes it: the required headers and the body."""
    task_id = str(uuid.uuid4())
    headers = {"lang": "py", "task": name, "id": task_id, "root_id": task_id, "retries": 0}
    body = json.dumps([args, kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    with Connection(broker_url) as connection:
        exchange = Exchange("billing.default", type="direct")
        Producer(connection).publish(
            body,
            exchange=exchange,
            routing_key="billing.default",
            declare=[exchange],
            headers=headers,
            content_type="application/json",
            content_encoding="utf-8",
            serializer=None,
        )
    return task_id


def wait_for(path: Path, needle: str, proc: CeleryProcess, timeout_seconds: float = 30) -> None:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_text(errors="replace"):
            return
        time.sleep(0.2)
    tail = path.read_text(errors="replace")[-3000:] if path.exists() else ""
    pytest.fail(f"timed out waiting for {needle!r} in {path.name}:\n{tail}\n-- output:\n{proc.log_text()[-2000:]}")


def test_no_token_in_any_line_of_a_debug_worker_when_attach_card_is_sent_the_compact_way(
    world: tuple[Context, TpagaClient], pg_url: str, sandbox: Any, redis_db_url: str, tmp_path: Path
) -> None:
    ctx, gateway = world
    # Given a customer, a real temporary token for them, and a worker at DEBUG with a log file
    customer_id = catalog.create_customer(ctx, email="ada@example.com", first_name="Ada")
    real_token = gateway.tokenize_card(number="4111111111111111", exp_month=12, exp_year=2031, holder_name="Ada")
    env = process_env(
        {
            "DATABASE_URL": pg_url,
            "CELERY_BROKER_URL": redis_db_url,
            "TPAGA_API_URL": sandbox.api_url,
            "TPAGA_PRIVATE_KEY": DEFAULT_PRIVATE_KEY,
            "TPAGA_PUBLIC_KEY": DEFAULT_PUBLIC_KEY,
        }
    )
    log_file = tmp_path / "worker-file.log"
    with worker(env, tmp_path / "worker.out", "--loglevel", "DEBUG", "--logfile", str(log_file)) as proc:
        wait_for(log_file, "ready.", proc, 60)

        # When attach_card is published the compact way (no reprs): a real token, a bogus one, one positional,
        # and one to a misspelled task name
        attached = publish_compact(
            redis_db_url, "billing.attach_card", [], {"customer_id": customer_id, "token": real_token}
        )
        refused = publish_compact(
            redis_db_url, "billing.attach_card", [], {"customer_id": customer_id, "token": BOGUS_TOKEN}
        )
        positional = publish_compact(redis_db_url, "billing.attach_card", [customer_id, POSITIONAL_TOKEN], {})
        publish_compact(redis_db_url, "billing.attach_crd", [], {"customer_id": customer_id, "token": MISSPELLED_TOKEN})

        # Then each ran (the card is attached; the others failed) or was discarded
        wait_for(log_file, f"billing.attach_card[{attached}] succeeded", proc)
        wait_for(log_file, f"billing.attach_card[{refused}] raised expected: TaskInputError", proc)
        wait_for(log_file, f"billing.attach_card[{positional}] raised expected: TaskInputError", proc)
        wait_for(log_file, "Received unregistered task of type 'billing.attach_crd'", proc)
        with ctx.sessions() as session:
            assert session.execute(select(Card.id).where(Card.customer_id == customer_id)).scalar_one()
        proc.stop(30)

    # And no token appears in any line of the worker's log file or its output, at any level
    lines = log_file.read_text(errors="replace").splitlines() + proc.log_text().splitlines()
    assert any("TaskPool: Apply" in line for line in lines)  # the DEBUG line that used to carry the body
    for token in (real_token, BOGUS_TOKEN, POSITIONAL_TOKEN, MISSPELLED_TOKEN):
        leaks = [line for line in lines if token in line]
        assert not leaks, (token, leaks[:3])
