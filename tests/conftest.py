"""Shared fixtures: a real Kafka-protocol broker and a real Redis-protocol server.

``KAFKA_BOOTSTRAP`` / ``REDIS_URL`` point the suite at external servers; otherwise an embedded
Tansu broker and an embedded Valkey server are started once per session.  Each test gets a
unique topic prefix / key namespace so tests never see each other's data.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.core.infra import EmbeddedBroker, EmbeddedCache


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if os.environ.get("KAFKA_BOOTSTRAP"):
        yield os.environ["KAFKA_BOOTSTRAP"]
        return
    with EmbeddedBroker(log_path=tmp_path_factory.mktemp("tansu") / "tansu.log") as broker:
        yield broker.bootstrap


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    with EmbeddedCache(tmp_path_factory.mktemp("valkey")) as cache:
        yield cache.url


@pytest.fixture()
def unique() -> str:
    """A short unique token for topic prefixes, key namespaces and experiment ids."""
    return uuid.uuid4().hex[:10]


@pytest.fixture()
def tmp_run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "runs"
    d.mkdir()
    return d


# --------------------------------------------------------------------------- tests of the tests

SABOTAGE_ENV = "AUTOINTERV_TEST_SABOTAGE"  # "reject" | "validate": force every held-out decision
FORCED = {"reject": "rejected", "validate": "validated"}


@pytest.fixture(scope="session", autouse=True)
def _sabotaged_decision() -> Iterator[None]:
    """With $AUTOINTERV_TEST_SABOTAGE set, the validator's held-out decision (``_auc_decision``, what
    ``ValidatorService.decide`` runs) is forced to reject or to validate everything, for the whole
    session (module fixtures included).  tests/test_sabotage.py runs the statistics tests so and
    asserts they fail; production code has no hook for this."""
    mode = os.environ.get(SABOTAGE_ENV)
    if not mode:
        yield
        return
    from services.validator.service import ValidatorService

    forced = FORCED[mode]
    original = ValidatorService._auc_decision

    def sabotaged(self: ValidatorService, *args: Any, **kwargs: Any) -> Any:
        return original(self, *args, **kwargs).model_copy(update={"decision": forced})

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ValidatorService, "_auc_decision", sabotaged)
        yield
