"""``autointerv status``: end offsets per topic and lag per consumer group, read from the broker.

Two broker quirks shape this module (both measured on Tansu 0.6.0, see docs/operations.md):

* ListOffsets(latest) answers "base offset of the partition's last record batch + 1", so a
  partition whose last write was a batch of N records reports N-1 too few.  The high watermark in
  a Fetch response is right, so end offsets are confirmed by fetching each partition's last batch
  (one small read per partition; on a real Kafka both numbers agree and the fetch changes nothing).
* OffsetFetch for "all partitions of a group" is a protocol error there, so committed offsets are
  always asked for explicit partitions.

Groups are discovered with ListGroups (Tansu supports it) and merged with the expected groups the
caller passes in (from the config), so a group that has not joined yet still shows up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from rich import box
from rich.console import Console
from rich.table import Table

from services.core.bus import ESCALATION_PREFIX, LOGICAL_TOPICS, PartitionLag, Topics, end_offsets
from services.core.endpoints import Endpoint

log = logging.getLogger("autointerv.status")

MONITOR_LOGICAL = "monitor"


@dataclass(frozen=True)
class TopicOffsets:
    topic: str  # physical name
    logical: str
    ends: dict[int, int]  # partition -> end offset (high watermark)

    @property
    def total(self) -> int:
        return sum(self.ends.values())


@dataclass(frozen=True)
class GroupTopicLag:
    group: str
    topic: str
    logical: str
    partitions: list[PartitionLag]

    @property
    def committed(self) -> int:
        return sum(p.committed or 0 for p in self.partitions)

    @property
    def end(self) -> int:
        return sum(p.end_offset for p in self.partitions)

    @property
    def lag(self) -> int:
        return sum(max(0, p.lag) for p in self.partitions)


@dataclass(frozen=True)
class GroupStatus:
    group: str
    state: str  # broker-reported state, "unknown" when DescribeGroups is unavailable
    topics: list[GroupTopicLag]
    expected: bool  # passed in by the caller (from the config)
    discovered: bool  # returned by ListGroups

    @property
    def lag(self) -> int:
        return sum(t.lag for t in self.topics)


@dataclass(frozen=True)
class StatusReport:
    bootstrap: str
    prefix: str
    collected_at: float
    topics: list[TopicOffsets]
    groups: list[GroupStatus]
    list_groups_supported: bool
    notes: list[str] = field(default_factory=list)

    def topic(self, logical: str) -> TopicOffsets | None:
        return next((t for t in self.topics if t.logical == logical), None)

    def group(self, group_id: str) -> GroupStatus | None:
        return next((g for g in self.groups if g.group == group_id), None)


def _is_pipeline_topic(logical: str) -> bool:
    return logical in LOGICAL_TOPICS or logical.startswith(ESCALATION_PREFIX) or logical == MONITOR_LOGICAL


async def exact_end_offsets(bootstrap: str, topics: Iterable[str], timeout_s: float = 5.0,
                            verify: bool = True) -> dict[TopicPartition, int]:
    """End offsets per partition: ListOffsets, confirmed by fetching each partition's last batch
    (``bus.end_offsets``, see the module doc); ``verify`` False trusts ListOffsets."""
    return await end_offsets(bootstrap, dict.fromkeys(topics), correct=verify, timeout_s=timeout_s)


async def _list_topics(admin: AIOKafkaAdminClient, prefix: str) -> list[str]:
    names = await admin.list_topics()
    return sorted(n for n in names if n.startswith(prefix + ".") and _is_pipeline_topic(n[len(prefix) + 1:]))


async def _discover_groups(admin: AIOKafkaAdminClient, prefix: str) -> list[str] | None:
    """Groups of this prefix via ListGroups, or None when the broker does not support it."""
    try:
        listed = await admin.list_consumer_groups()
    except Exception as exc:  # any failure means "fall back to the expected groups"
        log.info("ListGroups unavailable; using the expected groups", extra={"error": repr(exc)})
        return None
    return sorted(g for g, _proto in listed if g.startswith(prefix + "."))


async def _group_states(admin: AIOKafkaAdminClient, groups: list[str]) -> dict[str, str]:
    """Broker-reported group states.  Only ask about groups ListGroups returned: Tansu answers
    DescribeGroups for an unknown group with a response aiokafka cannot decode."""
    out: dict[str, str] = {}
    for group in groups:
        try:
            for resp in await admin.describe_consumer_groups([group]):
                for g in resp.groups:
                    out[g[1]] = g[2] or "unknown"  # (error_code, group, state, ...)
        except Exception as exc:  # the state is decoration; the lag is what matters
            log.info("DescribeGroups failed", extra={"group": group, "error": repr(exc)})
    return out


async def _committed(admin: AIOKafkaAdminClient, group: str,
                     parts: list[TopicPartition]) -> dict[TopicPartition, int | None]:
    try:
        got = await admin.list_consumer_group_offsets(group, partitions=parts)
    except Exception as exc:  # a group the broker does not know has no commits
        log.info("no committed offsets", extra={"group": group, "error": repr(exc)})
        got = {}
    return {tp: (meta.offset if meta is not None and meta.offset >= 0 else None)
            for tp, meta in ((tp, got.get(tp)) for tp in parts)}


def _group_lags(group: str, topics: Topics, ends: Mapping[TopicPartition, int],
                committed: Mapping[TopicPartition, int | None], declared: set[str]) -> list[GroupTopicLag]:
    """Per-topic lag rows for topics the group committed on, or that the caller declared for it."""
    by_topic: dict[str, list[PartitionLag]] = {}
    for tp in sorted(ends, key=lambda t: (t.topic, t.partition)):
        row = PartitionLag(tp.topic, tp.partition, ends[tp], committed.get(tp))
        by_topic.setdefault(tp.topic, []).append(row)
    return [GroupTopicLag(group, t, topics.logical(t), rows) for t, rows in by_topic.items()
            if t in declared or any(r.committed is not None for r in rows)]


async def collect_status(bootstrap: str, topics: Topics, groups: list[str], *,
                         group_topics: Mapping[str, Iterable[str]] | None = None,
                         verify_ends: bool = True) -> StatusReport:
    """End offsets of every pipeline topic under ``topics.prefix`` and each group's lag on them.

    ``groups`` are the expected group ids (from the config); groups found by ListGroups are added.
    A group's lag is shown for topics it has committed on, plus ``group_topics[group]`` (physical
    names) if given, so a subscribed group that has not committed yet shows its whole backlog.
    """
    notes: list[str] = []
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        names = sorted(set(await _list_topics(admin, topics.prefix)))
        discovered = await _discover_groups(admin, topics.prefix)
        if discovered is None:
            notes.append("ListGroups is not supported by this broker: showing the expected groups only")
        all_groups = sorted(set(groups) | set(discovered or ()))
        states = await _group_states(admin, discovered or [])
        ends = await exact_end_offsets(bootstrap, names, verify=verify_ends)
        parts = sorted(ends, key=lambda t: (t.topic, t.partition))
        statuses = []
        for g in all_groups:
            committed = await _committed(admin, g, parts) if parts else {}
            declared = set((group_topics or {}).get(g, ()))
            lags = _group_lags(g, topics, ends, committed, declared)
            statuses.append(GroupStatus(g, states.get(g, "unknown"), lags, expected=g in groups,
                                        discovered=g in (discovered or ())))
    finally:
        await admin.close()
    offsets: dict[str, dict[int, int]] = {n: {} for n in names}
    for tp, end in ends.items():
        offsets[tp.topic][tp.partition] = end
    return StatusReport(bootstrap, topics.prefix, time.time(),
                        [TopicOffsets(n, topics.logical(n), dict(sorted(offsets[n].items()))) for n in names],
                        statuses, discovered is not None, notes)


def _per_partition(values: Mapping[int, int]) -> str:
    return " ".join(f"{p}:{v}" for p, v in sorted(values.items()))


def _group_label(group: str, prefix: str, experiment: str | None) -> str:
    """``<prefix>.<experiment>.embedder`` -> ``embedder`` when the tables are about that experiment."""
    own = f"{prefix}.{experiment}." if experiment else None
    return group[len(own):] if own and group.startswith(own) else group


def render_status(report: StatusReport, console: Console, experiment: str | None = None) -> None:
    """Print two tables: topics (end offsets) and consumer groups (committed, end, lag).  They fit
    80 columns: no vertical rules, and the per-partition column folds onto more lines."""
    tt = Table(title=f"Topics ({report.prefix}.*) on {report.bootstrap}", title_justify="left",
               box=box.SIMPLE_HEAD, pad_edge=False)
    tt.add_column("topic", no_wrap=True)
    tt.add_column("parts", justify="right")
    tt.add_column("records", justify="right", no_wrap=True)
    tt.add_column("per partition", overflow="fold", min_width=12)
    for t in report.topics:
        tt.add_row(t.logical, str(len(t.ends)), f"{t.total:,}", _per_partition(t.ends))
    console.print(tt)

    title = f"Consumer groups of {experiment}" if experiment else "Consumer groups"
    gt = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    labels = [_group_label(g.group, report.prefix, experiment) for g in report.groups]
    room = max(12, console.width - 54)  # what the other columns leave on this console
    gt.add_column("group", overflow="fold", width=min(room, max(map(len, labels), default=5)))
    gt.add_column("topic, lag per partition", overflow="fold", ratio=1)
    for col in ("committed", "end", "lag"):
        gt.add_column(col, justify="right", no_wrap=True)
    for g, label in zip(report.groups, labels, strict=True):
        joined = g.discovered or not report.list_groups_supported
        if g.state not in ("Stable", "unknown"):
            label += f"\n[dim]({g.state})[/]"
        if not joined:
            label += "\n[dim](not joined)[/]"
        if not g.topics:
            gt.add_row(label, "[dim]no commits yet[/]", "", "", "")
        for i, t in enumerate(g.topics):
            style = "red" if t.lag > 0 else "green"
            per = _per_partition({p.partition: max(0, p.lag) for p in t.partitions})
            gt.add_row(label if i == 0 else "", f"{t.logical}\n[dim]{per}[/]", f"{t.committed:,}",
                       f"{t.end:,}", f"[{style}]{t.lag:,}[/]")
    console.print(gt)
    for note in report.notes:
        console.print(f"[yellow]{note}[/]")


def render_endpoints(endpoints: list[tuple[Endpoint, str]], console: Console, experiment: str) -> None:
    """The experiment's registered /metrics endpoints, each with what its /healthz said."""
    if not endpoints:
        console.print(f"[dim]no endpoints registered for {experiment} (processes publish theirs in Redis "
                      "when they start)[/]")
        return
    et = Table(title=f"Endpoints of {experiment}", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    et.add_column("service", overflow="fold")
    et.add_column("pid", justify="right")
    et.add_column("metrics", overflow="fold")
    et.add_column("health", overflow="fold")
    et.add_column("up since", no_wrap=True)
    for ep, health in endpoints:
        style = "green" if health == "ok" else "red"
        et.add_row(ep.service, str(ep.pid), ep.metrics_url, f"[{style}]{health}[/]",
                   time.strftime("%m-%d %H:%M", time.localtime(ep.started_at)))
    console.print(et)


async def probe_health(url: str, timeout_s: float = 2.0) -> str:
    """``ok``, the failing services' details, or ``unreachable`` (a process that died)."""
    import httpx

    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            resp = await client.get(url.rstrip("/") + "/healthz")
        body = resp.json()
    except (httpx.HTTPError, ValueError):
        return "unreachable"
    if body.get("ok"):
        return "ok"
    bad = [f"{name}: {s.get('detail', '')}" for name, s in body.get("services", {}).items() if not s.get("ok")]
    return "; ".join(bad) or f"HTTP {resp.status_code}"
