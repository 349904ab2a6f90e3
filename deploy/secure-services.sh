#!/usr/bin/env bash
# A secured Kafka and Redis for tests, beside the shared plaintext ones (deploy/services.sh).
#
#   deploy/secure-services.sh start DIR    make a CA and certificates in DIR, start both, write
#                                           DIR/env (the DEALSTREAM_* settings to reach them)
#   deploy/secure-services.sh stop DIR     stop both (the files stay in DIR)
#
# Kafka 4.1 (KRaft, the jars of deploy/kafka/kafka.sh): one SASL_SSL listener with SCRAM-SHA-512
# for clients, no plaintext listener; the controller listener stays on 127.0.0.1, internal. The
# SCRAM users are created when the storage is formatted (`StorageTool format --add-scram`).
# Redis: TLS only (`port 0`), client certificates required, the ACL users of deploy/redis/acl/
# (worker, learner, readonly) plus a `default` user with every right for the tests' own checks.
# Every password is random, made here and written only into DIR (mode 700).
#
# Environment: DEALSTREAM_SECURE_KAFKA_PORT (19094), DEALSTREAM_SECURE_KAFKA_CONTROLLER_PORT
# (19095), DEALSTREAM_SECURE_REDIS_PORT (16380), DEALSTREAM_SECURE_REDIS_PREFIX (`ds:*:`: the
# key prefix the ACL patterns are written for; the default lets every test's own `ds:t<tag>:`
# prefix match), DEALSTREAM_CACHE, JAVA_HOME.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KAFKA_PORT="${DEALSTREAM_SECURE_KAFKA_PORT:-19094}"
CONTROLLER_PORT="${DEALSTREAM_SECURE_KAFKA_CONTROLLER_PORT:-19095}"
REDIS_PORT="${DEALSTREAM_SECURE_REDIS_PORT:-16380}"
ACL_PREFIX="${DEALSTREAM_SECURE_REDIS_PREFIX:-ds:*:}"
VERSION="$(grep -o '<kafka.version>[^<]*' "$HERE/kafka/pom.xml" | head -n1 | cut -d'>' -f2)"
LIBS="${DEALSTREAM_CACHE:-$HOME/.cache/dealstream}/kafka-$VERSION/libs"
START_TIMEOUT=90

log() { echo "secure-services: $*"; }
die() { echo "secure-services: $*" >&2; exit 1; }
port_open() { timeout 1 bash -c ": >/dev/tcp/127.0.0.1/$1" 2>/dev/null; }
password() { openssl rand -hex 24; }

make_certificates() {
    local dir="$1/tls"
    mkdir -p "$dir"
    # A CA, then one server certificate for both services (localhost and 127.0.0.1, so that
    # hostname checking passes) and one client certificate (Redis asks for it).
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=dealstream test CA" \
        -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
    local name
    for name in server client; do
        openssl req -newkey rsa:2048 -nodes -subj "/CN=dealstream-$name" \
            -keyout "$dir/$name.key" -out "$dir/$name.csr" 2>/dev/null
        printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$dir/$name.ext"
        openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
            -CAcreateserial -days 2 -extfile "$dir/$name.ext" -out "$dir/$name.pem" 2>/dev/null
    done
    # Kafka reads its key from a PKCS#12 keystore.
    openssl pkcs12 -export -in "$dir/server.pem" -inkey "$dir/server.key" \
        -name kafka -passout "pass:$KEYSTORE_PASSWORD" -out "$dir/kafka.p12"
    # A certificate signed by a CA nobody trusts, for the tests of refused peers.
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=untrusted" \
        -keyout "$dir/untrusted.key" -out "$dir/untrusted.pem" 2>/dev/null
}

start_kafka() {
    local dir="$1/kafka"
    mkdir -p "$dir/data" "$dir/logs"
    cat >"$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$CONTROLLER_PORT
listeners=SASL_SSL://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
advertised.listeners=SASL_SSL://localhost:$KAFKA_PORT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL
inter.broker.listener.name=SASL_SSL
sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="broker" password="$BROKER_PASSWORD";
ssl.keystore.type=PKCS12
ssl.keystore.location=$1/tls/kafka.p12
ssl.keystore.password=$KEYSTORE_PASSWORD
ssl.truststore.type=PEM
ssl.truststore.location=$1/tls/ca.pem
ssl.client.auth=none
log.dirs=$dir/data
EOF
    cat "$HERE/kafka/single-node.properties" >>"$dir/server.properties"
    chmod 600 "$dir/server.properties"
    local java="${JAVA_HOME:+$JAVA_HOME/bin/}java"
    local cluster_id
    cluster_id="$("$java" -cp "$LIBS/*" kafka.tools.StorageTool random-uuid)"
    "$java" -cp "$LIBS/*" -Dlog4j2.configurationFile="$HERE/kafka/log4j2.properties" \
        -Dkafka.logs.dir="$dir/logs" kafka.tools.StorageTool format -t "$cluster_id" \
        -c "$dir/server.properties" --standalone \
        --add-scram "SCRAM-SHA-512=[name=broker,password=$BROKER_PASSWORD]" \
        --add-scram "SCRAM-SHA-512=[name=dealstream,password=$KAFKA_PASSWORD]" >/dev/null \
        || die "formatting the secured Kafka's storage failed"
    setsid nohup "$java" -Xms512m -Xmx768m -XX:+UseG1GC -XX:+ExitOnOutOfMemoryError \
        -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$HERE/kafka/log4j2.properties" -Dkafka.logs.dir="$dir/logs" \
        -cp "$LIBS/*" kafka.Kafka "$dir/server.properties" >"$dir/logs/stdout.log" 2>&1 </dev/null &
    echo $! >"$dir/kafka.pid"
    local i pid
    pid="$(cat "$dir/kafka.pid")"
    for ((i = 0; i < START_TIMEOUT * 2; i++)); do
        kill -0 "$pid" 2>/dev/null || { tail -n 30 "$dir/logs/server.log" >&2; die "Kafka exited"; }
        if grep -q "Kafka Server started" "$dir/logs/server.log" 2>/dev/null \
                && port_open "$KAFKA_PORT"; then
            log "Kafka SASL_SSL (SCRAM-SHA-512) on 127.0.0.1:$KAFKA_PORT (pid $pid)"
            return 0
        fi
        sleep 0.5
    done
    die "the secured Kafka did not start within ${START_TIMEOUT}s (see $dir/logs)"
}

start_redis() {
    local dir="$1/redis"
    mkdir -p "$dir"
    # The shipped ACL rules, for this run's key prefix, each with its user's password hash.
    : >"$dir/users.acl"
    local role user pass hash
    for role in worker learner readonly; do
        pass="$(password)"
        hash="$(printf '%s' "$pass" | sha256sum | cut -d' ' -f1)"
        user="dealstream-$role"
        grep -v '^#' "$HERE/redis/acl/$role.acl" | grep . \
            | sed -e "s|~ds:|~${ACL_PREFIX}|g" -e "s/\$/ #$hash/" >>"$dir/users.acl"
        printf 'DEALSTREAM_SECURE_REDIS_%s_PASSWORD=%s\n' "${role^^}" "$pass" >>"$1/env"
    done
    hash="$(printf '%s' "$REDIS_ADMIN_PASSWORD" | sha256sum | cut -d' ' -f1)"
    echo "user default on #$hash ~* &* +@all" >>"$dir/users.acl"
    chmod 600 "$dir/users.acl"
    redis-server --port 0 --tls-port "$REDIS_PORT" --bind 127.0.0.1 \
        --tls-cert-file "$1/tls/server.pem" --tls-key-file "$1/tls/server.key" \
        --tls-ca-cert-file "$1/tls/ca.pem" --tls-auth-clients yes \
        --aclfile "$dir/users.acl" --dir "$dir" --save "" --appendonly no \
        --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" \
        || die "redis-server failed to start (see $dir/redis.log)"
    local i
    for ((i = 0; i < 100; i++)); do
        if port_open "$REDIS_PORT"; then
            log "Redis TLS on 127.0.0.1:$REDIS_PORT, no plaintext port, ACL users $dir/users.acl"
            return 0
        fi
        sleep 0.1
    done
    die "the secured Redis did not start (see $dir/redis.log)"
}

cmd_start() {
    local dir="$1"
    mkdir -p "$dir"
    chmod 700 "$dir"
    local p
    for p in "$KAFKA_PORT" "$CONTROLLER_PORT" "$REDIS_PORT"; do
        ! port_open "$p" || die "port 127.0.0.1:$p is taken; set DEALSTREAM_SECURE_*_PORT"
    done
    command -v openssl >/dev/null || die "openssl not found (apt-get install -y openssl)"
    bash "$HERE/kafka/kafka.sh" fetch
    KEYSTORE_PASSWORD="$(password)"
    BROKER_PASSWORD="$(password)"
    KAFKA_PASSWORD="$(password)"
    REDIS_ADMIN_PASSWORD="$(password)"
    make_certificates "$dir"
    : >"$dir/env"
    chmod 600 "$dir/env"
    start_redis "$dir"
    start_kafka "$dir"
    # The settings of every dealstream process (streams/settings.py); the Redis user and
    # password are the tests' admin (`default`); processes get a role's user
    # (tests/conftest.py reads DEALSTREAM_SECURE_REDIS_<ROLE>_PASSWORD).
    cat >>"$dir/env" <<EOF
DEALSTREAM_KAFKA_BOOTSTRAP=localhost:$KAFKA_PORT
DEALSTREAM_KAFKA_SECURITY_PROTOCOL=SASL_SSL
DEALSTREAM_KAFKA_SASL_MECHANISM=SCRAM-SHA-512
DEALSTREAM_KAFKA_SASL_USERNAME=dealstream
DEALSTREAM_KAFKA_SASL_PASSWORD=$KAFKA_PASSWORD
DEALSTREAM_KAFKA_SSL_CAFILE=$dir/tls/ca.pem
DEALSTREAM_REDIS_URL=rediss://localhost:$REDIS_PORT/0
DEALSTREAM_REDIS_USERNAME=default
DEALSTREAM_REDIS_PASSWORD=$REDIS_ADMIN_PASSWORD
DEALSTREAM_REDIS_SSL_CAFILE=$dir/tls/ca.pem
DEALSTREAM_REDIS_SSL_CERTFILE=$dir/tls/client.pem
DEALSTREAM_REDIS_SSL_KEYFILE=$dir/tls/client.key
DEALSTREAM_SECURE_DIR=$dir
EOF
    log "settings in $dir/env"
}

stop_pid() {
    local pidfile="$1" pid i
    [[ -f "$pidfile" ]] || return 0
    pid="$(cat "$pidfile")"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 300; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$pidfile"
}

cmd_stop() {
    stop_pid "$1/kafka/kafka.pid"
    stop_pid "$1/redis/redis.pid"
    log "stopped the services of $1"
}

[[ -n "${2:-}" ]] || { echo "usage: $0 start|stop DIR" >&2; exit 64; }
case "$1" in
    start) cmd_start "$2" ;;
    stop) cmd_stop "$2" ;;
    *) echo "usage: $0 start|stop DIR" >&2; exit 64 ;;
esac
