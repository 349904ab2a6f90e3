#!/usr/bin/env bash
# A local cluster without Docker: three Kafka brokers (KRaft, each broker and controller, three
# voters), a Redis Cluster of three primaries and three replicas, and on request dealstream
# workers and a learner; everything on 127.0.0.1, state and logs under one dir.
#
#   deploy/cluster.sh start [DIR]        brokers + Redis Cluster (+ workers when
#                                        DEALSTREAM_CLUSTER_WORKERS > 0); writes DIR/env
#   deploy/cluster.sh workers [DIR] [--dry-run] [NAME=VALUE...]
#                                        the workers and the learner (NAME=VALUE overrides a
#                                        setting of theirs; --dry-run prints what would run)
#   deploy/cluster.sh stop [DIR]         stop everything started in DIR (files stay)
#   deploy/cluster.sh status [DIR]       say what is up; exit 0 when brokers and Redis are
#   deploy/cluster.sh reset [DIR]        stop, then delete DIR
#
# DIR defaults to <repo>/.dealstream/cluster. Ports, from DEALSTREAM_CLUSTER_PORT_BASE (B,
# default 19200): brokers B+1..B+3, controllers B+11..B+13, Redis B+21..B+26 (cluster bus
# +10000), worker HTTP B+31.., learner HTTP B+40. Same jars as deploy/kafka/kafka.sh, same
# Debian redis-server as deploy/redis/redis.sh. docs/cluster.md has the details.
#
# Environment: DEALSTREAM_CLUSTER_PORT_BASE (19200), DEALSTREAM_CLUSTER_WORKERS (0 on start,
# 3 for `workers`), DEALSTREAM_CLUSTER_KAFKA_HEAP (512m), DEALSTREAM_CLUSTER_START_TIMEOUT
# (120 s), DEALSTREAM_CLUSTER_REDIS_NODE_TIMEOUT_MS (2000), DEALSTREAM_CACHE, JAVA_HOME, PYTHON.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
# KAFKA_LIBS, kafka_fetch, kafka_find_java, kafka_storage, kafka_launch, kafka_pid, port_open.
source "$HERE/kafka/lib.sh"

BASE="${DEALSTREAM_CLUSTER_PORT_BASE:-19200}"
HEAP="${DEALSTREAM_CLUSTER_KAFKA_HEAP:-512m}"
START_TIMEOUT="${DEALSTREAM_CLUSTER_START_TIMEOUT:-120}"
NODE_TIMEOUT_MS="${DEALSTREAM_CLUSTER_REDIS_NODE_TIMEOUT_MS:-2000}"
BROKERS=(1 2 3)
REDIS_NODES=(1 2 3 4 5 6)

log() { echo "cluster: $*"; }
die() { echo "cluster: $*" >&2; exit 1; }

broker_port() { echo $((BASE + $1)); }
controller_port() { echo $((BASE + 10 + $1)); }
redis_port() { echo $((BASE + 20 + $1)); }
worker_port() { echo $((BASE + 30 + $1)); }
learner_port() { echo $((BASE + 40)); }

joined() {
    local IFS=,
    echo "$*"
}
bootstrap() {
    local i out=()
    for i in "${BROKERS[@]}"; do out+=("127.0.0.1:$(broker_port "$i")"); done
    joined "${out[@]}"
}
redis_nodes() {
    local j out=()
    for j in "${REDIS_NODES[@]}"; do out+=("127.0.0.1:$(redis_port "$j")"); done
    echo "${out[@]}"
}

check_base() {
    [[ "$BASE" =~ ^[0-9]+$ ]] && ((BASE >= 1024 && BASE + 26 + 10000 <= 65535)) \
        || die "DEALSTREAM_CLUSTER_PORT_BASE must be within 1024 and 55509 (Redis's bus ports" \
            "are 10000 above its ports), got '$BASE'"
}

# DIR remembers its port base: the brokers' quorum and the Redis nodes' view of each other
# are written into their state, so moving the ports of an existing cluster breaks it.
check_dir_ports() {
    local file="$DIR/port-base"
    if [[ -f "$file" && "$(cat "$file")" != "$BASE" ]]; then
        die "$DIR was made with DEALSTREAM_CLUSTER_PORT_BASE=$(cat "$file"), not $BASE: use" \
            "that, or '$0 reset $DIR' first"
    fi
}

# -- Kafka ------------------------------------------------------------------------------------

kafka_dir() { echo "$DIR/kafka-$1"; }
# The broker's pid: from its pid file, else from the command lines (a stop interrupted after
# the pid file went, or a pid file deleted by hand, must not leave a broker nobody stops).
broker_pid() {
    local dir pid
    dir="$(kafka_dir "$1")"
    pid="$(kafka_pid "$dir/kafka.pid" "$dir/server.properties")"
    [[ -n "$pid" ]] || pid="$(pgrep -f -- "kafka\.Kafka $dir/server\.properties\$" | head -n1 || true)"
    echo "$pid"
}

answers() {
    local rc=0
    "$(kafka_python_bin)" "$HERE/kafka/wait_kafka.py" "$@" || rc=$?
    [[ "$rc" != 4 ]] || exit 2
    return "$rc"
}

# A Kafka Uuid (16 random bytes, base64url without padding), as StorageTool random-uuid makes
# them, without starting a JVM. Never one that starts with '-' (it would read as an option).
kafka_uuid() {
    local id
    while :; do
        id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')"
        [[ "$id" == -* ]] || break
    done
    echo "$id"
}

# The cluster id and the three voters (id@host:port:directory-id), made once per DIR and used
# to format every node: each node must be formatted with the same values.
quorum() {
    local file="$DIR/kafka-quorum"
    if [[ ! -f "$file" ]]; then
        local i voters=()
        for i in "${BROKERS[@]}"; do
            voters+=("$i@127.0.0.1:$(controller_port "$i"):$(kafka_uuid)")
        done
        printf 'CLUSTER_ID=%s\nINITIAL_CONTROLLERS=%s\n' "$(kafka_uuid)" "$(joined "${voters[@]}")" \
            >"$file.tmp"
        mv "$file.tmp" "$file"
    fi
    # shellcheck disable=SC1090
    source "$file"
}

write_broker_config() {
    local i="$1" dir voters=() j
    dir="$(kafka_dir "$i")"
    mkdir -p "$dir/data" "$dir/logs"
    for j in "${BROKERS[@]}"; do voters+=("127.0.0.1:$(controller_port "$j")"); done
    # Regenerated on every start (a changed setting takes effect); log.dirs stays the same.
    cat >"$dir/server.properties" <<EOF
# Generated by deploy/cluster.sh; edits are overwritten on the next start.
process.roles=broker,controller
node.id=$i
controller.quorum.bootstrap.servers=$(joined "${voters[@]}")
listeners=PLAINTEXT://127.0.0.1:$(broker_port "$i"),CONTROLLER://127.0.0.1:$(controller_port "$i")
advertised.listeners=PLAINTEXT://127.0.0.1:$(broker_port "$i")
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/data
EOF
    cat "$HERE/cluster/kafka.properties" >>"$dir/server.properties"
}

format_broker() {
    local i="$1" dir
    dir="$(kafka_dir "$i")"
    [[ -f "$dir/data/meta.properties" ]] && return 0
    # --initial-controllers: the three nodes are the voters of a dynamic quorum from the start.
    kafka_storage "$dir/logs" format -t "$CLUSTER_ID" -c "$dir/server.properties" \
        --initial-controllers "$INITIAL_CONTROLLERS" >"$dir/logs/format.log" 2>&1 \
        || { cat "$dir/logs/format.log" >&2; die "formatting $dir/data failed ('$0 reset $DIR' starts from scratch)"; }
}

start_kafka() {
    local i pid pids=() p
    for i in "${BROKERS[@]}"; do
        pid="$(broker_pid "$i")"
        if [[ -z "$pid" ]]; then
            for p in "$(broker_port "$i")" "$(controller_port "$i")"; do
                ! port_open "$p" || die "port 127.0.0.1:$p is taken by something else; stop it" \
                    "or set DEALSTREAM_CLUSTER_PORT_BASE"
            done
        fi
    done
    kafka_find_java
    kafka_fetch
    quorum
    for i in "${BROKERS[@]}"; do
        write_broker_config "$i"
    done
    # Formatting starts a JVM per node: in parallel, they take as long as one.
    local formats=()
    for i in "${BROKERS[@]}"; do
        format_broker "$i" &
        formats+=($!)
    done
    for pid in "${formats[@]}"; do wait "$pid" || die "formatting the brokers' storage failed"; done
    for i in "${BROKERS[@]}"; do
        local dir
        dir="$(kafka_dir "$i")"
        pid="$(broker_pid "$i")"
        if [[ -z "$pid" ]]; then
            log "starting broker $i on 127.0.0.1:$(broker_port "$i") (controller" \
                "$(controller_port "$i"), heap $HEAP)"
            kafka_launch "$dir/server.properties" "$dir/logs" "$dir/kafka.pid" \
                -Xms256m "-Xmx$HEAP"
            pid="$(cat "$dir/kafka.pid")"
        fi
        pids+=(--pid "$pid")
    done
    # Each broker answers on its own port (a metadata answer through the others could come
    # from a broker the controller has not fenced yet), and all three are registered.
    local rc=0
    for i in "${BROKERS[@]}"; do
        answers "127.0.0.1:$(broker_port "$i")" --timeout "$START_TIMEOUT" "${pids[@]}" || rc=$?
        [[ "$rc" == 0 ]] || break
    done
    [[ "$rc" != 0 ]] \
        || answers "$(bootstrap)" --brokers 3 --timeout "$START_TIMEOUT" "${pids[@]}" || rc=$?
    case "$rc" in
        0) log "Kafka: 3 brokers on $(bootstrap)" ;;
        3) kafka_tails; die "a broker exited during startup (logs in $DIR/kafka-*/logs)" ;;
        *) kafka_tails; die "the 3 brokers did not all register within ${START_TIMEOUT}s" \
               "(raise DEALSTREAM_CLUSTER_START_TIMEOUT, or '$0 stop $DIR')" ;;
    esac
}

kafka_tails() {
    local i dir
    for i in "${BROKERS[@]}"; do
        dir="$(kafka_dir "$i")"
        echo "cluster: last lines of $dir/logs/server.log:" >&2
        tail -n 15 "$dir/logs/server.log" >&2 2>/dev/null || true
        [[ -s "$dir/logs/stdout.log" ]] && tail -n 5 "$dir/logs/stdout.log" >&2
    done
}

stop_kafka() {
    # All at once: each broker's controlled shutdown needs a controller quorum, which stopping
    # them one by one would lose before the last one leaves.
    local i pid
    for i in "${BROKERS[@]}"; do
        pid="$(broker_pid "$i")"
        [[ -n "$pid" ]] || { rm -f "$(kafka_dir "$i")/kafka.pid"; continue; }
        log "stopping broker $i (pid $pid)"
        # The pid file goes once the process is gone, not before.
        (kafka_stop_pid "$pid" && rm -f "$(kafka_dir "$i")/kafka.pid") &
    done
    wait
}

# -- Redis Cluster ----------------------------------------------------------------------------

redis_dir() { echo "$DIR/redis-$1"; }
rcli() {
    local port="$1"
    shift
    timeout 5 redis-cli -h 127.0.0.1 -p "$port" "$@" 2>/dev/null
}
# The node's pid: the redis-server serving its port (Redis titles itself
# `redis-server 127.0.0.1:PORT [cluster]`), whether or not its pid file is still there.
redis_pid() {
    pgrep -f -- "^redis-server 127\.0\.0\.1:$(redis_port "$1") \[cluster\]" | head -n1 || true
}
cluster_field() { rcli "$1" cluster info | tr -d '\r' | sed -n "s/^$2://p"; }

start_redis_node() {
    local j="$1" dir port pid
    dir="$(redis_dir "$j")"
    port="$(redis_port "$j")"
    pid="$(redis_pid "$j")"
    if [[ -n "$pid" ]]; then
        return 0
    fi
    ! port_open "$port" || die "port 127.0.0.1:$port is taken by something else; stop it or set" \
        "DEALSTREAM_CLUSTER_PORT_BASE"
    mkdir -p "$dir"
    # The shipped durable settings, then the cluster's; this node's own last.
    cat >"$dir/node.conf" <<EOF
# Generated by deploy/cluster.sh; edits are overwritten on the next start.
include $REPO/deploy/redis/redis.conf
include $HERE/cluster/redis.conf
cluster-node-timeout $NODE_TIMEOUT_MS
port $port
bind 127.0.0.1
dir $dir
pidfile $dir/redis.pid
logfile $dir/redis.log
daemonize yes
EOF
    redis-server "$dir/node.conf" || { tail -n 20 "$dir/redis.log" >&2; die "redis-server failed on $port"; }
}

start_redis() {
    command -v redis-server >/dev/null && command -v redis-cli >/dev/null \
        || die "redis-server not found: install it (sudo apt-get install -y redis-server)"
    local j port i
    for j in "${REDIS_NODES[@]}"; do start_redis_node "$j"; done
    for j in "${REDIS_NODES[@]}"; do
        port="$(redis_port "$j")"
        for ((i = 0; i < 100; i++)); do
            [[ "$(rcli "$port" ping)" == PONG ]] && break
            sleep 0.1
        done
        [[ "$(rcli "$port" ping)" == PONG ]] \
            || { tail -n 20 "$(redis_dir "$j")/redis.log" >&2; die "no PONG from Redis on $port"; }
    done
    # A fresh set of nodes knows only itself and serves no slot: make the cluster. Nodes that
    # restarted from their nodes.conf find each other again by themselves.
    local first fresh=0
    first="$(redis_port 1)"
    for j in "${REDIS_NODES[@]}"; do
        port="$(redis_port "$j")"
        if [[ "$(cluster_field "$port" cluster_known_nodes)" == 1 \
                && "$(cluster_field "$port" cluster_slots_assigned)" == 0 ]]; then
            fresh=$((fresh + 1))
        fi
    done
    if ((fresh == ${#REDIS_NODES[@]})); then
        log "creating the Redis Cluster (3 primaries, 3 replicas)"
        # shellcheck disable=SC2046
        redis-cli --cluster create $(redis_nodes) --cluster-replicas 1 --cluster-yes \
            >"$DIR/redis-cluster-create.log" 2>&1 \
            || { cat "$DIR/redis-cluster-create.log" >&2; die "redis-cli --cluster create failed"; }
    elif ((fresh > 0)); then
        die "$fresh of the 6 Redis nodes are new and the others already form a cluster:" \
            "'$0 reset $DIR' starts from scratch"
    fi
    local deadline=$((SECONDS + START_TIMEOUT)) ok
    while :; do
        ok=0
        for j in "${REDIS_NODES[@]}"; do
            port="$(redis_port "$j")"
            [[ "$(cluster_field "$port" cluster_state)" == ok \
                && "$(cluster_field "$port" cluster_known_nodes)" == "${#REDIS_NODES[@]}" ]] \
                && ok=$((ok + 1))
        done
        ((ok == ${#REDIS_NODES[@]})) && break
        ((SECONDS < deadline)) || die "Redis Cluster not ok on every node after ${START_TIMEOUT}s" \
            "(see $DIR/redis-*/redis.log; 'redis-cli -p $first cluster nodes')"
        sleep 0.2
    done
    log "Redis Cluster: 6 nodes on 127.0.0.1:$(redis_port 1)-$(redis_port 6), cluster_state:ok"
}

stop_redis() {
    local j pid
    for j in "${REDIS_NODES[@]}"; do
        pid="$(redis_pid "$j")"
        [[ -n "$pid" ]] || continue
        log "stopping Redis node $j (pid $pid)"
        # SIGTERM: the node flushes and fsyncs its append-only file and saves nodes.conf.
        stop_pid "$pid" 10 &
    done
    wait
}

# stop_pid PID SECONDS: SIGTERM, SIGKILL when still alive after SECONDS.
stop_pid() {
    local pid="$1" i
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < $2 * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "pid $pid ignored SIGTERM for $2 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

# -- dealstream processes ---------------------------------------------------------------------

python_cli() { echo "$(kafka_python_bin) -m streams.cli"; }

# The secrets every process of the cluster shares, made once per DIR (mode 600/700).
make_secrets() {
    mkdir -p "$DIR/keys"
    chmod 700 "$DIR/keys"
    if [[ ! -f "$DIR/keys/pseudonym.key" ]]; then
        (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DIR/keys/pseudonym.key")
    fi
    if [[ ! -f "$DIR/keys/model-signing.pem" ]]; then
        # shellcheck disable=SC2046
        $(python_cli) model keygen --out "$DIR/keys" >/dev/null \
            || die "dealstream model keygen failed (is the repo's .venv installed? make install)"
    fi
}

write_env() {
    (umask 077 && cat >"$DIR/env.tmp" <<EOF
# The settings of a dealstream process on this cluster (written by deploy/cluster.sh).
# Load with: set -a; . $DIR/env; set +a
DEALSTREAM_KAFKA_BOOTSTRAP=$(bootstrap)
DEALSTREAM_REPLICATION_FACTOR=3
DEALSTREAM_MIN_INSYNC_REPLICAS=2
DEALSTREAM_REDIS_URL=redis://127.0.0.1:$(redis_port 1)/0
DEALSTREAM_REDIS_CLUSTER=1
DEALSTREAM_REDIS_PREFIX=ds:{ds}:
DEALSTREAM_PSEUDONYM_KEY=$(cat "$DIR/keys/pseudonym.key")
DEALSTREAM_MODEL_VERIFY_KEY_FILE=$DIR/keys/model-verify.pem
DEALSTREAM_CLUSTER_DIR=$DIR
DEALSTREAM_CLUSTER_REDIS_NODES=$(joined $(redis_nodes))
EOF
    )
    mv "$DIR/env.tmp" "$DIR/env"
}

# The settings of env (NAME=VALUE lines) as arguments for env(1).
env_args() { grep -E '^[A-Z_]+=' "$DIR/env"; }

proc_pid() {
    local pidfile="$DIR/processes/$1.pid" pid
    [[ -f "$pidfile" ]] || return 0
    pid="$(cat "$pidfile")"
    if [[ "$pid" =~ ^[0-9]+$ ]] && tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" \
            | grep -qF "streams.cli"; then
        echo "$pid"
    fi
}

# The HTTP status of GET 127.0.0.1:$1$2, or nothing.
http_status() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1 \
        && printf 'GET $2 HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3 && head -n1 <&3" 2>/dev/null \
        | awk '{print $2}'
}

# start_process NAME ROLE PORT OVERRIDES...: one worker or the learner, in its own session.
start_process() {
    local name="$1" role="$2" port="$3"
    shift 3
    local common=() settings=() pid
    mapfile -t common < <(env_args)
    settings=("${common[@]}")
    settings+=("DEALSTREAM_STATE=$DIR/processes/$name")
    if [[ "$role" == learner ]]; then
        settings+=("DEALSTREAM_MODEL_SIGNING_KEY_FILE=$DIR/keys/model-signing.pem"
            "DEALSTREAM_LEARNER_HTTP_PORT=$port")
    else
        settings+=("DEALSTREAM_HTTP_PORT=$port")
    fi
    settings+=("$@")
    if [[ -n "$DRY_RUN" ]]; then
        printf 'env <%s>' "$DIR/env"
        printf ' %q' "${settings[@]:${#common[@]}}"
        printf ' %s %s >%s 2>&1\n' "$(python_cli)" "$role" "$DIR/processes/$name.log"
        return 0
    fi
    pid="$(proc_pid "$name")"
    if [[ -n "$pid" ]]; then
        log "$name already running (pid $pid, HTTP 127.0.0.1:$port)"
        return 0
    fi
    ! port_open "$port" || die "port 127.0.0.1:$port is taken; set DEALSTREAM_CLUSTER_PORT_BASE"
    mkdir -p "$DIR/processes/$name"
    # shellcheck disable=SC2046
    (cd "$DIR/processes/$name" && exec setsid nohup env "${settings[@]}" $(python_cli) "$role" \
        >>"$DIR/processes/$name.log" 2>&1 </dev/null) &
    echo $! >"$DIR/processes/$name.pid"
    log "started $name (pid $!, HTTP 127.0.0.1:$port, log $DIR/processes/$name.log)"
}

cmd_workers() {
    local n="${DEALSTREAM_CLUSTER_WORKERS:-3}" k
    [[ "$n" =~ ^[1-9]$ ]] || die "DEALSTREAM_CLUSTER_WORKERS must be 1 to 9, got '$n'"
    [[ -f "$DIR/env" ]] || die "$DIR/env not found: '$0 start $DIR' first"
    mkdir -p "$DIR/processes"
    local topics=()
    mapfile -t topics < <(env_args)
    if [[ -n "$DRY_RUN" ]]; then
        echo "# <$DIR/env>: its settings; the topics (replication factor 3), then the processes"
        printf 'env <%s>' "$DIR/env"
        printf ' %q' "${OVERRIDES[@]}"
        printf ' %s topics\n' "$(python_cli)"
    else
        # The topics first, replicated as the env says, so no process creates them its way.
        env "${topics[@]}" "${OVERRIDES[@]}" $(python_cli) topics \
            || die "creating the topics failed"
    fi
    for ((k = 1; k <= n; k++)); do
        start_process "worker-$k" worker "$(worker_port "$k")" "${OVERRIDES[@]}"
    done
    start_process learner learner "$(learner_port)" "${OVERRIDES[@]}"
    [[ -z "$DRY_RUN" ]] || return 0
    # Up means the HTTP endpoints answer /health; readiness (a model, the group) comes later.
    local deadline=$((SECONDS + START_TIMEOUT)) name port pending
    while :; do
        pending=()
        for name in $(process_names); do
            [[ -n "$(proc_pid "$name")" ]] \
                || { tail -n 20 "$DIR/processes/$name.log" >&2; die "$name exited (log above)"; }
            port="$(process_port "$name")"
            [[ "$(http_status "$port" /health)" == 200 ]] || pending+=("$name")
        done
        ((${#pending[@]} == 0)) && break
        ((SECONDS < deadline)) || die "no /health from ${pending[*]} after ${START_TIMEOUT}s" \
            "(logs in $DIR/processes)"
        sleep 0.5
    done
    log "workers: $n and a learner answer /health (logs in $DIR/processes)"
}

process_names() {
    local f
    for f in "$DIR"/processes/*.pid; do
        [[ -e "$f" ]] && basename "$f" .pid
    done
    return 0
}
process_port() {
    case "$1" in
        learner) learner_port ;;
        worker-*) worker_port "${1#worker-}" ;;
    esac
}

stop_processes() {
    local name pid
    for name in $(process_names); do
        pid="$(proc_pid "$name")"
        [[ -n "$pid" ]] || { rm -f "$DIR/processes/$name.pid"; continue; }
        log "stopping $name (pid $pid)"
        # SIGTERM: a worker finishes its batch, commits and leaves its group.
        (stop_pid "$pid" 30 && rm -f "$DIR/processes/$name.pid") &
    done
    wait
}

# -- commands ---------------------------------------------------------------------------------

cmd_start() {
    check_base
    mkdir -p "$DIR"
    chmod 700 "$DIR"
    check_dir_ports
    echo "$BASE" >"$DIR/port-base"
    local started=$SECONDS
    # Redis first: it takes a fraction of a second while the brokers' JVMs warm up.
    start_redis
    start_kafka
    make_secrets
    write_env
    log "up in $((SECONDS - started)) s; settings in $DIR/env"
    if [[ "${DEALSTREAM_CLUSTER_WORKERS:-0}" != 0 ]]; then
        cmd_workers
    fi
}

cmd_stop() {
    [[ -d "$DIR" ]] || { log "$DIR does not exist: nothing to stop"; return 0; }
    # Every part even when another fails: the workers first (they flush to Kafka and Redis).
    local rc=0
    stop_processes || rc=1
    stop_kafka || rc=1
    stop_redis || rc=1
    log "stopped what ran in $DIR"
    return "$rc"
}

cmd_status() {
    local rc=0 i j pid port name
    for i in "${BROKERS[@]}"; do
        pid="$(broker_pid "$i")"
        port="$(broker_port "$i")"
        if [[ -z "$pid" ]]; then
            log "broker $i: not running"
            rc=1
        elif answers "127.0.0.1:$port"; then
            log "broker $i: running (pid $pid) on 127.0.0.1:$port, answering"
        else
            log "broker $i: running (pid $pid) on 127.0.0.1:$port, NOT answering"
            rc=1
        fi
    done
    if ((rc == 0)); then
        if answers "$(bootstrap)" --brokers 3; then
            log "Kafka: 3 brokers registered"
        else
            log "Kafka: fewer than 3 brokers registered"
            rc=1
        fi
    fi
    for j in "${REDIS_NODES[@]}"; do
        pid="$(redis_pid "$j")"
        port="$(redis_port "$j")"
        if [[ -z "$pid" ]]; then
            log "redis $j: not running"
            rc=1
        elif [[ "$(rcli "$port" ping)" == PONG ]]; then
            log "redis $j: running (pid $pid) on 127.0.0.1:$port, $(rcli "$port" role | head -n1)," \
                "cluster_state:$(cluster_field "$port" cluster_state)"
            [[ "$(cluster_field "$port" cluster_state)" == ok ]] || rc=1
        else
            log "redis $j: running (pid $pid) on 127.0.0.1:$port, NOT answering"
            rc=1
        fi
    done
    for name in $(process_names); do
        pid="$(proc_pid "$name")"
        port="$(process_port "$name")"
        if [[ -n "$pid" ]]; then
            log "$name: running (pid $pid), /health $(http_status "$port" /health || true)," \
                "/ready $(http_status "$port" /ready || true) on 127.0.0.1:$port"
        else
            log "$name: not running (see $DIR/processes/$name.log)"
        fi
    done
    ((rc == 0)) && log "settings: $DIR/env"
    return "$rc"
}

cmd_reset() {
    cmd_stop
    [[ -f "$DIR/port-base" ]] || die "$DIR does not look like a cluster dir (no port-base); not deleting it"
    rm -rf "$DIR"
    log "removed $DIR"
}

usage() {
    echo "usage: $0 start|stop|status|reset [DIR]" >&2
    echo "       $0 workers [DIR] [--dry-run] [NAME=VALUE...]" >&2
    exit 64
}

COMMAND="${1:-}"
shift || true
DIR=""
DRY_RUN=""
OVERRIDES=()
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        DEALSTREAM_*=*) OVERRIDES+=("$arg") ;;
        -*) usage ;;
        *) [[ -z "$DIR" ]] || usage; DIR="$arg" ;;
    esac
done
DIR="${DIR:-$REPO/.dealstream/cluster}"
mkdir -p "$(dirname "$DIR")"
DIR="$(cd "$(dirname "$DIR")" && pwd)/$(basename "$DIR")"
[[ "$COMMAND" == workers || (-z "$DRY_RUN" && ${#OVERRIDES[@]} == 0) ]] || usage

case "$COMMAND" in
    start) cmd_start ;;
    workers) check_base; cmd_workers ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    reset) cmd_reset ;;
    *) usage ;;
esac
