#!/usr/bin/env bash
# One run of every baseline and of QuorumKV, printed as one markdown table.
#
#   benches/compare.sh                  # 20 s per measurement, about 10 minutes in all
#   DURATION=5 SKIP_ETCD=1 benches/compare.sh
#
# Measures, at concurrency 64 and 1, with VALUE_BYTES (100) values and N=3, R=W=2:
#   ceiling      QUIC + mutual TLS fan-out to 3 echo processes, done at 2 replies
#   raw-quic     one QUIC request/reply to 1 echo process
#   raw-sled     sled inserts, durable (Db::flush + fdatasync, group commit)
#   quorumkv     a local 3-node cluster: write-only dw=1, write-only dw=0, read-only R=2
#   etcd         a local 3-member etcd cluster: write-only, read-only (linearizable)
# Each QuorumKV measurement starts a fresh local cluster (and stops it); read-only runs load
# RECORDS records first (not measured). etcd needs etcd and protoc: they are installed from
# Debian's packages by benches/etcd.sh's etcd_install; SKIP_ETCD=1 leaves etcd out.
#
# Environment: DURATION (seconds per measurement, 20), WARMUP (seconds, 1), RECORDS (10000),
# VALUE_BYTES (100), CONCURRENCY ("64 1"), SKIP_ETCD. Data goes to temporary directories
# under $TMPDIR (default /tmp), which should be on the disk you want to measure (not tmpfs).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
# shellcheck source=benches/etcd.sh
source benches/etcd.sh

DURATION=${DURATION:-20}
WARMUP=${WARMUP:-1}
RECORDS=${RECORDS:-10000}
VALUE_BYTES=${VALUE_BYTES:-100}
CONCURRENCY=${CONCURRENCY:-64 1}
SKIP_ETCD=${SKIP_ETCD:-}

features=()
if [[ -z "$SKIP_ETCD" ]]; then
    etcd_install
    features=(--features etcd)
fi
cargo build --release -p quorumkv-node -p quorumkv-bench --bins "${features[@]}" >&2
bench=target/release/quorumkv-bench

results=$(mktemp -d -t quorumkv-bench-compare-XXXXXX)
cleanup() {
    etcd_stop
    rm -rf "$results"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

common=(--duration "$DURATION" --warmup "$WARMUP" --value-bytes "$VALUE_BYTES" --records "$RECORDS")
count=0

# measure LABEL ARGS...: runs one measurement, keeps its JSON report and the command.
measure() {
    local label=$1
    shift
    count=$((count + 1))
    local file
    file=$(printf '%s/%02d.json' "$results" "$count")
    echo "[$count] $label: $bench $* ${common[*]}" >&2
    if "$bench" "$@" "${common[@]}" --json >"$file.tmp" 2>"$file.err"; then
        python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); r["label"]=sys.argv[2]; r["command"]=sys.argv[3]; json.dump(r, open(sys.argv[4], "w"))' \
            "$file.tmp" "$label" "quorumkv-bench $* ${common[*]}" "$file"
    else
        echo "    failed: $(tail -n 3 "$file.err")" >&2
        python3 -c 'import json,sys; json.dump({"label":sys.argv[1],"command":sys.argv[2],"failed":True}, open(sys.argv[3],"w"))' \
            "$label" "quorumkv-bench $* ${common[*]}" "$file"
    fi
}

for c in $CONCURRENCY; do
    measure "quorum ceiling (QUIC, 3 echo, done at 2)" ceiling --replicas 3 --quorum 2 --concurrency "$c"
    measure "raw QUIC (1 echo)" raw-quic --concurrency "$c"
    measure "raw sled, durable (group commit)" raw-sled --durable --concurrency "$c"
    measure "QuorumKV write-only, W=2 dw=1" run --local 3 --workload write --w 2 --dw 1 --concurrency "$c"
    measure "QuorumKV write-only, W=2 dw=0" run --local 3 --workload write --w 2 --dw 0 --concurrency "$c"
    measure "QuorumKV read-only, R=2" run --local 3 --workload c --r 2 --load --concurrency "$c"
done
if [[ -z "$SKIP_ETCD" ]]; then
    etcd_start
    for c in $CONCURRENCY; do
        measure "etcd write-only (3 members)" etcd --endpoints "$ETCD_ENDPOINTS" --workload write --concurrency "$c"
        measure "etcd read-only, linearizable" etcd --endpoints "$ETCD_ENDPOINTS" --workload c --load --concurrency "$c"
    done
fi

python3 - "$results" <<'PY'
import glob, json, os, sys

rows = [json.load(open(path)) for path in sorted(glob.glob(os.path.join(sys.argv[1], "[0-9]*.json")))]
print("| measurement | concurrency | ops/s | p50 µs | p99 µs | p99.9 µs | max µs | errors |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for r in rows:
    if r.get("failed"):
        print(f"| {r['label']} | | failed | | | | | |")
        continue
    # Every measurement here has one operation kind.
    op = next(iter(r["operations"].values()), {})
    lat = op.get("latency_us", {})
    print(f"| {r['label']} | {r['config']['concurrency']} | {r['throughput_ops_per_sec']:,.0f} "
          f"| {lat.get('p50', '')} | {lat.get('p99', '')} | {lat.get('p99_9', '')} "
          f"| {lat.get('max', '')} | {r['errors']} |")
print()
print("Commands:")
print()
for r in rows:
    print(f"    {r['command']}")
PY
load=$(cut -d' ' -f1-3 /proc/loadavg)
echo
echo "Machine: $(nproc) cores, $(uname -sr), load average $load at the end; values ${VALUE_BYTES} B, ${DURATION} s per measurement after ${WARMUP} s warmup."
