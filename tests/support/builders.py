"""Small builders for the customer store, so each test states only the facts it is about."""

from datetime import UTC, datetime, timedelta
from itertools import count

from sqlalchemy import Engine
from sqlmodel import Session

from models import CART_OPEN, Cart, CartItem, Complaint, Customer, Order, Suppression

NOW = datetime(2026, 3, 16, 12, 0, tzinfo=UTC)  # a Monday
_ids = count(1)


def ago(**delta: float) -> datetime:
    return NOW - timedelta(**delta)


class Store:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _add(self, *rows: object) -> None:
        with Session(self.engine, expire_on_commit=False) as session:
            for row in rows:
                session.add(row)
            session.commit()
            for row in rows:
                session.refresh(row)
            session.expunge_all()

    def customer(self, name: str = "Anna", *, email: str | None = "", consent: bool = True, locale: str = "de-DE",
                 created: datetime | None = None, last_seen: datetime | None = None,
                 last_name: str | None = "Schäfer", external_id: str | None = None) -> Customer:
        n = next(_ids)
        address = f"kunde{n}@example.de" if email == "" else email
        customer = Customer(external_id=external_id or f"c-{n}", email=address, first_name=name,
                            last_name=last_name, locale=locale, marketing_consent=consent,
                            consent_at=ago(days=400) if consent else None,
                            created_at=created or ago(days=500), last_seen_at=last_seen or ago(days=1))
        self._add(customer)
        return customer

    def order(self, customer: Customer, placed: datetime, total: float = 50.0) -> Order:
        order = Order(external_id=f"o-{next(_ids)}", customer_id=customer.id, placed_at=placed,
                      total_cents=round(total * 100), currency="EUR", products=[])
        self._add(order)
        return order

    def cart(self, customer: Customer, updated: datetime, items: list[tuple[str, float, int]] | None = None) -> Cart:
        cart = Cart(external_id=f"cart-{next(_ids)}", customer_id=customer.id, status=CART_OPEN,
                    created_at=updated, updated_at=updated)
        self._add(cart)
        rows = [CartItem(cart_id=cart.id, product_id=f"p-{i}", name=name, price_cents=round(price * 100), quantity=qty)
                for i, (name, price, qty) in enumerate(items if items is not None else [("Wanderschuh", 129.9, 1)])]
        if rows:
            self._add(*rows)
        return cart

    def complaint(self, customer: Customer, received: datetime, subject: str = "Paket beschädigt",
                  answered: datetime | None = None) -> Complaint:
        complaint = Complaint(external_id=f"k-{next(_ids)}", customer_id=customer.id, subject=subject,
                              received_at=received, answered_at=answered)
        self._add(complaint)
        return complaint

    def lapsed(self, count: int) -> list[str]:
        """``count`` customers whose last order is 500 days old (the win-back's audience); their emails."""
        emails = []
        for i in range(count):
            customer = self.customer(f"K{i}")
            self.order(customer, ago(days=500))
            emails.append(customer.email)
        return emails

    def suppress(self, email: str, reason: str = "manual") -> None:
        self._add(Suppression(email=email.lower(), reason=reason))
