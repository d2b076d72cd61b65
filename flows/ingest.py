"""Loading the shop's events (Segment spec, one JSON object per line) into the store.

Each line is validated before it touches the database; a bad line is reported with
its number and skipped, the good ones load. Every event is stored once, keyed by
Segment's ``messageId`` (or, without one, by a hash of the line), so loading the
same file twice changes nothing.
"""

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from email_validator import EmailNotValidError, validate_email
from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)
from sqlalchemy import Engine, select
from sqlmodel import Session

from flows.spec.problems import format_path
from models import (
    CART_OPEN,
    CART_ORDERED,
    Cart,
    CartItem,
    Complaint,
    Customer,
    Event,
    Order,
    Suppression,
    SuppressionReason,
)

COMMIT_EVERY = 500


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _number_as_text(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


# Shops send ids as numbers or strings; we store them as text.
Id = Annotated[str, BeforeValidator(_number_as_text), Field(min_length=1, max_length=255)]


class _Lenient(BaseModel):
    """Segment payloads carry many fields we do not use; those are ignored, ours are checked."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class Traits(_Lenient):
    email: str | None = None
    first_name: str | None = Field(None, validation_alias=AliasChoices("first_name", "firstName"), max_length=200)
    last_name: str | None = Field(None, validation_alias=AliasChoices("last_name", "lastName"), max_length=200)
    locale: str | None = Field(None, max_length=35)
    timezone: str | None = Field(None, max_length=64)
    marketing_consent: bool | None = None
    consent_confirmed: bool = False  # the shop ran its own double opt-in already
    consent_source: str | None = Field(None, max_length=64)
    created_at: datetime | None = Field(None, validation_alias=AliasChoices("created_at", "createdAt"))

    @field_validator("email")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return validate_email(value, check_deliverability=False, allow_smtputf8=False).normalized
        except EmailNotValidError as exc:
            raise ValueError(f"not a deliverable address ({exc})") from None


class Product(_Lenient):
    product_id: Id = Field(validation_alias=AliasChoices("product_id", "productId", "sku", "id"))
    name: str = Field("", max_length=500)
    price: float = Field(0, ge=0)
    quantity: int = Field(1, ge=1)
    url: str | None = None
    image_url: str | None = None
    cart_id: Id | None = None


class OrderCompleted(_Lenient):
    order_id: Id
    total: float | None = Field(None, ge=0)
    revenue: float | None = Field(None, ge=0)
    currency: str = Field("EUR", min_length=3, max_length=3)
    products: list[dict[str, Any]] = Field(default_factory=list)
    cart_id: Id | None = None


class ComplaintReceived(_Lenient):
    complaint_id: Id
    subject: str = Field("", max_length=500)


class ComplaintAnswered(_Lenient):
    complaint_id: Id


class SegmentEvent(_Lenient):
    type: Literal["identify", "track"]
    user_id: Id = Field(validation_alias=AliasChoices("userId", "user_id"))
    timestamp: datetime
    message_id: str | None = Field(None, validation_alias=AliasChoices("messageId", "message_id"), max_length=255)
    traits: Traits = Field(default_factory=Traits)
    event: str | None = Field(None, max_length=255)
    properties: dict[str, Any] = Field(default_factory=dict)
    context: dict[str, Any] = Field(default_factory=dict)


PROPERTIES: dict[str, type[_Lenient]] = {
    "Product Added": Product,
    "Product Removed": Product,
    "Order Completed": OrderCompleted,
    "Complaint Received": ComplaintReceived,
    "Complaint Answered": ComplaintAnswered,
}


@dataclass
class IngestReport:
    loaded: int = 0
    duplicates: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)
    complaints: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass(frozen=True)
class _Parsed:
    event: SegmentEvent
    details: _Lenient | None
    message_id: str
    raw: dict[str, Any]


def parse_line(text: str) -> _Parsed:
    """Validate one line; raises ValueError with a readable reason."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(raw, dict):
        raise ValueError("expected a JSON object")
    try:
        event = SegmentEvent.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(_reasons(exc)) from None
    if event.type == "track" and not event.event:
        raise ValueError("event: track events need an event name")
    model = PROPERTIES.get(event.event or "") if event.type == "track" else None
    try:
        details = model.model_validate(event.properties) if model else None
    except ValidationError as exc:
        raise ValueError(_reasons(exc, ("properties",))) from None
    message_id = event.message_id or "sha256:" + hashlib.sha256(
        json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    return _Parsed(event, details, message_id, raw)


def _reasons(exc: ValidationError, prefix: tuple[str, ...] = ()) -> str:
    return "; ".join(
        f"{format_path(prefix + tuple(e['loc']))}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()
    )


def ingest_lines(engine: Engine, lines: Iterable[str]) -> IngestReport:
    report = IngestReport()
    with Session(engine, expire_on_commit=False) as session:
        store = _Store(session)
        pending = 0
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            try:
                parsed = parse_line(text)
            except ValueError as exc:
                report.errors.append((number, str(exc)))
                continue
            if store.seen(parsed.message_id):
                report.duplicates += 1
                continue
            try:
                with session.begin_nested():
                    store.apply(parsed)
            except ValueError as exc:
                report.errors.append((number, str(exc)))
                store.customers.clear()  # a customer created by the failed line was rolled back
                continue
            report.loaded += 1
            if parsed.event.event == "Complaint Received":
                report.complaints.append(parsed.details.complaint_id)  # type: ignore[union-attr]
            pending += 1
            if pending >= COMMIT_EVERY:
                session.commit()
                pending = 0
        session.commit()
    return report


class _Store:
    """Applies validated events; caches customers for the length of one file."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.customers: dict[str, Customer] = {}
        self.message_ids: set[str] = set()

    def seen(self, message_id: str) -> bool:
        if message_id in self.message_ids:
            return True
        found = self.session.execute(select(Event.id).where(Event.message_id == message_id)).first()
        return found is not None

    def apply(self, parsed: _Parsed) -> None:
        event, ts = parsed.event, _aware(parsed.event.timestamp)
        customer = self.customer(event.user_id, ts)
        if event.type == "identify":
            self.identify(customer, event, ts)
        else:
            customer.last_seen_at = max(filter(None, [customer.last_seen_at, ts]))
            handler = _TRACK_HANDLERS.get(event.event or "")
            if handler:
                handler(self, customer, parsed.details, ts)
        self.session.add(
            Event(message_id=parsed.message_id, type=event.type, name=event.event, user_id=event.user_id,
                  timestamp=ts, payload=parsed.raw)
        )
        self.session.flush()
        self.message_ids.add(parsed.message_id)

    def customer(self, external_id: str, ts: datetime) -> Customer:
        customer = self.customers.get(external_id)
        if customer is None:
            customer = self.session.execute(
                select(Customer).where(Customer.external_id == external_id)
            ).scalar_one_or_none()
            if customer is None:
                customer = Customer(external_id=external_id, created_at=ts)
                self.session.add(customer)
                self.session.flush()
            self.customers[external_id] = customer
        return customer

    def identify(self, customer: Customer, event: SegmentEvent, ts: datetime) -> None:
        traits = event.traits
        for name in ("email", "first_name", "last_name", "timezone", "locale"):
            value = getattr(traits, name)
            if value is not None:
                setattr(customer, name, value)
        if traits.locale is None and isinstance(event.context.get("locale"), str):
            customer.locale = event.context["locale"][:35]
        if traits.timezone is None and isinstance(event.context.get("timezone"), str):
            customer.timezone = event.context["timezone"][:64]
        if traits.created_at is not None:
            customer.created_at = _aware(traits.created_at)
        if traits.marketing_consent is True and not customer.marketing_consent:
            if traits.consent_confirmed:
                customer.marketing_consent, customer.consent_at = True, ts
                customer.consent_source = traits.consent_source or "shop (confirmed)"
            elif customer.consent_requested_at is None:
                customer.consent_requested_at = ts  # double opt-in: the confirmation mail asks
                customer.consent_source = traits.consent_source
        elif traits.marketing_consent is False:
            withdraw_consent(customer)

    # -- track events ---------------------------------------------------------------
    def open_cart(self, customer: Customer, cart_id: str | None, ts: datetime) -> Cart:
        if cart_id:
            cart = self.session.execute(select(Cart).where(Cart.external_id == cart_id)).scalar_one_or_none()
        else:
            cart = self.session.execute(
                select(Cart).where(Cart.customer_id == customer.id, Cart.status == CART_OPEN).order_by(Cart.id.desc())
            ).scalars().first()
        if cart is None:
            cart = Cart(external_id=cart_id or f"{customer.external_id}/{ts:%Y%m%dT%H%M%S%f}",
                        customer_id=customer.id, created_at=ts, updated_at=ts)
            self.session.add(cart)
            self.session.flush()
        elif cart.customer_id != customer.id:
            raise ValueError(f"cart {cart_id!r} belongs to another customer")
        return cart

    def product_added(self, customer: Customer, product: Product, ts: datetime) -> None:
        cart = self.open_cart(customer, product.cart_id, ts)
        item = self.session.execute(
            select(CartItem).where(CartItem.cart_id == cart.id, CartItem.product_id == product.product_id)
        ).scalar_one_or_none()
        if item is None:
            item = CartItem(cart_id=cart.id, product_id=product.product_id, quantity=0)
        item.quantity += product.quantity
        item.name = product.name or item.name
        item.price_cents = round(product.price * 100)
        item.url, item.image_url = product.url or item.url, product.image_url or item.image_url
        self.session.add(item)
        cart.status, cart.updated_at = CART_OPEN, max(cart.updated_at, ts)

    def product_removed(self, customer: Customer, product: Product, ts: datetime) -> None:
        cart = self.open_cart(customer, product.cart_id, ts)
        item = self.session.execute(
            select(CartItem).where(CartItem.cart_id == cart.id, CartItem.product_id == product.product_id)
        ).scalar_one_or_none()
        if item is not None:
            item.quantity -= product.quantity
            if item.quantity <= 0:
                self.session.delete(item)
            else:
                self.session.add(item)
        cart.updated_at = max(cart.updated_at, ts)

    def order_completed(self, customer: Customer, order: OrderCompleted, ts: datetime) -> None:
        exists = self.session.execute(select(Order.id).where(Order.external_id == order.order_id)).first()
        if exists:
            raise ValueError(f"order {order.order_id!r} was already loaded from another event")
        amount = order.total if order.total is not None else order.revenue
        self.session.add(Order(external_id=order.order_id, customer_id=customer.id, placed_at=ts,
                               total_cents=round((amount or 0) * 100), currency=order.currency.upper(),
                               products=order.products))
        carts = select(Cart).where(Cart.customer_id == customer.id, Cart.status == CART_OPEN)
        if order.cart_id:
            carts = carts.where(Cart.external_id == order.cart_id)
        for cart in self.session.execute(carts).scalars():
            cart.status, cart.updated_at = CART_ORDERED, max(cart.updated_at, ts)

    def complaint_received(self, customer: Customer, complaint: ComplaintReceived, ts: datetime) -> None:
        exists = self.session.execute(select(Complaint.id).where(Complaint.external_id == complaint.complaint_id)).first()
        if exists:
            raise ValueError(f"complaint {complaint.complaint_id!r} was already loaded from another event")
        self.session.add(Complaint(external_id=complaint.complaint_id, customer_id=customer.id,
                                   subject=complaint.subject, received_at=ts))

    def complaint_answered(self, customer: Customer, answer: ComplaintAnswered, ts: datetime) -> None:
        complaint = self.session.execute(
            select(Complaint).where(Complaint.external_id == answer.complaint_id)
        ).scalar_one_or_none()
        if complaint is None:
            raise ValueError(f"complaint {answer.complaint_id!r} is not known")
        complaint.answered_at = ts

    def unsubscribed(self, customer: Customer, _details: None, ts: datetime) -> None:
        withdraw_consent(customer)
        if customer.email and self.session.get(Suppression, customer.email.lower()) is None:
            self.session.add(Suppression(email=customer.email.lower(), reason=SuppressionReason.UNSUBSCRIBED,
                                         detail="Unsubscribed event", created_at=ts))


def withdraw_consent(customer: Customer) -> None:
    customer.marketing_consent, customer.consent_at, customer.consent_requested_at = False, None, None


_TRACK_HANDLERS = {
    "Product Added": _Store.product_added,
    "Product Removed": _Store.product_removed,
    "Order Completed": _Store.order_completed,
    "Complaint Received": _Store.complaint_received,
    "Complaint Answered": _Store.complaint_answered,
    "Unsubscribed": _Store.unsubscribed,
}
