#!/usr/bin/env bash
# GPU check (issue 16): on a CUDA machine, within a time cap (default 8 minutes) and without network,
# set up an interpreter, then measure with hc_benchmark and print JSON lines on stdout (progress on stderr):
#   1. the paper preset's training step time per curriculum step (1-4): eager with AMP, then --compile;
#   2. whether the loader outpaces each step (hc_benchmark's `outpaces`);
#   3. hc_predict file to file on the 512x512x239 CT (benchmark case `ct`) with a fresh model, peak GPU memory;
#   4. nnU-Net v2's predict_single_npy_array on the same volume and the ratio, when nnunetv2 is importable.
# --smoke: the same records on tiny synthetic data (hc_benchmark --quick), in under 2 minutes on a CPU.
# Records, exit statuses and setup: documentation/benchmarks.md, section "GPU check".
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STARTED="$(date +%s)"

usage() {
    cat <<'EOF'
usage: scripts/device_check.sh [--smoke] [--setup-only] [--device DEV] [--output FILE] [--time-cap S] [--python PY]
                               [--venv DIR] [--wheel-dir DIR] [--base-python PY] [--work DIR]
                               [--shared-data DIR] [--nnunet-python PY]

  --smoke            tiny synthetic data (hc_benchmark --quick), few iterations, compile on step 4 only
  --setup-only       set up the interpreter, print the device_check_setup record, stop
  --device DEV       cpu, cuda, cuda:N or auto (default auto: cuda if torch sees one)    [HC_DEVICE]
  --output FILE      also write the JSON lines to FILE (replaced)                       [HC_CHECK_OUTPUT]
  --time-cap S       seconds for everything, setup included (default 480; 150 --smoke)  [HC_CHECK_TIME_CAP]
  --python PY        interpreter to use as it is (must already have the requirements)   [HC_PYTHON]
  --venv DIR         virtual environment to reuse, or to create when absent (.venv)     [HC_VENV]
  --wheel-dir DIR    wheels (and sdists) the venv is created from, offline (.whl)       [HC_WHEEL_DIR]
  --base-python PY   interpreter the venv is created from, with its site packages, so
                     a torch already installed there is used (default python3)          [HC_BASE_PYTHON]
  --work DIR         hc_benchmark's work folder, kept (default: temporary, removed)     [HC_CHECK_WORK]
  --shared-data DIR  folder with mmwhs_ct_labels/ (default ../shared/data)              [HC_SHARED_DATA]
  --nnunet-python PY interpreter with nnunetv2 (default: the one above)                 [HC_NNUNET_PYTHON]

Exit status: 0 every measurement present, 1 some missing or failed, 2 setup failed (one line on stderr),
3 the time cap cut measurements short.
EOF
}

die() { echo "device_check: error: $*" >&2; exit 2; }
log() { echo "device_check: $*" >&2; }

PYTHON="${HC_PYTHON:-}"
VENV="${HC_VENV:-$REPO/.venv}"
WHEEL_DIR="${HC_WHEEL_DIR:-$REPO/.whl}"
BASE_PYTHON="${HC_BASE_PYTHON:-python3}"
DEVICE="${HC_DEVICE:-auto}"
OUTPUT="${HC_CHECK_OUTPUT:-}"
TIME_CAP="${HC_CHECK_TIME_CAP:-}"
WORK="${HC_CHECK_WORK:-}"
SHARED_DATA="${HC_SHARED_DATA:-}"
NNUNET_PYTHON="${HC_NNUNET_PYTHON:-}"
SMOKE=0
SETUP_ONLY=0

while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --smoke) SMOKE=1; shift; continue ;;
        --setup-only) SETUP_ONLY=1; shift; continue ;;
        --python|--venv|--wheel-dir|--base-python|--device|--output|--time-cap|--work|--shared-data|--nnunet-python)
            [ $# -ge 2 ] || die "$1 needs a value (see --help)" ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
    case "$1" in
        --python) PYTHON="$2" ;;
        --venv) VENV="$2" ;;
        --wheel-dir) WHEEL_DIR="$2" ;;
        --base-python) BASE_PYTHON="$2" ;;
        --device) DEVICE="$2" ;;
        --output) OUTPUT="$2" ;;
        --time-cap) TIME_CAP="$2" ;;
        --work) WORK="$2" ;;
        --shared-data) SHARED_DATA="$2" ;;
        --nnunet-python) NNUNET_PYTHON="$2" ;;
    esac
    shift 2
done

if [ -z "$TIME_CAP" ]; then
    if [ "$SMOKE" = 1 ]; then TIME_CAP=150; else TIME_CAP=480; fi
fi
case "$TIME_CAP" in ''|*[!0-9]*) die "--time-cap must be a whole number of seconds, got '$TIME_CAP'" ;; esac
command -v timeout >/dev/null || die "the 'timeout' command (coreutils) is missing"

remaining() { echo $((STARTED + TIME_CAP - $(date +%s))); }

# Run a setup command within the cap, its output in the setup log; die with a one-line error if it fails.
SETUP_LOG="$(mktemp -t hc_device_check_setup.XXXXXX)"
INCOMPLETE=.hc_device_check_incomplete  # marks a venv whose creation has not finished
CREATED=0
setup_step() {
    local what="$1"; shift
    local left; left="$(remaining)"
    [ "$left" -gt 0 ] || die "setup: time cap of ${TIME_CAP} s reached before: $what"
    timeout -k 5 "$left" "$@" >>"$SETUP_LOG" 2>&1
    local rc=$?
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        die "setup failed: $what: the time cap of ${TIME_CAP} s was reached (log: $SETUP_LOG)"
    elif [ "$rc" != 0 ]; then
        die "setup failed: $what ($(grep -v '^\s*$' "$SETUP_LOG" | tail -n 1 | cut -c1-300); log: $SETUP_LOG)"
    fi
}

# ---- 1. the interpreter ------------------------------------------------------------------------------
if [ -n "$PYTHON" ]; then
    PY="$PYTHON"
    HOW="given interpreter"
    command -v "$PY" >/dev/null 2>&1 || [ -x "$PY" ] || die "--python $PY: no such interpreter"
elif [ -x "$VENV/bin/python" ] && [ ! -e "$VENV/$INCOMPLETE" ]; then
    PY="$VENV/bin/python"
    HOW="reused venv $VENV"
else
    HOW="venv $VENV created from the wheels in $WHEEL_DIR"
    [ -d "$WHEEL_DIR" ] || die "no venv at $VENV and no wheel folder $WHEEL_DIR (set HC_WHEEL_DIR or --wheel-dir, or HC_PYTHON)"
    command -v "$BASE_PYTHON" >/dev/null 2>&1 || die "--base-python $BASE_PYTHON: no such interpreter"
    [ -e "$VENV/$INCOMPLETE" ] && rm -rf "$VENV"  # left by a setup of this script that did not finish
    log "creating $VENV on top of $BASE_PYTHON's packages and the wheels in $WHEEL_DIR, offline"
    setup_step "create the venv" "$BASE_PYTHON" -m venv --without-pip "$VENV"
    touch "$VENV/$INCOMPLETE"
    PY="$VENV/bin/python"
    # The base's site-packages go on the venv's path (after its own) through a .pth file, so its torch
    # and pip are used -- also when the base is itself a venv, which --system-site-packages would skip
    # (the H200 image's python3 is one).
    site_dir="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>>"$SETUP_LOG")" \
        || die "setup failed: the new venv's python does not run (log: $SETUP_LOG)"
    "$BASE_PYTHON" -c 'import site, sysconfig; print("\n".join(dict.fromkeys(site.getsitepackages() + [sysconfig.get_paths()[k] for k in ("purelib", "platlib")])))' \
        >"$site_dir/_hc_base_site_packages.pth" 2>>"$SETUP_LOG" || die "setup failed: cannot list $BASE_PYTHON's site packages"
    "$PY" -m pip --version >/dev/null 2>&1 || die "setup failed: $BASE_PYTHON has no pip to install with"
    PIP=("$PY" -m pip install --no-index --find-links "$WHEEL_DIR" --no-deps --no-build-isolation
         --disable-pip-version-check --no-input)
    if ! "$PY" -c "import torch" >/dev/null 2>&1; then
        # torch only from a wheel in the folder, pinned to that file's exact version: never a resolved one
        mapfile -t torch_wheels < <(find "$WHEEL_DIR" -maxdepth 1 -name 'torch-*.whl' | sort)
        [ "${#torch_wheels[@]}" = 1 ] || die "$BASE_PYTHON has no torch and $WHEEL_DIR holds ${#torch_wheels[@]} torch wheels (need exactly one)"
        torch_version="$(basename "${torch_wheels[0]}" | cut -d- -f2)"
        setup_step "install torch==$torch_version from $WHEEL_DIR" \
            "$PY" -m pip install --no-index --find-links "$WHEEL_DIR" --disable-pip-version-check "torch==$torch_version"
    fi
    # Everything else in the folder, without dependency resolution: it can never replace torch, and a
    # missing requirement shows up in the import check below.
    mapfile -t others < <(find "$WHEEL_DIR" -maxdepth 1 \( -name '*.whl' -o -name '*.tar.gz' -o -name '*.zip' \) \
                          ! -name 'torch-*' ! -name 'heartcascade-*' | sort)
    if [ "${#others[@]}" -gt 0 ]; then
        setup_step "install ${#others[@]} packages from $WHEEL_DIR" "${PIP[@]}" "${others[@]}"
    fi
    setup_step "install heartcascade (editable) into $VENV" "${PIP[@]}" -e "$REPO"
    CREATED=1
fi
# The checkout's code wins over any installed copy (also in hc_benchmark's worker processes).
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# imports heartcascade and its requirements (a broken install fails here), then resolves the device
left="$(remaining)"
[ "$left" -gt 0 ] || die "setup: time cap of ${TIME_CAP} s reached before the import check"
DEVICE="$(timeout -k 5 "$left" "$PY" -m heartcascade.benchmark.device_check check --device "$DEVICE" 2>>"$SETUP_LOG")"
rc=$?
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    die "setup failed: the import check reached the time cap of ${TIME_CAP} s"
elif [ "$rc" != 0 ]; then
    die "setup failed: $(grep -v '^\s*$' "$SETUP_LOG" | tail -n 1 | cut -c1-400)"
fi
[ "$CREATED" = 1 ] && rm -f "$VENV/$INCOMPLETE"
SETUP_S=$(($(date +%s) - STARTED))
[ "$SMOKE" = 1 ] || [ "$SETUP_ONLY" = 1 ] || [ "$DEVICE" != cpu ] || log "warning: the full check on a CPU takes hours; use --smoke, or a GPU"

# ---- 2. measurements ---------------------------------------------------------------------------------
if [ -z "$WORK" ]; then
    WORK="$(mktemp -d -t hc_device_check.XXXXXX)"
    trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK" || die "cannot create the work folder $WORK"
# inductor's kernels are compiled into this run's own cache: a half-written shared cache left by a killed
# compile ("file too short") would otherwise fail every later compiled step on the machine
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$WORK/inductor_cache}"
EAGER="$WORK/eager.jsonl"
COMPILED="$WORK/compile.jsonl"
: >"$EAGER"
: >"$COMPILED"
if [ -n "$OUTPUT" ]; then
    : >"$OUTPUT" || die "cannot write --output $OUTPUT"
fi

# Print a record on stdout and into --output.
emit() {
    if [ -n "$OUTPUT" ]; then printf '%s\n' "$1" | tee -a "$OUTPUT"; else printf '%s\n' "$1"; fi
}
SETUP_RECORD="$("$PY" -m heartcascade.benchmark.device_check setup --how "$HOW" --setup-s "$SETUP_S" \
    --device "$DEVICE" 2>>"$SETUP_LOG")" || die "could not describe the setup: $(tail -n 1 "$SETUP_LOG")"
emit "$SETUP_RECORD"
rm -f "$SETUP_LOG"
[ "$SETUP_ONLY" = 1 ] && exit 0

SUMMARY_RESERVE=20  # seconds kept for the summary records
CUT=()
# hc_benchmark within what is left of the cap: its JSON lines (only those) to stdout, --output and $1.
run_benchmark() {
    local name="$1" records="$2"; shift 2
    local left=$(($(remaining) - SUMMARY_RESERVE))
    if [ "$left" -lt 15 ]; then
        CUT+=(--cut "$name=time cap of ${TIME_CAP} s reached before this run")
        log "$name run skipped: the time cap is reached"
        return
    fi
    log "$name run (at most ${left} s): hc_benchmark $*"
    # hc_benchmark's own --timeout (per section) ends first, so a cut section's records still come out
    timeout -k 10 "$left" "$PY" -m heartcascade.cli.benchmark "$@" --device "$DEVICE" --cases ct \
        --work "$WORK/bench" --timeout "$((left > 30 ? left - 10 : left))" \
        | grep --line-buffered '^{' | tee -a "$records" ${OUTPUT:+"$OUTPUT"}
    local rc="${PIPESTATUS[0]}"
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        CUT+=(--cut "$name=time cap of ${TIME_CAP} s reached during this run")
    elif [ "$rc" != 0 ]; then
        log "$name run: hc_benchmark exited with status $rc (its error records say why)"
    fi
}

NN=(--compare-nnunet)
[ -n "$NNUNET_PYTHON" ] && NN+=(--nnunet-python "$NNUNET_PYTHON")
SHARED=()
[ -n "$SHARED_DATA" ] && SHARED=(--shared-data "$SHARED_DATA")
# the compile run reuses the data and plans of the eager run and measures only the loader and training
COMPILE_SKIP=(--skip preprocessing,memory,predict,inprocess,nnunet)
if [ "$SMOKE" = 1 ]; then
    STEPS=1,2,3,4
    COMPILE_STEPS=4  # inductor compiles each graph for tens of CPU seconds: one step shows the path works
    run_benchmark eager "$EAGER" --quick --skip memory --roi reference --amp bf16 "${NN[@]}" "${SHARED[@]}" \
        --steps "$STEPS" --train-warmup 1 --train-iterations 1 --loader-batches 2
    run_benchmark compile "$COMPILED" --quick "${COMPILE_SKIP[@]}" --amp bf16 --compile "${SHARED[@]}" \
        --steps "$COMPILE_STEPS" --train-warmup 1 --train-iterations 1 --loader-batches 2
else
    STEPS=1,2,3,4
    COMPILE_STEPS=1,2,3,4
    run_benchmark eager "$EAGER" --preset paper --skip memory --roi reference --amp bf16 "${NN[@]}" "${SHARED[@]}" \
        --steps "$STEPS" --train-warmup 1 --train-iterations 3
    # warm-up iterations compile (steps 2-3 have a few subvolume shapes, each its own graph)
    run_benchmark compile "$COMPILED" --preset paper "${COMPILE_SKIP[@]}" --amp bf16 --compile "${SHARED[@]}" \
        --steps "$COMPILE_STEPS" --train-warmup 3 --train-iterations 3 --loader-batches 4
fi

# ---- 3. summary ----------------------------------------------------------------------------------------
SUMMARY="$WORK/summary.jsonl"
SMOKE_FLAG=()
[ "$SMOKE" = 1 ] && SMOKE_FLAG=(--smoke)
timeout 60 "$PY" -m heartcascade.benchmark.device_check summary --eager "$EAGER" --compile "$COMPILED" \
    --steps "$STEPS" --compile-steps "$COMPILE_STEPS" --started "$STARTED" --time-cap "$TIME_CAP" \
    "${SMOKE_FLAG[@]}" "${CUT[@]}" >"$SUMMARY"
STATUS=$?
[ -n "$OUTPUT" ] && cat "$SUMMARY" >>"$OUTPUT"
cat "$SUMMARY"
if [ "$STATUS" = 0 ]; then
    log "done in $(($(date +%s) - STARTED)) s"
else
    log "incomplete (exit status $STATUS): see the device_check_summary record"
fi
exit "$STATUS"
