#!/usr/bin/env bash
# A local multi-node Ray cluster on one machine: a head node and N worker nodes (separate
# raylets), each with its own logical CPUs. Used by tests of multi-node placement.
#   cluster/local_cluster.sh start [N_WORKERS]   -> prints the GCS address, then the job
#                                                   submission (dashboard) address
#   cluster/local_cluster.sh stop
set -euo pipefail
cd "$(dirname "$0")/.."
RAY="${RAY:-.venv/bin/ray}"
# Loopback-only test cluster on one machine: Ray 2.60 turns token auth on by default for
# `ray start --head`, and nodes and clients started here would each need the token. Off here;
# never for a cluster reachable from a network (the launcher / KubeRay configs keep defaults).
export RAY_AUTH_MODE=disabled
PORT="${RAY_LOCAL_PORT:-6390}"
# Its own dashboard port, so that it never collides with a `ray.init()` instance (8265).
DASHBOARD_PORT="${RAY_LOCAL_DASHBOARD_PORT:-8275}"
case "${1:-}" in
  start)
    workers="${2:-1}"
    "$RAY" start --head --port="$PORT" --num-cpus=2 --resources='{"local_head": 1}' \
        --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
        --disable-usage-stats >/dev/null
    for i in $(seq 1 "$workers"); do
        "$RAY" start --address="127.0.0.1:$PORT" --num-cpus=2 \
            --resources="{\"local_worker_$i\": 1}" --disable-usage-stats >/dev/null
    done
    echo "127.0.0.1:$PORT"
    echo "http://127.0.0.1:$DASHBOARD_PORT"
    ;;
  stop)
    "$RAY" stop --force >/dev/null 2>&1 || true
    ;;
  *)
    echo "usage: $0 start [N_WORKERS] | stop" >&2
    exit 2
    ;;
esac
