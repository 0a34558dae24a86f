"""Tests of the tests: the statistics tests must fail when the validator's decision is broken.

Each run starts pytest on STATISTICS_TESTS in a subprocess with $AUTOINTERV_TEST_SABOTAGE set
(tests/conftest.py forces every held-out decision to "rejected" or to "validated") and asserts the
run fails, and fails in the tests that guard that side: a validator that rejects everything must
fail the planted counterparts, one that validates everything the null tests.  The list is plain node
ids/modules: add a statistics module here and it is sabotaged too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SABOTAGE_ENV

ROOT = Path(__file__).resolve().parents[1]
STATISTICS_TESTS = ("tests/test_validator_null.py", "tests/test_cascade.py",
                    "tests/test_null_and_planted.py::test_planted_behaviours_are_all_found_and_validated")
MUST_FAIL = {  # per sabotage, tests that must be among the failures
    "reject": ("test_validator_null.py::test_true_hypotheses_are_validated",
               "test_cascade.py::test_only_borderline_hypotheses_escalate_and_reach_the_llm",
               "test_null_and_planted.py::test_planted_behaviours_are_all_found_and_validated"),
    "validate": ("test_validator_null.py::test_null_hypotheses_are_validated_at_most_at_alpha",
                 "test_cascade.py::test_only_borderline_hypotheses_escalate_and_reach_the_llm"),
}


def run_sabotaged(mode: str, tests: tuple[str, ...] = STATISTICS_TESTS) -> tuple[int, list[str], str]:
    """(exit code, failed node ids, output tail) of the tests with the decision forced to ``mode``."""
    env = {**os.environ, SABOTAGE_ENV: mode, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *tests],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    failed = re.findall(r"^FAILED (\S+)", proc.stdout, re.MULTILINE)
    return proc.returncode, failed, proc.stdout[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("mode", sorted(MUST_FAIL))
def test_statistics_tests_fail_when_the_decision_is_sabotaged(mode: str) -> None:
    code, failed, tail = run_sabotaged(mode)
    print(f"sabotage {mode}: {len(failed)} failed: {failed}")
    assert code == 1 and failed, tail
    for must in MUST_FAIL[mode]:
        assert any(f.split("[")[0].endswith(must) for f in failed), (must, failed)
