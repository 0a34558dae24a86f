"""The topology is derived from the services' declarations: orders, groups, the AsyncAPI file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench.experiments import sim_config
from services.core.events import Validation
from services.core.runtime import Incoming, Service
from services.core.schemas import ASYNCAPI_FILE, check_schemas
from services.core.topology import Node, Topology, TopologyError
from services.orchestrator import declared_topology, expected_groups

ROOT = Path(__file__).resolve().parents[1]


def test_producers_stop_before_their_consumers_and_start_after_them() -> None:
    topo = declared_topology(sim_config(validator={"tiers": [{"name": "kw", "kind": "keyword"},
                                                             {"name": "emb", "kind": "embedding"}]}))
    stop = topo.stop_order
    assert stop[0] == "controller" and stop[-1] == "sink"
    for a, b in [("controller", "generator"), ("generator", "embedder"), ("embedder", "clusterer"),
                 ("clusterer", "hypothesizer"), ("hypothesizer", "validator:kw"), ("validator:kw", "validator:emb")]:
        assert stop.index(a) < stop.index(b), (a, b)
    assert topo.start_order == list(reversed(stop))
    # the escalation topic links tier 0 to tier 1 and nothing else
    assert topo.writers("escalations.emb") == ["validator:kw"]
    assert topo.readers("escalations.emb") == ["validator:emb"]
    assert topo.readers("validations") == ["controller", "sink"]


def test_expected_groups_are_every_consuming_instance() -> None:
    cfg = sim_config()
    groups = expected_groups(cfg)
    prefix = f"{cfg.bus.topic_prefix}.{cfg.experiment_id}."
    assert all(g.startswith(prefix) for g in groups)
    names = {g[len(prefix):] for g in groups}
    assert names == {"controller", "generator-base+intervention", "embedder", "clusterer", "hypothesizer",
                     "paired", "validator.keyword", "validator.embedding", "sink"}


def test_a_cycle_through_no_origin_is_an_error_naming_the_services() -> None:
    nodes = [Node("a", "a", ("x",), ("y",), "g.a", False), Node("b", "b", ("y",), ("x",), "g.b", False)]
    with pytest.raises(TopologyError, match=r"\['a', 'b'\]"):
        Topology(nodes)
    ok = Topology([nodes[0], Node("b", "b", ("y",), ("x",), "g.b", True)])  # b starts the cycle
    assert ok.stop_order == ["b", "a"]


def test_a_plugin_joins_the_topology_from_its_declarations() -> None:
    class Notifier(Service):
        name = "notifier"
        consumes = (Validation,)

        async def handle(self, batch: list[Incoming]) -> None: ...

    from services.core.memory_bus import MemoryBus
    from services.core.topics import Topics
    from services.orchestrator import build_services, make_context

    cfg = sim_config()
    ctx = make_context(cfg, MemoryBus(cfg.bus, Topics(cfg.bus.topic_prefix)), "redis://unused")
    services = [*build_services(ctx).values(), Notifier(ctx)]
    topo = Topology.of(services)
    assert topo.stop_order.index("notifier") > topo.stop_order.index("validator:keyword")  # reads validations
    assert "notifier" in topo.readers("validations") and "notifier" in topo.writers("dead-letters")
    assert f"{cfg.bus.topic_prefix}.{cfg.experiment_id}.notifier" in topo.groups()


def test_a_stale_asyncapi_file_is_reported(tmp_path: Path) -> None:
    schemas = tmp_path / "schemas"
    shutil.copytree(ROOT / "schemas", schemas)
    assert check_schemas(schemas) == []
    api = schemas / ASYNCAPI_FILE
    api.write_text(api.read_text().replace("Sent by: clusterer.", "Sent by: someone else."))
    problems = check_schemas(schemas)
    assert len(problems) == 1 and "stale" in problems[0] and ASYNCAPI_FILE in problems[0]
