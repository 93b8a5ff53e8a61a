"""`billing demo --web`: the seed's browser flow, end to end, in a browser.

It starts the bundled emulator (which serves the card form at /__sandbox/checkout), migrates a fresh SQLite
database of its own, runs a real `celery worker` and `celery beat` on the embedded broker, and serves a small
merchant site (aiohttp) that stands for the integrator's app:

    GET  /                        redirects to the emulator's checkout, with ?return_to=<this site>/signup
    POST /signup                  receives tmp_cc_token, email, firstName, lastName from the checkout and signs
                                  the customer up with the public tasks, by name (tasks.client): upsert_customer,
                                  attach_card, create_subscription (the plan was upserted at start)
    GET  /subscriptions/{id}      the subscription's state, refreshed until its first charge is settled
    GET  /api/subscriptions/{id}  the same as JSON

The merchant reads billing's database to show the state, which keeps the demo small; a real app would learn it
from the event stream (docs/events.md). docs/checkout.md describes the flow.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlencode

import click
from aiohttp import web

PLAN_CODE = "web-monthly"
PLAN_AMOUNT = "45000"
PLAN_CURRENCY = "COP"
WORKER_START_TIMEOUT_SECONDS = 120
MAX_NAME = 64
MAX_EMAIL = 254
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")
_SUBSCRIPTION = re.compile(r"sub_[0-9a-f]{12}")
# Attempt states that are an outcome: the page stops refreshing once the first charge reaches one.
_SETTLED_ATTEMPTS = frozenset({"approved", "declined", "unknown", "not_sent", "duplicate"})


class BadSignup(ValueError):
    """Raised when the checkout's post cannot sign anyone up; nothing is sent."""


@dataclass(frozen=True)
class Signup:
    token: str
    email: str
    first_name: str
    last_name: str


def parse_signup(form: Mapping[str, str]) -> Signup:
    """The checkout's post, checked before anything is sent: a token, an email and both names."""
    token = form.get("tmp_cc_token", "").strip()
    if not token:
        raise BadSignup("tmp_cc_token is missing: the card was not tokenized (post from the checkout page)")
    if not _TOKEN.fullmatch(token):
        raise BadSignup("tmp_cc_token is not a Tpaga token (1 to 128 letters, digits, '_' or '-')")
    email = form.get("email", "").strip()
    if not 3 <= len(email) <= MAX_EMAIL or "@" not in email.strip("@") or any(c.isspace() for c in email):
        raise BadSignup(f"email must be an address like ana@example.com (at most {MAX_EMAIL} characters)")
    names = {}
    for key in ("firstName", "lastName"):
        value = " ".join(form.get(key, "").split())
        if not 1 <= len(value) <= MAX_NAME:
            raise BadSignup(f"{key} must be 1 to {MAX_NAME} characters")
        names[key] = value
    return Signup(token, email, names["firstName"], names["lastName"])


class Shop(Protocol):
    """What the merchant site needs from billing: sign a customer up, and say how the subscription is doing."""

    def sign_up(self, signup: Signup) -> str:
        """Send the commands; returns the subscription's external id."""
        ...

    def state(self, external_id: str) -> dict[str, Any]:
        """The subscription as billing sees it now (`settled` once its first charge has an outcome)."""
        ...


def request_ids(external_id: str) -> dict[str, str]:
    """The commands' request ids of one signup, from its subscription's external id (`sub_<key>`)."""
    key = external_id.removeprefix("sub_")
    return {
        name: f"signup-{key}-{name}"
        for name in ("customer", "card", "subscription")  # in the order they are sent
    }


@dataclass
class CeleryShop:
    """The integrator's side: its own Celery app on the billing broker, sending the commands by name."""

    app: Any  # celery.Celery
    sessions: Any  # sessionmaker

    def sign_up(self, signup: Signup) -> str:
        from tasks import client

        key = secrets.token_hex(6)
        customer, subscription = f"cus_{key}", f"sub_{key}"
        ids = request_ids(subscription)
        client.upsert_customer(
            self.app,
            external_id=customer,
            email=signup.email,
            first_name=signup.first_name,
            last_name=signup.last_name,
            request_id=ids["customer"],
        )
        client.attach_card(self.app, token=signup.token, external_customer_id=customer, request_id=ids["card"])
        client.create_subscription(
            self.app,
            external_id=subscription,
            external_customer_id=customer,
            plan_code=PLAN_CODE,
            request_id=ids["subscription"],
        )
        return subscription

    def state(self, external_id: str) -> dict[str, Any]:
        from sqlalchemy import select

        from billing.db.models import Command, Subscription
        from billing.services import timeline

        ids = request_ids(external_id)
        with self.sessions() as session:
            outcomes = {
                c.request_id: c
                for c in session.execute(select(Command).where(Command.request_id.in_(ids.values()))).scalars()
            }
            commands = [
                {
                    "command": name,
                    "status": outcomes[rid].status if rid in outcomes else "waiting",
                    "error": outcomes[rid].error if rid in outcomes else None,
                }
                for name, rid in ids.items()
            ]
            sub = session.execute(
                select(Subscription).where(Subscription.external_id == external_id)
            ).scalar_one_or_none()
            story = timeline.subscription_timeline(session, sub) if sub is not None else None
        invoices = story["invoices"] if story else []
        first = invoices[0]["attempts"] if invoices else []
        settled = any(c["status"] in ("rejected", "stale") for c in commands) or any(
            a["state"] in _SETTLED_ATTEMPTS for a in first
        )
        return {
            "external_id": external_id,
            "subscription": story["subscription"] if story else None,
            "invoices": invoices,
            "commands": commands,
            "settled": settled,
        }


@dataclass
class Merchant:
    """The merchant site; `known` holds the subscriptions it signed up (anything else is a 404)."""

    checkout_url: str
    shop: Shop
    known: set[str] = field(default_factory=set)

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes(
            [
                web.get("/", self.index),
                web.post("/signup", self.signup),
                web.get("/subscriptions/{external_id}", self.page),
                web.get("/api/subscriptions/{external_id}", self.api),
            ]
        )
        return app

    async def index(self, request: web.Request) -> web.StreamResponse:
        back = str(request.url.with_path("/signup").with_query(None))
        raise web.HTTPFound(f"{self.checkout_url}?{urlencode({'return_to': back})}")

    async def signup(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        try:
            signup = parse_signup({k: v for k, v in form.items() if isinstance(v, str)})
        except BadSignup as exc:
            return _html(400, "Sign-up refused", f"<p>{html.escape(str(exc))}</p><p>Nothing was sent to billing.</p>")
        external_id = await asyncio.to_thread(self.shop.sign_up, signup)
        self.known.add(external_id)
        raise web.HTTPSeeOther(f"/subscriptions/{external_id}")

    async def _state(self, request: web.Request) -> dict[str, Any]:
        external_id = request.match_info["external_id"]
        if not _SUBSCRIPTION.fullmatch(external_id) or external_id not in self.known:
            raise web.HTTPNotFound(text=f"this shop signed no subscription {external_id!r} up\n")
        return await asyncio.to_thread(self.shop.state, external_id)

    async def api(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(await self._state(request))

    async def page(self, request: web.Request) -> web.StreamResponse:
        state = await self._state(request)
        return _html(200, "Your subscription", render_state(state), refresh=not state["settled"])


def _html(status: int, title: str, body: str, refresh: bool = False) -> web.Response:
    head = '<meta http-equiv="refresh" content="1">' if refresh else ""
    text = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">{head}<title>{html.escape(title)}</title>'
        "<style>body{font-family:system-ui,sans-serif;max-width:48rem;margin:2rem auto}"
        "td,th{padding:.2rem .6rem;text-align:left;border-bottom:1px solid #ddd}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )
    return web.Response(text=text, status=status, content_type="text/html")


def _attempt(a: dict[str, Any]) -> str:
    """`1 approved`, `2 declined 51`: Tpaga's errorCode when it is not the approval's 00."""
    code = a["error_code"]
    return f"{a['number']} {a['state']}" + (f" {code}" if code not in (None, "00") else "")


def render_state(state: dict[str, Any]) -> str:
    def cell(value: object) -> str:
        return f"<td>{html.escape('' if value is None else str(value))}</td>"

    sub = state["subscription"]
    parts = []
    if sub is None:
        parts.append(f'<p id="status">{html.escape(state["external_id"])}: waiting for the worker</p>')
    else:
        plan = sub["plan"]
        parts.append(
            f'<p id="status">{html.escape(state["external_id"])}: <strong>{html.escape(sub["status"])}</strong>, '
            f"plan {html.escape(str(plan['code']))} ({html.escape(str(plan['amount']))} "
            f"{html.escape(str(plan['currency']))} every {html.escape(str(plan['every']))})</p>"
        )
    rows = "".join(
        "<tr>"
        + cell(i["period_index"])
        + cell(f"{i['amount']} {i['currency']}")
        + f'<td class="invoice-state">{html.escape(i["state"])}</td>'
        + cell(", ".join(_attempt(a) for a in i["attempts"]))
        + "</tr>"
        for i in state["invoices"]
    )
    parts.append(
        "<h2>Invoices</h2><table><tr><th>period</th><th>amount</th><th>state</th><th>attempts</th></tr>"
        + (rows or '<tr><td colspan="4">none yet</td></tr>')
        + "</table>"
    )
    commands = "".join(
        "<tr>" + cell(c["command"]) + cell(c["status"]) + cell(c["error"]) + "</tr>" for c in state["commands"]
    )
    parts.append(
        "<h2>Commands sent</h2><table><tr><th>command</th><th>outcome</th><th>error</th></tr>" + commands + "</table>"
    )
    if not state["settled"]:
        parts.append("<p>Refreshing every second until the first charge has an outcome.</p>")
    return "".join(parts)


def run_web_demo(host: str, port: int, echo: Callable[[str], None] = click.echo) -> None:
    """Run until SIGINT or SIGTERM; everything it started is stopped, and its state removed, on the way out."""
    from celery import Celery
    from sqlalchemy import select

    from billing.db.engine import make_engine, make_session_factory
    from billing.db.migrate import upgrade
    from billing.db.models import Command, Plan
    from billing.demo import process, wait, worker_env
    from billing.sandbox.server import SandboxConfig, SandboxThread
    from tasks import client

    listening = _listen(host, port)  # first: a port in use stops the demo before it starts anything
    state_dir = tempfile.mkdtemp(prefix="billing-web-demo-")
    database_url = f"sqlite:///{os.path.join(state_dir, 'billing.db')}"
    broker_url = f"sqla+sqlite:///{os.path.join(state_dir, 'celery-broker.db')}"
    logs = os.path.abspath("demo-logs")
    os.makedirs(logs, exist_ok=True)
    with ExitStack() as stack:
        stack.callback(listening.close)
        stack.callback(shutil.rmtree, state_dir, True)
        # Until the shop's event loop takes SIGTERM over, it unwinds this stack like Ctrl-C does: the worker and
        # beat run in sessions of their own, and the default action would leave them running.
        previous = signal.signal(signal.SIGTERM, _interrupt)
        stack.callback(signal.signal, signal.SIGTERM, previous)
        sandbox = SandboxThread(SandboxConfig(host=host, port=0)).start()
        stack.callback(sandbox.stop)
        echo(f"[web] emulator at {sandbox.api_url} (its ledger: {sandbox.base_url}__sandbox/ledger)")
        env = worker_env(database_url, broker_url, sandbox.api_url, clock="system")
        upgrade(database_url)
        engine = make_engine(database_url)
        stack.callback(engine.dispose)
        sessions = make_session_factory(engine)
        celery = [sys.executable, "-m", "celery", "-A", "tasks"]
        worker_options = ["--loglevel=INFO", "--pool=threads", "-c", "4", "--without-mingle", "--without-gossip"]
        worker = stack.enter_context(
            process(
                [*celery, "worker", *worker_options],
                env,
                os.path.join(logs, "web-worker.log"),
            )
        )
        beat = stack.enter_context(
            process(
                [*celery, "beat", "--loglevel=INFO", "--schedule", os.path.join(state_dir, "celerybeat-schedule")],
                env,
                os.path.join(logs, "web-beat.log"),
            )
        )
        echo(f"[web] fresh state in {state_dir} (removed at exit); worker and beat logs in {logs}/web-*.log")
        shop_app = Celery("shop", broker=broker_url)
        client.upsert_plan(
            shop_app,
            code=PLAN_CODE,
            amount=PLAN_AMOUNT,
            currency=PLAN_CURRENCY,
            interval="month",
            request_id=f"web-demo-plan-{PLAN_CODE}",
        )

        def plan_ready() -> bool:
            for proc, name in ((worker, "worker"), (beat, "beat")):
                if proc.poll() is not None:
                    raise click.ClickException(
                        f"the celery {name} exited ({proc.returncode}); see {logs}/web-{name}.log"
                    )
            with sessions() as session:
                refused = session.execute(
                    select(Command.error).where(Command.name == "billing.upsert_plan", Command.status != "applied")
                ).scalar()
                if refused:
                    raise click.ClickException(f"the worker refused the demo's plan: {refused}")
                return session.execute(select(Plan.id).where(Plan.code == PLAN_CODE)).first() is not None

        wait(plan_ready, WORKER_START_TIMEOUT_SECONDS, "the worker to create the demo's plan")
        echo(f"[web] the worker created plan {PLAN_CODE} ({PLAN_AMOUNT} {PLAN_CURRENCY} a month)")
        merchant = Merchant(f"{sandbox.base_url}__sandbox/checkout", CeleryShop(shop_app, sessions))
        asyncio.run(_serve(merchant.app(), listening, echo))


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _listen(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(128)
        except OSError:
            sock.close()
            raise
    except OSError as exc:  # socket.gaierror too: a host that does not resolve
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


async def _serve(app: web.Application, sock: socket.socket, echo: Callable[[str], None]) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    bound = runner.addresses[0]
    # A wildcard bind is reached on loopback; an IPv6 address is bracketed in a URL.
    reach = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(bound[0], bound[0])
    shown = f"[{reach}]" if ":" in reach else reach
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    echo(f"[web] open http://{shown}:{bound[1]}/ in a browser to sign up with a test card (Ctrl-C stops)")
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        echo("[web] stopped")
