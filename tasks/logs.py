"""No log record carries a card token, whatever logger made it and whatever handler writes it.

Celery logs raw message bodies in several places: the consumer dumps a message it cannot run (an unregistered
task name such as `billing.attach_crd`, an invalid shape, an undecodable body), and the pool's DEBUG line
`TaskPool: Apply` keeps the first 1,024 characters of the message. A sender that sets no `kwargsrepr` (a bare
kombu publish, a non-Python client) puts `attach_card`'s token in that body. A filter on one logger is not
enough: filters on a logger do not apply to records propagated from its children, and handlers come and go
(Celery's, a log file's, a test's).

`install()` therefore wraps the process's LogRecord factory, which every logger calls when it makes a record
(after its level check, so records that are not emitted cost nothing):

1. message dumps Celery is known to make keep their diagnosis (the error, the task name and id, the delivery
   info) and lose the message body, which may hold a token under any key or position;
2. every record's final message, exception text and stack text are scanned for a value given under a key
   that names a token (`"token": "..."`, `'token': '...'`, `token=...`), and the value is replaced by `***`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

from celery.worker.consumer import consumer

HIDDEN_BODY = "<hidden: task arguments may hold secrets>"
MASK = "***"
# celery.concurrency.base.BasePool.apply_async, at DEBUG: (target, repr of the task's args, repr of its kwargs).
POOL_APPLY = "TaskPool: Apply %s (args:%s kwargs:%s)"
_ARGUMENT_HEADERS = frozenset({"argsrepr", "kwargsrepr"})
_INSTALLED = "_billing_masks_tokens"

# A key that names a token (token, temp_token, creditCardToken...), quoted or bare, then ':' or '=', then its
# value: quoted (possibly with escaped quotes, as in JSON inside a repr) up to its closing quote or the end of
# a truncated text, or bare up to a separator.
_TOKEN_VALUE = re.compile(
    r"""(?P<key>(?:\\*["'])?[A-Za-z_]*token[A-Za-z_]*(?:\\*["'])?\s*[:=]\s*)"""
    r"""(?:(?P<quote>\\*["'])(?P<quoted>.*?)(?:(?P<close>(?P=quote))|$)|(?P<bare>[^\s,;&)}\]"'\\]+))""",
    re.IGNORECASE | re.DOTALL,
)
# The start of the pool's repr of a task's args: [task name, task id, ...].
_APPLY_HEAD = re.compile(r"""^[\[(]'(?P<name>[^'\\]{0,200})', '(?P<id>[^'\\]{0,200})'""")


def _mask_value(match: re.Match[str]) -> str:
    if match.group("bare") is not None:
        return f"{match.group('key')}{MASK}"
    return f"{match.group('key')}{match.group('quote')}{MASK}{match.group('close') or ''}"


def mask_tokens(text: str) -> str:
    """`text` with the value of every token-named key replaced by `***`."""
    if "token" not in text.lower():  # the common case: one cheap scan
        return text
    return _TOKEN_VALUE.sub(_mask_value, text)


def _headers(headers: Any) -> Any:
    if isinstance(headers, Mapping):
        return {k: v for k, v in headers.items() if k not in _ARGUMENT_HEADERS}
    return "<hidden>"


def _apply_summary(args_repr: Any) -> str:
    match = _APPLY_HEAD.match(str(args_repr))
    if match is None:
        return HIDDEN_BODY
    return f"[{match.group('name')!r}, {match.group('id')!r}, {HIDDEN_BODY}]"


def hide_message_bodies(record: logging.LogRecord) -> None:
    """Replace the message body in the records Celery makes of a raw message (see the module docstring)."""
    args = record.args if isinstance(record.args, tuple) else ()
    msg = record.msg
    if msg is consumer.UNKNOWN_TASK_ERROR and len(args) == 4:
        record.args = (args[0], HIDDEN_BODY, _headers(args[2]), args[3])
    elif msg is consumer.INVALID_TASK_ERROR and len(args) == 2:
        record.args = (args[0], HIDDEN_BODY)
    elif msg is consumer.MESSAGE_DECODE_ERROR and len(args) == 5:
        record.args = (args[0], args[1], args[2], "<hidden>", HIDDEN_BODY)
    elif msg is consumer.UNKNOWN_FORMAT and len(args) == 1:
        record.args = (HIDDEN_BODY,)
    elif msg == POOL_APPLY and len(args) == 3:
        record.args = (args[0], _apply_summary(args[1]), HIDDEN_BODY)


_EXCEPTION_FORMATTER = logging.Formatter()


def mask_record(record: logging.LogRecord) -> None:
    """Hide message bodies, then mask token values in the message, the exception text and the stack text."""
    hide_message_bodies(record)
    try:
        message = record.getMessage()
    except Exception:  # a malformed format: logging reports it when a handler formats the record
        return
    masked = mask_tokens(message)
    if masked != message:
        record.msg, record.args = masked, None
    if record.exc_info and not record.exc_text:
        try:
            text = _EXCEPTION_FORMATTER.formatException(record.exc_info)
        except Exception:
            text = ""
        masked = mask_tokens(text)
        if masked != text:
            record.exc_text = masked  # formatters use exc_text when it is set
    if record.stack_info:
        record.stack_info = mask_tokens(record.stack_info)


def install() -> None:
    """Wrap the process's LogRecord factory so that every record is masked (idempotent)."""
    previous: Callable[..., logging.LogRecord] = logging.getLogRecordFactory()
    if getattr(previous, _INSTALLED, False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        mask_record(record)
        return record

    setattr(factory, _INSTALLED, True)
    logging.setLogRecordFactory(factory)
