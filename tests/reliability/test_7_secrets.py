"""Scenario 7, secrets: after the other scenarios, the workers' logs, Flower's API and the broker's contents
hold neither the Tpaga private key nor any Tpaga card id or temporary token (design.md invariant 5).

This scenario adds the hard cases: a careless sender (no kwargsrepr) attaching a card, a token in the wrong
field, a token sent to a misspelled task name, a token Tpaga refuses, charges and a refund (card and charge
ids travel between the worker and Tpaga), with Flower (basic auth, read-only) watching. Then it scans Flower's
pages, this world's logs and broker, and every log and broker dump the earlier scenarios of this session left.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import requests
from celery import Celery
from sqlalchemy import select

from billing.db.models import Card, Invoice
from billing.services import catalog
from tasks.client import send_attach_card
from tasks.testing import free_port
from tests.reliability.harness import ARTIFACTS, SECRETS, timed
from tests.reliability.proof import prove, secrets_found

pytestmark = [pytest.mark.reliability, pytest.mark.celery, pytest.mark.postgres, pytest.mark.slow]

AUTH = ("ops", "reliability-horse-battery")


def _get(base: str, path: str, **params: Any) -> str:
    response = requests.get(base + path, auth=AUTH, params=params, timeout=10)
    assert response.status_code == 200, (path, response.status_code)
    return response.text


def test_no_secret_in_logs_flower_or_on_the_broker(make_world: Any) -> None:
    figures: dict[str, Any] = {"runs": 1}
    with timed(figures):
        # Given due subscriptions, a customer waiting for a card, and fresh temporary tokens
        world = make_world("7. secrets")
        world.seed(approve=5, backdated_share=0)
        bob = catalog.create_customer(world.ctx, email="bob@example.com")

        def token(number: str = "4111111111111111") -> str:
            value = world.gateway.tokenize_card(number=number, exp_month=1, exp_year=2032, holder_name="Card Holder")
            SECRETS.add(value)
            return value

        raw, careful, misplaced, misspelled = token(), token("4242424242424242"), token("5500000000000004"), token()
        refused = "tok_refused_by_tpaga_5f4dcc3b5aa765d6"
        SECRETS.add(refused)

        # Positive control: a queued attach_card message carries its token (the documented contract), and the
        # broker scan sees it through kombu's base64 body encoding.
        sender = Celery("another-app", broker=world.redis.url)
        sender.conf.task_send_sent_event = True
        careless = sender.send_task(
            "billing.attach_card", kwargs={"customer_id": bob, "token": raw}, queue="billing.default"
        ).id
        assert raw in world.redis.dump(), "the broker scan must see message bodies"

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        flower = world.start_process(
            "flower",
            ["flower", "--address=127.0.0.1", f"--port={port}", "--read_only", "--inspect_timeout=3000"],
            FLOWER_BASIC_AUTH=f"{AUTH[0]}:{AUTH[1]}",
        )
        flower.wait_for_log(r"Visit me at|Registered tasks", 60)
        _wait_until_flower_sees_events(base, sender)
        proc = world.start_worker("w1")
        proc.wait_for_log(r"ready\.", 60)
        world.start_beat()

        # When tasks with secrets in every wrong place are sent, and billing charges and refunds
        ids = {
            careless: "SUCCESS",
            send_attach_card(sender, bob, careful): "SUCCESS",
            sender.send_task(
                "billing.attach_card", kwargs={"customer_id": misplaced, "token": misplaced}, queue="billing.default"
            ).id: "FAILURE",
            sender.send_task(
                "billing.attach_card", kwargs={"customer_id": bob, "token": refused}, queue="billing.default"
            ).id: "FAILURE",
        }
        sender.send_task(
            "billing.attach_crd", kwargs={"customer_id": bob, "token": misspelled}, queue="billing.default"
        )
        assert world.wait_settled(60), world.counts()
        with world.ctx.sessions() as s:
            paid = s.execute(select(Invoice.id).where(Invoice.state == "paid")).scalars().first()
        ids[
            sender.send_task(
                "billing.request_refund", kwargs={"invoice_id": paid, "reason": "r"}, queue="billing.refunds"
            ).id
        ] = "SUCCESS"
        world.wait_for("select 1 from refunds where state = 'voided'", "the refund voided", 30)
        deadline = time.monotonic() + 30
        tasks: dict[str, Any] = {}
        while time.monotonic() < deadline:
            tasks = requests.get(base + "/api/tasks", auth=AUTH, timeout=10).json()
            if all(tasks.get(i, {}).get("state") == state for i, state in ids.items()):
                break
            time.sleep(0.3)
        assert all(tasks.get(i, {}).get("state") == state for i, state in ids.items()), tasks

        # Then no secret is in Flower's pages, the logs, or on the broker
        pages = {
            "/api/tasks": _get(base, "/api/tasks"),
            "/api/workers": _get(base, "/api/workers", refresh="1"),
            "/tasks/datatable": _get(
                base,
                "/tasks/datatable",
                draw=1,
                start=0,
                length=1000,
                **{"order[0][column]": 0, "columns[0][data]": "name", "order[0][dir]": "asc"},
            ),
        }
        for task_id in tasks:
            pages[f"/api/task/info/{task_id}"] = _get(base, f"/api/task/info/{task_id}")
            pages[f"/task/{task_id}"] = _get(base, f"/task/{task_id}")
        assert "billing.attach_card" in pages["/api/tasks"] and "billing.charge_invoice" in pages["/api/tasks"]
        assert "billing.attach_crd" in proc.log_text(), "the misspelled task should have been logged (redacted)"
        with world.ctx.sessions() as s:
            card_ids = set(s.execute(select(Card.tpaga_card_id)).scalars())
        secrets = SECRETS | card_ids
        broker = world.redis.dump()
        texts: dict[str, str] = {f"flower {path}": text for path, text in pages.items()}
        texts["broker (this world)"] = broker
        for label, artifact in ARTIFACTS:
            texts[label] = artifact.read_text(errors="replace") if isinstance(artifact, Path) else artifact
        leaks = secrets_found(texts, secrets)
        figures["flower_pages_scanned"] = len(pages)
        figures["logs_and_dumps_scanned"] = len(texts) - len(pages)
        figures["bytes_scanned"] = sum(len(t) for t in texts.values())
        figures["secrets_checked"] = len(secrets)
        figures["secrets_found_anywhere"] = len(leaks)
        assert not leaks, leaks
        flower.stop()
        sender.close()
    prove(world, figures)


def _wait_until_flower_sees_events(base: str, sender: Celery, timeout_seconds: float = 60) -> None:
    """Flower's event receiver connects a little after its HTTP server: send a harmless failing task until
    Flower reports it (no worker yet: it shows as sent), so the real tasks' events cannot be missed."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        ping = sender.send_task("billing.execute_refund", kwargs={"refund_id": 987654}, queue="billing.refunds").id
        for _ in range(10):
            try:
                response = requests.get(base + f"/api/task/info/{ping}", auth=AUTH, timeout=5)
            except requests.ConnectionError:
                response = None
            if response is not None and response.status_code == 200:
                return
            time.sleep(0.2)
    pytest.fail("Flower never saw a task event")
