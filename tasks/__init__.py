"""The Celery app of the billing worker: `celery -A tasks worker|beat|flower`.

Task names (stable; other apps send them by name with JSON keyword arguments) are in `tasks.config`;
`tasks.client` has helpers for senders, `docs/operations.md` the operator's guide.
"""

from tasks import periodic, public  # noqa: F401  (registers the tasks)
from tasks.app import app, runtime

__all__ = ["app", "runtime"]
