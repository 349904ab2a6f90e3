#!/usr/bin/env bash
# The real services dealstream needs locally (Kafka + Redis), without Docker.
#
#   deploy/services.sh start|stop|status
#
# Each service script reuses one that already answers, so this is safe to run repeatedly.
# Ports: DEALSTREAM_KAFKA_PORT (9092), DEALSTREAM_REDIS_PORT (6379).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BOOTSTRAP="127.0.0.1:${DEALSTREAM_KAFKA_PORT:-9092}"
REDIS_URL="redis://127.0.0.1:${DEALSTREAM_REDIS_PORT:-6379}/0"

summary() {
    echo "DEALSTREAM_KAFKA_BOOTSTRAP=$BOOTSTRAP"
    echo "DEALSTREAM_REDIS_URL=$REDIS_URL"
}

case "${1:-}" in
    start)
        # Redis first: it takes a fraction of a second, Kafka a few seconds.
        bash "$HERE/redis/redis.sh" start
        bash "$HERE/kafka/kafka.sh" start
        summary
        ;;
    stop)
        # Keep going when one fails, so the other is still stopped.
        rc=0
        bash "$HERE/kafka/kafka.sh" stop || rc=$?
        bash "$HERE/redis/redis.sh" stop || rc=$?
        exit "$rc"
        ;;
    status)
        rc=0
        bash "$HERE/kafka/kafka.sh" status || rc=1
        bash "$HERE/redis/redis.sh" status || rc=1
        [[ "$rc" == 0 ]] && summary
        exit "$rc"
        ;;
    *)
        echo "usage: $0 start|stop|status" >&2
        exit 64
        ;;
esac
