"""docs/tasks.md cannot drift from the tasks: it names every public task with each of its arguments and its queue,
its Python example runs against `tasks.client` as written, and its raw Redis message, pushed as written, is run by
a real worker."""

from __future__ import annotations

import base64
import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from billing import task_names
from billing.db import migrate
from billing.db.engine import make_engine
from tasks.config import KWARGS, ROUTES
from tasks.testing import private_redis_db, process_env, worker
from tests.procs import wait_until
from tests.test_tasks_masking import RecordingApp

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "tasks.md").read_text()


def _sections(doc: str) -> dict[str, str]:
    """`### billing.x` heading -> its text, up to the next heading."""
    parts = re.split(r"^(#{2,3} .*)$", doc, flags=re.MULTILINE)
    return {parts[i][4:].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2) if parts[i].startswith("### ")}


def _between(doc: str, start: str, end: str) -> str:
    return doc[doc.index(start) : doc.index(end, doc.index(start))]


def _json_blocks(doc: str) -> list[str]:
    return re.findall(r"```json\n(.*?)```", doc, flags=re.DOTALL)


def test_every_public_task_is_documented_with_each_argument_and_its_queue() -> None:
    sections = _sections(DOC)
    commands_preamble = _between(DOC, "## Commands", "### ")
    for name in task_names.PUBLIC_TASKS:
        assert name in sections, f"docs/tasks.md has no '### {name}' section"
        shared = commands_preamble if name in task_names.COMMANDS else ""
        for kwarg in KWARGS[name]:
            assert f"`{kwarg}`" in sections[name] + shared, f"{name}: argument {kwarg} is not documented"
        assert f"`{ROUTES[name]}`" in sections[name] + shared, f"{name}: queue {ROUTES[name]} is not documented"
        # The queue table of "Sending" names it too.
        assert f"`{name}`" in _between(DOC, "## Sending", "## Rules"), name
    # And nothing documented that is not a task.
    assert set(sections) <= set(task_names.ALL_TASKS)
    for name in (*task_names.INTERNAL_TASKS, *task_names.PERIODIC_TASKS):
        assert f"`{name}`" in DOC, name
    assert "BILLING_COMMAND_WAIT_SECONDS" in DOC


def _run_example(monkeypatch: pytest.MonkeyPatch, where: str, text_: str, **names: Any) -> list[tuple[str, str]]:
    """Run the first Python block of `text_` with its Celery app recording; returns (task, queue) sent."""
    code = re.findall(r"```python\n(.*?)```", text_, flags=re.DOTALL)[0]
    apps: list[RecordingApp] = []

    def recording_celery(*args: Any, **kwargs: Any) -> RecordingApp:
        apps.append(RecordingApp())
        return apps[-1]

    monkeypatch.setattr("celery.Celery", recording_celery)
    exec(compile(code, where, "exec"), dict(names))
    (sent,) = apps
    assert all(str(value) not in options["kwargsrepr"] for _, options in sent.calls for value in names.values())
    return [(name, options["queue"]) for name, options in sent.calls]


SIGN_UP = [
    ("billing.upsert_plan", "billing.default"),
    ("billing.upsert_customer", "billing.default"),
    ("billing.attach_card", "billing.default"),
    ("billing.create_subscription", "billing.default"),
]


def test_the_python_example_runs_against_tasks_client(monkeypatch: pytest.MonkeyPatch) -> None:
    example = _between(DOC, "## From Python", "## Without Celery")
    sent = _run_example(monkeypatch, "docs/tasks.md", example, token_from_the_browser="tok_doc_example")
    assert sent == [
        *SIGN_UP,
        ("billing.pause_subscription", "billing.default"),
        ("billing.cancel_subscription", "billing.default"),
    ]


def test_the_readmes_sign_up_example_runs_against_tasks_client(monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (ROOT / "README.md").read_text()
    assert "BILLING_COMMAND_WAIT_SECONDS" in _between(readme, "## Configuration", "## The `billing` command")
    example = _between(readme, "## Task API", "## Production")
    assert _run_example(monkeypatch, "README.md", example, token="tok_readme_example") == SIGN_UP


def test_the_documented_redis_message_is_run_by_a_worker(
    redis_server_url: str, sqlite_url: str, tmp_path: Path
) -> None:
    # Given the envelope and the body exactly as docs/tasks.md shows them, with the fresh ids it asks for
    envelope_text, body_text = _json_blocks(_between(DOC, "## Without Celery", "- Required"))[:2]
    body = json.loads(body_text)
    envelope = json.loads(envelope_text.replace('"<base64 of the body below>"', json.dumps("")))
    envelope["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    task_id = str(uuid.uuid4())
    envelope["headers"].update(id=task_id, root_id=task_id)
    envelope["properties"].update(correlation_id=task_id, delivery_tag=str(uuid.uuid4()))
    queue = envelope["properties"]["delivery_info"]["routing_key"]
    assert queue == ROUTES[envelope["headers"]["task"]]
    migrate.upgrade(sqlite_url)

    import redis

    with private_redis_db(redis_server_url) as broker_url:
        env = process_env(
            {"DATABASE_URL": sqlite_url, "CELERY_BROKER_URL": broker_url, "TPAGA_PRIVATE_KEY": "unused"}
            | {"TPAGA_PUBLIC_KEY": "unused"}
        )
        proc = worker(env, tmp_path / "worker.log")
        proc.cwd = tmp_path
        with proc:
            proc.wait_for_log(r"ready\.", 60)
            # When a sender without Celery pushes it onto the queue's list
            client = redis.Redis.from_url(broker_url)
            client.lpush(queue, json.dumps(envelope))
            client.close()
            # Then the worker runs it: the plan exists and its outcome is in the ledger under the request_id
            proc.wait_for_log(rf"billing.upsert_plan\[{task_id}\] succeeded", 60)
        log = proc.log_text()
    assert "Connection to broker lost" not in log
    engine = make_engine(sqlite_url)

    def recorded() -> Any:
        with engine.connect() as conn:
            return conn.execute(
                text("select c.status, p.amount_minor from commands c, plans p where c.request_id = 'plan-gold'")
            ).first()

    try:
        assert tuple(wait_until(recorded, "the command's outcome in the ledger")) == ("applied", 4_500_000)
    finally:
        engine.dispose()
