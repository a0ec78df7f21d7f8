# Shared by the benchmark scripts (sourced, not run): the work directory, the processes a
# run started and their cleanup, waiting for a line in a log, and the core-to-core round
# trip (examples/core_rtt.rs) that every rate here follows.

# bench_init TAG HUGE_PREFIX: WORK (a new directory /tmp/vnet-TAG.XXXXXX), PIDS (the
# processes the current run started; the script keeps it up to date), and on exit: every
# process in PIDS killed, the script's own bench_extra_cleanup run if it defines one, WORK
# and the hugepage files /dev/hugepages/HUGE_PREFIX* (DPDK's --file-prefix) removed.
bench_init() {
    [ -n "$2" ] || { echo "bench_init: a hugepage file prefix is required" >&2; exit 2; }
    WORK=$(mktemp -d "/tmp/vnet-$1.XXXXXX")
    PIDS=""
    BENCH_HUGE=$2
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM
}

bench_cleanup() {
    for p in $PIDS; do kill -TERM "$p" 2>/dev/null; done
    sleep 0.5
    for p in $PIDS; do kill -KILL "$p" 2>/dev/null; done
    if declare -F bench_extra_cleanup >/dev/null; then bench_extra_cleanup; fi
    rm -rf "$WORK" /dev/hugepages/"$BENCH_HUGE"*
}

# wait_for FILE PATTERN TIMEOUT_S: until FILE has a line matching PATTERN.
wait_for() {
    local i
    for i in $(seq $(( $3 * 10 ))); do grep -q -- "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
    return 1
}

# The round trip between GUEST_CPU and HOST_CPU now, in ns ("-" if it cannot be measured).
rtt() {
    "$RTT" "$GUEST_CPU" "$HOST_CPU" 0.3 2>/dev/null | sed -n 's/^rtt_ns=\([0-9]*\).*/\1/p' | grep . || echo -
}

# run_stats FILES...: over files of 1-s samples (pps, one per line, one file per run) ->
# "median min max p10 p50 p90 slow n" in pps: the median, smallest and largest of the run
# means; the percentiles of all the samples together; how many of the n samples sat below
# half the p90 (the machine's slow level).
run_stats() {
    local means
    means=$(for f in "$@"; do awk '{s+=$1; n++} END {if (n) printf "%d\n", s/n}' "$f"; done | sort -n)
    cat "$@" | sort -n | awk -v means="$means" '
        {a[NR]=$1}
        END {
            nm = split(means, m, "\n");
            med = (nm % 2) ? m[(nm+1)/2] : (m[nm/2] + m[nm/2+1]) / 2;
            r10 = int(0.1*NR+0.999); r50 = int(0.5*NR+0.999); r90 = int(0.9*NR+0.999);
            if (r10 < 1) r10 = 1;
            slow = 0; for (i = 1; i <= NR; i++) if (a[i] < a[r90]/2) slow++;
            printf "%.1f %d %d %d %d %d %d %d\n", med, m[1], m[nm], a[r10], a[r50], a[r90], slow, NR
        }'
}

# summary FILES...: "median p10 p50 p90" of run_stats, in Mpps.
summary() {
    run_stats "$@" | awk '{printf "%.3f %.3f %.3f %.3f\n", $1 / 1e6, $4 / 1e6, $5 / 1e6, $6 / 1e6}'
}

# record_run WHO ROW SIZE R: runs the script's own `run_one WHO ROW SIZE TAG` (TAG =
# ROW.SIZE.WHO.R, leaving $WORK/TAG.samples) and appends the run's mean, its samples and
# the round trip before it (or FAILED, with the tails of its logs on stderr) to RUNS_LOG.
record_run() {
    local who=$1 row=$2 size=$3 r=$4 tag=$2.$3.$1.$4 before mean
    before=$(rtt)
    if run_one "$who" "$row" "$size" "$tag"; then
        mean=$(awk '{s+=$1; n++} END {printf "%.3f", s/n/1e6}' "$WORK/$tag.samples")
        RUNS_LOG="$RUNS_LOG$row $size $who run $r: $mean Mpps ($(tr '\n' ' ' <"$WORK/$tag.samples")), rtt before ${before} ns"$'\n'
    else
        RUNS_LOG="$RUNS_LOG$row $size $who run $r: FAILED"$'\n'
        tail -n 5 "$WORK/$tag".*.log >&2
        rm -f "$WORK/$tag.samples"
    fi
}

# report_row ROW SIZE THEM: the row's line from the recorded runs, ours against THEM:
# "median (p10/p50/p90)" of each (`summary`) and the ratios ours/THEM at p90 and median.
report_row() {
    local row=$1 size=$2 them=$3 o t om o10 o50 o90 tm t10 t50 t90
    o=$(ls "$WORK/$row.$size.ours".*.samples 2>/dev/null); t=$(ls "$WORK/$row.$size.$them".*.samples 2>/dev/null)
    if [ -z "$o" ] || [ -z "$t" ]; then echo "$row $size: no successful run of one contender"; return; fi
    read -r om o10 o50 o90 <<<"$(summary $o)"; read -r tm t10 t50 t90 <<<"$(summary $t)"
    printf "%-8s %5s  %-34s %-34s %s / %s\n" "$row" "$size" "$om ($o10/$o50/$o90)" "$tm ($t10/$t50/$t90)" \
        "$(awk -v a="$o90" -v b="$t90" 'BEGIN {printf "%.2f", (b > 0 ? a/b : 0)}')" \
        "$(awk -v a="$om" -v b="$tm" 'BEGIN {printf "%.2f", (b > 0 ? a/b : 0)}')"
}
