"""provenance: how busy other work keeps the machine (read from /proc/stat), recorded with every result."""
from __future__ import annotations

import os
import subprocess
import sys

from sage_megatron.provenance import QUIET_BUSY_CORES, busy_cores, cpu_jiffies, provenance, run_start

SPIN = "import time\nt = time.time()\nwhile time.time() - t < {seconds}: pass"


def test_cpu_jiffies_reads_the_first_line():
    # user nice system idle iowait irq softirq steal: busy 10+0+5+1+1+3 = 20 of 20 + 70 + 10 = 100
    assert cpu_jiffies("cpu  10 0 5 70 10 1 1 3 0 0\ncpu0 1 2 3 4\n") == (20, 100)
    assert cpu_jiffies("cpu  4 0 1 5\n") == (5, 10)          # old kernels: four fields


def test_one_spinning_process_keeps_about_one_core_busy_and_is_warned_of(capsys):
    burner = subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=8)])
    try:
        busy = busy_cores(1.5)
        start = run_start()
    finally:
        burner.kill()
        burner.wait()
    assert 0.6 <= busy <= (os.cpu_count() or 1)
    assert start["busy_cores_at_start"] > QUIET_BUSY_CORES and isinstance(start["load_avg_1m_at_start"], float)
    assert "WARNING: other work keeps" in capsys.readouterr().err
    record = provenance("cmd", start=start)
    assert record["command"] == "cmd" and record["busy_cores_at_start"] == start["busy_cores_at_start"]
