"""Statistics for validating findings: anytime-valid tests, intervals, AUC, false discovery control.

Pure functions and small state objects; no I/O.
"""

from services.stats.auc import AucResult, auc_test, delong_variance, permutation_auc_p
from services.stats.effects import cliffs_delta, cohens_h
from services.stats.fdr import LordPlusPlus, benjamini_hochberg, lord_gamma
from services.stats.sequential import (
    beta_binomial_log_e,
    beta_binomial_log_e_many,
    confidence_sequence_bernoulli,
    newcombe_diff_interval,
    spending_level,
    wilson_interval,
)

__all__ = [
    "AucResult",
    "LordPlusPlus",
    "auc_test",
    "benjamini_hochberg",
    "beta_binomial_log_e",
    "beta_binomial_log_e_many",
    "cliffs_delta",
    "cohens_h",
    "confidence_sequence_bernoulli",
    "delong_variance",
    "lord_gamma",
    "newcombe_diff_interval",
    "permutation_auc_p",
    "spending_level",
    "wilson_interval",
]
