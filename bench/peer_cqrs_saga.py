"""python-cqrs 5.3, the peer in bench_saga.py: the same 2-step in-memory saga (reserve
changes the context, charge does nothing) through ``saga.transaction`` and
``MemorySagaStorage``, CPU us per saga. Runs in its own virtualenv (python-cqrs is not an
msdata dependency); prints one figure per line read on stdin, so bench_saga.py interleaves
its rounds with msdata's.

    python -m venv /tmp/cqrsvenv && /tmp/cqrsvenv/bin/pip install python-cqrs==5.3.0
    .venv/bin/python bench/bench_saga.py --only memory --cqrs-python /tmp/cqrsvenv/bin/python
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from typing import Any

from cqrs.handlers.saga import SagaStepHandler
from cqrs.saga.models import SagaContext
from cqrs.saga.saga import Saga
from cqrs.saga.storage.memory import MemorySagaStorage


@dataclasses.dataclass
class OrderContext(SagaContext):
    order_id: str = "o-1"
    amount_cents: int = 1234
    reserved: bool = False


class Reserve(SagaStepHandler[OrderContext, None]):
    async def act(self, context: OrderContext) -> Any:
        context.reserved = True
        return self._generate_step_result(None)

    async def compensate(self, context: OrderContext) -> None:
        context.reserved = False


class Charge(SagaStepHandler[OrderContext, None]):
    async def act(self, context: OrderContext) -> Any:
        return self._generate_step_result(None)

    async def compensate(self, context: OrderContext) -> None:
        return None


class Checkout(Saga[OrderContext]):
    steps = [Reserve, Charge]


class Container:
    external_container = None

    def attach_external_container(self, container: Any) -> None:
        pass

    async def resolve(self, type_: Any) -> Any:
        return type_()


async def main(n: int) -> None:
    saga, storage, container = Checkout(), MemorySagaStorage(), Container()

    async def one() -> None:
        async with saga.transaction(OrderContext(), container, storage) as tx:
            async for _ in tx:
                pass

    for _ in range(200):
        await one()
    for _line in sys.stdin:
        t = time.process_time()
        for _ in range(n):
            await one()
        print((time.process_time() - t) / n * 1e6, flush=True)


asyncio.run(main(int(sys.argv[1])))
