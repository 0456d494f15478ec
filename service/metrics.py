"""Prometheus metrics read from the job store at scrape time (the DB is the truth, and it is
shared by every API replica, so no process-local counter could be right)."""

from __future__ import annotations

import time

from fastapi import Request
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from api_schemas.jobs import JobStatus
from service.deps import AppState

DURATION_BUCKETS = [1, 5, 15, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600]
STATUSES: tuple[str, ...] = JobStatus.__args__  # type: ignore[attr-defined]


class JobCollector(Collector):
    def __init__(self, state: AppState):
        self.state = state

    def collect(self):
        store = self.state.store
        counts = store.status_counts()
        jobs = GaugeMetricFamily("linearize_jobs", "Jobs by status.", labels=["status"])
        for status in STATUSES:
            jobs.add_metric([status], counts.get(status, 0))
        yield jobs

        depth = GaugeMetricFamily(
            "linearize_queue_depth",
            "Queued jobs: in the store, and messages in the broker.",
            labels=["source"],
        )
        depth.add_metric(["store"], counts.get("queued", 0))
        broker_depth = self.state.broker.queue_depth()
        if broker_depth is not None:
            depth.add_metric(["broker"], broker_depth)
        yield depth

        buckets, total, count = store.duration_histogram(DURATION_BUCKETS)
        hist = HistogramMetricFamily(
            "linearize_job_duration_seconds", "Run time of finished jobs (start to end)."
        )
        hist.add_metric(
            [],
            [(str(float(b)), c) for b, c in zip(DURATION_BUCKETS, buckets, strict=True)]
            + [("+Inf", count)],
            total,
        )
        yield hist

        workers = GaugeMetricFamily("linearize_workers", "Workers with a recent heartbeat.")
        workers.add_metric([], len(store.alive_workers(3 * self.state.settings.worker_heartbeat_s)))
        yield workers


def make_registry(state: AppState) -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobCollector(state))
    latency = Histogram(
        "linearize_http_request_duration_seconds",
        "API latency by route.",
        ["method", "route", "status"],
        registry=registry,
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
    )
    return registry, latency


async def observe_latency(request: Request, call_next):
    start = time.perf_counter()
    response = await call_next(request)
    route = request.scope.get("route")
    latency = getattr(request.app.state, "http_latency", None)
    if latency is not None and route is not None:
        latency.labels(request.method, route.path, str(response.status_code)).observe(
            time.perf_counter() - start
        )
    return response
