"""The shortened soak run that CI makes: 10 s of mixed load with random upstream faults."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ten_second_soak_loses_nothing_and_explains_every_error():
    result = subprocess.run([sys.executable, "bench/soak.py", "--duration", "10"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "lost: 0; unexplained errors: 0" in result.stdout
    for kind in ("submit", "status", "long-poll", "stream"):
        assert "| %s |" % kind.rjust(9) in result.stdout
