"""The consume loop every service runs: poll, decode, handle, flush, commit; ticks; lag; shutdown.

:class:`ServiceLoop` is the loop half of :class:`services.core.runtime.Service` (which declares what
a service consumes and produces and the hooks it implements).  ``run()`` is ``start(); step()
until stopped; close()``; the in-memory bus's burst driver calls ``step(wait=False)`` itself, so
tests and benchmarks run this very loop.  Commits follow acknowledged outputs; infrastructure
errors rewind the batch (services.core.faults); a bad record is dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

from aiokafka import TopicPartition
from pydantic import ValidationError

from services.core.bus import BROKER_ERRORS
from services.core.context import Incoming, header_experiment
from services.core.events import ControlEvent
from services.core.faults import INFRASTRUCTURE_ERRORS, DeadLetterError, InfrastructureLost, bounded


def short_error(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ")
    return f"{type(exc).__name__}: {text[:500]}"


class ServiceLoop:
    """The loop; mixed into :class:`~services.core.runtime.Service`, whose attributes it uses."""

    # ------------------------------------------------------------------ loop

    async def run(self) -> None:
        """Run until stopped (or until the infrastructure is lost for good).  Once per instance."""
        await self.start()
        try:
            while not self._stop.is_set():
                await self.step()
        finally:
            await self.close()

    async def start(self) -> None:
        """Connect the producer, run ``setup`` and join the consumer group."""
        await self.producer.start()
        await self.setup()
        topics = self.input_topics()
        if topics:
            self._consumer = self.bus.consumer(topics, self.group_id(), client_id=self.source)
            await self._consumer.start()
        self._started = True
        self.metrics.healthy.labels(self.name).set(1)

    async def step(self, wait: bool = True) -> int:
        """One turn of the loop: poll one batch (waiting up to ``bus.poll_timeout_ms`` when ``wait``),
        then the tick if one is due.  Returns the records handled.  Raises InfrastructureLost."""
        if self.outages.lost is not None:
            raise InfrastructureLost(self.outages.lost)
        self.health.last_poll = time.time()
        handled = 0
        if self._consumer is not None:
            handled = await self._guarded(self._poll_once(self.cfg.bus.poll_timeout_ms if wait else 0), wait,
                                          "poll") or 0
        elif wait:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.cfg.bus.poll_timeout_ms / 1000)
        now = self.clock.monotonic()
        if now - self._last_tick >= self.tick_interval_s:
            self._last_tick = now
            await self._guarded(self._tick_and_flush(), wait, "tick")
        if wait and self._consumer is not None and now - self._last_lag >= 5.0 and (
                self._lag_task is None or self._lag_task.done()):
            self._last_lag = now  # in the background: a slow lag query must never stall consumption
            self._lag_task = asyncio.create_task(self._update_lag())
        if self.exit_when_finished and self.experiment_finished is not None and handled == 0 \
                and await self._caught_up():
            self.log.info("experiment finished and every input consumed; stopping",
                          extra={"stopped_because": self.experiment_finished.stopped_because})
            self.stop()
        return handled

    async def close(self) -> None:
        """Drain and commit (bounded by ``bus.shutdown_timeout_s``), leave the group, tear down."""
        self.health.running = False
        self.metrics.healthy.labels(self.name).set(0)
        if not self._started:
            await self.teardown()
            return
        limit = self.cfg.bus.shutdown_timeout_s
        try:
            if not await bounded(self._drain_and_commit(), limit):
                self.log.warning("drain did not finish in time; uncommitted work will be re-delivered",
                                 extra={"limit_s": limit})
        except Exception:
            self.log.exception("drain failed; uncommitted work will be re-delivered")
        if self._lag_task is not None:
            self._lag_task.cancel()
            await bounded(asyncio.wait({self._lag_task}), 1.0)
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await bounded(self._consumer.stop(), min(limit, 5.0))
        try:
            await self.teardown()
        finally:
            with contextlib.suppress(Exception):
                await bounded(self.producer.stop(), min(limit, 5.0))
            if self.ctx.owns_bus:  # its lag probe's connections, bounded by the bus
                with contextlib.suppress(Exception):
                    await self.bus.close()
            self._started = False

    async def _caught_up(self) -> bool:
        """True when this instance has read everything on its input partitions."""
        if self._consumer is None:
            return True
        try:
            ends = await self.bus.end_offsets(self.input_topics())
            for tp in self._consumer.assignment():
                if await self._consumer.position(tp) < ends.get(tp, 0):
                    return False
        except Exception:
            return False
        return True

    async def _tick_and_flush(self) -> None:
        await self.tick()
        await self.producer.flush()

    async def _poll_once(self, timeout_ms: int) -> int:
        assert self._consumer is not None
        polled = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=self.cfg.bus.max_poll_records)
        records = [r for part in polled.values() for r in part]
        if not records:
            return 0
        starts = {tp: recs[0].offset for tp, recs in polled.items() if recs}
        t0 = time.perf_counter()
        try:
            batch = await self._decode_all(records)
            if batch:
                await self._handle_safely(batch)
            await self.producer.flush()  # outputs acknowledged before inputs are committed
            to_commit = await self.before_commit({tp: recs[-1].offset + 1 for tp, recs in polled.items() if recs})
            if to_commit:
                await asyncio.wait_for(self._consumer.commit(to_commit), self.cfg.bus.request_timeout_s)
        except (*INFRASTRUCTURE_ERRORS, TimeoutError):
            self._rewind(starts)  # the batch comes again once the infrastructure answers
            raise
        self.metrics.batch_seconds.labels(self.name).observe(time.perf_counter() - t0)
        self.metrics.batch_size.labels(self.name).observe(len(records))
        self.health.last_progress = time.time()
        self.metrics.last_progress.labels(self.name).set(self.health.last_progress)
        return len(records)

    def _rewind(self, starts: dict[TopicPartition, int]) -> None:
        assert self._consumer is not None
        assigned = self._consumer.assignment()
        for tp, offset in starts.items():
            if tp in assigned:
                self._consumer.seek(tp, offset)

    async def _guarded(self, work: Any, wait: bool, source: str) -> Any:
        """Run one piece of the loop; infrastructure failures are retried (see services.core.faults)."""
        try:
            result = await work
        except (*INFRASTRUCTURE_ERRORS, TimeoutError) as exc:
            self.outages.failed(exc, source)
            if wait:
                await self.clock.sleep(self.outages.backoff_s())
            return None
        if source != "poll" or result:  # an empty poll touched nothing
            # records polled, handled, flushed and committed prove the broker answers, whatever failed
            self.outages.recovered(source, broker_alive=source == "poll")
        return result

    async def _drain_and_commit(self) -> None:
        offsets = await self.drain()
        await self.producer.flush()
        if offsets and self._consumer is not None:
            await asyncio.wait_for(self._consumer.commit(offsets), self.cfg.bus.request_timeout_s)

    async def _decode_all(self, records: Sequence[Any]) -> list[Incoming]:
        out: list[Incoming] = []
        for rec in records:
            exp = header_experiment(rec.headers)
            if self.only_own_experiment and exp is not None and exp != self.ctx.experiment_id:
                continue  # another experiment sharing the cluster
            try:
                event = self.decode(rec)
            except (ValidationError, ValueError, TypeError, DeadLetterError) as exc:
                await self.dead_letter(rec, f"undecodable {self.ctx.topics.logical(rec.topic)} record: "
                                            f"{short_error(exc)}")
                continue
            if self.only_own_experiment and event.experiment_id != self.ctx.experiment_id:
                continue
            if isinstance(event, ControlEvent):
                if event.kind == "finished":
                    self.experiment_finished = event
                if ControlEvent not in self.consumes:
                    continue  # the runtime's own business
            out.append(Incoming(event, rec))
        return out

    async def _handle_safely(self, batch: list[Incoming]) -> None:
        """Handle a batch; on failure retry one by one so a poison record is isolated.  An
        infrastructure error is not the records' fault: it propagates (the batch is rewound)."""
        try:
            await self.handle(batch)
            self._count(batch)
            return
        except INFRASTRUCTURE_ERRORS:
            raise
        except DeadLetterError:
            pass
        except Exception as exc:
            self.metrics.errors.labels(self.name, type(exc).__name__).inc()
            if len(batch) == 1:
                await self.dead_letter(batch[0].record, f"handler failed: {short_error(exc)}")
                return
            self.log.exception("batch failed; retrying records one by one")
        for item in batch:
            try:
                await self.handle([item])
                self._count([item])
            except INFRASTRUCTURE_ERRORS:
                raise
            except Exception as exc:
                self.metrics.errors.labels(self.name, type(exc).__name__).inc()
                await self.dead_letter(item.record, f"handler failed: {short_error(exc)}")

    def _count(self, batch: list[Incoming]) -> None:
        for item in batch:
            self.metrics.processed.labels(self.name, item.event.topic).inc()

    async def _update_lag(self) -> None:
        """Lag = true end offset minus position, per topic (see bus.end_offsets for why a probe).
        A failing query counts towards a broker outage: an idle service finds out this way."""
        consumer = self._consumer
        if consumer is None:
            return
        started = self.clock.monotonic()
        try:  # the liveness probe: a consumer whose coordinator died has no assignment to show it
            await self.bus.ping()
        except Exception as exc:
            with contextlib.suppress(InfrastructureLost):
                self.outages.failed(BROKER_ERRORS[0](f"broker did not answer: {exc!r}"), "probe", started)
            return
        self.outages.recovered("probe")
        try:  # lag itself is monitoring: slow answers on a loaded machine are not an outage
            ends = await self.bus.end_offsets(self.input_topics())
        except Exception as exc:
            self.log.debug("lag query failed", extra={"error": repr(exc)})
            return
        total = 0
        per_topic: dict[str, int] = {}
        for tp in consumer.assignment():
            try:
                pos = await consumer.position(tp)
            except Exception:
                continue
            lag = max(0, ends.get(tp, pos) - pos)
            total += lag
            per_topic[tp.topic] = per_topic.get(tp.topic, 0) + lag
        for topic, lag in per_topic.items():
            self.metrics.lag.labels(self.name, self.group_id(), self.ctx.topics.logical(topic)).set(lag)
        self.health.lag = total
        ok, detail = self.health.status()
        self.health.detail = detail
        self.metrics.healthy.labels(self.name).set(1 if ok else 0)
