"""Candidate events: a cluster whose share test crossed, with texts for the labeler and validators.

The labeler contrasts the over-represented side with the other side's label-split texts: from the
cluster first, padded with the other side's label texts from anywhere, so a one-sided cluster (the
usual case for a planted behaviour) still has a contrast.  Held-out texts are padded the same way
from the held-out samples, and no text is ever in both.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from services.clusterer.uncertainty import ref_of
from services.core.events import ROLES, CandidateCluster, TextRef, stable_id
from services.stats.sequential import confidence_sequence_bernoulli

if TYPE_CHECKING:
    from services.clusterer.state import ClusterState

log = logging.getLogger("autointerv.clusterer")

MAX_LOG_E = 700.0  # exp() of more overflows a float; such evidence is decisive anyway


def text_key(cid: int, role: int, label: bool) -> int:
    """Key of the text samples of one cluster, role and split (cid 0 for the global samples)."""
    return cid * 4 + role * 2 + int(label)


def padded(st: ClusterState, cid: int, over: int, label: bool) -> dict[int, list[TextRef]]:
    """The cluster's label (or held-out) texts per role, the other side padded up to the
    over-represented side's count from that side's global label (or held-out) sample."""
    refs = {r: st.refs(cid, r, label) for r in (0, 1)}
    have = {t.text_id for r in (0, 1) for t in refs[r]}
    pool = st.global_texts.get(text_key(0, 1 - over, label))
    need = max(0, len(refs[over]) - len(refs[1 - over]))
    refs[1 - over] += [ref_of(t) for t in [t for t in pool if t[0] not in have][:need]]
    return refs


def cluster_candidate(st: ClusterState, cid: int, log_e: float) -> CandidateCluster:
    nb, ni = (int(x) for x in st._own[cid])
    over = 1 if ni > nb else 0
    level = st.spending.level(cid)
    holdout = padded(st, cid, over, label=False)
    label = padded(st, cid, over, label=True)
    log.info("clusterer %s: cluster %d divergent (%s over-represented, %d/%d, log e %.1f)",
             st.experiment_id, cid, ROLES[over], ni, ni + nb, log_e)
    return CandidateCluster(
        experiment_id=st.experiment_id, candidate_id=stable_id(st.experiment_id, cid),
        cluster_id=cid, snapshot_seq=st.seq, direction=ROLES[over], count_base=nb,
        count_intervention=ni, share_intervention=ni / (ni + nb),
        share_ci=confidence_sequence_bernoulli(ni, ni + nb, level),
        e_value=math.exp(min(log_e, MAX_LOG_E)),
        alpha_spent=level, label_texts=label[0] + label[1],
        holdout_texts=holdout[0] + holdout[1])
