"""The messages between the services: the saga's commands and replies, the order events."""

from __future__ import annotations

from pydantic import BaseModel

from msdata import Command, Event, message_type


@message_type("inventory.ReserveStock")
class ReserveStock(Command):
    order_id: str
    sku: str
    quantity: int


@message_type("inventory.ReleaseStock")
class ReleaseStock(Command):
    order_id: str


@message_type("payment.ChargePayment")
class ChargePayment(Command):
    order_id: str
    amount_cents: int
    card: str


@message_type("payment.RefundPayment")
class RefundPayment(Command):
    order_id: str


class Charged(BaseModel):
    payment_id: str


@message_type("order.OrderPlaced")
class OrderPlaced(Event):
    order_id: str
    sku: str
    quantity: int
    amount_cents: int
    card: str


@message_type("order.OrderCompleted")
class OrderCompleted(Event):
    order_id: str


@message_type("order.OrderCancelled")
class OrderCancelled(Event):
    order_id: str
