"""What templates see about a customer's orders: the latest one placed up to the run's moment."""

from sqlmodel import Session

from flows.content.context import OrderView, load_latest_orders
from tests.support.builders import NOW, Store, ago


def test_each_customer_gets_their_latest_order_placed_up_to_now(store: Store) -> None:
    anna, ben, cleo = store.customer("Anna"), store.customer("Ben"), store.customer("Cleo")
    store.order(anna, ago(days=400), total=20)
    latest = store.order(anna, ago(days=30), total=75.5)
    store.order(anna, ago(days=-1), total=999)  # placed after the run's moment: not yet
    only = store.order(ben, ago(days=3))
    with Session(store.engine) as session:
        orders = load_latest_orders(session, [anna.id, ben.id, cleo.id], NOW)
    assert orders == {
        anna.id: OrderView(latest.external_id, ago(days=30), 7550, "EUR", []),
        ben.id: OrderView(only.external_id, ago(days=3), 5000, "EUR", []),
    }
    assert orders[anna.id].placed_at.utcoffset() is not None  # an aware UTC moment, on both databases
