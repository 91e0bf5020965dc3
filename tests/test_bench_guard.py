"""The overhead guard of issue 5, outside ``make test``: ``SLOW=1 make test`` or ``make bench``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_identical_settings_overhead_stays_under_ten_percent():
    """``train.py`` with the peer's settings must cost at most 10 % more wall time per token than the peer."""
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "end_to_end.py"), "--guard", "--repeats", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
