"""Which stored card a customer's charges use."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.db.models import Card
from billing.domain.states import CardStatus


def usable_card_of_customer(session: Session, customer_id: int) -> tuple[int, str] | None:
    """The customer's newest usable card as (id, Tpaga card id), or None."""
    row = session.execute(
        select(Card.id, Card.tpaga_card_id)
        .where(Card.customer_id == customer_id, Card.status == CardStatus.USABLE)
        .order_by(Card.id.desc())
        .limit(1)
    ).first()
    return None if row is None else (row.id, row.tpaga_card_id)
