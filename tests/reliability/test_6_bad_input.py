"""Scenario 6, bad input: malformed task arguments sent by name through Redis from a bare Celery app (wrong
types, unknown ids, missing and extra fields, huge values, strings for ids, negatives, nulls), malformed CLI
arguments, and a pickle-serialized message. Each is answered with a clear error, once, and changes nothing:
the database (every table, outbox and events included) is the same before and after.

Malformed gateway bodies (HTML, truncated JSON, missing fields, odd statuses) are covered, one per row, by
tests/test_gateway_mapping.py::test_map_response_table; scenario 5 sends garbled answers end to end.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Exchange, Producer, Queue
from sqlalchemy import select

from billing.db.models import Base, ChargeAttempt, Customer, Invoice
from billing.services import charging, invoicing
from tests.procs import send_by_name
from tests.reliability.harness import SECRETS, timed
from tests.reliability.proof import prove
from tests.test_cli_common import make_cli

pytestmark = [pytest.mark.reliability, pytest.mark.celery, pytest.mark.postgres, pytest.mark.slow]

HUGE = 10**40
BOGUS_TOKEN = "tok_reliability_bogus_0123456789abcdef"
NEWLINE_TOKEN = "tok_reliability\nsplit_0123456789"


# A refused command's outcome is recorded by design (docs/tasks.md): its ledger row, its event and a token Tpaga
# refused (remembered so that a repeat gets the same answer without reaching Tpaga) are not a change.
LEDGER_TABLES = ("commands", "command_waits")


def _refusal_record(table: str, row: Any) -> bool:
    return (
        (table == "events" and row.kind == "command.rejected")
        or (table == "stream_events" and row.type == "command.rejected")
        or (table == "card_tokens" and row.state == "refused")
    )


def _background(table: str, row: Any) -> bool:
    """Work beat does meanwhile, whatever the commands: its leases and the stream's numbering counter."""
    return table == "control" and (row.key.startswith("lease:") or row.key == "stream.offset")


def _as_text(table: str, row: Any) -> tuple[str, ...]:
    if table == "stream_events":  # numbering an event (its offset, seq, filled ids) is not a change
        return (str(row.event_id), str(row.type))
    return tuple(str(v) for v in row)


def snapshot(world: Any) -> dict[str, list[tuple[str, ...]]]:
    """Every row of every table, as text, but the records of refused commands."""
    with world.ctx.sessions() as session:
        return {
            table.name: [
                _as_text(table.name, row)
                for row in session.execute(select(table).order_by(*table.primary_key.columns)).all()
                if not _refusal_record(table.name, row) and not _background(table.name, row)
            ]
            for table in Base.metadata.sorted_tables
            if table.name not in LEDGER_TABLES
        }


class Canary:
    """Unpickling this creates a directory: proof that a pickle payload was (or was not) deserialized."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


def test_malformed_inputs_fail_clearly_once_and_change_nothing(make_world: Any) -> None:
    figures: dict[str, Any] = {"runs": 1}
    with timed(figures):
        # Given a paid invoice, an open one, a customer and a subscription, and a worker
        world = make_world("6. bad input")
        seeded = world.seed(approve=2, backdated_share=0)
        invoicing.open_due_invoices(world.ctx)
        with world.ctx.sessions() as s:
            paid, unpaid = s.execute(select(Invoice.id).order_by(Invoice.id)).scalars().all()
            customer = s.execute(select(Customer.id).order_by(Customer.id)).scalars().first()
            sub = s.get(Invoice, paid).subscription_id  # type: ignore[union-attr]
        assert charging.charge_invoice(world.ctx, paid).outcome == "approved"
        with world.ctx.sessions() as s:
            attempt = s.execute(select(ChargeAttempt.id)).scalar_one()
        # The open invoice is parked far in the future: a charge by a bad message would show.
        with world.ctx.sessions() as s, s.begin():
            s.get(Invoice, unpaid).due_at = world.ctx.clock.now().replace(year=2099)  # type: ignore[union-attr]
        assert seeded.subscription_ids
        SECRETS.update({BOGUS_TOKEN, NEWLINE_TOKEN})
        proc = world.start_worker("w1")
        proc.wait_for_log(r"ready\.", 60)
        before = snapshot(world)

        charges, refunds, default, scheduler = (
            "billing.charges",
            "billing.refunds",
            "billing.default",
            "billing.scheduler",
        )
        ci, rr, ac, cs, er = (
            "billing.charge_invoice",
            "billing.request_refund",
            "billing.attach_card",
            "billing.cancel_subscription",
            "billing.execute_refund",
        )
        # (key, task, queue, args, kwargs, expected message)
        cases: list[tuple[str, str, str, list[Any], dict[str, Any], str]] = [
            ("id as string", ci, charges, [], {"invoice_id": str(unpaid)}, f"got '{unpaid}' (a str)"),
            ("id as float", ci, charges, [], {"invoice_id": 1.5}, "got 1.5 (a float)"),
            ("id as bool", ci, charges, [], {"invoice_id": True}, "got True (a bool)"),
            ("id null", ci, charges, [], {"invoice_id": None}, "got None (a NoneType)"),
            ("id as list", ci, charges, [], {"invoice_id": [unpaid]}, "must be an integer id, got a list"),
            ("id as object", ci, charges, [], {"invoice_id": {"id": unpaid}}, "must be an integer id, got a dict"),
            ("id zero", ci, charges, [], {"invoice_id": 0}, "must be a positive integer id, got 0"),
            ("id negative", ci, charges, [], {"invoice_id": -5}, "must be a positive integer id, got -5"),
            ("id past bigint", ci, charges, [], {"invoice_id": 2**63}, "must be a positive integer id"),
            ("id huge", ci, charges, [], {"invoice_id": HUGE}, "must be a positive integer id"),
            ("id huge string", ci, charges, [], {"invoice_id": "9" * 100_000}, "must be an integer id, got '9999"),
            ("id missing", ci, charges, [], {}, "missing required argument(s) invoice_id"),
            ("extra field", ci, charges, [], {"invoice_id": unpaid, "force": True}, "unexpected argument(s) force"),
            ("positional", ci, charges, [unpaid], {}, "takes keyword arguments only (invoice_id)"),
            ("unknown invoice", ci, charges, [], {"invoice_id": 987654}, "invoice 987654 does not exist"),
            ("refund no reason", rr, refunds, [], {"invoice_id": paid}, "missing required argument(s) reason"),
            ("refund reason int", rr, refunds, [], {"invoice_id": paid, "reason": 5}, "reason must be a string"),
            ("refund no target", rr, refunds, [], {"reason": "x"}, "give exactly one of invoice_id or charge_id"),
            (
                "refund two targets",
                rr,
                refunds,
                [],
                {"reason": "x", "invoice_id": paid, "charge_id": attempt},
                "give exactly one of invoice_id or charge_id",
            ),
            (
                "refund empty reason",
                rr,
                refunds,
                [],
                {"invoice_id": paid, "reason": "  "},
                "reason must be a non-empty",
            ),
            (
                "refund long reason",
                rr,
                refunds,
                [],
                {"invoice_id": paid, "reason": "y" * 300},
                "at most 255 characters",
            ),
            (
                "refund unknown charge",
                rr,
                refunds,
                [],
                {"reason": "x", "charge_id": 987654},
                "charge 987654 does not exist",
            ),
            ("refund unpaid", rr, refunds, [], {"reason": "x", "invoice_id": unpaid}, "has no approved charge"),
            (
                "refund id string",
                rr,
                refunds,
                [],
                {"reason": "x", "invoice_id": "7"},
                "invoice_id must be an integer id",
            ),
            ("card no token", ac, default, [], {"customer_id": customer}, "missing required argument(s) token"),
            ("card token int", ac, default, [], {"customer_id": customer, "token": 123}, "token must be a string"),
            (
                "card customer string",
                ac,
                default,
                [],
                {"customer_id": str(customer), "token": BOGUS_TOKEN},
                "customer_id must be an integer id, got a str",
            ),
            (
                "card unknown customer",
                ac,
                default,
                [],
                {"customer_id": 987654, "token": BOGUS_TOKEN},
                "customer 987654 does not exist",
            ),
            (
                "card unknown token",
                ac,
                default,
                [],
                {"customer_id": customer, "token": BOGUS_TOKEN},
                "Tpaga refused the token (HTTP 422)",
            ),
            (
                "card token control chars",
                ac,
                default,
                [],
                {"customer_id": customer, "token": NEWLINE_TOKEN},
                "token is malformed",
            ),
            (
                "card blank token",
                ac,
                default,
                [],
                {"customer_id": customer, "token": "   "},
                "token must be a non-empty",
            ),
            (
                "cancel flag string",
                cs,
                default,
                [],
                {"subscription_id": sub, "at_period_end": "yes"},
                "at_period_end must be true or false, got 'yes' (a str)",
            ),
            (
                "cancel flag int",
                cs,
                default,
                [],
                {"subscription_id": sub, "refund_last_charge": 1},
                "refund_last_charge must be true or false",
            ),
            ("cancel unknown", cs, default, [], {"subscription_id": 987654}, "subscription 987654 does not exist"),
            (
                "cancel null id",
                cs,
                default,
                [],
                {"subscription_id": None},
                "give exactly one of subscription_id or external_subscription_id",
            ),
            ("refund exec unknown", er, refunds, [], {"refund_id": 987654}, "refund 987654 does not exist"),
            ("refund exec string", er, refunds, [], {"refund_id": "1"}, "refund_id must be an integer id"),
            ("periodic extra", "billing.open_due_invoices", scheduler, [], {"limit": 5}, "it takes no arguments"),
            ("periodic positional", "billing.reconcile", scheduler, [1], {}, "takes keyword arguments only"),
        ]
        sent = dict(send_by_name(world.redis.url, [(k, t, q, a, kw) for k, t, q, a, kw, _ in cases]))
        log = ""
        failures: list[str] = []
        deadline = time.monotonic() + 60
        pending = {key for key, *_ in cases}
        while pending and time.monotonic() < deadline:
            log = proc.log_text()
            pending = {key for key in pending if f"[{sent[key]}] raised" not in log}
            time.sleep(0.3)
        for key, _task, _queue, _args, _kwargs, message in cases:
            task_id = sent[key]
            lines = [ln for ln in log.splitlines() if task_id in ln and "raised" in ln]
            if len(lines) != 1:
                failures.append(f"{key}: {len(lines)} failure line(s): {lines[:2]}")
            elif "raised expected: TaskInputError" not in lines[0] or message not in lines[0]:
                failures.append(f"{key}: {lines[0][-300:]}")
            if re.search(rf"\[{task_id}\] retry", log):
                failures.append(f"{key}: retried")
        figures["task_inputs"] = len(cases)

        # CLI arguments
        cli = make_cli(world.pg_url, api_url=world.sandbox.api_url)
        cli_cases: list[tuple[tuple[str, ...], int, str]] = [
            (("refund", "abc", "--reason", "x"), 2, "is not a valid integer"),
            (("refund", "987654", "--reason", "x"), 1, "invoice 987654 does not exist"),
            (("refund", str(unpaid), "--reason", "x"), 1, "has no approved charge"),
            (("refund", str(paid), "--reason", " "), 1, "reason must be a non-empty"),
            (("refund", str(paid)), 2, "Missing option '--reason'"),
            (("refund", str(HUGE), "--reason", "x"), 2, "is not in the range 1<=x<=9223372036854775807"),
            (("refund", "0", "--reason", "x"), 2, "is not in the range 1<=x"),
            (("review", "resolve", "987654", "--not-charged"), 1, "invoice 987654 does not exist"),
            (("review", "resolve", str(paid), "--not-charged"), 1, "is not in review"),
            (("review", "resolve", str(paid)), 2, "say what happened"),
            (("review", "resolve", str(paid), "--charged"), 2, "--charged needs --charge-id"),
            (("review", "resolve", str(HUGE), "--not-charged"), 2, "is not in the range"),
            (("subscriptions", "cancel", "987654"), 1, "subscription 987654 does not exist"),
            (("subscriptions", "cancel", "x1"), 2, "is not a valid integer"),
            (("subscriptions", "cancel", str(HUGE)), 2, "is not in the range"),
            (("subscriptions", "create", "--customer", str(HUGE), "--plan", "1"), 2, "is not in the range"),
            (("cards", "attach", "--customer", "987654", "--token", BOGUS_TOKEN), 1, "customer 987654 does not exist"),
            (("cards", "attach", "--customer", str(customer), "--token", " "), 2, "the token is empty"),
            (("clock", "advance", "--", "-5d"), 2, "is not a duration"),
            (("report", "--since", "yesterday-ish"), 2, "is not an ISO 8601 date"),
            (("plans", "create", "--code", "bad code!", "--amount", "100"), 1, "plan code must be"),
            (("plans", "create", "--code", "ok", "--amount", "12.345"), 1, ""),
        ]
        for args, code, message in cli_cases:
            result = cli.run(*args)
            shown = f"billing {' '.join(a[:20] for a in args)} -> {result.exit_code}: {result.output.strip()[-200:]}"
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                failures.append(f"{shown} crashed: {type(result.exception).__name__}")
            elif result.exit_code != code or message not in result.output or "Traceback" in result.output:
                failures.append(shown)
            if snapshot(world) != before:
                failures.append(f"{shown} changed the database")
        figures["cli_inputs"] = len(cli_cases)

        # A pickle payload on the charges queue: refused before anything is deserialized or run
        canary = world.tmp / "unpickled"
        pickled_id = "pickle-0000-0000-0000-000000000001"
        with Connection(world.redis.url) as conn:
            queue = Queue(charges, Exchange(charges, type="direct"), routing_key=charges)
            Producer(conn.channel()).publish(
                ((), {"invoice_id": unpaid, "canary": Canary(canary)}, {}),
                exchange=queue.exchange,
                routing_key=charges,
                serializer="pickle",
                declare=[queue],
                headers={
                    "lang": "py",
                    "task": ci,
                    "id": pickled_id,
                    "root_id": pickled_id,
                    "retries": 0,
                    "argsrepr": "()",
                    "kwargsrepr": "{}",
                },
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "pickle" not in proc.log_text():
            time.sleep(0.2)
        log = proc.log_text()
        time.sleep(1)
        refused = [ln for ln in log.splitlines() if "pickle" in ln]
        if not any("Refusing to deserialize" in ln or "untrusted content" in ln for ln in refused):
            failures.append(f"the pickle message was not refused visibly: {refused[:3]}")
        if canary.exists():
            failures.append("the pickle payload was deserialized (the canary exists)")
        if f"[{pickled_id}]" in log:
            failures.append("the pickle message reached a task")
        llen = world.redis.cli("llen", charges).strip()
        hlen = world.redis.cli("hlen", "unacked").strip()
        figures["pickle_refused"] = not canary.exists() and f"[{pickled_id}]" not in log
        figures["pickle_left_on_broker"] = int(llen or 0) + int(hlen or 0)

        after = snapshot(world)
        changed = [name for name in before if before[name] != after[name]]
        if changed:
            failures.append(f"tables changed: {changed}")
        figures["bad_inputs"] = len(cases) + len(cli_cases) + 1
        figures["bad_inputs_failed_clearly_without_change"] = figures["bad_inputs"] - len(failures)
        assert not failures, "\n".join(failures)
        proc.stop()
        # The open invoice was parked in 2099 for this test; charge it now so the proof sees a settled world.
        with world.ctx.sessions() as s, s.begin():
            s.get(Invoice, unpaid).due_at = world.ctx.clock.now()  # type: ignore[union-attr]
        assert charging.charge_invoice(world.ctx, unpaid).outcome == "approved"
    prove(world, figures)
