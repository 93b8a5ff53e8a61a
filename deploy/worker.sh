#!/bin/sh
# Start one Celery worker. In the try-out stack every worker replica shares the sandbox's network namespace
# (and so its hostname), so the node name gets a random suffix to stay unique; elsewhere it is harmless.
# Extra arguments go to `celery worker` (e.g. -Q billing.refunds,billing.scheduler). The app itself reads
# BILLING_LOG_LEVEL (default INFO), so no --loglevel here.
set -eu
suffix=$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
exec celery -A tasks worker -n "worker-${suffix}@%h" "$@"
