#!/usr/bin/env bash
# `make fuzz`: runs each libFuzzer target for SECONDS on its seeds (OUT/seeds/<target>, kept as they
# are) and its corpus (OUT/corpus/<target>, where it adds the inputs it finds), then prints the
# executions of each. A crash, leak, sanitizer report or timeout leaves its input under OUT/crashes
# and fails the run after the other targets had their turn.
# usage: fuzz/run.sh OUT SECONDS TARGET... (extra libFuzzer flags in $FUZZ_ARGS)
set -uo pipefail
out=$1 seconds=$2
shift 2
failed=()
summary=()
for t in "$@"; do
    mkdir -p "$out/corpus/$t" "$out/crashes"
    log="$out/$t.log"
    echo "fuzz_$t: up to ${seconds} s (log: $log)"
    start=$SECONDS
    # shellcheck disable=SC2086 # FUZZ_ARGS is a list of flags
    "$out/fuzz_$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$out/crashes/$t-" ${FUZZ_ARGS:-} "$out/corpus/$t" "$out/seeds/$t" >"$log" 2>&1
    rc=$?
    wall=$((SECONDS - start))
    execs=$(grep -o 'number_of_executed_units: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$')
    line=$(printf "fuzz_%-10s %10s executions in %5d s" "$t" "${execs:-?}" "$wall")
    if [ $rc -ne 0 ]; then
        failed+=("$t")
        line="$line  FAILED (exit $rc)"
        echo "---- fuzz_$t failed; the end of $log:"
        grep -v '^#[0-9]' "$log" | tail -n 40
        ls "$out/crashes/$t-"* 2>/dev/null | sed 's/^/reproducer: /'
    fi
    summary+=("$line")
done
echo "---- $(date -u '+%Y-%m-%d %H:%M UTC'), load average $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores"
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzzing found problems in: ${failed[*]} (inputs in $out/crashes; rerun one with $out/fuzz_<target> <input>)"
    exit 1
fi
