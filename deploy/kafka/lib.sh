# Shared by deploy/kafka/kafka.sh (one broker) and deploy/cluster.sh (three): where the jars
# are, how they are fetched, which Java runs them and how a broker JVM is launched. Sourced,
# not run; the sourcing script defines `log` and `die`.
#
# Environment: DEALSTREAM_CACHE (~/.cache/dealstream: jars), JAVA_HOME, PYTHON.

KAFKA_HOME_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KAFKA_REPO="$(cd "$KAFKA_HOME_DIR/../.." && pwd)"
# The pom is the one place the Kafka version is written down.
KAFKA_VERSION="$(grep -o '<kafka.version>[^<]*' "$KAFKA_HOME_DIR/pom.xml" | head -n1 | cut -d'>' -f2)"
KAFKA_LIBS="${DEALSTREAM_CACHE:-$HOME/.cache/dealstream}/kafka-$KAFKA_VERSION/libs"

# Prefer the repo's venv: it has aiokafka, which the readiness probe (wait_kafka.py) needs.
kafka_python_bin() {
    if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"
    elif [[ -x "$KAFKA_REPO/.venv/bin/python" ]]; then echo "$KAFKA_REPO/.venv/bin/python"
    else echo python3
    fi
}

# Is anything (Kafka or not) listening on 127.0.0.1:$1?
port_open() { timeout 1 bash -c ": >/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# Sets JAVA to a Java 17+ binary, or exits 2 saying what to install.
kafka_find_java() {
    local java
    if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then java="$JAVA_HOME/bin/java"
    else java="$(command -v java || true)"
    fi
    local major=0
    if [[ -n "$java" ]]; then
        # `java -version` prints e.g. `openjdk version "17.0.15" ...` (or "1.8.0_402" for Java 8).
        local v
        v="$("$java" -version 2>&1 | sed -n 's/.* version "\([^"]*\)".*/\1/p' | head -n1)"
        major="${v%%.*}"
        [[ "$major" == 1 ]] && major="$(echo "$v" | cut -d. -f2)"
        [[ "$major" =~ ^[0-9]+$ ]] || major=0
    fi
    if (( major < 17 )); then
        local found=""
        [[ -n "$java" ]] && found=" (found Java ${major/#0/?} at $java)"
        echo "dealstream: Java 17+ not found$found: install openjdk-17-jre-headless or set JAVA_HOME" >&2
        exit 2
    fi
    JAVA="$java"
}

# The broker's jars from Maven Central into the cache, once.
kafka_fetch() {
    if compgen -G "$KAFKA_LIBS/kafka_2.13-*.jar" >/dev/null; then
        return 0
    fi
    command -v mvn >/dev/null || die "Maven not found: install maven (apt-get install -y maven)"
    log "resolving Kafka $KAFKA_VERSION jars from Maven Central into $KAFKA_LIBS"
    # Copy into a scratch folder and rename: an interrupted download never looks complete.
    local tmp="$KAFKA_LIBS.tmp.$$"
    rm -rf "$tmp"
    mkdir -p "$(dirname "$KAFKA_LIBS")"
    mvn -q -B -f "$KAFKA_HOME_DIR/pom.xml" dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$tmp" || { rm -rf "$tmp"; die "mvn failed"; }
    rm -rf "$KAFKA_LIBS"
    mv "$tmp" "$KAFKA_LIBS"
}

# kafka_storage LOGS_DIR ARGS...: run kafka.tools.StorageTool (random-uuid, format ...).
kafka_storage() {
    local logs="$1"
    shift
    "$JAVA" -cp "$KAFKA_LIBS/*" -Dlog4j2.configurationFile="$KAFKA_HOME_DIR/log4j2.properties" \
        -Dkafka.logs.dir="$logs" kafka.tools.StorageTool "$@"
}

# kafka_launch CONFIG LOGS_DIR PIDFILE HEAP_OPTS...: start `kafka.Kafka CONFIG` in the
# background and write its pid. setsid: own session, so Ctrl-C in the calling shell or the end
# of a CI step's process group does not take the broker down. nohup + redirects: no terminal
# needed. A broker out of memory is better dead than limping (ExitOnOutOfMemoryError).
kafka_launch() {
    local config="$1" logs="$2" pidfile="$3"
    shift 3
    setsid nohup "$JAVA" "$@" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
        -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExitOnOutOfMemoryError \
        -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$KAFKA_HOME_DIR/log4j2.properties" -Dkafka.logs.dir="$logs" \
        -cp "$KAFKA_LIBS/*" kafka.Kafka "$config" >"$logs/stdout.log" 2>&1 </dev/null &
    echo $! >"$pidfile"
}

# kafka_pid PIDFILE CONFIG: the pid in PIDFILE when it is still a JVM running CONFIG, or
# nothing (after a reboot a stale pid file can point at an unrelated process).
kafka_pid() {
    local pidfile="$1" config="$2" pid
    [[ -f "$pidfile" ]] || return 0
    pid="$(cat "$pidfile")"
    if [[ "$pid" =~ ^[0-9]+$ ]] && tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" \
            | grep -qF "kafka.Kafka $config"; then
        echo "$pid"
    fi
}

# kafka_stop_pid PID: SIGTERM (the broker flushes and closes its logs cleanly, so the next
# start skips recovery), SIGKILL after 30 s.
kafka_stop_pid() {
    local pid="$1" i
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 300; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "pid $pid ignored SIGTERM for 30 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}
