#!/usr/bin/env bash
# A local multi-node Ray cluster on one machine: a head node and N worker nodes (separate
# raylets), each with its own logical CPUs. Used by tests of multi-node placement.
#   cluster/local_cluster.sh start [N_WORKERS]   -> prints the GCS address, then the job
#                                                   submission (dashboard) address
#   cluster/local_cluster.sh autoscale           -> a head only (0 CPUs) with Ray's autoscaler
#                                                   and the fake multi-node provider: worker
#                                                   nodes start on demand, by the node types of
#                                                   cluster/autoscaling_local.yaml, and go
#                                                   when idle; prints the two addresses
#   cluster/local_cluster.sh kill-node I         -> worker node I lost at once, as when a
#                                                   spot instance is preempted (SIGKILL to
#                                                   its raylet and every process under it)
#   cluster/local_cluster.sh stop                -> stops this cluster, and only it
# RAY_LOCAL_HEAD_CPUS / RAY_LOCAL_WORKER_CPUS (default 2 each): logical CPUs per node; a head
# with 0 keeps all work on the worker nodes.
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
# Its own temp dir: every process of this cluster names it on its command line, which is how
# `stop` finds them. (`ray stop` would kill every Ray instance on the machine, e.g. a test
# session's own.) Short: Ray's socket paths live under it.
TMP="${RAY_LOCAL_TMP:-/tmp/ray_lc}"
# Per-node agent ports: nodes on one machine must not share them, nor with other instances.
# Below Linux's ephemeral range (32768-60999): a port there can be taken at any moment by an
# outgoing connection or another process's random port (at 53102 one was, and the head's
# dashboard agent, then its raylet, failed to start). Above Ray's worker ports (10002-19999).
AGENT_BASE="${RAY_LOCAL_AGENT_PORT_BASE:-23100}"

node_ports() {  # node index -> its agent / metrics / runtime-env ports
    local base=$((AGENT_BASE + 10 * $1))
    echo "--dashboard-agent-listen-port=$base --dashboard-agent-grpc-port=$((base + 1))" \
         "--metrics-export-port=$((base + 2)) --runtime-env-agent-port=$((base + 3))"
}

case "${1:-}" in
  start)
    workers="${2:-1}"
    # shellcheck disable=SC2046
    "$RAY" start --head --port="$PORT" --num-cpus="${RAY_LOCAL_HEAD_CPUS:-2}" --resources='{"local_head": 1}' \
        --temp-dir="$TMP" --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
        $(node_ports 0) --disable-usage-stats >/dev/null
    for i in $(seq 1 "$workers"); do
        # shellcheck disable=SC2046
        "$RAY" start --address="127.0.0.1:$PORT" --num-cpus="${RAY_LOCAL_WORKER_CPUS:-2}" \
            --resources="{\"local_worker_$i\": 1}" $(node_ports "$i") \
            --disable-usage-stats >/dev/null
    done
    echo "127.0.0.1:$PORT"
    echo "http://127.0.0.1:$DASHBOARD_PORT"
    ;;
  autoscale)
    # The autoscaler's nodes join this head's GCS (the provider's default would be port 6379).
    config="$TMP.autoscaling.yaml"
    sed "s|gcs_address: null|gcs_address: 127.0.0.1:$PORT|" cluster/autoscaling_local.yaml \
        > "$config"
    # shellcheck disable=SC2046
    RAY_FAKE_CLUSTER=1 AUTOSCALER_UPDATE_INTERVAL_S="${AUTOSCALER_UPDATE_INTERVAL_S:-1}" \
        "$RAY" start --head --port="$PORT" --num-cpus=0 --autoscaling-config="$config" \
        --temp-dir="$TMP" --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
        $(node_ports 0) --disable-usage-stats >/dev/null
    echo "127.0.0.1:$PORT"
    echo "http://127.0.0.1:$DASHBOARD_PORT"
    ;;
  kill-node)
    [[ -n "${2:-}" ]] || { echo "usage: $0 kill-node I" >&2; exit 2; }
    tree() { local p; for p in "$@"; do echo "$p"; tree $(pgrep -P "$p" || true); done; }
    # The raylet is the one whose static resources hold this node's marker resource.
    raylet=$(pgrep -f -- "raylet.*$TMP.*local_worker_$2,|raylet.*local_worker_$2,.*$TMP" || true)
    [[ -n "$raylet" ]] || { echo "no running worker node $2 in $TMP" >&2; exit 1; }
    kill -KILL $(tree $raylet) 2>/dev/null || true
    ;;
  stop)
    # The processes naming $TMP (GCS, raylets, dashboard, log monitors) and all their
    # descendants (agents, workers, actors): TERM, then KILL what is left after 10 s.
    tree() { local p; for p in "$@"; do echo "$p"; tree $(pgrep -P "$p" || true); done; }
    pids=$(tree $(pgrep -f -- "$TMP" || true) | sort -u)
    [[ -z "$pids" ]] && exit 0
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 1 20); do
        alive=$(ps -o pid= -p $(echo $pids | tr ' ' ,) 2>/dev/null || true)
        [[ -z "$alive" ]] && exit 0
        sleep 0.5
    done
    kill -KILL $alive 2>/dev/null || true
    ;;
  *)
    echo "usage: $0 start [N_WORKERS] | autoscale | kill-node I | stop" >&2
    exit 2
    ;;
esac
