"""The customer store and the send ledger (SQLModel tables)."""

from models.commerce import CART_OPEN, CART_ORDERED, Cart, CartItem, Order
from models.consent import ConsentChange, ConsentChangeKind
from models.customer import Customer
from models.events import Event, StoreMeta
from models.feedback import Feedback, FeedbackKind
from models.identity import CustomerAlias, GroupMembership
from models.ledger import Send, SendStatus
from models.outcomes import Attribution, AttributionBasis, Engagement, EngagementKind, ExperimentLook
from models.preferences import CategoryOptOut
from models.support import Complaint
from models.suppression import Suppression, SuppressionReason, suppression_key

__all__ = [
    "CART_OPEN",
    "CART_ORDERED",
    "Attribution",
    "AttributionBasis",
    "Cart",
    "CartItem",
    "CategoryOptOut",
    "Complaint",
    "ConsentChange",
    "ConsentChangeKind",
    "Customer",
    "CustomerAlias",
    "Engagement",
    "EngagementKind",
    "Event",
    "ExperimentLook",
    "Feedback",
    "FeedbackKind",
    "GroupMembership",
    "Order",
    "Send",
    "SendStatus",
    "StoreMeta",
    "Suppression",
    "SuppressionReason",
    "suppression_key",
]
