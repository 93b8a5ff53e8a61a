"""`/__sandbox/checkout`: the seed's card form, served by the emulator itself.

Same origin as /api/tokenize/credit_card, so the browser tokenizes without CORS. The page is a static file
(billing/sandbox/static/checkout.html, package data) with the emulator's current public key, its clock's year and
the merchant's `return_to` filled in, each HTML-escaped.
"""

from __future__ import annotations

import functools
import html
from datetime import datetime
from importlib import resources
from urllib.parse import urlsplit

from aiohttp import web

from billing.sandbox.clock import BOGOTA

MAX_RETURN_TO = 2048
_HTML = "text/html"


class BadCheckout(ValueError):
    """Raised when the page's query cannot make a working page (an unusable return_to)."""


@functools.cache
def _template() -> str:
    return resources.files("billing.sandbox").joinpath("static/checkout.html").read_text("utf-8")


def return_to(raw: str | None) -> str:
    """The merchant URL the token is posted to: empty (the page then shows the token), or an absolute http(s)
    URL. Anything else (javascript:, a relative path, a bare host) is refused: the form would post nowhere
    useful, or run script."""
    if raw is None or raw == "":
        return ""
    if len(raw) > MAX_RETURN_TO:
        raise BadCheckout(f"return_to must be at most {MAX_RETURN_TO} characters, got {len(raw)}")
    try:
        parts = urlsplit(raw)
    except ValueError as exc:
        raise BadCheckout(f"return_to is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BadCheckout(f"return_to must be an absolute http:// or https:// URL, got {raw!r}")
    return raw


def page(public_key: str, year: int, target: str) -> str:
    def attr(value: str) -> str:
        return html.escape(value, quote=True)

    return (
        _template()
        .replace("{{PUBLIC_KEY}}", attr(public_key))
        .replace("{{YEAR}}", str(year))
        .replace("{{RETURN_TO}}", attr(target))
        .replace("{{MERCHANT_HIDDEN}}", "" if target else "hidden")
    )


def response(raw_return_to: str | None, public_key: str, now: datetime) -> web.Response:
    """The page for this `return_to`, or 400 with the reason (nothing else happens either way). `now` is the
    emulator's clock: its year (in Bogotá, as the expiry check counts) centres the page's list of years."""
    try:
        target = return_to(raw_return_to)
    except BadCheckout as exc:
        body = f"<!doctype html><title>Bad checkout link</title><p>{html.escape(str(exc))}</p>\n"
        return web.Response(text=body, status=400, content_type=_HTML)
    return web.Response(
        text=page(public_key, now.astimezone(BOGOTA).year, target),
        content_type=_HTML,
        headers={"Cache-Control": "no-store"},  # the key may be rotated through /__sandbox/keys
    )
