"""API composition: answer one request from several sources at once, each with its own
timeout, with required and optional parts, fallbacks, partial answers and an overall
deadline.

::

    from msdata.composition import compose, optional, required

    user = required("user", users.get, user_id, timeout=0.5)          # RequiredPart[User]
    orders = required("orders", bus.ask, RecentOrders(user_id=user_id), timeout=0.8)
    recs = optional("recommendations", recommender.top, user_id, timeout=0.3)

    answer = await compose(user, orders, recs, deadline=1.0)
    answer[user]      # User
    answer[recs]      # list[Product] | None: None when it failed or timed out
    answer.missing    # {"recommendations": TimedOut(seconds=0.3)}

Works with any async callable; imports no HTTP client. See ``docs/composition.md``.
"""

from msdata.composition.compose import Composed, compose
from msdata.composition.parts import (
    Cancelled,
    Failed,
    OptionalPart,
    Part,
    PartFailure,
    RequiredPart,
    TimedOut,
    optional,
    required,
)

__all__ = [
    "Cancelled",
    "Composed",
    "Failed",
    "OptionalPart",
    "Part",
    "PartFailure",
    "RequiredPart",
    "TimedOut",
    "compose",
    "optional",
    "required",
]
