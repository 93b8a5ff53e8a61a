"""Redaction of the message dumps Celery's consumer logs for messages it cannot run.

A message with an unregistered task name (a typo such as `billing.attach_crd`), an invalid shape or an
undecodable body is logged by `celery.worker.consumer.consumer` with its full body and headers: that would
print a token sent to a misspelled task. This filter keeps the diagnosis (the error, the task name and id, the
delivery info) and drops the arguments.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from celery.worker.consumer import consumer

HIDDEN_BODY = "<hidden: task arguments may hold secrets>"
_ARGUMENT_HEADERS = frozenset({"argsrepr", "kwargsrepr"})


def _headers(headers: Any) -> Any:
    if isinstance(headers, Mapping):
        return {k: v for k, v in headers.items() if k not in _ARGUMENT_HEADERS}
    return "<hidden>"


class RedactMessageDumps(logging.Filter):
    """Rewrites the arguments of the consumer's "cannot run this message" log records."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if record.msg is consumer.UNKNOWN_TASK_ERROR and len(args) == 4:
            record.args = (args[0], HIDDEN_BODY, _headers(args[2]), args[3])
        elif record.msg is consumer.INVALID_TASK_ERROR and len(args) == 2:
            record.args = (args[0], HIDDEN_BODY)
        elif record.msg is consumer.MESSAGE_DECODE_ERROR and len(args) == 5:
            record.args = (args[0], args[1], args[2], "<hidden>", HIDDEN_BODY)
        elif record.msg is consumer.UNKNOWN_FORMAT and len(args) == 1:
            record.args = (HIDDEN_BODY,)
        return True


def install() -> None:
    """Attach the filter to the consumer's logger (idempotent)."""
    logger = consumer.logger
    if not any(isinstance(f, RedactMessageDumps) for f in logger.filters):
        logger.addFilter(RedactMessageDumps())
