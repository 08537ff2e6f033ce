#!/usr/bin/env bash
# The GPU session's one command, one step per device command (each step stays under 10 minutes):
#
#   bash benchmarks/run_gpu_all.sh STEP
#
# STEP: tests | smoke | sw_op | table1_r16 | table1_r32 | table1_r64 | models_fp32 | models_bf16 | all (every step
# in this order; only where commands may run longer than 10 minutes). smoke: the three scripts with --smoke on the
# GPU (tiny shapes, a pre-flight of the CUDA code paths; results in $OUT/smoke, never in benchmarks/results).
#
# Every step first installs the checkout (pip install --no-deps --no-build-isolation -e .; PYTHONPATH=src if that
# fails) and checks that CUDA works. JSON results go to ${OUT:-benchmarks/results} (the device tool's $OUT comes
# back to the session), logs to that folder's logs/STEP.log. The benchmark scripts stop starting measurements
# after STEP_LIMIT_S seconds (default 450) and list what they did not run; rows are appended as they finish, so a
# killed step keeps what it measured. Environment: OUT, PYTHON (default python3), STEP_LIMIT_S, and SMOKE=1 (check
# this script on a machine without a GPU: no install (PYTHONPATH=src), no CUDA check, every script with --smoke
# on CPU, OUT must be set; add TRITON_INTERPRET=1 to run the Triton paths in the interpreter).
set -uo pipefail
cd "$(dirname "$0")/.."

STEP="${1:-all}"
OUTDIR="${OUT:-benchmarks/results}"
LOGDIR="$OUTDIR/logs"
PY="${PYTHON:-python3}"
LIMIT="${STEP_LIMIT_S:-450}"
PART=$((LIMIT * 2 / 5)) # models steps: two script calls (inference, training)
MARGIN=100              # a script call is killed MARGIN s after its limit (its last measurement may overrun)
STEPS="tests smoke sw_op table1_r16 table1_r32 table1_r64 models_fp32 models_bf16"

case " $STEPS all " in
*" $STEP "*) ;;
*)
	echo "usage: $0 {${STEPS// /|}|all}" >&2
	exit 2
	;;
esac
SMOKE_ARGS=()
if [ "${SMOKE:-0}" = 1 ]; then
	if [ -z "${OUT:-}" ]; then
		echo "SMOKE=1 needs OUT (smoke results never go to benchmarks/results)" >&2
		exit 2
	fi
	SMOKE_ARGS=(--smoke --device cpu)
	SMOKE_DEVICE=cpu
fi
mkdir -p "$LOGDIR"
LOG="$LOGDIR/$STEP.log"

say() { echo "[run_gpu_all $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

setup() {
	if [ "${SMOKE:-0}" = 1 ]; then
		say "SMOKE=1: no install, no CUDA check, scripts run with ${SMOKE_ARGS[*]}"
		export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
		return 0
	fi
	if "$PY" -m pip install --no-deps --no-build-isolation -e . >"$LOGDIR/pip_install.log" 2>&1; then
		say "installed the checkout (pip install -e .)"
	else
		say "pip install -e . failed (see $LOGDIR/pip_install.log); using PYTHONPATH=src"
		export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
	fi
	"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import sys
import torch
import lkvision
from lkvision.ops.kernels import is_available
try:
    import triton
    tv = triton.__version__
except Exception as exc:
    tv = f"missing ({type(exc).__name__}: {exc})"
ok = torch.cuda.is_available()
name = torch.cuda.get_device_name(0) if ok else None
kern = ok and is_available(torch.empty(1, device="cuda"))
print(f"torch {torch.__version__} cuda {torch.version.cuda} device {name} triton {tv} kernels {kern} "
      f"lkvision {lkvision.__file__}")
sys.exit(0 if ok else 3)
EOF
	local rc=${PIPESTATUS[0]}
	if [ "$rc" -ne 0 ]; then
		say "no usable CUDA device / lkvision import failed (rc $rc); stopping"
		exit 3
	fi
}

# run NAME SECONDS CMD...: one script call killed after SECONDS, output into the step's log
run() {
	local name="$1" seconds="$2"
	shift 2
	say "start $name: $*"
	timeout -k 10 "$seconds" "$@" 2>&1 | tee -a "$LOG"
	local rc=${PIPESTATUS[0]}
	say "end $name: rc $rc"
	return "$rc"
}

summary() { # record / error / skipped counts of the step's JSON files
	"$PY" - "$@" <<'EOF' 2>&1 | tee -a "$LOG"
import json, math, sys
for path in sys.argv[1:]:
    try:
        rows = json.loads(open(path).read())
    except Exception as exc:
        print(f"summary: {path}: not readable ({type(exc).__name__})")
        continue
    err = sum(1 for r in rows if r.get("error"))
    skip = sum(1 for r in rows if r.get("skipped"))
    print(f"summary: {path}: {len(rows)} records, {err} errors, {skip} skipped")
EOF
}

table1() {
	local rc=0
	run "table1 R=$1" $((LIMIT + MARGIN)) "$PY" benchmarks/gpu_dwconv_table1.py ${SMOKE_ARGS[@]+"${SMOKE_ARGS[@]}"} \
		--res "$1" --budget-s 3 --time-limit-s "$LIMIT" --out "$OUTDIR/gpu_dwconv_table1.json" || rc=1
	summary "$OUTDIR/gpu_dwconv_table1.json"
	return "$rc"
}

models() { # inference and training get 2/5 of the step's limit each
	local rc=0 out="$OUTDIR/gpu_models.json"
	run "models $1 infer" $((PART + MARGIN)) "$PY" benchmarks/gpu_models.py ${SMOKE_ARGS[@]+"${SMOKE_ARGS[@]}"} \
		--dtypes "$1" --modes infer --backends triton torch --budget-s 4 --time-limit-s "$PART" --out "$out" || rc=1
	run "models $1 train" $((PART + MARGIN)) "$PY" benchmarks/gpu_models.py ${SMOKE_ARGS[@]+"${SMOKE_ARGS[@]}"} \
		--dtypes "$1" --modes train --backends triton torch --budget-s 4 --time-limit-s "$PART" --out "$out" || rc=1
	summary "$out"
	return "$rc"
}

sw_op() {
	local rc=0
	run "sw_op" $((LIMIT + MARGIN)) "$PY" benchmarks/gpu_sw_op.py ${SMOKE_ARGS[@]+"${SMOKE_ARGS[@]}"} \
		--time-limit-s "$LIMIT" --out "$OUTDIR/gpu_sw_op.json" || rc=1
	summary "$OUTDIR/gpu_sw_op.json"
	return "$rc"
}

smoke() { # every script with --smoke on the device the step runs on (cpu under SMOKE=1)
	local rc=0 dir s
	if [ -n "${OUT:-}" ]; then dir="$OUT/smoke"; else dir="$(mktemp -d)"; fi
	for s in gpu_dwconv_table1 gpu_sw_op gpu_models; do
		run "smoke $s" 180 "$PY" "benchmarks/$s.py" --smoke --device "${SMOKE_DEVICE:-cuda}" --out "$dir/$s.json" ||
			rc=1
		summary "$dir/$s.json"
	done
	return "$rc"
}

do_step() {
	case "$1" in
	smoke) smoke ;;
	tests) run "gpu tests" $((LIMIT + MARGIN)) "$PY" -m pytest -q -m gpu tests/ops/test_triton_kernels.py \
		-p no:cacheprovider --durations=10 ;;
	sw_op) sw_op ;;
	table1_r16) table1 16 ;;
	table1_r32) table1 32 ;;
	table1_r64) table1 64 ;;
	models_fp32) models fp32 ;;
	models_bf16) models bf16 ;;
	esac
}

say "step $STEP, results in $OUTDIR"
setup
status=0
if [ "$STEP" = all ]; then
	for s in $STEPS; do
		do_step "$s" || status=1
	done
else
	do_step "$STEP" || status=1
fi
say "done: step $STEP, status $status"
exit "$status"
