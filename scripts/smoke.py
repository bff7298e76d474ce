"""Every dataset config end-to-end on its toy subset with the tiny offline model (`make smoke`)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "dataset"

if __name__ == "__main__":
    failed = []
    for p in sorted(CONFIGS.glob("*_toy.yaml")):
        for method in ("vanilla", "egg"):
            cmd = [
                sys.executable,
                "-m",
                "egg_eval",
                f"dataset={p.stem}",
                f"method={method}",
                "progress=false",
                "output_root=results/smoke",
            ]
            r = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in r.stdout.splitlines() if " | " in x), r.stderr[-300:])
            failures = re.search(r"\| failures (\d+)", line)
            ok = r.returncode == 0 and failures is not None and failures.group(1) == "0"  # a toy row never fails
            print("ok  " if ok else "FAIL", line)
            if not ok:
                failed.append(p.stem)
    sys.exit(1 if failed else 0)
