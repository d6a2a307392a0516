#!/usr/bin/env bash
# Wheels that the GPU machine lacks, for bench/gpu_check.sh (issue 12). That machine (Python 3.12,
# torch 2.11 + CUDA 13, no network) has numpy, scikit-learn, PyYAML and pytest but no pydantic:
# download here, where a package registry is reachable, the versions this repo's .venv runs, into
# bench/wheels (git-ignored), and name bench/wheels in the device `run` tool's `carry`.
#   bash scripts/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=bench/wheels
# pydantic and everything it imports (pydantic-core is pinned exactly by pydantic), plus PyYAML in case
# the machine's image drops it. Never torch: the machine's own CUDA build must be used.
mapfile -t PINS < <("$PY" - <<'PYEOF'
from importlib.metadata import version
for name in ["pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "pyyaml"]:
    print(f"{name}=={version(name)}")
PYEOF
)
rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "${PINS[@]}"
# Every dependency of what was downloaded must be there too (the GPU machine cannot fetch any).
"$PY" - "$DEST" <<'PYEOF'
import re, sys, zipfile
from pathlib import Path
wheels = sorted(Path(sys.argv[1]).glob("*.whl"))
have = {re.split(r"-\d", w.name, maxsplit=1)[0].lower().replace("_", "-") for w in wheels}
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:") and "extra ==" not in line:
                dep = re.split(r"[ ;<>=!~\[(]", line.split(":", 1)[1].strip(), maxsplit=1)[0].lower().replace("_", "-")
                if dep not in have:
                    sys.exit(f"gpu_wheels: {w.name} needs {dep}, which is not in {sys.argv[1]}")
PYEOF
ls -l "$DEST"
du -ch "$DEST"/*.whl | tail -1
