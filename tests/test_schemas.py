"""Every event model round-trips through orjson and validates against its committed JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from services.core import events as ev
from services.core.schemas import check_schemas, schema_path

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"


def _ref(role: str = "base") -> ev.TextRef:
    return ev.TextRef(text_id="t1", prompt_id="p1", role=role, text="hello")


def _hyp() -> ev.Hypothesis:
    return ev.Hypothesis(experiment_id="e", hypothesis_id="h", candidate_id="c", cluster_id=3,
                         direction="intervention", text="mentions cats", labeler="offline:log-odds",
                         keywords=["cat"], holdout_texts=[_ref("intervention"), _ref()],
                         cluster_evidence={"share_diff": 0.4})


SAMPLES: list[ev.Event] = [
    ev.GenerationRequest(experiment_id="e", role="base", prompts=[ev.PromptRef(prompt_id="p", text="Hi")],
                         exemplars=[ev.Exemplar(text_id="t", prompt_id="p", text="Once upon")], n_per_prompt=2,
                         decoding=ev.Decoding(temperature=0.7)),
    ev.DecodedText(experiment_id="e", text_id="t", request_id="r", role="intervention", model_id="m",
                   prompt_id="p", text="Hello there", meta={"behaviour": None}),
    ev.EmbeddedText(experiment_id="e", text_id="t", role="base", prompt_id="p", text="x", embedding_model="m",
                    dim=4, vector_b64=ev.EmbeddedText.encode_vector(np.ones(4))),
    ev.ClusterSnapshot(experiment_id="e", seq=1, n_seen=10, n_base=5, n_intervention=5, engine="minibatch",
                       clusters=[ev.ClusterStats(cluster_id=0, count_base=5, count_intervention=5,
                                                 share_intervention=0.5, share_ci=(0.2, 0.8))],
                       quality=ev.ClusterQuality(silhouette=0.1, n_clusters=1)),
    ev.UncertaintyEvent(experiment_id="e", uncertainty_id="u", kind="boundary", cluster_ids=[1, 2], score=0.3,
                        exemplars=[_ref()]),
    ev.CandidateCluster(experiment_id="e", candidate_id="c", cluster_id=3, snapshot_seq=1,
                        direction="intervention", count_base=1, count_intervention=40, share_intervention=0.97,
                        share_ci=(0.8, 1.0), e_value=1e9, alpha_spent=0.001, label_texts=[_ref()],
                        holdout_texts=[_ref("intervention")]),
    _hyp(),
    ev.Validation(experiment_id="e", validation_id="v", hypothesis_id="h", tier="keyword", tier_index=0,
                  decision="validated", auc=0.9, auc_ci=(0.8, 0.95), p_value=1e-5, alpha_level=0.01, n_pos=30,
                  n_neg=30, hypothesis=_hyp()),
    ev.Validation(experiment_id="e", validation_id="v2", hypothesis_id="h", tier="share-test", tier_index=0,
                  decision="validated", p_value=1e-5, alpha_level=0.01, n_pos=30, n_neg=2),
    ev.DeadLetter(experiment_id="e", source_topic="t", source_partition=0, source_offset=5, service="embedder",
                  reason="bad", original_b64="AA=="),
    ev.GenerationReport(experiment_id="e", request_id="r", role="base", round=2, texts=14,
                        failures=[ev.GenerationFailure(prompt_id="p", reason="exhausted", exhausted=True)]),
    ev.PairedRound(experiment_id="e", round=3, hypothesis_ids=["h1", "h2"], label_pairs=40, held_out_pairs=90),
    ev.ControlEvent(experiment_id="e", kind="finished", round=7, stopped_because="budget", detail="budget spent",
                    counts={"planned": 100, "produced": 98}),
]


def test_every_topic_has_a_sample() -> None:
    assert {type(s) for s in SAMPLES} == set(ev.EVENT_TYPES)


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_round_trip_and_schema(event: ev.Event) -> None:
    data = event.to_bytes()
    back = type(event).from_bytes(data)
    assert back == event
    schema = json.loads(schema_path(SCHEMAS, type(event)).read_text())
    jsonschema.validate(json.loads(data), schema)  # raises on mismatch
    assert schema["x-schema-version"] == ev.SCHEMA_VERSION


def test_schema_rejects_a_bad_record() -> None:
    schema = json.loads(schema_path(SCHEMAS, ev.DecodedText).read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"experiment_id": "e", "text_id": "t"}, schema)


def test_committed_schemas_match_models() -> None:
    assert check_schemas(SCHEMAS) == []


def test_envelope_headers_round_trip() -> None:
    event = SAMPLES[1]
    env = ev.Envelope.for_event(event, "autointerv/test")
    back = ev.Envelope.from_headers(env.to_headers())
    assert back is not None and back.id == "t" and back.experiment_id == "e" and back.type == event.type


def test_vector_encoding_is_compact_and_lossless_enough() -> None:
    vec = np.random.default_rng(0).standard_normal(384).astype(np.float32)
    vec /= np.linalg.norm(vec)
    b64 = ev.EmbeddedText.encode_vector(vec, "float16")
    as_json_list = json.dumps(vec.tolist())
    assert len(b64) * 4 < len(as_json_list)  # base64 float16 is > 4x smaller than a JSON float list
    e = SAMPLES[2].model_copy(update={"vector_b64": b64, "dim": 384})
    assert float(e.vector() @ vec) > 0.9999


def test_stable_id_is_stable() -> None:
    assert ev.stable_id("a", 1) == ev.stable_id("a", 1) != ev.stable_id("a", 2)
    assert ev.stable_id("a", 1) == "2e62af1e126c050a3305ca52c162b6e9"  # pinned across processes
