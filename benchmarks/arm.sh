#!/usr/bin/env bash
# benchmarks/arm.sh [MODEL.onnx] -- does a (compressed) ONNX model run correctly on aarch64 (ARM64)?
#
# Runs MODEL under onnxruntime for aarch64 (the manylinux aarch64 wheel from PyPI) inside an arm64
# Debian bookworm root, emulated on this x86-64 machine by Debian's qemu-user-static, and checks
# that its outputs equal those of the x86-64 run in the project's .venv on the same inputs
# (benchmarks/arm_check.py: max abs diff <= 1e-4 * (1 + max |x86 output|) per output).
# Exit 0 on pass, 1 on fail. This checks correctness only: speed under emulation means nothing.
#
# Default MODEL: out/mnist_cnn_lowrank.onnx (what `make demo` writes; made here if missing), fed
# the first ARM_BATCH (100) images of models/mnist_test.npz. Other models get seeded random inputs
# shaped by their inputs, dynamic first axis ARM_BATCH (4). Run from the repo root, as root.
#
# Set-up it does itself, idempotently (each step is skipped when already done):
#   1. apt-get install qemu-user-static binfmt-support debootstrap, if missing;
#   2. registers qemu-aarch64 with binfmt_misc if it can (mounting /proc/sys/fs/binfmt_misc first);
#   3. debootstrap --foreign --arch=arm64 bookworm (minbase + python3, python3-venv, python3-pip)
#      into ARM_ROOT (default ~/.cache/onnx-lowrank/arm64-root, outside the repo), then its second
#      stage run under qemu inside the root;
#   4. a venv /opt/ort in the root with onnxruntime pinned to the .venv's version (the nearest
#      version that has an aarch64 wheel if that one has none: said so) and numpy, pip-installed
#      by the arm64 pip itself.
# Where binfmt_misc cannot be used (some containers), arm64 programs cannot start other arm64
# programs, so the second stage and the arm64 pip are impossible: the script then unpacks the root's
# packages on the host (dpkg-deb -x), installs the aarch64 wheels with the host pip
# (--platform manylinux_2_28_aarch64 --target), and runs the arm64 python explicitly as
# `chroot ROOT /usr/bin/qemu-aarch64-static /usr/bin/python3 ...`. ARM_QEMU=explicit forces that.
#
# Time, measured on a 2-core x86-64 VM: first set-up ~21 min (apt 30 s, debootstrap first stage
# 55 s, emulated second stage 15 min 23 s, emulated pip 2 min 15 s); later runs ~30 s, of which the
# emulated onnxruntime run is ~20 s. ARM_QEMU=explicit (the no-binfmt path above) sets up in
# ~1 min 20 s instead, at the price of an unconfigured root. Logs: ${ARM_ROOT}-logs/.
#
# Environment: ARM_ROOT (arm64 root), ARM_MIRROR (Debian mirror), ARM_BATCH, ARM_QEMU=auto|explicit,
# ARM_QEMU_CPU (qemu CPU model for the run, e.g. cortex-a53; default qemu's "max"),
# ARM_KEEP=1 (keep the work dir inside the root).
set -Eeuo pipefail

STEP="start"
LOG=""
# shellcheck disable=SC2317  # (called from the ERR trap)
on_err() {  # one clear line, from the main shell only (not again from each subshell)
    local rc=$1 line=$2 cmd=${3%%$'\n'*}
    [[ $BASHPID == "$$" ]] || exit "$rc"
    ((${#cmd} <= 100)) || cmd="${cmd:0:100}..."
    echo "arm.sh: error: ${STEP} failed (exit ${rc}, line ${line}: ${cmd})${LOG:+; log: ${LOG}}" >&2
    exit "$rc"
}
trap 'on_err $? $LINENO "$BASH_COMMAND"' ERR
die() { echo "arm.sh: error: $*" >&2; exit 2; }
say() { echo "==> $*"; }
step() { STEP=$1; LOG=${2:-}; say "$1"; }
elapsed() { local s=$(( SECONDS - $1 )); printf '%dm%02ds' $((s / 60)) $((s % 60)); }

T0=$SECONDS
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
MODEL_ARG=${1:-}
[[ $# -le 1 ]] || die "usage: benchmarks/arm.sh [MODEL.onnx]"
[[ -z $MODEL_ARG ]] || MODEL_ARG=$(realpath -- "$MODEL_ARG")
cd "$REPO"

ROOT=${ARM_ROOT:-$HOME/.cache/onnx-lowrank/arm64-root}
ROOT=$(realpath -m -- "$ROOT")
MIRROR=${ARM_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
QEMU_MODE=${ARM_QEMU:-auto}
LOGS=${ROOT}-logs
QEMU=/usr/bin/qemu-aarch64-static
VENV_PY=.venv/bin/python

[[ $EUID -eq 0 ]] || die "run as root (apt-get, debootstrap and chroot need it)"
[[ -x $VENV_PY ]] || die "no $VENV_PY: run 'make setup' first"
case $ROOT in
    / | "$HOME" | "$REPO" | "$REPO"/*) die "ARM_ROOT=$ROOT: choose a folder of its own, outside the repo" ;;
esac
[[ $QEMU_MODE == auto || $QEMU_MODE == explicit ]] || die "ARM_QEMU must be auto or explicit"
mkdir -p "$(dirname "$ROOT")" "$LOGS"

# One arm.sh at a time per root: a second one waits.
exec 9>"${ROOT}.lock"
flock -n 9 || { say "another arm.sh is using $ROOT: waiting"; flock 9; }

# --- the model ----------------------------------------------------------------------------------
DATA_ARGS=()
if [[ -z $MODEL_ARG ]]; then
    MODEL=$REPO/out/mnist_cnn_lowrank.onnx
    if [[ ! -f $MODEL ]]; then
        step "making the default model $MODEL" "$LOGS/convert.log"
        mkdir -p out
        .venv/bin/onnx-lowrank convert models/mnist_cnn.onnx out/mnist_cnn_lowrank.onnx --eps 0.005 \
            --calib models/mnist_calib.npz --labels labels >"$LOG" 2>&1
    fi
    DATA_ARGS=(--data models/mnist_test.npz --batch "${ARM_BATCH:-100}")
else
    MODEL=$MODEL_ARG
    [[ -f $MODEL ]] || die "no such model: $MODEL"
    DATA_ARGS=(--batch "${ARM_BATCH:-4}")
fi

# --- 1. host packages ---------------------------------------------------------------------------
MISSING=()
for p in qemu-user-static binfmt-support debootstrap; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || MISSING+=("$p")
done
if ((${#MISSING[@]})); then
    step "installing ${MISSING[*]} (apt-get)" "$LOGS/apt.log"
    t=$SECONDS
    { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        "${MISSING[@]}"; } >"$LOG" 2>&1
    say "   done in $(elapsed $t)"
fi

# --- 2. binfmt_misc -----------------------------------------------------------------------------
BINFMT=0
BINFMT_WHY="ARM_QEMU=explicit"
BM=/proc/sys/fs/binfmt_misc
if [[ $QEMU_MODE == auto ]]; then
    [[ -e $BM/status ]] || mount -t binfmt_misc binfmt_misc "$BM" 2>/dev/null || true
    if [[ ! -e $BM/status ]]; then
        BINFMT_WHY="$BM cannot be mounted here"
    else
        grep -qx enabled "$BM/qemu-aarch64" 2>/dev/null ||
            update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
        if grep -qx enabled "$BM/qemu-aarch64" 2>/dev/null; then
            BINFMT=1
        else
            BINFMT_WHY="qemu-aarch64 cannot be registered in $BM"
        fi
    fi
fi

# Programs in the root get /proc, mounted in a private mount namespace (gone when they exit), but
# not /sys: with both, onnxruntime's cpuinfo reads the host's x86 /proc/cpuinfo (qemu 7.2 does not
# fake it for aarch64) next to /sys's CPU lists and `import onnxruntime` dies with SIGSEGV; with
# /sys absent it just warns "cpuinfo_initialize failed" and runs.
if unshare --mount --propagation private true 2>/dev/null; then UNSHARE=1; else UNSHARE=0; fi
in_root() {  # in_root PROGRAM ARGS...: run an arm64 program inside the root
    local pre=()
    ((BINFMT)) || pre=("$QEMU")
    local envs=(env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/root LANG=C.UTF-8
                ${PYTHONPATH_ROOT:+PYTHONPATH=$PYTHONPATH_ROOT} ${ARM_QEMU_CPU:+QEMU_CPU=$ARM_QEMU_CPU})
    # the host's env clears the environment: the root's /usr/bin/env is arm64, and without binfmt
    # only the first program (qemu's) can be arm64.
    if ((UNSHARE)); then
        # shellcheck disable=SC2016  # (expanded by that inner sh)
        "${envs[@]}" unshare --mount --propagation private -- /bin/sh -c '
            r=$1; shift
            mount -t proc proc "$r/proc" || echo "arm.sh: warning: could not mount /proc in the root" >&2
            exec chroot "$r" "$@"' sh "$ROOT" "${pre[@]}" "$@"
    else
        "${envs[@]}" chroot "$ROOT" "${pre[@]}" "$@"
    fi
}

# --- 3. the arm64 Debian root -------------------------------------------------------------------
if [[ -e $ROOT/.olr-stage2-started && ! -e $ROOT/.olr-stage2 ]]; then
    say "a previous second stage did not finish: making the root again"
    rm -f "$ROOT/.olr-stage1"
fi
if [[ ! -e $ROOT/.olr-stage1 ]]; then
    if grep -q " $ROOT/" /proc/mounts; then
        die "something is mounted below $ROOT (see /proc/mounts): unmount it first"
    fi
    step "debootstrap first stage (arm64 $SUITE, downloads ~60 MB) into $ROOT" "$LOGS/debootstrap-1.log"
    t=$SECONDS
    rm -rf --one-file-system "$ROOT"
    debootstrap --arch=arm64 --foreign --variant=minbase \
        --include=python3,python3-venv,python3-pip,ca-certificates "$SUITE" "$ROOT" "$MIRROR" >"$LOG" 2>&1
    touch "$ROOT/.olr-stage1"
    say "   done in $(elapsed $t)"
fi
install -m 755 "$QEMU" "$ROOT/usr/bin/qemu-aarch64-static"  # for the explicit path, and non-F binfmt
if ((BINFMT)) && ! in_root /bin/true 2>/dev/null; then
    BINFMT=0
    BINFMT_WHY="qemu-aarch64 is registered but chroot $ROOT /bin/true still fails"
fi
if ((BINFMT)); then
    say "qemu: binfmt_misc (arm64 programs start transparently)"
else
    say "qemu: explicit '$QEMU' per command ($BINFMT_WHY)"
fi

if [[ ! -e $ROOT/.olr-stage2 && ! -e $ROOT/.olr-unpacked ]]; then
    if ((BINFMT)); then
        step "debootstrap second stage, emulated (the slow part of the first set-up)" "$LOGS/debootstrap-2.log"
        t=$SECONDS
        touch "$ROOT/.olr-stage2-started"
        in_root /debootstrap/debootstrap --second-stage >"$LOG" 2>&1
        touch "$ROOT/.olr-stage2"
    else
        # Without binfmt, the second stage (arm64 dpkg running arm64 maintainer scripts) cannot run:
        # unpack the packages on the host instead. Not configured, but enough to run python3.
        step "unpacking the root's packages on the host (no binfmt: no second stage)" "$LOGS/unpack.log"
        t=$SECONDS
        for deb in "$ROOT"/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$ROOT"; done >"$LOG" 2>&1
        touch "$ROOT/.olr-unpacked"
    fi
    say "   done in $(elapsed $t)"
fi

# --- 4. onnxruntime + numpy for aarch64 ---------------------------------------------------------
STEP="reading onnxruntime's and numpy's versions in .venv"
X86_VERSIONS=$("$VENV_PY" -c 'import onnxruntime, numpy; print(onnxruntime.__version__, numpy.__version__)')
read -r X86_ORT X86_NP <<<"$X86_VERSIONS"
ARM_PYVER=$(basename "$(readlink -f "$ROOT/usr/bin/python3")")   # python3.11
ARM_PYVER=${ARM_PYVER#python}
if [[ -e $ROOT/.olr-stage2 ]]; then  # a real Debian root: a venv, filled by the arm64 pip itself
    ARM_PY=/opt/ort/bin/python
    PYTHONPATH_ROOT=""
    # The host's CA bundle, which may hold a TLS proxy's certificate that the root's lacks.
    PIP=(in_root "$ARM_PY" -m pip --cert /etc/ssl/olr-host-ca.crt --disable-pip-version-check)
    PIPTAGS=()
else                                  # host pip, told to fetch aarch64 wheels into a folder
    ARM_PY=/usr/bin/python3
    PYTHONPATH_ROOT=/opt/ort-site
    PIP=("$VENV_PY" -m pip)
    PIPTAGS=(--platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64
             --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64
             --implementation cp --python-version "$ARM_PYVER" --only-binary=:all:)
fi
STAMP=$ROOT/opt/.olr-ort-for-$X86_ORT-$X86_NP
if [[ ! -e $STAMP ]]; then
    step "installing onnxruntime (aarch64 wheel from PyPI) and numpy in the root" "$LOGS/pip.log"
    t=$SECONDS
    cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
    cp -L "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" "$ROOT/etc/ssl/olr-host-ca.crt"
    : >"$LOG"
    if [[ -e $ROOT/.olr-stage2 && ! -x $ROOT$ARM_PY ]]; then
        in_root /usr/bin/python3 -m venv /opt/ort >>"$LOG" 2>&1
    fi
    VERSIONS=$("${PIP[@]}" index versions onnxruntime "${PIPTAGS[@]}" 2>>"$LOG" |
               sed -n 's/^Available versions: //p')
    [[ -n $VERSIONS ]] || { LOG=$LOGS/pip.log; false; }
    ORT_PIN=$("$VENV_PY" - "$X86_ORT" "$VERSIONS" <<'EOF'
import sys
from packaging.version import Version
want, versions = Version(sys.argv[1]), [Version(v) for v in sys.argv[2].split(", ")]
if want in versions:
    print(want)
else:  # nearest: the newest older one, else the oldest newer one
    older = [v for v in versions if v < want]
    print(max(older) if older else min(versions))
EOF
)
    if [[ $ORT_PIN != "$X86_ORT" ]]; then
        say "   NOTE: no aarch64 wheel of onnxruntime $X86_ORT for python $ARM_PYVER; using the nearest, $ORT_PIN"
    else
        say "   onnxruntime $ORT_PIN has an aarch64 wheel: pinned to the x86 version"
    fi
    if [[ -e $ROOT/.olr-stage2 ]]; then TARGET=(); else TARGET=(--target "$ROOT/opt/ort-site" --upgrade); fi
    "${PIP[@]}" install "${PIPTAGS[@]}" "${TARGET[@]}" "onnxruntime==$ORT_PIN" "numpy==$X86_NP" >>"$LOG" 2>&1 ||
        { say "   numpy $X86_NP not installable there: letting pip choose numpy";
          "${PIP[@]}" install "${PIPTAGS[@]}" "${TARGET[@]}" "onnxruntime==$ORT_PIN" numpy >>"$LOG" 2>&1; }
    rm -f "$ROOT"/opt/.olr-ort-for-*
    touch "$STAMP"
    say "   done in $(elapsed $t)"
fi
SETUP_TIME=$(elapsed "$T0")

# --- 5. the check -------------------------------------------------------------------------------
step "x86-64 run of $MODEL"
mkdir -p "$ROOT/tmp"
WORK=$(mktemp -d "$ROOT/tmp/olr-check.XXXXXX")
if [[ ${ARM_KEEP:-0} == 1 ]]; then say "   work dir kept: $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi
cp benchmarks/arm_check.py "$WORK/"
"$VENV_PY" benchmarks/arm_check.py prepare "$MODEL" "$WORK" "${DATA_ARGS[@]}"

step "aarch64 run (emulated; 'Error in cpuinfo' lines are expected: no /sys in the root, see in_root)"
t=$SECONDS
W=${WORK#"$ROOT"}
in_root "$ARM_PY" "$W/arm_check.py" run "$W"
say "   emulated run took $(elapsed $t) (meaningless as a speed)"

step "comparing"
STEP="the comparison"
if "$VENV_PY" benchmarks/arm_check.py compare "$WORK"; then RC=0; else RC=$?; fi
say "set-up $SETUP_TIME, total $(elapsed "$T0")"
if ((RC == 1)); then
    echo "arm.sh: FAIL: aarch64 outputs differ from x86-64 beyond tolerance (table above)" >&2
elif ((RC != 0)); then
    echo "arm.sh: error: the comparison itself failed (exit $RC)" >&2
fi
exit "$RC"
