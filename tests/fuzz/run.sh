#!/usr/bin/env bash
# Runs the fuzz targets (libFuzzer, through the `libfuzzer-sys` crate) on the STABLE
# toolchain: the coverage instrumentation libFuzzer needs is LLVM's sanitizer-coverage
# pass, which stable rustc runs with `-Cpasses=sancov-module` and `-Cllvm-args`; only the
# sanitizers themselves (`-Zsanitizer=address`) need nightly, and no target here needs
# one (our code is checked by its own bounds assertions and Rust's; see each target).
# No cargo-fuzz: the few flags it would pass are passed here.
#
#   tests/fuzz/run.sh TARGET|all SECONDS     # run each for SECONDS (wall clock)
#   tests/fuzz/run.sh list                   # the targets
#
# Prints one line per target: executions, crashes (0 or 1: libFuzzer stops at the first),
# corpus size. Exit status 1 if any target crashed, timed out (a hang) or ran out of
# memory; the input is kept under tests/fuzz/artifacts/TARGET/ (FUZZ_ARTIFACTS). The
# corpus grows under tests/fuzz/corpus/TARGET/ (FUZZ_CORPUS); both are git-ignored.
# A crash input replays with: $CARGO_TARGET_DIR/<host>/release/TARGET INPUT
# One libFuzzer process per target (libFuzzer's -jobs mode would write its output to
# fuzz-N.log files in the current directory instead).
# Environment: CARGO_TARGET_DIR (default target/fuzz at the repo root), FUZZ_NICE
# (default 10), FUZZ_TIMEOUT (seconds one input may take before it counts as a hang,
# default 10).
set -euo pipefail

# The whole script is one function, read before it runs: editing this file while a long
# run is in progress cannot change what that run does.
main() {

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
TARGETS=(ring_walk ctrl_parse iotlb_model vhost_handler driver_used driver_rx)

usage() { echo "usage: $0 TARGET|all SECONDS  (targets: ${TARGETS[*]})" >&2; exit 2; }
[ "${1:-}" = list ] && { printf '%s\n' "${TARGETS[@]}"; exit 0; }
[ $# -eq 2 ] || usage
what=$1 secs=$2
[[ "$secs" =~ ^[0-9]+$ ]] || usage
if [ "$what" = all ]; then
    run=("${TARGETS[@]}")
else
    printf '%s\n' "${TARGETS[@]}" | grep -qx -- "$what" || usage
    run=("$what")
fi

if [ -d "${HOME:-/root}/.cargo/bin" ]; then PATH="${HOME:-/root}/.cargo/bin:$PATH"; fi
host=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target/fuzz}
nice_n=${FUZZ_NICE:-10}
# What cargo-fuzz passes for `-s none`, on stable. `--target` keeps the flags off build
# scripts and proc macros (they must not link libFuzzer's coverage hooks).
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
-Cdebug-assertions -Coverflow-checks"
bins=()
for t in "${run[@]}"; do bins+=(--bin "$t"); done
echo "fuzz: building ${run[*]} ($(rustc --version))" >&2
(cd "$here" && nice -n "$nice_n" cargo build --release --locked --target "$host" "${bins[@]}" >&2)

status=0
printf '%-14s %12s %8s %8s %s\n' target executions crashes corpus seconds
for t in "${run[@]}"; do
    corpus="${FUZZ_CORPUS:-$here/corpus}/$t"
    art="${FUZZ_ARTIFACTS:-$here/artifacts}/$t"
    mkdir -p "$corpus" "$art"
    log=$(mktemp)
    rc=0
    nice -n "$nice_n" "$CARGO_TARGET_DIR/$host/release/$t" "$corpus" \
        -max_total_time="$secs" -timeout="${FUZZ_TIMEOUT:-10}" -rss_limit_mb=2048 \
        -max_len=8192 \
        -artifact_prefix="$art/" -print_final_stats=1 >"$log" 2>&1 || rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | awk '{s+=$1} END {print s+0}')
    crashes=0
    if [ $rc -ne 0 ] || grep -qE '^==[0-9]+== ERROR: libFuzzer|^SUMMARY: libFuzzer' "$log"; then
        crashes=1
        status=1
        grep -E 'panicked at|ERROR: libFuzzer|SUMMARY|Test unit written' "$log" | head -n 8 >&2 || true
    fi
    printf '%-14s %12s %8s %8s %s\n' "$t" "$execs" "$crashes" "$(ls "$corpus" | wc -l)" "$secs"
    rm -f "$log"
done
exit $status
}

main "$@"
