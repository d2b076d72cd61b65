"""Builders for what mail earned: ledger rows in any status, clicks and opens, orders in any
currency and their stored attributions, so a report's test states each fact it counts."""

from datetime import datetime, timedelta
from itertools import count

from sqlmodel import Session

from models import Attribution, Customer, Engagement, Order, Send
from tests.support.builders import Store

_ids = count(1)
TEMPLATE = "abandoned_cart/default.de.html.j2"


class Outcomes:
    """Rows written as a run, the click endpoint and the attribution would leave them."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.engine = store.engine

    def _add(self, row: object) -> None:
        with Session(self.engine, expire_on_commit=False) as session:
            session.add(row)
            session.commit()
            session.refresh(row)
            session.expunge(row)

    def send(self, customer: Customer, trigger: str, at: datetime, status: str = "sent", *, stage: str = "new",
             template: str = TEMPLATE, category: str = "marketing", error: str = "", smtp_reply: str = "",
             not_before: datetime | None = None, links: tuple[str, ...] = ("https://shop.example/cart",)) -> Send:
        """One ledger row of ``trigger`` for ``customer`` whose moment (``evaluated_at``) is ``at``."""
        n = next(_ids)
        key = f"{trigger}/{customer.id}/o{n}"
        send = Send(send_key=key, trigger=trigger, customer_id=customer.id, occurrence=f"o{n}", category=category,
                    status=status, run_id="run-1", stage=stage, template=template, email=customer.email or "",
                    message_id=f"<{n:032x}@shop.example>", evaluated_at=at, claimed_at=at, finished_at=at,
                    not_before=not_before, smtp_reply=smtp_reply, error=error, links="\n".join(links) or None)
        self._add(send)
        return send

    def click(self, send: Send, at: datetime, *, machine: str = "", link: int = 0, repeats: int = 0) -> Engagement:
        engagement = Engagement(send_id=send.id, customer_id=send.customer_id, kind="click", link=link, at=at,
                                machine=machine, repeats=repeats)
        self._add(engagement)
        return engagement

    def open(self, send: Send, at: datetime, *, machine: str = "") -> Engagement:
        engagement = Engagement(send_id=send.id, customer_id=send.customer_id, kind="open", link=-1, at=at,
                                machine=machine)
        self._add(engagement)
        return engagement

    def order(self, customer: Customer, placed: datetime, total: float = 50.0, currency: str = "EUR") -> Order:
        order = Order(external_id=f"ord-{next(_ids)}", customer_id=customer.id, placed_at=placed,
                      total_cents=round(total * 100), currency=currency, products=[])
        self._add(order)
        return order

    def attributed(self, order: Order, send: Send | None, basis: str = "click",
                   touched: datetime | None = None) -> Attribution:
        """The attribution row of ``order``: to ``send`` on ``basis``, or unattributed (``send=None``)."""
        row = Attribution(order_id=order.id, customer_id=order.customer_id, placed_at=order.placed_at,
                          total_cents=order.total_cents, currency=order.currency,
                          send_id=send.id if send else None, trigger=send.trigger if send else None,
                          stage=send.stage if send else "", template=send.template if send else "",
                          basis=basis if send else "",
                          touched_at=(touched or order.placed_at - timedelta(hours=1)) if send else None)
        self._add(row)
        return row

    def converted(self, send: Send, placed: datetime, total: float = 50.0, currency: str = "EUR",
                  basis: str = "click") -> Order:
        """An order by the send's customer, attributed to ``send``."""
        customer = Customer(id=send.customer_id, external_id="")  # only the id is read
        order = self.order(customer, placed, total, currency)
        self.attributed(order, send, basis)
        return order
