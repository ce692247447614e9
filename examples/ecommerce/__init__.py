"""The e-commerce system: Order, Payment and Inventory services on msdata.

Each service owns its database and talks to the others only through messages (the checkout
saga's commands and replies, over the bus, through each service's outbox and inbox) and, for
reads, through their HTTP APIs. ``python -m examples.ecommerce`` runs the three in one process
with SQLite and the in-memory transport and drives a few hundred orders through them;
``python -m examples.ecommerce.launch`` runs them as separate processes on PostgreSQL and a
broker.
"""
