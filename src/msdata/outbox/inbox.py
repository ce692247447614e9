"""Kept so ``msdata.outbox.inbox`` imports keep working: the inbox is :mod:`msdata.inbox`."""

from msdata.inbox.inbox import Inbox, InboxMiddleware
from msdata.storage import TransactionFactory, current_connection

__all__ = ["Inbox", "InboxMiddleware", "TransactionFactory", "current_connection"]
