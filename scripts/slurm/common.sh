# scripts/slurm/common.sh -- shared by train.sbatch, convert.sbatch and scaling.sbatch.
#
# SOURCED from inside an sbatch script (never executed). It sets up the environment, brings up a
# Ray cluster over the job's nodes and runs the job's main step on the first ("head") node:
#
#   source "$SAGE_ROOT/scripts/slurm/common.sh"
#   sage_setup                 # env, venv, log dir, node list, EXIT trap
#   sage_ray_up                # Ray head on node 0, workers on the rest; exports RAY_ADDRESS, MASTER_ADDR
#   sage_run_main "train" "$SAGE_TRAIN_CMD"   # srun on the head, watched; its exit code is returned
#
# Bring-up, in order: node list from `scontrol show hostnames "$SLURM_JOB_NODELIST"`; each node's
# IP found ON that node (interface SAGE_NODE_IFNAME, else GLOO_SOCKET_IFNAME, else the address its
# hostname resolves to); Ray head started with srun on node 0 (`ray start --block` in the
# background, never waited on); `ray status --address` polled until the head answers (timeout ->
# error naming the head and its log); workers started with srun on the other nodes; polled until
# all N nodes are in the cluster (a worker step that exits, or a node still missing at the
# timeout, is named and fails the job at once); then the main step runs on the head while every
# Ray step is watched: if one dies, the main step is stopped and the job fails. An EXIT trap
# stops every background step (SIGTERM, then SIGKILL) so nothing outlives the job step.
# `ray stop` is never called: it kills every Ray process of the user on the node, including other
# jobs' (and, on the test cluster's emulated nodes, the other node's).
#
# Environment (all optional; defaults in brackets):
#   SAGE_ROOT               repository root on a shared file system [$SLURM_SUBMIT_DIR]
#   SAGE_VENV               virtualenv whose bin/ goes first on PATH [$SAGE_ROOT/.venv if it exists;
#                           "none" = use the PATH as is, e.g. inside a container]
#   SAGE_PYTHON             python interpreter [python from that PATH]
#   SAGE_CONTAINER_IMAGE    pyxis image; when set every srun gets --container-image, --container-name=sage
#                           (one container per node shared by all steps), --container-workdir=$SAGE_ROOT
#                           and --container-mounts=$SAGE_CONTAINER_MOUNTS [unset: no container]
#   SAGE_CONTAINER_MOUNTS   pyxis mounts, e.g. /lustre:/lustre,$HOME:$HOME [unset]
#   NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME   exported to all steps when set (e.g. ib0, eth0) [unset]
#   SAGE_NODE_IFNAME        interface whose IPv4 address is a node's Ray/torch address
#                           [$GLOO_SOCKET_IFNAME if it names one interface]
#   SAGE_RAY_PORT           Ray GCS port on the head [6379]
#   SAGE_RAY_TMPDIR         Ray temp dir: the head's; a worker node uses SAGE_RAY_TMPDIR/<node>, so that
#                           nodes sharing a file system (the test cluster's emulated nodes) never share
#                           Ray's session logs, which each node's log monitor forwards [Ray's default, /tmp/ray]
#   SAGE_RAY_START_ARGS     extra `ray start` arguments, e.g. "--num-gpus=8 --object-store-memory=..." []
#   SAGE_RAY_DASHBOARD      start Ray's dashboard on the head (true/false) [false]
#   SAGE_RAY_AUTH           Ray token authentication: token | disabled [token: RAY_AUTH_TOKEN or
#                           RAY_AUTH_TOKEN_PATH if set, else a fresh random token for this job,
#                           passed to every step in the environment]
#   SAGE_RAY_TIMEOUT        seconds to wait for the head, and then for all workers [180]
#   SAGE_MASTER_PORT        torch.distributed MASTER_PORT [29500]
#   SAGE_LOG_DIR            Ray step logs [$SAGE_ROOT/runs/slurm-$SLURM_JOB_ID]
#   SAGE_WATCH_INTERVAL     seconds between liveness checks of the Ray steps [2]

sage_log() { printf '[sage %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
sage_die() { printf '[sage %(%H:%M:%S)T] ERROR: %s\n' -1 "$*" >&2; exit 1; }

# The node's own IPv4 address; runs ON the node (exported so `srun bash -c sage_node_ip` finds it).
sage_node_ip() {
    local ip=""
    if [ -n "${SAGE_NODE_IFNAME:-}" ]; then
        ip=$(ip -4 -o addr show dev "$SAGE_NODE_IFNAME" 2>/dev/null | awk '{split($4, a, "/"); print a[1]; exit}')
        [ -n "$ip" ] || { echo "no IPv4 address on interface $SAGE_NODE_IFNAME on $(hostname)" >&2; return 1; }
    else
        ip=$(hostname --ip-address 2>/dev/null | awk '{print $1}')
        case "$ip" in ""|127.*) ip=$(hostname -I 2>/dev/null | awk '{print $1}') ;; esac
    fi
    [ -n "$ip" ] || { echo "cannot determine the IP address of $(hostname)" >&2; return 1; }
    echo "$ip"
}
export -f sage_node_ip

sage_setup() {
    [ -n "${SLURM_JOB_ID:-}" ] || sage_die "not inside a Slurm job: submit with sbatch"
    SAGE_ROOT=${SAGE_ROOT:-$SLURM_SUBMIT_DIR}
    cd "$SAGE_ROOT" || sage_die "cannot cd to SAGE_ROOT=$SAGE_ROOT"
    if [ "${SAGE_VENV:-}" != "none" ]; then
        SAGE_VENV=${SAGE_VENV:-$SAGE_ROOT/.venv}
        if [ -d "$SAGE_VENV/bin" ]; then
            export VIRTUAL_ENV=$SAGE_VENV PATH="$SAGE_VENV/bin:$PATH"
        elif [ -z "${SAGE_CONTAINER_IMAGE:-}" ]; then
            sage_log "no virtualenv at $SAGE_VENV; using python from PATH ($(command -v python || echo none))"
        fi
    fi
    SAGE_PYTHON=${SAGE_PYTHON:-python}
    export SAGE_ROOT SAGE_PYTHON
    export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}
    [ -n "${NCCL_SOCKET_IFNAME:-}" ] && export NCCL_SOCKET_IFNAME
    [ -n "${GLOO_SOCKET_IFNAME:-}" ] && export GLOO_SOCKET_IFNAME
    if [ -z "${SAGE_NODE_IFNAME:-}" ] && [ -n "${GLOO_SOCKET_IFNAME:-}" ]; then
        case "$GLOO_SOCKET_IFNAME" in *,*|^*|=*) ;; *) SAGE_NODE_IFNAME=$GLOO_SOCKET_IFNAME ;; esac
    fi
    export SAGE_NODE_IFNAME=${SAGE_NODE_IFNAME:-}

    # Ray's token authentication, set explicitly so that the outcome never depends on whether a
    # ~/.ray/auth_token happens to exist (`ray start --head` turns token auth on when it finds one,
    # while `ray status` and drivers only use it when told). Default: a fresh token for this job.
    case "${SAGE_RAY_AUTH:-token}" in
        token)
            export RAY_AUTH_MODE=token
            if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ]; then
                RAY_AUTH_TOKEN=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
                export RAY_AUTH_TOKEN
            fi ;;
        disabled) export RAY_AUTH_MODE=disabled ;;
        *) sage_die "SAGE_RAY_AUTH must be token or disabled, not '$SAGE_RAY_AUTH'" ;;
    esac

    SAGE_RAY_PORT=${SAGE_RAY_PORT:-6379}
    SAGE_RAY_TIMEOUT=${SAGE_RAY_TIMEOUT:-180}
    SAGE_WATCH_INTERVAL=${SAGE_WATCH_INTERVAL:-2}
    SAGE_LOG_DIR=${SAGE_LOG_DIR:-$SAGE_ROOT/runs/slurm-$SLURM_JOB_ID}
    mkdir -p "$SAGE_LOG_DIR" || sage_die "cannot create SAGE_LOG_DIR=$SAGE_LOG_DIR"

    mapfile -t SAGE_NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    [ "${#SAGE_NODES[@]}" -ge 1 ] || sage_die "empty node list from SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
    SAGE_HEAD=${SAGE_NODES[0]}

    # Per-step srun options: one task on one node, sharing the allocation with the other steps,
    # with all the node's CPUs (else a task/cgroup cluster confines Ray and its actors to 1 CPU).
    # (The smallest per-node CPU count of the job: SLURM_JOB_CPUS_PER_NODE reads like "64(x2),32".)
    local cpn
    cpn=$(echo "${SLURM_JOB_CPUS_PER_NODE:-${SLURM_CPUS_ON_NODE:-}}" | tr ',' '\n' | sed 's/(x[0-9]*)//' \
          | grep -E '^[0-9]+$' | sort -n | head -n 1) || cpn=""
    SAGE_SRUN=(srun --nodes=1 --ntasks=1 --overlap --kill-on-bad-exit=1)
    [ -n "$cpn" ] && SAGE_SRUN+=(--cpus-per-task="$cpn")
    if [ -n "${SAGE_CONTAINER_IMAGE:-}" ]; then
        # One named container per node, shared by the Ray steps and the main step (the driver must
        # see the raylet's socket files under Ray's temp dir). Untested here: no pyxis on these machines.
        SAGE_SRUN+=(--container-image="$SAGE_CONTAINER_IMAGE" --container-name=sage --container-workdir="$SAGE_ROOT")
        [ -n "${SAGE_CONTAINER_MOUNTS:-}" ] && SAGE_SRUN+=(--container-mounts="$SAGE_CONTAINER_MOUNTS")
    fi

    SAGE_STEP_PIDS=()
    SAGE_STEP_NAMES=()
    SAGE_STEP_LOGS=()
    trap sage_cleanup EXIT
    trap 'sage_log "signal received: stopping"; exit 143' TERM INT HUP
    sage_log "job $SLURM_JOB_ID: ${#SAGE_NODES[@]} node(s): ${SAGE_NODES[*]}; root $SAGE_ROOT; logs $SAGE_LOG_DIR"
}

# Stops every background step; keeps the exit status of whatever triggered the EXIT.
sage_cleanup() {
    local rc=$? pid i alive
    trap - EXIT
    set +e
    for pid in "${SAGE_STEP_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for i in 1 2 3 4 5 6 7 8 9 10; do
        alive=0
        for pid in "${SAGE_STEP_PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 1
    done
    for pid in "${SAGE_STEP_PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null; done
    [ "$rc" = 0 ] || sage_log "job exits with status $rc"
    exit "$rc"
}

# sage_bg NAME LOG CMD...  -- starts a watched background step.
sage_bg() {
    local name=$1 log=$2
    shift 2
    "$@" >"$log" 2>&1 &
    SAGE_STEP_PIDS+=($!)
    SAGE_STEP_NAMES+=("$name")
    SAGE_STEP_LOGS+=("$log")
}

# Prints the name and the log tail of the first watched step that has exited; returns 1 if none.
sage_dead_step() {
    local i
    for i in "${!SAGE_STEP_PIDS[@]}"; do
        if ! kill -0 "${SAGE_STEP_PIDS[$i]}" 2>/dev/null; then
            echo "${SAGE_STEP_NAMES[$i]} exited; last lines of ${SAGE_STEP_LOGS[$i]}:"
            tail -n 20 "${SAGE_STEP_LOGS[$i]}" 2>/dev/null | sed 's/^/    /'
            return 0
        fi
    done
    return 1
}

# `ray status` against the head, run where the ray CLI is (in the container when one is used).
sage_ray_status() {
    if [ -n "${SAGE_CONTAINER_IMAGE:-}" ]; then
        "${SAGE_SRUN[@]}" -w "$SAGE_HEAD" ray status --address "$RAY_ADDRESS"
    else
        ray status --address "$RAY_ADDRESS"
    fi
}

# Number of alive nodes in `ray status` (lines " <count> node_<id>" under "Active:").
sage_ray_count_nodes() {
    sage_ray_status 2>/dev/null | awk '/^Active:/{a=1; next} /^[A-Z][a-z]+.*:/{a=0} a && $2 ~ /^node_/ {n+=$1} END{print n+0}'
}

sage_ray_up() {
    local t0 ip node n want i missing
    local common=(--port="$SAGE_RAY_PORT")
    local extra=()
    [ -n "${SAGE_RAY_TMPDIR:-}" ] && extra+=(--temp-dir="$SAGE_RAY_TMPDIR")
    # shellcheck disable=SC2206  # intentional word splitting of user-supplied extra args
    [ -n "${SAGE_RAY_START_ARGS:-}" ] && extra+=($SAGE_RAY_START_ARGS)

    SAGE_HEAD_IP=$("${SAGE_SRUN[@]}" -w "$SAGE_HEAD" bash -c sage_node_ip) \
        || sage_die "cannot get the IP address of head node $SAGE_HEAD"
    export RAY_ADDRESS="$SAGE_HEAD_IP:$SAGE_RAY_PORT"
    export MASTER_ADDR=$SAGE_HEAD_IP MASTER_PORT=${SAGE_MASTER_PORT:-29500}
    export SAGE_NUM_NODES=${#SAGE_NODES[@]}
    sage_log "Ray head on $SAGE_HEAD ($RAY_ADDRESS)"
    sage_bg "Ray head on $SAGE_HEAD" "$SAGE_LOG_DIR/ray-head-$SAGE_HEAD.log" \
        "${SAGE_SRUN[@]}" -w "$SAGE_HEAD" \
        ray start --head --block --node-ip-address="$SAGE_HEAD_IP" "${common[@]}" \
        --include-dashboard="${SAGE_RAY_DASHBOARD:-false}" --disable-usage-stats "${extra[@]}"

    t0=$SECONDS
    until sage_ray_status >/dev/null 2>&1; do
        if sage_dead_step >&2; then sage_die "Ray head did not start on $SAGE_HEAD"; fi
        [ $((SECONDS - t0)) -lt "$SAGE_RAY_TIMEOUT" ] || sage_die "Ray head on $SAGE_HEAD ($RAY_ADDRESS) did not answer \
\`ray status\` within ${SAGE_RAY_TIMEOUT}s; see $SAGE_LOG_DIR/ray-head-$SAGE_HEAD.log"
        sleep 2
    done
    sage_log "Ray head up after $((SECONDS - t0)) s"

    for node in "${SAGE_NODES[@]:1}"; do
        local worker_extra=() arg
        for arg in "${extra[@]}"; do
            case "$arg" in --temp-dir=*) worker_extra+=("$arg/$node") ;; *) worker_extra+=("$arg") ;; esac
        done
        # Each worker finds its own IP on its node, then joins the head.
        # shellcheck disable=SC2016  # expanded by the bash on the worker node, not here
        sage_bg "Ray worker on $node" "$SAGE_LOG_DIR/ray-worker-$node.log" \
            "${SAGE_SRUN[@]}" -w "$node" bash -c 'ip=$(sage_node_ip) || exit 1; exec ray start --block --address="$0" --node-ip-address="$ip" "$@"' \
            "$RAY_ADDRESS" --disable-usage-stats "${worker_extra[@]}"
    done

    want=${#SAGE_NODES[@]}
    t0=$SECONDS
    while :; do
        n=$(sage_ray_count_nodes)
        [ "${n:-0}" -ge "$want" ] && break
        if sage_dead_step >&2; then sage_die "a Ray step died during start-up (${n:-0}/$want nodes joined)"; fi
        if [ $((SECONDS - t0)) -ge "$SAGE_RAY_TIMEOUT" ]; then
            missing=()
            for i in "${!SAGE_STEP_NAMES[@]}"; do
                grep -q "Ray runtime started" "${SAGE_STEP_LOGS[$i]}" 2>/dev/null || missing+=("${SAGE_STEP_NAMES[$i]#Ray * on }")
            done
            sage_die "only ${n:-0} of $want nodes joined the Ray cluster within ${SAGE_RAY_TIMEOUT}s; not joined: ${missing[*]:-unknown} (logs in $SAGE_LOG_DIR)"
        fi
        sleep 2
    done
    sage_log "Ray cluster ready: $want node(s) after $((SECONDS - t0)) s"
}

# sage_run_main NAME CMD  -- runs CMD (a shell command line) on the head node with srun while
# watching the Ray steps; returns the step's exit status (1 if a Ray step died under it).
sage_run_main() {
    local name=$1 cmd=$2 pid rc
    sage_log "$name: $cmd"
    "${SAGE_SRUN[@]}" -w "$SAGE_HEAD" bash -c "$cmd" &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        if [ "${#SAGE_STEP_PIDS[@]}" -gt 0 ] && sage_dead_step >&2; then
            sage_log "ERROR: a Ray step died while '$name' was running: stopping it"
            kill -TERM "$pid" 2>/dev/null
            wait "$pid" 2>/dev/null || true
            return 1
        fi
        sleep "$SAGE_WATCH_INTERVAL"
    done
    rc=0
    wait "$pid" || rc=$?
    if [ "$rc" = 0 ]; then sage_log "$name finished"; else sage_log "ERROR: $name exited with status $rc"; fi
    return "$rc"
}
