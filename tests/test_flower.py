"""Flower against a real worker: operators see task names, ids, states and masked arguments, never the
private key, a temporary token or a Tpaga card id, and Flower runs with auth and in read-only mode."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from celery import Celery
from sqlalchemy import select

from billing.bootstrap import build_context
from billing.config import Settings
from billing.db import migrate
from billing.db.models import Card, Invoice
from billing.domain.money import Money
from billing.gateway import TpagaClient
from billing.sandbox import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY
from billing.services import catalog, invoicing
from tasks.client import send_attach_card
from tasks.testing import CeleryProcess, free_port, private_redis_db, process_env, worker

pytestmark = [pytest.mark.celery, pytest.mark.redis, pytest.mark.slow]

AUTH = ("ops", "correct-horse-battery")
FINAL = {"SUCCESS", "FAILURE"}
UNRUN_TOKEN = "tok_SECRET_never_run_7c1d"


@pytest.fixture
def redis_db_url(redis_server_url: str) -> Iterator[str]:
    with private_redis_db(redis_server_url) as url:
        yield url


def _get(base: str, path: str, **params: Any) -> requests.Response:
    response = requests.get(base + path, auth=AUTH, params=params, timeout=10)
    assert response.status_code == 200, (path, response.status_code, response.text[:500])
    return response


def test_flower_shows_tasks_with_secrets_masked(
    sqlite_url: str, sandbox: Any, redis_db_url: str, tmp_path: Path
) -> None:
    # Given a customer with a due invoice, another without a card, and three temporary tokens
    migrate.upgrade(sqlite_url)
    gateway = TpagaClient(sandbox.api_url, DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY)
    settings = Settings(database_url=sqlite_url, tpaga_api_url=sandbox.api_url, tpaga_private_key=DEFAULT_PRIVATE_KEY)
    ctx = build_context(settings, gateway=gateway)
    plan = catalog.create_plan(ctx, code="basic", name="Basic", amount=Money.from_major("20000", "COP"))
    ada = catalog.create_customer(ctx, email="ada@example.com")

    def token(number: str = "4111111111111111") -> str:
        return gateway.tokenize_card(number=number, exp_month=1, exp_year=2032, holder_name="Card Holder")

    catalog.attach_card(ctx, customer_id=ada, token=token())
    catalog.subscribe(ctx, customer_id=ada, plan_id=plan)
    invoicing.open_due_invoices(ctx)
    with ctx.sessions() as s:
        invoice_id = s.execute(select(Invoice.id)).scalar_one()
    bob = catalog.create_customer(ctx, email="bob@example.com")
    raw_token, helper_token, misplaced_token = token(), token("4242424242424242"), token("5500000000000004")

    env = process_env(
        {
            "DATABASE_URL": sqlite_url,
            "CELERY_BROKER_URL": redis_db_url,
            "TPAGA_API_URL": sandbox.api_url,
            "TPAGA_PRIVATE_KEY": DEFAULT_PRIVATE_KEY,
            "TPAGA_PUBLIC_KEY": DEFAULT_PUBLIC_KEY,
        }
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # As in docker-compose.yml: basic auth from FLOWER_BASIC_AUTH (not on the command line), read-only.
    flower = CeleryProcess(
        ["flower", "--address=127.0.0.1", f"--port={port}", "--read_only", "--inspect_timeout=3000"],
        env | {"FLOWER_BASIC_AUTH": f"{AUTH[0]}:{AUTH[1]}"},
        tmp_path / "flower.log",
    )
    sender = Celery("another-app", broker=redis_db_url)
    sender.conf.task_send_sent_event = True
    try:
        with worker(env, tmp_path / "worker.log") as proc:
            flower.start()
            proc.wait_for_log(r"ready\.")
            flower.wait_for_log(r"Visit me at|Registered tasks", timeout_seconds=30)
            _wait_until_flower_sees_events(base, sender)

            # When other apps send tasks: one careless (no kwargsrepr), one through tasks.client, a bad one
            careless = sender.send_task(
                "billing.attach_card", kwargs={"customer_id": bob, "token": raw_token}, queue="billing.default"
            ).id
            careful = send_attach_card(sender, bob, helper_token)
            charge = sender.send_task(
                "billing.charge_invoice", kwargs={"invoice_id": invoice_id}, queue="billing.charges"
            ).id
            misplaced = sender.send_task(
                "billing.attach_card",
                kwargs={"customer_id": misplaced_token, "token": misplaced_token},
                queue="billing.default",
            ).id
            # (a misspelled name: no worker ever runs it, so Flower has only the sender's task-sent event)
            unrun = sender.send_task(
                "billing.attach_crd", kwargs={"customer_id": bob, "token": UNRUN_TOKEN}, queue="billing.default"
            ).id
            ids = {careless: "SUCCESS", careful: "SUCCESS", charge: "SUCCESS", misplaced: "FAILURE"}
            tasks = _wait_for_states(base, ids, proc)
            unrun_info = _wait_for_task(base, unrun)
            assert unrun_info["name"] == "billing.attach_crd"
            assert unrun_info["kwargs"] is None and unrun_info["args"] is None

            # Then Flower lists them by name and id, with masked arguments
            assert tasks[careless]["name"] == "billing.attach_card"
            assert tasks[charge]["name"] == "billing.charge_invoice"
            for task_id in (careless, careful, misplaced):
                info = _get(base, f"/api/task/info/{task_id}").json()
                assert info["kwargs"] in (
                    f"{{'customer_id': {bob}, 'token': '***'}}",
                    "{'customer_id': '***', 'token': '***'}",
                ), info["kwargs"]
                assert info["args"] == "()"
            info = _get(base, f"/api/task/info/{charge}").json()
            assert info["kwargs"] == f"{{'invoice_id': {invoice_id}}}"
            assert "'outcome': 'approved'" in info["result"]
            assert "TaskInputError" in _get(base, f"/api/task/info/{misplaced}").json()["exception"]

            pages = {
                "/api/tasks": _get(base, "/api/tasks").text,
                "/tasks": _get(base, "/tasks").text,
                "/tasks/datatable": _get(
                    base,
                    "/tasks/datatable",
                    draw=1,
                    start=0,
                    length=100,
                    **{"order[0][column]": 0, "columns[0][data]": "name", "order[0][dir]": "asc"},
                ).text,
                "/api/workers": _get(base, "/api/workers", refresh="1").text,
                "/workers": _get(base, "/workers").text,
            }
            for task_id in (*ids, unrun):
                pages[f"/task/{task_id}"] = _get(base, f"/task/{task_id}").text
                pages[f"/api/task/info/{task_id}"] = _get(base, f"/api/task/info/{task_id}").text
            assert all(task_id in pages["/tasks/datatable"] for task_id in ids)
            assert "billing.attach_card" in pages["/tasks/datatable"]

            # And no secret is anywhere: the private key, the temporary tokens, Tpaga's card ids
            with ctx.sessions() as s:
                card_ids = list(s.execute(select(Card.tpaga_card_id)).scalars())
            assert len(card_ids) == 3  # Ada's, and Bob's two
            secrets = [DEFAULT_PRIVATE_KEY, raw_token, helper_token, misplaced_token, UNRUN_TOKEN, *card_ids]
            for path, text in pages.items():
                for secret in secrets:
                    assert secret not in text, f"a secret is visible on {path}"
            for log in (proc.log_text(), flower.log_text()):
                for secret in secrets:
                    assert secret not in log

            # And Flower refuses anonymous readers and every state-changing call
            for path in ("/api/tasks", "/tasks", f"/task/{charge}", "/workers"):
                assert requests.get(base + path, timeout=10).status_code == 401, path
            revoke = requests.post(base + f"/api/task/revoke/{charge}", auth=AUTH, timeout=10)
            assert revoke.status_code == 403
            apply = requests.post(
                base + "/api/task/async-apply/billing.charge_invoice",
                auth=AUTH,
                json={"kwargs": {"invoice_id": invoice_id}},
                timeout=10,
            )
            assert apply.status_code == 403
    finally:
        flower.stop()
        sender.close()
        gateway.close()
        ctx.sessions.kw["bind"].dispose()


def _wait_until_flower_sees_events(base: str, sender: Celery, timeout_seconds: float = 30) -> None:
    """Flower's event receiver connects a little after its HTTP server: send harmless failing pings until one
    shows up, so the real tasks' events cannot be missed."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        ping = sender.send_task("billing.execute_refund", kwargs={"refund_id": 987654}, queue="billing.refunds").id
        for _ in range(10):
            try:
                response = requests.get(base + f"/api/task/info/{ping}", auth=AUTH, timeout=5)
            except requests.ConnectionError:
                response = None
            if response is not None and response.status_code == 200 and response.json().get("state") in FINAL:
                return
            time.sleep(0.2)
    pytest.fail("Flower never saw a task event")


def _wait_for_task(base: str, task_id: str, timeout_seconds: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        response = requests.get(base + f"/api/task/info/{task_id}", auth=AUTH, timeout=5)
        if response.status_code == 200:
            return dict(response.json())
        time.sleep(0.2)
    pytest.fail(f"Flower never saw task {task_id}")


def _wait_for_states(
    base: str, expected: dict[str, str], proc: CeleryProcess, timeout_seconds: float = 30
) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout_seconds
    tasks: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        tasks = _get(base, "/api/tasks").json()
        if all(tasks.get(task_id, {}).get("state") == state for task_id, state in expected.items()):
            return tasks
        time.sleep(0.3)
    states = {task_id: tasks.get(task_id, {}).get("state") for task_id in expected}
    pytest.fail(f"Flower states {states}, expected {expected}; worker log:\n{proc.log_text()[-3000:]}")
