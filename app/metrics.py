"""`GET /metrics`: the service's metrics in the Prometheus text format, for every process together.

Events (HTTP requests, send outcomes, provider latency, receipts) are counted in the memory of the process
that sees them: a dict update under a lock, no I/O on the request or the job's path. A daemon thread adds
those deltas every `METRICS_FLUSH_INTERVAL` seconds into a few Redis hashes (`HINCRBY`, `HINCRBYFLOAT`),
in one MULTI/EXEC round trip; every web process and every worker, on every machine, adds into the same
hashes, so any web process that answers a scrape shows the totals of all of them. A histogram is kept as
one count per bucket and a sum; the cumulative `le` buckets are computed at scrape time. Deltas that
cannot be flushed (Redis down) are kept, merged by series, and tried again; a final flush runs when a
worker stops and when a process exits. The answering process flushes its own deltas in the scrape's
round trip, so that a scrape shows at least everything that process has seen.

The gauges are read when scraped: jobs per queue and state (RQ's lists and registries) and scheduled jobs
overdue, in the same round trip; live workers (their heartbeats); campaigns by status (one `GROUP BY` over
the campaigns table; the scrape never reads the messages table). With Redis down or stalled the scrape
still answers, within `REDIS_SOCKET_TIMEOUT`, with the database's gauges and
`dispatch_metrics_source_up{source="redis"} 0`; with the database down, the other way round.

The counters live in Redis without an expiry: a flushed or replaced Redis starts them from zero again,
which Prometheus's `rate()` and `increase()` read as a counter reset. Names and labels: docs/operations.md.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from flask import Flask, Response, current_app, g, request
from flask.views import MethodView
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from redis import Redis
from rq import Queue
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from app.blueprint import Blueprint
from app.database import round_trip_budget
from app.extensions import db
from app.messaging.app_worker import live_worker_count
from app.messaging.scheduled_jobs import OVERDUE_AFTER, count_overdue
from app.messaging.spool import INBOUND_KEY, OUTCOMES_KEY
from app.models import Campaign, CampaignStatus, Channel, ErrorClass, MessageStatus

log = logging.getLogger(__name__)

bp = Blueprint("metrics", __name__, description="Metrics for Prometheus")

PREFIX = "dispatch"
# The spool's lists (app.messaging.spool), by the name the gauge gives them.
SPOOL_KEYS = {"outcomes": OUTCOMES_KEY, "inbound": INBOUND_KEY}
# The Redis hashes the processes add into: one per metric, fields named by the series' label values.
KEY_PREFIX = "campaign_dispatch:metrics:"
# Series a process keeps between two flushes; beyond it (labels gone wild, or Redis down for long with
# ever new series) new series are dropped, not memory.
MAX_SERIES = 10_000
# Seconds the campaigns-by-status query may take before the scrape answers without it.
DATABASE_BUDGET = 1.0
# HTTP methods counted by name; any other is counted as `other`, so that a client cannot add series.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# The `endpoint` label of a request that matched no route.
UNMATCHED = "unmatched"


@dataclass(frozen=True)
class Metric:
    """One metric family: its name (without the prefix), help, kind, labels and, for a histogram, buckets."""

    name: str
    help: str
    kind: str  # "counter" or "histogram"
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()

    @property
    def key(self) -> str:
        return KEY_PREFIX + self.name

    @property
    def full_name(self) -> str:
        return f"{PREFIX}_{self.name}"


HTTP_REQUESTS = Metric(
    "http_requests", "HTTP requests answered, by method, route and status", "counter", ("method", "endpoint", "status")
)
HTTP_DURATION = Metric(
    "http_request_duration_seconds",
    "Seconds from a request's first hook to its answer, by method and route",
    "histogram",
    ("method", "endpoint"),
    (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
MESSAGES = Metric(
    "messages",
    "Send jobs' outcomes, by channel, the channel's provider, outcome and error class",
    "counter",
    ("channel", "provider", "outcome", "error_class"),
)
SEND_DURATION = Metric(
    "provider_send_duration_seconds",
    "Seconds a provider took to answer a send, by provider",
    "histogram",
    ("provider",),
    (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
RECEIPTS = Metric(
    "receipts",
    "Delivery receipts, by provider, the status they say and what they did (applied, unchanged, kept)",
    "counter",
    ("provider", "status", "result"),
)
SPOOLED = Metric(
    "spooled",
    "Items kept in Redis while PostgreSQL was unavailable, to be applied when it returns, by kind: `outcome` (a "
    "send's record), `receipt`, `keyword` (a customer's opt-out or opt-in)",
    "counter",
    ("kind",),
)
RECEIPTS_EXPIRED = Metric(
    "receipts_expired",
    "Kept delivery receipts deleted after KEPT_RECEIPT_TTL without finding their message, by provider",
    "counter",
    ("provider",),
)
IN_DOUBT = Metric(
    "sends_in_doubt",
    "Messages put back in line although their send may have reached the provider, by why: `lease_expired` "
    "(the claim's worker died or hung past its job's timeout)",
    "counter",
    ("reason",),
)
WEBHOOK_INVALID_ITEMS = Metric(
    "webhook_invalid_items",
    "Items of webhook posts refused (the rest of their post applied), by provider and reason: missing, type, "
    "too_long, characters (could not be read) or database (refused when applied)",
    "counter",
    ("provider", "reason"),
)
LINK_REQUESTS = Metric(
    "link_requests",
    "Requests for short links (/l/{code}), by result: `click` (counted), `preview` (a link-preview fetcher, "
    "redirected, not counted), `head` (redirected, not counted), `unknown` (no such link: 404)",
    "counter",
    ("result",),
)
FALLBACKS = Metric(
    "sms_fallbacks",
    "SMS fallbacks of WhatsApp messages made, by result: `made` (to be sent), `skipped_opted_out` (the "
    "customer opted out of sms), `skipped_frequency_cap` (FREQUENCY_CAP held it back)",
    "counter",
    ("result",),
)
EVENT_METRICS = (
    HTTP_REQUESTS,
    HTTP_DURATION,
    MESSAGES,
    SEND_DURATION,
    RECEIPTS,
    RECEIPTS_EXPIRED,
    SPOOLED,
    IN_DOUBT,
    WEBHOOK_INVALID_ITEMS,
    LINK_REQUESTS,
    FALLBACKS,
)

# A histogram's fields: `<label values>` + SEPARATOR + `b<index of the bucket>` (the last is +Inf) or `sum`.
SEPARATOR = "\x1f"  # JSON escapes it: it never occurs in the encoded label values


def series_field(values: Iterable[str]) -> str:
    """The hash field of a series: its label values as a JSON list (any value round-trips)."""
    return json.dumps(list(values), separators=(",", ":"))


def bucket_index(buckets: tuple[float, ...], value: float) -> int:
    """The index of the first bucket `value` fits in (`len(buckets)`: only in +Inf)."""
    for index, bound in enumerate(buckets):
        if value <= bound:
            return index
    return len(buckets)


# --- recording: in memory, per process ---------------------------------------------------------------


class Recorder:
    """The deltas a process has counted since its last flush, and their flush into Redis. One per app
    (the app knows its Redis); thread-safe."""

    def __init__(self, app: Flask) -> None:
        self._app = weakref.ref(app)
        self.interval = app.config["METRICS_FLUSH_INTERVAL"]
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], float] = {}
        self._flushed_at = time.monotonic()
        self._dropping = False
        self._failing = False

    def add(self, key: str, field_name: str, amount: float) -> None:
        """Add `amount` to one field's delta."""
        with self._lock:
            slot = (key, field_name)
            if slot in self._pending:
                self._pending[slot] += amount
            elif len(self._pending) < MAX_SERIES:
                self._pending[slot] = amount
            elif not self._dropping:
                self._dropping = True
                log.warning("metrics: over %d series since the last flush; new ones are dropped", MAX_SERIES)

    def count(self, metric: Metric, values: Iterable[str], amount: int = 1) -> None:
        self.add(metric.key, series_field(values), amount)

    def observe(self, metric: Metric, values: Iterable[str], seconds: float) -> None:
        """One observation of a histogram: its bucket's count and the sum, under one lock."""
        prefix = series_field(values) + SEPARATOR
        with self._lock:
            for name, amount in ((f"b{bucket_index(metric.buckets, seconds)}", 1), ("sum", float(seconds))):
                slot = (metric.key, prefix + name)
                if slot in self._pending or len(self._pending) < MAX_SERIES:
                    self._pending[slot] = self._pending.get(slot, 0) + amount

    def take(self) -> dict[tuple[str, str], float]:
        """The deltas so far, leaving none: the caller flushes them, or gives them back."""
        with self._lock:
            taken, self._pending = self._pending, {}
            self._dropping = False
            self._flushed_at = time.monotonic()
        return taken

    def give_back(self, deltas: dict[tuple[str, str], float]) -> None:
        """Deltas a flush could not write: added to those counted since, to be tried again (bounded by
        `MAX_SERIES`, as new series are)."""
        for (key, field_name), amount in deltas.items():
            self.add(key, field_name, amount)

    def due(self) -> bool:
        return time.monotonic() - self._flushed_at >= self.interval

    def redis(self) -> Redis | None:
        app = self._app()
        return None if app is None else app.extensions.get("redis")

    def flush(self) -> bool:
        """Write the deltas into Redis in one round trip; on failure keep them for the next flush."""
        deltas = self.take()
        if not deltas:
            return True
        connection = self.redis()
        if connection is None:
            return False
        try:
            with connection.pipeline(transaction=True) as pipe:
                add_deltas(pipe, deltas)
                pipe.execute()
        except Exception as exc:  # noqa: BLE001 - Redis down or stalled: counted again at the next flush
            self.give_back(deltas)
            if not self._failing:  # one line per outage, not one per flush
                log.warning("metrics: cannot flush to Redis (%s: %s); kept for the next flush", type(exc).__name__, exc)
            self._failing = True
            return False
        if self._failing:
            log.info("metrics: flushed to Redis again")
        self._failing = False
        return True


def add_deltas(pipe, deltas: dict[tuple[str, str], float]) -> None:
    """Queue on `pipe` the commands adding `deltas`: whole numbers with HINCRBY, sums with HINCRBYFLOAT."""
    for (key, field_name), amount in deltas.items():
        if isinstance(amount, float):
            pipe.hincrbyfloat(key, field_name, amount)
        else:
            pipe.hincrby(key, field_name, amount)


# Every recorder of this process, and the one thread that flushes them (started by the first record).
_recorders: weakref.WeakSet[Recorder] = weakref.WeakSet()
_flusher: threading.Thread | None = None
_flusher_lock = threading.Lock()
# The longest the flusher sleeps: a recorder made meanwhile waits no longer than this for its first look.
IDLE_TICK = 1.0


def _flush_loop() -> None:
    """Flush each recorder when its interval has passed; forever (a daemon thread)."""
    while True:
        recorders = list(_recorders)
        time.sleep(min([r.interval for r in recorders] + [IDLE_TICK]))
        for recorder in recorders:
            if recorder.due():
                recorder.flush()
        del recorders


def _start_flusher() -> None:
    """Start this process's flush thread once: lazily, so that it runs in the process that records
    (after gunicorn forks its workers), not in a parent that forked it away."""
    global _flusher
    with _flusher_lock:
        if _flusher is None or not _flusher.is_alive():
            _flusher = threading.Thread(target=_flush_loop, name="metrics-flush", daemon=True)
            _flusher.start()


def _after_fork_in_child() -> None:
    """A forked child has no flush thread, and must not flush its parent's deltas a second time."""
    global _flusher, _flusher_lock
    _flusher, _flusher_lock = None, threading.Lock()
    for recorder in list(_recorders):
        recorder._lock = threading.Lock()
        recorder._pending = {}


def flush_all() -> None:
    """Flush every recorder of this process now (process exit; tests)."""
    for recorder in list(_recorders):
        recorder.flush()


def _flush_at_exit() -> None:
    """The last flush as the process exits. A second stop signal that lands during it (a gunicorn worker
    told to quit by its master after the first) ends it quietly: what was not flushed is lost, as in a
    kill, and no traceback is written."""
    with contextlib.suppress(SystemExit, KeyboardInterrupt):
        flush_all()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_flush_at_exit)


def _recorder() -> Recorder | None:
    """The current app's recorder, its flush thread started; None outside an app built by create_app."""
    return recorder_of(current_app)


def recorder_of(app: Flask) -> Recorder | None:
    """`app`'s recorder, its flush thread started (for code that runs outside an app context)."""
    recorder = app.extensions.get("metrics")
    if recorder is not None and (_flusher is None or not _flusher.is_alive()):
        _start_flusher()
    return recorder


def flush(app: Flask | None = None) -> bool:
    """Flush the deltas of `app` (default: the current app) into Redis now: a worker that stops, and tests
    that read the totals without waiting for the flush thread. Whether it succeeded (or had nothing)."""
    recorder = (app or current_app).extensions.get("metrics")
    return recorder.flush() if recorder is not None else True


# --- what the service records --------------------------------------------------------------------------

_RULE_ARGUMENT = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


def endpoint_label(rule: str | None) -> str:
    """A route as the OpenAPI document writes it (`/campaigns/{campaign_id}`), never the path a client sent:
    the label's values are the app's routes, plus `unmatched`."""
    return UNMATCHED if rule is None else _RULE_ARGUMENT.sub(r"{\1}", rule)


def _request_started() -> None:
    g.metrics_started = time.perf_counter()


def _request_answered(response: Response) -> Response:
    """Count the answer, with the status it leaves with (errors are already rendered: app.errors)."""
    recorder = _recorder()
    if recorder is None:
        return response
    method = request.method if request.method in HTTP_METHODS else "other"
    endpoint = endpoint_label(request.url_rule.rule if request.url_rule is not None else None)
    recorder.count(HTTP_REQUESTS, (method, endpoint, str(response.status_code)))
    started = g.get("metrics_started")
    if started is not None:
        recorder.observe(HTTP_DURATION, (method, endpoint), time.perf_counter() - started)
    return response


def message_outcome(outcome) -> tuple[str, str] | None:
    """The `outcome` and `error_class` labels of what a send's claim ended in (`send.store.Outcome`). None
    for a hand-back for want of a slot or for quiet hours: counted where it is decided (`limited`,
    `quiet_hours`)."""
    status = outcome.status
    if status == MessageStatus.SENT:
        return "sent", ""
    if status == MessageStatus.CANCELED:
        return "canceled", ""
    if status == MessageStatus.FAILED:
        return "failed", outcome.error_class or ""
    if outcome.error_class == ErrorClass.THROTTLED:
        return "throttled", ""
    if outcome.error_class == ErrorClass.ACCOUNT:
        return "paused", ErrorClass.ACCOUNT
    if outcome.not_before is not None or outcome.hand_back is not None:
        return None
    if status == MessageStatus.PENDING:  # a pause or a cancel came while it waited for its slot
        return "held", ""
    return "retry", outcome.error_class or ""


def count_message(channel: str, outcome: str, error_class: str = "") -> None:
    """Count one send job's outcome for `channel` (its provider is the channel's provider)."""
    recorder = _recorder()
    if recorder is not None:
        recorder.count(MESSAGES, (channel, _provider_of(channel), outcome, error_class))


def _provider_of(channel: str) -> str:
    """The provider of `channel`, from the settings, as `providers.provider_name` reads it (not imported:
    the providers import the receipts, which count here)."""
    return current_app.config["WHATSAPP_PROVIDER" if channel == Channel.WHATSAPP else "SMS_PROVIDER"]


def count_outcome(channel: str, outcome) -> None:
    """Count what a send's claim ended in (see `message_outcome`)."""
    labels = message_outcome(outcome)
    if labels is not None:
        count_message(channel, *labels)


def count_skipped() -> None:
    """Count a send job that found its message not queued for it (a repeat, or an earlier turn's job)."""
    recorder = _recorder()
    if recorder is not None:
        recorder.count(MESSAGES, ("", "", "skipped", ""))


def count_spooled(kind: str, count: int = 1) -> None:
    """Count `count` items of `kind` kept in Redis for PostgreSQL (`app.messaging.spool`)."""
    recorder = _recorder()
    if recorder is not None and count:
        recorder.count(SPOOLED, (kind,), count)


def count_expired_receipts(providers: Iterable[str]) -> None:
    """Count kept receipts deleted unmatched, one `provider` each."""
    recorder = _recorder()
    if recorder is not None:
        for provider in providers:
            recorder.count(RECEIPTS_EXPIRED, (provider,))


def count_in_doubt(count: int, reason: str = "lease_expired") -> None:
    """Count `count` messages put back in line although their send may have reached the provider."""
    recorder = _recorder()
    if recorder is not None and count:
        recorder.count(IN_DOUBT, (reason,), count)


def count_fallbacks(results: Iterable[str]) -> None:
    """Count SMS fallbacks made, one `result` each (`made`, `skipped_opted_out`, `skipped_frequency_cap`)."""
    recorder = _recorder()
    if recorder is not None:
        for result in results:
            recorder.count(FALLBACKS, (result,))


@contextlib.contextmanager
def provider_call(provider: str) -> Iterator[None]:
    """Time the block, a call to `provider`, into the send-latency histogram (a raising call too)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        recorder = _recorder()
        if recorder is not None:
            recorder.observe(SEND_DURATION, (provider,), time.perf_counter() - started)


def count_receipts(results: Iterable[tuple[str, str, str]]) -> None:
    """Count receipts as `(provider, status, result)`: `applied`, `unchanged` or `kept`."""
    recorder = _recorder()
    if recorder is not None:
        for values in results:
            recorder.count(RECEIPTS, values)


def count_invalid_webhook_items(provider: str, reasons: Iterable[str]) -> None:
    """Count items of a `provider`'s webhook post refused, one per reason given (`BadItem.reason`, or
    `database`)."""
    recorder = _recorder()
    if recorder is not None:
        for reason in reasons:
            recorder.count(WEBHOOK_INVALID_ITEMS, (provider, reason))


def count_link_request(result: str, recorder: Recorder | None) -> None:
    """Count a request for a short link: `click`, `preview`, `head` or `unknown` (answered outside any app
    context: the app's `recorder` is given)."""
    if recorder is not None:
        recorder.count(LINK_REQUESTS, (result,))


# --- the scrape ------------------------------------------------------------------------------------------

QUEUE_STATES = ("queued", "started", "scheduled", "deferred", "failed")


@dataclass
class Snapshot:
    """What a scrape read: the event hashes and the queues from Redis, campaigns from the database."""

    hashes: dict[str, dict[str, str]] = field(default_factory=dict)
    queues: dict[tuple[str, str], int] = field(default_factory=dict)
    workers: int | None = None
    overdue: dict[str, int] = field(default_factory=dict)
    spooled: dict[str, int] = field(default_factory=dict)
    redis_ok: bool = False
    campaigns: dict[str, int] | None = None


def _queue_keys(name: str, connection: Redis) -> list[tuple[str, str, str]]:
    """(state, Redis command, key) of RQ's list and registries of queue `name`, keys as RQ names them:
    what RQ's own counts read, without their cleanup writes."""
    queue = Queue(name, connection=connection)
    return [
        ("queued", "llen", queue.key),
        ("started", "zcard", queue.started_job_registry.key),
        ("scheduled", "zcard", queue.scheduled_job_registry.key),
        ("deferred", "zcard", queue.deferred_job_registry.key),
        ("failed", "zcard", queue.failed_job_registry.key),
    ]


def read_redis(snapshot: Snapshot, recorder: Recorder | None) -> None:
    """One round trip: this process's deltas added, then every metric hash, queue count and count of overdue
    scheduled jobs read back; then the live workers (a second one, `live_worker_count`'s own)."""
    deltas = recorder.take() if recorder is not None else {}
    connection = current_app.extensions["redis"]
    queue_reads = [
        (queue, state, command, key)
        for queue in current_app.config["QUEUES"]
        for state, command, key in _queue_keys(queue, connection)
    ]
    try:
        with connection.pipeline(transaction=True) as pipe:
            add_deltas(pipe, deltas)
            for metric in EVENT_METRICS:
                pipe.hgetall(metric.key)
            for _, _, command, key in queue_reads:
                getattr(pipe, command)(key)
            count_overdue(pipe, current_app.config["QUEUES"])
            for key in SPOOL_KEYS.values():
                pipe.llen(key)
            answers = pipe.execute()[len(deltas) :]
    except Exception:  # noqa: BLE001 - Redis down or stalled: the scrape answers without it
        log.warning("metrics: Redis unavailable for the scrape", exc_info=True)
        if recorder is not None:
            recorder.give_back(deltas)  # MULTI/EXEC: none of them was added
        return
    for metric, answer in zip(EVENT_METRICS, answers, strict=False):
        snapshot.hashes[metric.name] = {_text(k): _text(v) for k, v in answer.items()}
    queue_counts = answers[len(EVENT_METRICS) : len(EVENT_METRICS) + len(queue_reads)]
    for (queue, state, _, _), count in zip(queue_reads, queue_counts, strict=True):
        snapshot.queues[(queue, state)] = int(count)
    overdue = answers[len(EVENT_METRICS) + len(queue_reads) : -len(SPOOL_KEYS)]
    snapshot.overdue = dict(zip(current_app.config["QUEUES"], overdue, strict=True))
    snapshot.spooled = dict(zip(SPOOL_KEYS, answers[-len(SPOOL_KEYS) :], strict=True))
    snapshot.redis_ok = True
    try:
        snapshot.workers = live_worker_count(connection)
    except Exception:  # noqa: BLE001 - Redis went away between the two: the answer goes without the workers
        log.warning("metrics: could not count the live workers", exc_info=True)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def read_campaigns(snapshot: Snapshot) -> None:
    """Campaigns by status: one `GROUP BY` over the campaigns table, within `DATABASE_BUDGET`."""
    try:
        with round_trip_budget(DATABASE_BUDGET):
            rows = db.session.execute(select(Campaign.status, func.count()).group_by(Campaign.status)).all()
    except SQLAlchemyError:
        log.warning("metrics: database unavailable for the scrape", exc_info=True)
        with contextlib.suppress(SQLAlchemyError):
            db.session.rollback()
        return
    snapshot.campaigns = {status: 0 for status in CampaignStatus.ALL} | {status: count for status, count in rows}


@functools.lru_cache(maxsize=MAX_SERIES)
def _labels_of(series: str) -> tuple[str, ...]:
    """A series' label values from its hash field; cached: the same series come back at every scrape."""
    return tuple(json.loads(series))


def counter_family(metric: Metric, values: dict[str, str]) -> CounterMetricFamily:
    family = CounterMetricFamily(metric.full_name, metric.help, labels=metric.labels)
    for series, total in sorted(values.items()):
        family.add_metric(_labels_of(series), float(total))
    return family


def histogram_family(metric: Metric, values: dict[str, str]) -> HistogramMetricFamily:
    """A histogram from its per-bucket counts: cumulative `le` buckets, `+Inf` the total count."""
    per_series: dict[str, dict[str, float]] = {}
    for name, value in values.items():
        series, _, part = name.partition(SEPARATOR)
        per_series.setdefault(series, {})[part] = float(value)
    family = HistogramMetricFamily(metric.full_name, metric.help, labels=metric.labels)
    for series, parts in sorted(per_series.items()):
        cumulative, buckets = 0.0, []
        for index, bound in enumerate((*metric.buckets, float("inf"))):
            cumulative += parts.get(f"b{index}", 0.0)
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        family.add_metric(_labels_of(series), buckets, parts.get("sum", 0.0))
    return family


def families(snapshot: Snapshot) -> Iterator:
    """Every metric family of a scrape; those of a source that did not answer are left out."""
    sources = GaugeMetricFamily(
        f"{PREFIX}_metrics_source_up", "Whether the scrape could read the source (1) or not (0)", labels=("source",)
    )
    sources.add_metric(["redis"], float(snapshot.redis_ok))
    sources.add_metric(["database"], float(snapshot.campaigns is not None))
    yield sources
    if snapshot.redis_ok:
        for metric in EVENT_METRICS:
            build = counter_family if metric.kind == "counter" else histogram_family
            yield build(metric, snapshot.hashes.get(metric.name, {}))
        queues = GaugeMetricFamily(f"{PREFIX}_queue_jobs", "RQ jobs per queue and state", labels=("queue", "state"))
        for (queue, state), count in snapshot.queues.items():
            queues.add_metric([queue, state], count)
        yield queues
    if snapshot.workers is not None:
        yield GaugeMetricFamily(
            f"{PREFIX}_workers", "Live workers, counted from their heartbeats", value=snapshot.workers
        )
    if snapshot.overdue:
        overdue = GaugeMetricFamily(
            f"{PREFIX}_scheduled_jobs_overdue",
            f"Scheduled jobs (retries, postponed sends) due over {OVERDUE_AFTER} s ago and not yet queued, per queue",
            labels=("queue",),
        )
        for queue, count in snapshot.overdue.items():
            overdue.add_metric([queue], count)
        yield overdue
    if snapshot.spooled:
        waiting = GaugeMetricFamily(
            f"{PREFIX}_spool_waiting",
            "Items waiting in Redis for PostgreSQL to come back: send records (`outcomes`), receipts and keywords "
            "(`inbound`)",
            labels=("list",),
        )
        for name, count in snapshot.spooled.items():
            waiting.add_metric([name], count)
        yield waiting
    if snapshot.campaigns is not None:
        campaigns = GaugeMetricFamily(f"{PREFIX}_campaigns", "Campaigns by status", labels=("status",))
        for status, count in snapshot.campaigns.items():
            campaigns.add_metric([status], count)
        yield campaigns


class _Collected:
    """A prometheus_client collector over what one scrape read."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator:
        return families(self.snapshot)


def render() -> bytes:
    """The scrape's answer: this process's deltas flushed, then everything read back (see the module's doc)."""
    snapshot = Snapshot()
    read_redis(snapshot, _recorder())
    read_campaigns(snapshot)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collected(snapshot))
    return generate_latest(registry)


@bp.route("/metrics", endpoint="metrics")
class Metrics(MethodView):
    @bp.response(
        200,
        {"type": "string"},
        content_type="text/plain",
        description="The Prometheus text format (docs/operations.md#metrics)",
    )
    def get(self):
        """The service's metrics, every process together, in the Prometheus text format"""
        return Response(render(), status=200, content_type=CONTENT_TYPE_LATEST)


def init_app(app: Flask) -> None:
    """Count every request: the start hook runs first of all, so that a request refused by the rate
    limiter or the key check is timed too, and the answer hook last, so that it sees the final status.
    Call after every other hook is registered."""
    app.extensions["metrics"] = recorder = Recorder(app)
    _recorders.add(recorder)
    app.before_request_funcs.setdefault(None, []).insert(0, _request_started)
    app.after_request_funcs.setdefault(None, []).insert(0, _request_answered)  # they run last first
