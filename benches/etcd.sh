#!/usr/bin/env bash
# Runs quorumkv-bench's etcd mode against a three-member etcd cluster on loopback.
#
#   benches/etcd.sh                 # write-only and read-only, concurrency 64 and 1
#   DURATION=5 benches/etcd.sh      # shorter measurements
#
# What it does:
#   1. installs Debian's etcd-server, etcd-client, protobuf-compiler and libprotobuf-dev if
#      missing (the etcd-client crate compiles etcd's .proto files at build time, so the
#      bench's `etcd` feature needs protoc and its well-known types). The Debian package may start a system etcd on port 2379; it is
#      stopped and disabled, and this cluster uses other ports anyway.
#   2. builds quorumkv-bench with `--features etcd` (release profile).
#   3. starts members e1..e3 on 127.0.0.1 (client ports ETCD_BASE_PORT+1..3, peer ports
#      ETCD_BASE_PORT+11..13), data in a temporary directory, all stopped and removed on exit.
#   4. waits until every member reports healthy, then runs the workloads and prints results.
#
# benches/compare.sh sources this file for etcd_install, etcd_start and etcd_stop.
#
# Environment: DURATION (seconds per measurement, default 20), RECORDS (default 10000),
# VALUE_BYTES (default 100), ETCD_BASE_PORT (default 23780), BENCH (a prebuilt binary with
# the etcd feature; skips the build).
set -euo pipefail

ETCD_BASE_PORT=${ETCD_BASE_PORT:-23780}
ETCD_PIDS=()
ETCD_DIR=""

etcd_install() {
    local missing=()
    command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
    command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)
    command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
    # protoc's well-known types (google/protobuf/descriptor.proto, ...), which etcd's .proto
    # files import; Debian ships them apart from the compiler.
    [[ -f /usr/include/google/protobuf/descriptor.proto ]] || missing+=(libprotobuf-dev)
    if ((${#missing[@]})); then
        echo "installing ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    fi
    # A system etcd started by the package would compete for the two cores.
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
        systemctl stop etcd || true
        systemctl disable etcd >/dev/null 2>&1 || true
    elif command -v service >/dev/null 2>&1 && service etcd status >/dev/null 2>&1; then
        service etcd stop >/dev/null 2>&1 || true
    fi
}

# Starts the three members and sets ETCD_ENDPOINTS. Call etcd_stop (or trap it) to clean up.
etcd_start() {
    ETCD_DIR=$(mktemp -d -t quorumkv-bench-etcd-XXXXXX)
    local cluster="" endpoints="" i
    for i in 1 2 3; do
        cluster+="${cluster:+,}e$i=http://127.0.0.1:$((ETCD_BASE_PORT + 10 + i))"
        endpoints+="${endpoints:+,}127.0.0.1:$((ETCD_BASE_PORT + i))"
    done
    for i in 1 2 3; do
        etcd --name "e$i" \
            --data-dir "$ETCD_DIR/e$i" \
            --listen-client-urls "http://127.0.0.1:$((ETCD_BASE_PORT + i))" \
            --advertise-client-urls "http://127.0.0.1:$((ETCD_BASE_PORT + i))" \
            --listen-peer-urls "http://127.0.0.1:$((ETCD_BASE_PORT + 10 + i))" \
            --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_BASE_PORT + 10 + i))" \
            --initial-cluster "$cluster" \
            --initial-cluster-token quorumkv-bench \
            --initial-cluster-state new \
            --log-level warn \
            >"$ETCD_DIR/e$i.log" 2>&1 &
        ETCD_PIDS+=($!)
    done
    ETCD_ENDPOINTS=$endpoints
    export ETCD_ENDPOINTS
    local deadline=$((SECONDS + 60))
    until ETCDCTL_API=3 etcdctl --endpoints="$ETCD_ENDPOINTS" endpoint health >/dev/null 2>&1; do
        if ((SECONDS > deadline)); then
            echo "etcd did not become healthy; logs in $ETCD_DIR" >&2
            tail -n 20 "$ETCD_DIR"/e*.log >&2 || true
            return 1
        fi
        sleep 0.2
    done
    echo "etcd cluster healthy at $ETCD_ENDPOINTS" >&2
}

etcd_stop() {
    local pid
    for pid in "${ETCD_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${ETCD_PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    ETCD_PIDS=()
    if [[ -n "$ETCD_DIR" ]]; then
        rm -rf "$ETCD_DIR"
        ETCD_DIR=""
    fi
}

etcd_main() {
    local root
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    cd "$root"
    local duration=${DURATION:-20} records=${RECORDS:-10000} value_bytes=${VALUE_BYTES:-100}
    etcd_install
    local bench=${BENCH:-}
    if [[ -z "$bench" ]]; then
        cargo build --release -p quorumkv-bench --features etcd >&2
        bench=target/release/quorumkv-bench
    fi
    trap etcd_stop EXIT
    trap 'exit 130' INT TERM
    etcd_start
    local common=(--endpoints "$ETCD_ENDPOINTS" --duration "$duration" --records "$records"
        --value-bytes "$value_bytes")
    local concurrency
    for concurrency in 64 1; do
        echo "\$ $bench etcd --workload write --concurrency $concurrency ${common[*]}"
        "$bench" etcd --workload write --concurrency "$concurrency" "${common[@]}"
        echo
        echo "\$ $bench etcd --workload c --load --concurrency $concurrency ${common[*]}"
        "$bench" etcd --workload c --load --concurrency "$concurrency" "${common[@]}"
        echo
    done
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    etcd_main "$@"
fi
