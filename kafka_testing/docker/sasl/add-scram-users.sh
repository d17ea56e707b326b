#!/usr/bin/env bash
# Adds the SCRAM test users to the SASL test broker (run by the kafka-sasl-init service).
# Usage: add-scram-users.sh BOOTSTRAP (e.g. kafka-sasl:19095)
set -euo pipefail
bootstrap="${1:-kafka-sasl:19095}"
configs=(/opt/kafka/bin/kafka-configs.sh --bootstrap-server "$bootstrap"
    --command-config /etc/kafka/secrets/admin-client.properties)

for attempt in $(seq 1 30); do
    if "${configs[@]}" --alter --entity-type users --entity-name scram256 \
        --add-config 'SCRAM-SHA-256=[iterations=8192,password=scram256-secret]' &&
        "${configs[@]}" --alter --entity-type users --entity-name scram512 \
            --add-config 'SCRAM-SHA-512=[iterations=8192,password=scram512-secret]'; then
        "${configs[@]}" --describe --entity-type users
        echo "scram users ready"
        exit 0
    fi
    echo "broker not ready for SCRAM users yet (attempt $attempt); retrying" >&2
    sleep 2
done
echo "could not add SCRAM users" >&2
exit 1
