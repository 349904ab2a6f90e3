#!/usr/bin/env bash
# Local Redis for development and tests, without Docker.
#
#   deploy/redis/redis.sh start|stop|status
#
# A Redis that already answers on the port (a system service, another checkout) is reused, as it
# is configured; else a private redis-server is started from deploy/redis/redis.conf (append-only
# file fsynced every second, no eviction) with its files under the state dir, so that a restart
# keeps the features, watermarks and budgets (docs/delivery.md, "Durability").
#
# Environment: DEALSTREAM_REDIS_PORT (6379), DEALSTREAM_STATE (<repo>/.dealstream),
# DEALSTREAM_REDIS_APPENDFSYNC (everysec; `always` fsyncs every write, `no` leaves it to the OS).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"

PORT="${DEALSTREAM_REDIS_PORT:-6379}"
APPENDFSYNC="${DEALSTREAM_REDIS_APPENDFSYNC:-everysec}"
CONF="$HERE/redis.conf"
STATE="${DEALSTREAM_STATE:-$REPO/.dealstream}/redis"
PIDFILE="$STATE/redis.pid"
LOGFILE="$STATE/redis.log"
START_TIMEOUT=20

log() { echo "redis: $*"; }
die() { echo "redis: $*" >&2; exit 1; }

# PONG on 127.0.0.1:$PORT? Uses redis-cli when present, else speaks RESP over bash's /dev/tcp
# (redis-cli may not be installed yet when we check for a Redis to reuse).
ping() {
    if command -v redis-cli >/dev/null; then
        [[ "$(timeout 2 redis-cli -h 127.0.0.1 -p "$PORT" ping 2>/dev/null)" == PONG ]]
    else
        timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$PORT && printf 'PING\r\n' >&3 \
            && head -c 5 <&3" 2>/dev/null | grep -q '^+PONG'
    fi
}

port_open() { timeout 1 bash -c ": >/dev/tcp/127.0.0.1/$PORT" 2>/dev/null; }

# The pid of the redis-server we started, or nothing (a stale pid file may name anything).
our_pid() {
    [[ -f "$PIDFILE" ]] || return 0
    local pid
    pid="$(cat "$PIDFILE")"
    if [[ "$pid" =~ ^[0-9]+$ ]] && grep -q redis-server 2>/dev/null <"/proc/$pid/cmdline"; then
        echo "$pid"
    fi
}

ensure_server() {
    if ! command -v redis-server >/dev/null; then
        if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
            log "redis-server not found; installing Debian's redis-server package"
            apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server
        else
            die "redis-server not found: install it (sudo apt-get install -y redis-server) or run Redis 7 yourself on port $PORT"
        fi
    fi
    # We develop and test against Redis 7 (compose runs redis:7); older servers lack commands
    # and options, and fail in odd places rather than at startup.
    local version major
    version="$(redis-server --version | sed -n 's/.* v=\([0-9.]*\).*/\1/p')"
    major="${version%%.*}"
    if ! [[ "$major" =~ ^[0-9]+$ ]] || (( major < 7 )); then
        log "warning: redis-server $version found, dealstream needs 7.x or later"
    fi
}

cmd_start() {
    local pid
    pid="$(our_pid)"
    if ping; then
        if [[ -n "$pid" ]]; then
            log "already running on 127.0.0.1:$PORT (pid $pid)"
        else
            log "a Redis already answers on 127.0.0.1:$PORT; reusing it"
        fi
        return 0
    fi
    # Installing Debian's package may start its own service; if so, that one is reused.
    ensure_server
    if ping; then
        log "a Redis answers on 127.0.0.1:$PORT (started by the package); reusing it"
        return 0
    fi
    if port_open; then
        die "port 127.0.0.1:$PORT is taken by something that is not Redis; stop it or set DEALSTREAM_REDIS_PORT"
    fi

    mkdir -p "$STATE"
    : >"$LOGFILE"
    case "$APPENDFSYNC" in
        always | everysec | no) ;;
        *) die "DEALSTREAM_REDIS_APPENDFSYNC must be always, everysec or no, got '$APPENDFSYNC'" ;;
    esac
    # Durable (redis.conf: AOF, noeviction); the AOF lives in the state dir and is replayed on
    # the next start.
    redis-server "$CONF" --port "$PORT" --bind 127.0.0.1 --daemonize yes --pidfile "$PIDFILE" \
        --dir "$STATE" --appendfsync "$APPENDFSYNC" --logfile "$LOGFILE" \
        || { tail -n 30 "$LOGFILE" >&2; die "redis-server failed to start"; }

    local i
    for ((i = 0; i < START_TIMEOUT * 10; i++)); do
        if ping; then
            log "ready on 127.0.0.1:$PORT (pid $(cat "$PIDFILE" 2>/dev/null || echo ?))"
            return 0
        fi
        sleep 0.1
    done
    echo "redis: last lines of $LOGFILE:" >&2
    tail -n 30 "$LOGFILE" >&2 || true
    die "no PONG on 127.0.0.1:$PORT after ${START_TIMEOUT}s"
}

cmd_stop() {
    local pid
    pid="$(our_pid)"
    if [[ -z "$pid" ]]; then
        rm -f "$PIDFILE"
        if ping; then
            log "not started by us; leaving the Redis on 127.0.0.1:$PORT alone"
        else
            log "not running"
        fi
        return 0
    fi
    # SIGTERM: Redis shuts down cleanly (the AOF is flushed and fsynced).
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "pid $pid ignored SIGTERM for 10 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$PIDFILE"
    log "stopped (pid $pid)"
}

cmd_status() {
    local pid
    pid="$(our_pid)"
    if ping; then
        if [[ -n "$pid" ]]; then
            log "running (pid $pid) on 127.0.0.1:$PORT, answering"
        else
            log "not started by us, but a Redis answers on 127.0.0.1:$PORT"
        fi
        return 0
    fi
    if [[ -n "$pid" ]]; then
        log "running (pid $pid) on 127.0.0.1:$PORT, NOT answering (see $LOGFILE)"
    elif port_open; then
        log "not running (127.0.0.1:$PORT is held by something that does not answer as Redis)"
    else
        log "not running"
    fi
    return 1
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 64 ;;
esac
