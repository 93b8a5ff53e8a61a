"""The Celery app of the billing worker: `celery -A tasks worker|beat|flower`.

Importing this package (or `tasks.client`) reads no `.env`, raises nothing and patches nothing: the app reads
its settings when it is first used, and `configure_process` prepares a process that uses it (see tasks.app).
Task names (stable; other apps send them by name with JSON keyword arguments) are in `billing.task_names`;
`tasks.client` has helpers for senders, `docs/operations.md` the operator's guide.
"""

from tasks import commands, periodic, public  # noqa: F401  (registers the tasks)
from tasks.app import app, configure_process, runtime

__all__ = ["app", "configure_process", "runtime"]
