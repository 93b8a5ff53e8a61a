"""Commands from other apps by their own ids: plans by code, customers and subscriptions by external id.

Each is idempotent in the database (unique external ids; a row written before Tpaga is called, completed
after), order-tolerant (naming an object not there yet raises `Waiting`, which the task layer retries for a
bounded time) and late-tolerant (an `issued_at` older than the object's last applied change is `Stale`). The
outcome of each goes to the ledger (`billing.services.ledger`) with its request_id. See docs/tasks.md.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import DisconnectionError, OperationalError
from sqlalchemy.orm import Session

from billing import task_names
from billing.db import cas
from billing.db.models import Card, CardToken, ChargeAttempt, Customer, Invoice, Plan, Subscription
from billing.domain.periods import Interval, period_boundary, period_index_at
from billing.domain.states import AttemptState, CardStatus, InvoiceState, SubscriptionStatus
from billing.gateway import errors as gw
from billing.gateway.models import CreditCard
from billing.services import catalog, events, stream, subscriptions
from billing.services.context import Context, enqueue
from billing.services.errors import AnswerLost, InvalidRequest, Missing, NotFound, Waiting
from billing.services.ledger import Meta, Scope, check_external_id, run

UPSERT_PLAN = task_names.UPSERT_PLAN
UPSERT_CUSTOMER = task_names.UPSERT_CUSTOMER
ATTACH_CARD = task_names.ATTACH_CARD
CREATE_SUBSCRIPTION = task_names.CREATE_SUBSCRIPTION
CANCEL_SUBSCRIPTION = task_names.CANCEL_SUBSCRIPTION
PAUSE_SUBSCRIPTION = task_names.PAUSE_SUBSCRIPTION
RESUME_SUBSCRIPTION = task_names.RESUME_SUBSCRIPTION

NO_META = Meta()


# ---------------------------------------------------------------------------------------------------- plans


def upsert_plan(
    ctx: Context,
    *,
    code: str,
    amount: str,
    currency: str,
    interval: str = "month",
    interval_count: int = 1,
    trial_days: int = 0,
    name: str | None = None,
    tax: str = "excluded",
    tax_rate: int | None = None,
    meta: Meta = NO_META,
) -> dict[str, Any]:
    """Create the plan; the same terms again change nothing; other terms are refused once the plan is in use.

    The tax treatment is one of the terms: `tax` (iva, inc, excluded, exempt; `excluded` when not given, what
    every plan sent before taxes existed) at `tax_rate` percent (None: the treatment's default)."""
    if not isinstance(amount, str):
        raise InvalidRequest(f"amount must be a decimal string such as '45000', got a {type(amount).__name__}")
    if not isinstance(currency, str):
        raise InvalidRequest("currency must be a string such as 'COP'")
    money = catalog.money_from_input(amount, currency)
    catalog.check_plan_terms(code, money, interval, interval_count, trial_days)
    plan_tax = catalog.tax_from_input(tax, tax_rate)
    if name is not None and (not isinstance(name, str) or not 1 <= len(name) <= 128):
        raise InvalidRequest("name must be a string of 1 to 128 characters")
    terms = {
        "amount_minor": money.amount_minor,
        "currency": money.currency,
        "interval": Interval(interval),
        "interval_count": interval_count,
        "trial_days": trial_days,
        "tax_treatment": plan_tax.treatment,
        "tax_rate": plan_tax.rate,
    }
    scope = Scope.of(UPSERT_PLAN, {"code": code, **terms, "name": name}, meta)

    def apply() -> dict[str, Any]:
        now = ctx.clock.now()
        with ctx.unit_of_work() as session:
            plan = session.execute(select(Plan).where(Plan.code == code).with_for_update()).scalar_one_or_none()
            if plan is None:
                plan = Plan(code=code, name=name or code, created_at=now, last_issued_at=meta.issued_at, **terms)
                session.add(plan)
                session.flush()
                result = _plan_result(plan, created=True, changed=True)
                return scope.applied(session, now, result)
            scope.check_fresh("plan", code, plan.last_issued_at)
            current = {key: getattr(plan, key) for key in terms}
            changed = False
            if current != terms:
                in_use = session.execute(
                    select(Subscription.id).where(Subscription.plan_id == plan.id).limit(1)
                ).first()
                if in_use:
                    raise InvalidRequest(
                        f"plan {code!r} is in use and its terms cannot change (plans are immutable once "
                        "subscribed: make a new code)"
                    )
                for key, value in terms.items():
                    setattr(plan, key, value)
                changed = True
            if name is not None and plan.name != name:
                plan.name = name
                changed = True
            plan.last_issued_at = scope.advance(plan.last_issued_at)
            return scope.applied(session, now, _plan_result(plan, created=False, changed=changed))

    return run(ctx, scope, apply)


def _plan_result(plan: Plan, *, created: bool, changed: bool) -> dict[str, Any]:
    return {"plan_code": plan.code, "plan_id": plan.id, "created": created, "changed": changed}


# ------------------------------------------------------------------------------------------------ customers


def _check_text(name: str, value: object, longest: int, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= longest or value != value.strip():
        raise InvalidRequest(f"{name} must be a string of 1 to {longest} characters without surrounding spaces")
    return value


def _check_email(value: object) -> str:
    email = _check_text("email", value, 254)
    assert email is not None
    local, _, domain = email.partition("@")
    if not local or "." not in domain or " " in email or domain.startswith(".") or domain.endswith("."):
        raise InvalidRequest(f"email must be an address such as ana@example.com, got {email[:40]!r}")
    return email


def upsert_customer(
    ctx: Context,
    *,
    external_id: str,
    email: str,
    first_name: str,
    last_name: str,
    phone: str | None = None,
    meta: Meta = NO_META,
) -> dict[str, Any]:
    """Create the customer here and at Tpaga exactly once; a repeat replaces the local fields (an omitted phone
    is no phone: an upsert is the customer as the app has it, so the newest one alone decides, in any order).

    The row is written first, pending (no Tpaga id) under a lease; only the lease holder calls Tpaga, and the
    completion is a compare-and-set on the still-missing Tpaga id. A duplicate that finds the row pending waits
    (`Waiting`). Tpaga has no update call: later changes of the fields are kept here only.
    """
    check_external_id("external_id", external_id)
    fields = {
        "email": _check_email(email),
        "first_name": _check_text("first_name", first_name, 128),
        "last_name": _check_text("last_name", last_name, 128),
        "phone": _check_text("phone", phone, 32, optional=True),
    }
    scope = Scope.of(UPSERT_CUSTOMER, {"external_id": external_id, **fields}, meta)

    def apply() -> dict[str, Any]:
        now = ctx.clock.now()
        with ctx.unit_of_work() as session:
            customer = _customer_for_update(session, external_id)
            created = customer is None
            if customer is None:
                customer = Customer(
                    merchant_customer_id=external_id,
                    created_at=now,
                    updated_at=now,
                    last_issued_at=meta.issued_at,
                    tpaga_lease_expires_at=now + ctx.sending_lease,
                    **fields,
                )
                session.add(customer)
                session.flush()
            else:
                scope.check_fresh("customer", external_id, customer.last_issued_at)
                # Every field, the phone too when omitted: keeping an older phone would make the end state
                # depend on the delivery order (an older upsert overtaken by this one is refused as stale).
                changed = []
                for key, value in fields.items():
                    if getattr(customer, key) != value:
                        setattr(customer, key, value)
                        changed.append(key)
                customer.updated_at = now
                customer.last_issued_at = scope.advance(customer.last_issued_at)
                if customer.tpaga_customer_id is not None:
                    if changed:
                        catalog.emit_customer(session, now, "customer.updated", customer, changed=changed)
                    return scope.applied(session, now, _customer_result(customer, created=False))
                lease = customer.tpaga_lease_expires_at
                if lease is not None and lease > now:
                    raise Waiting(f"customer {external_id!r} is being created at Tpaga by another worker")
                # The holder's lease ran out (its worker died, or its answer was lost): take over. Tpaga has no
                # lookup by merchantCustomerId, so an operator may find a second customer there (event below).
                customer.tpaga_lease_expires_at = now + ctx.sending_lease
                events.record(session, now, "customer.tpaga_retry", customer_id=customer.id, external_id=external_id)
            customer_id = customer.id
        return _create_at_tpaga(ctx, scope, customer_id, external_id, fields, created)

    return run(ctx, scope, apply)


def _customer_for_update(session: Session, external_id: str) -> Customer | None:
    return session.execute(
        select(Customer).where(Customer.merchant_customer_id == external_id).with_for_update()
    ).scalar_one_or_none()


def _create_at_tpaga(
    ctx: Context, scope: Scope, customer_id: int, external_id: str, fields: dict[str, Any], created: bool
) -> dict[str, Any]:
    try:
        remote = ctx.gateway.create_customer(
            first_name=fields["first_name"],
            last_name=fields["last_name"],
            email=fields["email"],
            merchant_customer_id=external_id,
        )
    except gw.NotSentError:
        _release_customer(ctx, customer_id)
        raise
    except gw.ValidationError as exc:
        _release_customer(ctx, customer_id, forget=created)
        refused = ", ".join(sorted({f.field for f in exc.errors if f.field})) or "its fields"
        raise InvalidRequest(f"Tpaga refused the customer ({refused}); nothing was created") from None
    now = ctx.clock.now()
    with ctx.unit_of_work() as session:
        completed = session.execute(
            update(Customer)
            .where(Customer.id == customer_id, Customer.tpaga_customer_id.is_(None))
            .values(tpaga_customer_id=remote.id, tpaga_lease_expires_at=None, updated_at=now)
            .execution_options(synchronize_session=False)
        ).rowcount  # type: ignore[attr-defined]
        if not completed:
            # Another worker took over after our lease ran out and completed first: ours is a spare at Tpaga.
            events.record(
                session, now, "customer.orphan_at_tpaga", customer_id=customer_id, tpaga_customer_id=remote.id
            )
        customer = session.get_one(Customer, customer_id)
        if completed:
            events.record(session, now, "customer.created", customer_id=customer_id, external_id=external_id)
            catalog.emit_customer(session, now, "customer.created", customer)
        return scope.applied(session, now, _customer_result(customer, created=created))


def _release_customer(ctx: Context, customer_id: int, *, forget: bool = False) -> None:
    """Tpaga created nothing: give the lease back at once, or forget a row this command made and nothing uses."""
    with ctx.unit_of_work() as session:
        pending = Customer.id == customer_id, Customer.tpaga_customer_id.is_(None)
        used = session.execute(select(Subscription.id).where(Subscription.customer_id == customer_id).limit(1)).first()
        if forget and not used:
            session.execute(delete(Customer).where(*pending))
        else:
            session.execute(update(Customer).where(*pending).values(tpaga_lease_expires_at=None))


def _customer_result(customer: Customer, *, created: bool) -> dict[str, Any]:
    return {"external_id": customer.merchant_customer_id, "customer_id": customer.id, "created": created}


def _customer_by_external_id(session: Session, external_id: str) -> Customer:
    customer = session.execute(
        select(Customer).where(Customer.merchant_customer_id == external_id)
    ).scalar_one_or_none()
    if customer is None:
        raise Missing("customer", external_id)
    return customer


# ---------------------------------------------------------------------------------------------------- cards


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def attach_card(
    ctx: Context,
    *,
    token: str,
    customer_id: int | None = None,
    external_customer_id: str | None = None,
    meta: Meta = NO_META,
) -> dict[str, Any]:
    """Associate a card from a single-use token; the same token again returns the first result.

    The token's SHA-256 is written `pending` before Tpaga is called: a duplicate delivery finds it and waits
    for, or returns, the first call's outcome instead of spending the token twice (Tpaga's "already used").
    """
    if not isinstance(token, str) or not token.strip():
        raise InvalidRequest("token must be a non-empty string")
    if (customer_id is None) == (external_customer_id is None):
        raise InvalidRequest("give exactly one of customer_id or external_customer_id")
    if external_customer_id is not None:
        check_external_id("external_customer_id", external_customer_id)
    digest = token_digest(token)
    scope = Scope.of(
        ATTACH_CARD, {"token_sha256": digest, "customer_id": customer_id, "customer": external_customer_id}, meta
    )

    def apply() -> dict[str, Any]:
        now = ctx.clock.now()
        with ctx.unit_of_work() as session:
            if customer_id is not None:
                customer = session.get(Customer, customer_id)
                if customer is None:
                    raise NotFound(f"customer {customer_id} does not exist")
            else:
                assert external_customer_id is not None
                customer = _customer_by_external_id(session, external_customer_id)
            if customer.tpaga_customer_id is None:
                raise Waiting(f"customer {customer.merchant_customer_id or customer.id} is not yet created at Tpaga")
            row = session.get(CardToken, digest, with_for_update=True)
            if row is None:
                session.add(
                    CardToken(
                        token_sha256=digest,
                        customer_id=customer.id,
                        state="pending",
                        issued_at=meta.issued_at,
                        lease_expires_at=now + ctx.sending_lease,
                        created_at=now,
                        updated_at=now,
                    )
                )
                session.flush()
            else:
                _token_outcome(row, customer.id, now)
            target, tpaga_customer_id = customer.id, customer.tpaga_customer_id
        return _associate(ctx, scope, token, digest, target, tpaga_customer_id)

    return run(ctx, scope, apply)


def _token_outcome(row: CardToken, customer_id: int, now: datetime) -> None:
    """A token seen before: raise what its first use came to (a result is returned by the ledger, or here)."""
    if row.customer_id != customer_id:
        raise InvalidRequest("this token was already given for another customer")
    if row.state == "attached":
        raise _AlreadyAttached(row.card_id)
    if row.state == "refused":
        raise InvalidRequest(row.error or "Tpaga refused the token")
    if row.state == "pending" and row.lease_expires_at is not None and row.lease_expires_at > now:
        raise Waiting("this token is being associated at Tpaga by another worker")
    # Unknown, or pending past its lease (the worker died during the call): the token may be spent at Tpaga.
    raise AnswerLost("Tpaga's answer to this token's association was lost; the card may be associated there")


class _AlreadyAttached(Exception):
    def __init__(self, card_id: int | None) -> None:
        super().__init__(card_id)
        self.card_id = card_id


def _associate(
    ctx: Context, scope: Scope, token: str, digest: str, customer_id: int, tpaga_customer_id: str
) -> dict[str, Any]:
    try:
        remote = ctx.gateway.associate_card(tpaga_customer_id, token)
    except (gw.NotSentError, ValueError):
        _forget_token(ctx, digest)  # nothing reached Tpaga: the token is unspent
        raise
    except (gw.ValidationError, gw.NotFoundError) as exc:
        message = f"Tpaga refused the token (HTTP {exc.http_status}): it is unknown, expired or already used"
        _finish_token(ctx, digest, "refused", message)
        raise InvalidRequest(message) from None
    except gw.OutcomeUnknownError:
        _finish_token(ctx, digest, "unknown", "Tpaga's answer was lost")
        raise AnswerLost("Tpaga's answer was lost; the card may be associated there") from None
    except gw.TpagaError:
        _forget_token(ctx, digest)  # refused as a whole (a 401): nothing was associated
        raise
    # Tpaga has associated the card and the token is spent: a database error (a deadlock, a serialization failure,
    # a lost connection) rolled back only our transaction, so it is run again, for a few seconds, rather than lose
    # the card. A database down for longer leaves the token pending, then "answer lost" (docs/operations.md).
    for attempt in range(1, _RECORD_ATTEMPTS + 1):
        try:
            return _record_card(ctx, scope, digest, customer_id, remote)
        except (OperationalError, DisconnectionError):
            if attempt == _RECORD_ATTEMPTS:
                raise
            time.sleep(min(0.1 * 2**attempt, 2.0))
    raise AssertionError("unreachable")


_RECORD_ATTEMPTS = 6


def _record_card(ctx: Context, scope: Scope, digest: str, customer_id: int, remote: CreditCard) -> dict[str, Any]:
    now = ctx.clock.now()
    usable = remote.validation_successful is not False
    with ctx.unit_of_work() as session:
        card = Card(
            customer_id=customer_id,
            tpaga_card_id=remote.id,
            brand=remote.brand,
            last_four=remote.last_four,
            exp_month=remote.expiration_month,
            exp_year=remote.expiration_year,
            status=CardStatus.USABLE if usable else CardStatus.UNUSABLE,
            unusable_code=None if usable else remote.validation_error_code,
            created_at=now,
        )
        session.add(card)
        session.flush()
        session.execute(
            update(CardToken)
            .where(CardToken.token_sha256 == digest)
            .values(state="attached", card_id=card.id, lease_expires_at=None, updated_at=now)
        )
        events.record(session, now, "card.attached", card_id=card.id, usable=usable)
        stream.emit(
            session,
            now,
            "card.attached",
            customer_id=customer_id,
            brand=card.brand,
            last_four=card.last_four,
            exp_month=card.exp_month,
            exp_year=card.exp_year,
            usable=usable,
            error_code=card.unusable_code,
        )
        if usable:
            catalog.retry_waiting_invoices(session, now, customer_id, card.id)
        return scope.applied(session, now, {"customer_id": customer_id, "card_id": card.id, "usable": usable})


def _forget_token(ctx: Context, digest: str) -> None:
    with ctx.unit_of_work() as session:
        session.execute(delete(CardToken).where(CardToken.token_sha256 == digest, CardToken.state == "pending"))


def _finish_token(ctx: Context, digest: str, state: str, error: str) -> None:
    now = ctx.clock.now()
    with ctx.unit_of_work() as session:
        session.execute(
            update(CardToken)
            .where(CardToken.token_sha256 == digest, CardToken.state == "pending")
            .values(state=state, error=error, lease_expires_at=None, updated_at=now)
        )


def attach_card_result(ctx: Context, **kwargs: Any) -> dict[str, Any]:
    """attach_card, with a token already attached answered by its first result."""
    try:
        return attach_card(ctx, **kwargs)
    except _AlreadyAttached as done:
        with ctx.sessions() as session:
            card = session.get_one(Card, done.card_id)
            return {
                "customer_id": card.customer_id,
                "card_id": card.id,
                "usable": card.status == CardStatus.USABLE,
                "repeat": True,
            }


# -------------------------------------------------------------------------------------------- subscriptions


def _subscription_by_external_id(session: Session, external_id: str, *, lock: bool = False) -> Subscription:
    query = select(Subscription).where(Subscription.external_id == external_id)
    sub = session.execute(query.with_for_update() if lock else query).scalar_one_or_none()
    if sub is None:
        raise Missing("subscription", external_id)
    return sub


def _check_when(name: str, value: object) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise InvalidRequest(f"{name} must be an ISO 8601 time with a UTC offset")
    return value


def create_subscription(
    ctx: Context,
    *,
    external_id: str,
    external_customer_id: str,
    plan_code: str,
    trial_days: int | None = None,
    anchor_at: datetime | None = None,
    meta: Meta = NO_META,
) -> dict[str, Any]:
    """Create the subscription once; the same terms again return it; other terms are refused.

    The customer need not have a card yet: its invoices wait for one (`billing.attach_card` charges them).
    """
    check_external_id("external_id", external_id)
    check_external_id("external_customer_id", external_customer_id)
    if not isinstance(plan_code, str) or not catalog.PLAN_CODE.match(plan_code):
        raise InvalidRequest("plan_code must be 1-64 characters of letters, digits, '_', '.', '-'")
    if trial_days is not None and (isinstance(trial_days, bool) or not isinstance(trial_days, int)):
        raise InvalidRequest("trial_days must be a whole number from 0 to 730")
    _check_when("anchor_at", anchor_at)
    terms = {
        "customer": external_customer_id,
        "plan_code": plan_code,
        "trial_days": trial_days,
        "anchor_at": anchor_at.isoformat() if anchor_at else None,
    }
    terms_hash = hashlib.sha256(repr(sorted(terms.items())).encode()).hexdigest()
    scope = Scope.of(CREATE_SUBSCRIPTION, {"external_id": external_id, **terms}, meta)

    def apply() -> dict[str, Any]:
        now = ctx.clock.now()
        with ctx.unit_of_work() as session:
            plan = session.execute(select(Plan).where(Plan.code == plan_code)).scalar_one_or_none()
            if plan is None:
                raise NotFound(f"plan {plan_code!r} does not exist")
            existing = session.execute(
                select(Subscription).where(Subscription.external_id == external_id)
            ).scalar_one_or_none()
            if existing is not None:
                if existing.terms_hash != terms_hash:
                    raise InvalidRequest(
                        f"subscription {external_id!r} exists with other terms (customer, plan, trial, anchor)"
                    )
                return scope.applied(session, now, _subscription_result(existing, changed=False))
            customer = _customer_by_external_id(session, external_customer_id)
            sub = catalog.new_subscription(
                session, ctx, now, customer_id=customer.id, plan=plan, anchor_at=anchor_at, trial_days=trial_days
            )
            sub.external_id = external_id
            sub.terms_hash = terms_hash
            sub.last_issued_at = meta.issued_at
            session.flush()
            return scope.applied(session, now, _subscription_result(sub, changed=True))

    return run(ctx, scope, apply)


def _subscription_result(sub: Subscription, *, changed: bool, **extra: Any) -> dict[str, Any]:
    return {
        "external_id": sub.external_id,
        "subscription_id": sub.id,
        "status": str(sub.status),
        "paused": sub.paused_at is not None,
        "changed": changed,
        **extra,
    }


def cancel_subscription(
    ctx: Context,
    *,
    subscription_id: int | None = None,
    external_subscription_id: str | None = None,
    at_period_end: bool = False,
    refund_last_charge: bool = False,
    meta: Meta = NO_META,
) -> dict[str, Any]:
    """Cancel by internal or external id (see `subscriptions.cancel_subscription`).

    Never stale, and it leaves the subscription's `issued_at` mark alone: nothing undoes a cancel, so one issued
    before a pause or resume that overtook it must still apply (refused, the customer would go on being billed),
    and that pause or resume, when it comes after, is judged against the other pauses and resumes only.
    """
    if (subscription_id is None) == (external_subscription_id is None):
        raise InvalidRequest("give exactly one of subscription_id or external_subscription_id")
    if external_subscription_id is not None:
        check_external_id("external_subscription_id", external_subscription_id)
    params = {
        "subscription_id": subscription_id,
        "subscription": external_subscription_id,
        "at_period_end": at_period_end,
        "refund_last_charge": refund_last_charge,
    }
    scope = Scope.of(CANCEL_SUBSCRIPTION, params, meta)

    external: dict[str, str | None] = {}

    def guard(session: Session, sub: Subscription) -> None:
        external["external_id"] = sub.external_id

    def apply() -> dict[str, Any]:
        target = subscription_id
        if target is None:
            assert external_subscription_id is not None
            with ctx.sessions() as session:
                target = _subscription_by_external_id(session, external_subscription_id).id
        result = subscriptions.cancel_subscription(
            ctx,
            subscription_id=target,
            at_period_end=at_period_end,
            refund_last_charge=refund_last_charge,
            guard=guard,
            record=lambda session, now, result: scope.applied(session, now, {**external, **result}),
        )
        return {**external, **result}

    result = run(ctx, scope, apply)
    if result.get("repeat") and refund_last_charge:
        # The refund is requested after the cancel commits; a repeat asks again (one refund per charge) so a
        # worker that died between the two leaves no cancel without its refund.
        result["refund"] = subscriptions.refund_last_paid(ctx, result["subscription_id"])
    return result


def pause_subscription(
    ctx: Context, *, external_subscription_id: str, resumes_at: datetime | None = None, meta: Meta = NO_META
) -> dict[str, Any]:
    """Pause: no invoice is opened and nothing is charged until resumed (by command, or at `resumes_at`).

    Open invoices are locked first (the charge path's order), then the subscription; attempts of them still
    `pending` (claimed, not yet sent) are refused (`not_sent`), so `mark_sending` cannot send them; an attempt
    already `sending` finishes, and its invoice waits afterwards (the claim path refuses a paused subscription).
    """
    check_external_id("external_subscription_id", external_subscription_id)
    _check_when("resumes_at", resumes_at)
    scope = Scope.of(
        PAUSE_SUBSCRIPTION,
        {"subscription": external_subscription_id, "resumes_at": resumes_at.isoformat() if resumes_at else None},
        meta,
    )

    def apply() -> dict[str, Any]:
        now = ctx.clock.now()
        if resumes_at is not None and resumes_at <= now:
            raise InvalidRequest("resumes_at must be in the future")
        with ctx.unit_of_work() as session:
            found = _subscription_by_external_id(session, external_subscription_id)
            invoice_ids = _lock_open_invoices(session, found.id)
            sub = session.execute(
                select(Subscription).where(Subscription.id == found.id).with_for_update()
            ).scalar_one()
            scope.check_fresh("subscription", sub.external_id, sub.last_issued_at)
            if sub.status == SubscriptionStatus.CANCELED:
                raise InvalidRequest(f"subscription {external_subscription_id!r} is canceled")
            changed = sub.paused_at is None or sub.resumes_at != resumes_at
            if sub.paused_at is None:
                invoice_ids += [i for i in _lock_open_invoices(session, sub.id) if i not in invoice_ids]
                _hold_invoices(session, now, invoice_ids)
                sub.paused_at = now
                sub.next_billing_at = None
                events.record(
                    session,
                    now,
                    "subscription.paused",
                    subscription_id=sub.id,
                    resumes_at=resumes_at.isoformat() if resumes_at else None,
                )
                stream.emit(
                    session,
                    now,
                    "subscription.paused",
                    subscription_id=sub.id,
                    status=str(sub.status),
                    resumes_at=stream.iso(resumes_at),
                    entitlement=stream.subscription_entitlement(sub, now),
                )
            sub.resumes_at = resumes_at
            sub.updated_at = now
            sub.last_issued_at = scope.advance(sub.last_issued_at)
            session.flush()
            return scope.applied(session, now, _subscription_result(sub, changed=changed))

    return run(ctx, scope, apply)


def _lock_open_invoices(session: Session, subscription_id: int) -> list[int]:
    return list(
        session.execute(
            select(Invoice.id)
            .where(Invoice.subscription_id == subscription_id, Invoice.state == InvoiceState.OPEN)
            .order_by(Invoice.id)
            .with_for_update()
        ).scalars()
    )


def _hold_invoices(session: Session, now: datetime, invoice_ids: list[int]) -> None:
    """The paused subscription's open invoices wait (no due time); their unsent attempts never leave."""
    if not invoice_ids:
        return
    session.execute(update(Invoice).where(Invoice.id.in_(invoice_ids)).values(due_at=None, updated_at=now))
    pending = list(
        session.execute(
            select(ChargeAttempt.id).where(
                ChargeAttempt.invoice_id.in_(invoice_ids), ChargeAttempt.state == AttemptState.PENDING
            )
        ).scalars()
    )
    cas.transition_ids(
        session,
        ChargeAttempt,
        pending,
        AttemptState.NOT_SENT,
        now=now,
        finished_at=now,
        lease_expires_at=None,
        error_message="subscription paused before sending",
    )


def resume_subscription(ctx: Context, *, external_subscription_id: str, meta: Meta = NO_META) -> dict[str, Any]:
    """Resume a paused subscription (a subscription not paused is left as it is)."""
    check_external_id("external_subscription_id", external_subscription_id)
    scope = Scope.of(RESUME_SUBSCRIPTION, {"subscription": external_subscription_id}, meta)

    def apply() -> dict[str, Any]:
        now = ctx.clock.now()
        with ctx.unit_of_work() as session:
            found = _subscription_by_external_id(session, external_subscription_id)
            sub = session.execute(
                select(Subscription).where(Subscription.id == found.id).with_for_update()
            ).scalar_one()
            scope.check_fresh("subscription", sub.external_id, sub.last_issued_at)
            changed = resume_locked(session, ctx, sub, now)
            sub.last_issued_at = scope.advance(sub.last_issued_at)
            session.flush()
            return scope.applied(session, now, _subscription_result(sub, changed=changed))

    return run(ctx, scope, apply)


def resume_locked(session: Session, ctx: Context, sub: Subscription, now: datetime) -> bool:
    """Resume `sub` (locked by the caller): the anchor is kept, the period that contains now is billed if its
    invoice was never opened, the periods skipped while paused never are; open invoices are charged now."""
    if sub.paused_at is None:
        return False
    plan = session.get_one(Plan, sub.plan_id)
    interval, count, tz = Interval(plan.interval), plan.interval_count, ctx.timezone
    current = period_index_at(sub.anchor_at, now, interval, count, tz)
    index = max(sub.next_period_index, current)
    sub.paused_at = None
    sub.resumes_at = None
    sub.updated_at = now
    if sub.status != SubscriptionStatus.CANCELED and sub.status != SubscriptionStatus.UNPAID:
        sub.next_period_index = index
        sub.next_billing_at = period_boundary(sub.anchor_at, index, interval, count, tz)
    open_ids = _lock_open_invoices(session, sub.id)
    for invoice_id in open_ids:
        if cas.update_while(session, Invoice, invoice_id, InvoiceState.OPEN, due_at=now, updated_at=now):
            enqueue(session, now, task_names.CHARGE_INVOICE, invoice_id=invoice_id)
    events.record(session, now, "subscription.resumed", subscription_id=sub.id, skipped_to_period=index)
    stream.emit(
        session,
        now,
        "subscription.resumed",
        subscription_id=sub.id,
        status=str(sub.status),
        next_period_index=sub.next_period_index,
        next_billing_at=stream.iso(sub.next_billing_at),
        entitlement=stream.subscription_entitlement(sub, now),
    )
    return True


def resume_due(ctx: Context, *, limit: int = 500) -> int:
    """Resume the paused subscriptions whose `resumes_at` has come (beat, with the invoice opener), and cancel the
    paused ones whose scheduled cancel has come; returns how many were resumed."""
    now = ctx.clock.now()
    with ctx.unit_of_work() as session:
        subs = list(
            session.execute(
                select(Subscription)
                .where(Subscription.resumes_at.is_not(None), Subscription.resumes_at <= now)
                .order_by(Subscription.resumes_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).scalars()
        )
        resumed = sum(resume_locked(session, ctx, sub, now) for sub in subs)
    # A paused subscription canceled at period end renews no more, so the renewal scan never reaches its
    # cancel_at: it is canceled here once that time has come.
    with ctx.sessions() as session:
        ending = list(
            session.execute(
                select(Subscription.id)
                .where(
                    Subscription.paused_at.is_not(None),
                    Subscription.cancel_at.is_not(None),
                    Subscription.cancel_at <= now,
                    Subscription.status != SubscriptionStatus.CANCELED,
                )
                .limit(limit)
            ).scalars()
        )
    for subscription_id in ending:
        subscriptions.cancel_subscription(ctx, subscription_id=subscription_id)
    return resumed


COMMANDS: dict[str, Callable[..., dict[str, Any]]] = {
    UPSERT_PLAN: upsert_plan,
    UPSERT_CUSTOMER: upsert_customer,
    ATTACH_CARD: attach_card_result,
    CREATE_SUBSCRIPTION: create_subscription,
    CANCEL_SUBSCRIPTION: cancel_subscription,
    PAUSE_SUBSCRIPTION: pause_subscription,
    RESUME_SUBSCRIPTION: resume_subscription,
}
