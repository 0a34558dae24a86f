"""Read `pip install --dry-run --report` JSON on stdin; exit 1 when the torch it would install is a
CUDA build (it pulls nvidia-* runtime packages), print the torch version it would install.

Used by the Makefile on machines without nvidia-smi, before anything is downloaded: pip resolves
from the wheels' metadata only, so a CUDA build is refused before its gigabytes are fetched."""

from __future__ import annotations

import json
import sys

report = json.load(sys.stdin)
names = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in report.get("install", [])}
cuda = sorted(n for n in names if n.startswith("nvidia-"))
print(f"torch {names.get('torch', '(already satisfied)')}" + (f" with {len(cuda)} CUDA packages" if cuda else ""))
sys.exit(1 if cuda else 0)
