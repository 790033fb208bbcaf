"""What the design promises, restated once for the tests that hold the code to it."""

from __future__ import annotations

# DESIGN.md, "Events": the twelve documented event types
TWELVE = frozenset(
    {
        "customer.created",
        "customer.updated",
        "order.created",
        "order.updated",
        "order.status_changed",
        "payment.status_changed",
        "product.viewed",
        "product.added_to_cart",
        "review.created",
        "review.updated",
        "cart.abandoned",
        "marketplace.analytics",
    }
)
