"""Run one command and print {"wall_s", "peak_rss_mib", "stdout"} as JSON: peak RSS from this process's
RUSAGE_CHILDREN, which covers exactly the one child it ran."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

cmd = sys.argv[sys.argv.index("--") + 1 :]
t0 = time.perf_counter()
p = subprocess.run(cmd, capture_output=True, text=True)
wall = time.perf_counter() - t0
if p.returncode != 0:
    sys.stderr.write(p.stderr[-4000:])
    sys.exit(p.returncode)
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"wall_s": wall, "peak_rss_mib": rss, "stdout": p.stdout}))
