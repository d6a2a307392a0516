#!/usr/bin/env bash
# The paper-reproduction targets of the Makefile (`make reproduce-<target>`), one sweep spec each.
#
#   scripts/reproduce.sh TARGET
#   TARGET: digits | fmnist-ect-vs-sct | fmnist-scaling | cifar10-ect | cifar10-sct | imagenet64-sct
#
# Environment:
#   DRY_RUN=1          print the checks and the trial plan (`sct-sweep validate`), run nothing
#   QUICK=1            fmnist targets: the <= 20-minute version of the same experiment (fewer
#                      iterations and seeds, smaller FID sample; sweep name gets `_quick`)
#   DATA_ROOT          paper targets: overrides data.root of the spec
#   INCEPTION_WEIGHTS  paper targets: overrides eval.inception_weights (pt_inception-2015-12-05-6726825d.pth)
#   PRETRAINED         paper targets: sets pretrain.checkpoint, e.g. NVIDIA's edm-cifar10-32x32-uncond-vp.pkl
#                      or edm2-img64-s-*.pkl (downloaded by you): tuning starts from it, no pretraining
#   SCT_SWEEP, PY      the CLI and the Python to use (default: .venv/bin/sct-sweep, .venv/bin/python)
#
# Paper targets (cifar10-*, imagenet64-*) stop at once, with one line saying why, on a machine
# without a CUDA GPU, without the dataset or without the Inception weights. With QUICK or the path
# overrides, the spec actually run is a derived copy under .cache/specs/ (printed before it runs).
# A sweep that exists already (ray_results/<name>) is resumed, not rerun: finished trials are kept;
# remove ray_results/<name> to start it over. Each sweep ends with `sct-sweep report <name>`.
set -euo pipefail
cd "$(dirname "$0")/.."

SCT_SWEEP=${SCT_SWEEP:-.venv/bin/sct-sweep}
PY=${PY:-.venv/bin/python}
DRY_RUN=${DRY_RUN:-0}
QUICK=${QUICK:-0}
TARGET=${1:-}

die() { echo "reproduce-$TARGET: $*" >&2; exit 2; }
truthy() { [[ "$1" == 1 || "$1" == true || "$1" == yes ]]; }

# derive SPEC NAME KEY=VALUE...: a copy of SPEC with dotted keys set (values parsed as YAML); prints its path.
derive() {
  local spec=$1 name=$2
  shift 2
  mkdir -p .cache/specs
  "$PY" - "$spec" ".cache/specs/$name.yaml" "name=$name" "$@" <<'EOF'
import sys, yaml
src, dst, *sets = sys.argv[1:]
spec = yaml.safe_load(open(src))
for item in sets:
    key, _, value = item.partition("=")
    if key.startswith("search."):  # search.<dotted TrainConfig path>.<axis kind>: replaces the axis
        path, _, kind = key.removeprefix("search.").rpartition(".")
        spec.setdefault("search", {})[path] = {kind: yaml.safe_load(value)}
        continue
    *parents, leaf = key.split(".")
    node = spec
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = yaml.safe_load(value)
with open(dst, "w") as f:
    f.write(f"# derived from {src} by scripts/reproduce.sh: {' '.join(sets)}\n")
    yaml.safe_dump(spec, f, sort_keys=False)
print(dst)
EOF
}

# spec_get SPEC DOTTED.KEY: one setting of a spec ('' when unset).
spec_get() {
  "$PY" -c 'import sys, yaml
node = yaml.safe_load(open(sys.argv[1]))
for k in sys.argv[2].split("."):
    node = node.get(k) if isinstance(node, dict) else None
print("" if node is None else node)' "$1" "$2"
}

# plan SPEC: `sct-sweep validate`; where it refuses (no GPU or files here), the plan without those checks.
plan() {
  if "$SCT_SWEEP" validate "$1"; then return 0; fi
  echo "(the plan as it would run once the checks pass:)"
  "$PY" - "$1" <<'EOF'
import sys, yaml
from sct_sweeps.config import SweepSpec
from sct_sweeps.space import plan
try:
    spec = SweepSpec.model_validate(yaml.safe_load(open(sys.argv[1])))
except ValueError:
    sys.exit(2)  # the spec itself is invalid: `sct-sweep validate` said why
print("\n".join("  " + line for line in plan(spec).lines()))
EOF
}

# run_sweep SPEC: run it (or only show the plan on DRY_RUN=1), then its report.
run_sweep() {
  local spec=$1 name
  name=$(spec_get "$spec" name)
  if truthy "$DRY_RUN"; then
    plan "$spec"
    echo "DRY_RUN: would run: $SCT_SWEEP run $spec && $SCT_SWEEP report $name"
    return 0
  fi
  if [[ -f "${SCT_PROJECT_DIR:-.}/ray_results/$name/sct_sweep.json" ]]; then
    echo "== sweep $name exists: resuming it (finished trials are kept; remove ray_results/$name to start over)"
    "$SCT_SWEEP" resume "$name" --no-report
  else
    echo "== $SCT_SWEEP run $spec"
    "$SCT_SWEEP" run "$spec" --no-report
  fi
  "$SCT_SWEEP" report "$name"
}

# paper SPEC WHAT: GPU, data and Inception checks, then the sweep.
paper() {
  local spec=$1 sets=() root weights missing=""
  [[ -n "${DATA_ROOT:-}" ]] && sets+=("base.data.root=$DATA_ROOT")
  [[ -n "${INCEPTION_WEIGHTS:-}" ]] && sets+=("base.eval.inception_weights=$INCEPTION_WEIGHTS")
  [[ -n "${PRETRAINED:-}" ]] && sets+=("base.pretrain.checkpoint=$(realpath "$PRETRAINED")")
  if ((${#sets[@]})); then
    spec=$(derive "$spec" "$(basename "$spec" .yaml)" "${sets[@]}")
    echo "spec: $spec (${sets[*]})"
  fi
  root=$(spec_get "$spec" base.data.root)
  weights=$(spec_get "$spec" base.eval.inception_weights)
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    missing="no CUDA GPU on this machine (torch.cuda.is_available() is false); run it on a GPU machine"
  elif [[ ! -d "$root" ]]; then
    missing="data.root: $root: directory not found; set DATA_ROOT=<dir> or data.root in $1"
  elif [[ ! -f "$weights" ]]; then
    missing="eval.inception_weights: $weights: file not found; set INCEPTION_WEIGHTS=<pt_inception-2015-12-05-6726825d.pth>"
  fi
  if truthy "$DRY_RUN"; then
    echo "check: ${missing:-GPU, data and Inception weights present}"
    run_sweep "$spec"
    return 0
  fi
  [[ -z "$missing" ]] || die "$missing (DRY_RUN=1 prints the plan)"
  run_sweep "$spec"
}

# fmnist SPEC QUICK_SETTINGS...: the sweep, or its quick variant under QUICK=1.
fmnist() {
  local spec=$1
  shift
  if truthy "$QUICK"; then
    spec=$(derive "$spec" "$(basename "$spec" .yaml)_quick" "$@")
    echo "QUICK=1: $spec ($*)"
  fi
  run_sweep "$spec"
}

case "$TARGET" in
  digits)
    for s in ect_vs_sct ablate_schedule ablate_refbatch ablate_eta ablate_cfg; do
      run_sweep "experiments/$s.yaml"
    done
    ;;
  fmnist-ect-vs-sct)
    fmnist experiments/fmnist_ect_vs_sct.yaml base.iterations=200 base.eval.every=100 \
      base.eval.online=false "search.seed.grid=[0]"
    ;;
  fmnist-scaling)
    fmnist experiments/fmnist_scaling.yaml "search.iterations.grid=[50, 100, 200]" \
      "search.optim.batch_size.grid=[32]" base.eval.every=50 base.eval.fid_samples=500
    ;;
  cifar10-ect) paper experiments/cifar10_ect.yaml ;;
  cifar10-sct) paper experiments/cifar10_sct.yaml ;;
  imagenet64-sct) paper experiments/imagenet64_sct.yaml ;;
  *)
    echo "usage: scripts/reproduce.sh digits|fmnist-ect-vs-sct|fmnist-scaling|cifar10-ect|cifar10-sct|imagenet64-sct" >&2
    exit 2
    ;;
esac
