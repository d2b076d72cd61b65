"""What a template sees, loaded for a whole batch of recipients in a few queries."""

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import func, select
from sqlmodel import Session, col

from models import Cart, CartItem, Complaint, Customer, Order
from models.db import one_of


@dataclass(frozen=True, slots=True)
class CustomerView:
    id: str
    email: str
    first_name: str | None
    last_name: str | None
    locale: str
    language: str

    @property
    def name(self) -> str:
        return " ".join(part for part in (self.first_name, self.last_name) if part)


@dataclass(frozen=True, slots=True)
class CartItemView:
    name: str
    quantity: int
    price_cents: int
    url: str | None
    image_url: str | None


@dataclass(frozen=True, slots=True)
class CartView:
    items: list[CartItemView]
    currency: str
    updated_at: datetime

    @property
    def item_count(self) -> int:
        return sum(item.quantity for item in self.items)

    @property
    def total_cents(self) -> int:
        return sum(item.quantity * item.price_cents for item in self.items)


@dataclass(frozen=True, slots=True)
class OrderView:
    id: str
    placed_at: datetime
    total_cents: int
    currency: str
    products: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ComplaintView:
    id: str
    subject: str
    received_at: datetime


@dataclass(frozen=True, slots=True)
class Links:
    unsubscribe: str
    preferences: str
    shop: str
    confirm: str | None = None  # consent confirmation mails only


@dataclass(frozen=True, slots=True)
class TriggerView:
    name: str
    description: str


def load_carts(session: Session, cart_ids: Sequence[int]) -> dict[int, CartView]:
    if not cart_ids:
        return {}
    carts = {cast(int, c.id): c for c in session.scalars(select(Cart).where(col(Cart.id).in_(cart_ids)))}
    items: dict[int, list[CartItemView]] = defaultdict(list)
    rows = session.scalars(select(CartItem).where(col(CartItem.cart_id).in_(cart_ids)).order_by(col(CartItem.id)))
    for item in rows:
        items[item.cart_id].append(CartItemView(item.name, item.quantity, item.price_cents, item.url, item.image_url))
    return {cid: CartView(items[cid], cart.currency, cart.updated_at) for cid, cart in carts.items()}


def load_complaints(session: Session, complaint_ids: Sequence[int]) -> dict[int, ComplaintView]:
    if not complaint_ids:
        return {}
    rows = session.scalars(select(Complaint).where(col(Complaint.id).in_(complaint_ids)))
    return {cast(int, c.id): ComplaintView(c.external_id, c.subject, c.received_at) for c in rows}


def load_latest_orders(session: Session, customer_ids: Sequence[int], now: datetime) -> dict[int, OrderView]:
    """Each customer's latest order placed up to ``now`` (one grouped query, one fetch)."""
    if not customer_ids:
        return {}
    latest = (
        select(col(Order.customer_id), func.max(Order.placed_at).label("placed_at"))
        .where(one_of(Order.customer_id, customer_ids, session.get_bind().dialect.name), col(Order.placed_at) <= now)
        .group_by(col(Order.customer_id))
        .subquery()
    )
    # Columns, not Order objects: building ORM objects was most of this function's cost.
    rows = session.execute(
        select(col(Order.customer_id), col(Order.external_id), col(Order.placed_at), col(Order.total_cents),
               col(Order.currency), col(Order.products))
        .join(latest, (col(Order.customer_id) == latest.c.customer_id) & (col(Order.placed_at) == latest.c.placed_at))
    )
    return {customer: OrderView(external_id, placed_at, total, currency, list(products or []))
            for customer, external_id, placed_at, total, currency, products in rows}


def load_untracked(session: Session, customer_ids: Sequence[int]) -> set[int]:
    """Those of ``customer_ids`` who left tracking on the preference page (one query)."""
    if not customer_ids:
        return set()
    dialect = session.get_bind().dialect.name
    return set(session.execute(select(col(Customer.id)).where(
        one_of(Customer.id, customer_ids, dialect), col(Customer.untracked_at).is_not(None))).scalars())


def sample_contexts(reference: str | None, base_url: str, shop_url: str) -> list[dict[str, Any]]:
    """Sample recipients for test renders: one fully known, one with no name on file."""
    now = datetime(2026, 3, 14, 9, 30, tzinfo=UTC)
    cart = CartView(
        [
            CartItemView("Wanderschuh „Alpin“", 1, 12990, f"{shop_url}/p/1", None),
            CartItemView("Wool socks", 2, 1450, f"{shop_url}/p/2", None),
        ],
        "EUR",
        now,
    )
    base = {
        "cart": cart if reference == "cart" else None,
        "complaint": ComplaintView("C-1", "Lieferung beschädigt", now) if reference == "complaint" else None,
        "order": OrderView("1001", now, 5990, "EUR"),
        "links": Links(f"{base_url}/u/sample-token", f"{base_url}/preferences/sample-token", shop_url,
                       f"{base_url}/confirm/sample-token" if reference == "consent" else None),
        "trigger": TriggerView("sample", "sample"),
        "now": now,
    }
    known = CustomerView("c-1", "jürgen@example.de", "Jürgen", "Müller", "de-DE", "de")
    unknown = CustomerView("c-2", "anon@example.com", None, None, "en", "en")
    return [{**base, "customer": known}, {**base, "customer": unknown}]


def _attributes(view: type) -> list[str]:
    names = [f.name for f in fields(view)]
    names += [n for n, v in vars(view).items() if isinstance(v, property)]
    return sorted(names)


VIEW_ATTRIBUTES = {
    view.__name__: _attributes(view)
    for view in (CustomerView, CartView, CartItemView, OrderView, ComplaintView, Links, TriggerView)
}
