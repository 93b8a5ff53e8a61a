"""A Celery app with one no-op task and exactly the billing worker's settings (`tasks.config.celery_config`):
threads pool, concurrency, prefetch, late acks, events on, JSON. `benchmarks/billing_bench.py` fills its queue
and times a worker draining it: the ceiling of one-message-per-charge on this broker and machine.

    celery -A benchmarks.noop_app worker -Q bench.noop
"""

from __future__ import annotations

import os

from celery import Celery
from kombu import Exchange, Queue

from tasks.config import TaskSettings, celery_config

QUEUE = "bench.noop"
TASK = "bench.noop"

settings = TaskSettings.from_env(os.environ)
app = Celery("bench")
conf = celery_config(settings)
conf.update(
    task_queues=(Queue(QUEUE, Exchange(QUEUE, type="direct"), routing_key=QUEUE),),
    task_default_queue=QUEUE,
    task_default_exchange=QUEUE,
    task_default_routing_key=QUEUE,
    task_routes={TASK: {"queue": QUEUE}},
    beat_schedule={},
)
app.conf.update(conf)


@app.task(name=TASK)
def noop() -> None:
    return None
