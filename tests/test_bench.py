"""bench.py --quick: the whole table runs and every comparison finds equal results (no timing is asserted)."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_quick_bench_runs_and_its_equality_checks_pass(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.load(open(out))["rows"]
    assert len(rows) == 6 and all(r["equal"] for r in rows), [r["check"] for r in rows]
    assert all(r["ours"] > 0 and r["torchvision"] > 0 for r in rows)
    assert "| training step" in proc.stdout  # the markdown table is printed
