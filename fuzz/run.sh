#!/bin/sh
# Runs sup's fuzz targets one after another, each for SECONDS (default 600),
# starting from the seeds in fuzz/seeds, and prints the executions of each.
#   fuzz/run.sh [SECONDS] [TARGET...]
# Needs a nightly toolchain and cargo-fuzz (cargo install cargo-fuzz).
# A crash leaves its input in fuzz/artifacts/TARGET/; make it a regression test.
set -eu
cd "$(dirname "$0")"
secs=${1:-600}
[ $# -gt 0 ] && shift
targets=${*:-config control sdnotify nodeipc loglines}
cargo +nightly fuzz build -O
for t in $targets; do
    mkdir -p "corpus/$t"
    cp -n seeds/"$t"/* "corpus/$t/" 2>/dev/null || true
    log="artifacts/$t.log"
    mkdir -p artifacts
    if cargo +nightly fuzz run -O "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=4096 >"$log" 2>&1; then
        result=ok
    else
        result=CRASH
    fi
    runs=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | tail -1)
    echo "$t: $result: ${runs:-see $log}"
done
