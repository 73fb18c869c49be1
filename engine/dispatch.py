"""The dispatcher: claims due messages from the outbox, renders them, sends them, records outcomes.

Every message moves queued -> claimed -> sending -> sent | failed | unknown, each step committed:
- claiming is one UPDATE over a batch (`FOR UPDATE SKIP LOCKED` on PostgreSQL, so several workers
  never claim the same message; SQLite has a single writer);
- `sending` is committed before the request leaves, so a crash after that point leaves the message
  in `sending`, and `reconcile` marks it `unknown` instead of sending it again;
- a claim that expires before `sending` is safe to claim again: no request left.

Throughput comes from several worker processes (`touchpoints dispatch --workers N`), each a
`Dispatcher` claiming its own batches (on SQLite `BEGIN IMMEDIATE` serialises the claims), and
within each from a pool of `concurrency` sending threads. Processes that share a sender pace it
together: `pacing=DatabaseBuckets(engine)` moves every channel's rate-limiter buckets into the
database, one row per sender, so N processes keep to the sender's rate, not N times it.

Sends overlap on a pool of `concurrency` threads. All database work stays on the calling thread:
it marks a wave of up to `concurrency` messages `sending` in one UPDATE just before handing them to
the pool, and records results in batches. A crash between marking a wave and its requests leaving
leaves some messages `sending` that were never sent; reconciliation calls them `unknown`. That is
the price of batching, and it keeps the guarantee that matters: a message is never sent twice.

Consent: a marketing message to a customer whose latest `consent_log` entry for (customer, channel,
marketing) withdraws consent fails with `no_consent` and no request. An `opt_out` answer from a
provider appends that withdrawal, in the same transaction as the outcome.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import socket
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    and_,
    bindparam,
    case,
    false,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from channels.base import Channel, OutgoingMessage, SendResult, SendStatus, load_adapter
from channels.errors import ErrorClass
from channels.ratelimit import BucketStore, RateLimiter
from engine.clock import Clock
from engine.config import ChannelsFile
from engine.models import (
    ConsentEntry,
    Counter,
    Customer,
    Membership,
    Message,
    MessageStatus,
    Outcome,
    table,
)
from engine.templates import RenderError, TemplateStore

__all__ = ["MARKETING", "NO_CONSENT", "DatabaseBuckets", "DispatchReport", "Dispatcher",
           "build_channels"]

MAX_RETRIES = 5
MARKETING = "marketing"
NO_CONSENT = "no_consent"
_CHUNK = 500  # ids per IN (...) list
_ERROR_CODE = re.compile(r"^\w+: \w+ (\d+)")  # "opt_out: twilio 21610 (HTTP 400): ..."

Row = dict[str, Any]

_OUTBOX = table(Message)
# Results are written with executemany: one statement per shape, built once.
_FINAL = (update(_OUTBOX).where(_OUTBOX.c.id == bindparam("b_id"))
          .values(status=bindparam("b_status"), last_error=bindparam("b_error"),
                  sent_at=bindparam("b_sent_at"), provider_message_id=bindparam("b_provider_id")))
_AGAIN = (update(_OUTBOX).where(_OUTBOX.c.id == bindparam("b_id"))
          .values(status=MessageStatus.QUEUED, last_error=bindparam("b_error"),
                  due_at=bindparam("b_due"), claimed_by=None, claim_expires_at=None))


class DatabaseBuckets:
    """Senders' token buckets in the database, for dispatcher processes that share a sender.

    Each bucket is one `counters` row holding the bucket's theoretical arrival time (GCRA) in
    microseconds of the wall clock: a reservation moves it on by one interval in one UPDATE, so
    processes queue up for the sender's slots as threads do in a `RateLimiter`. The processes
    must share a clock: on one host they do; across hosts it is as good as NTP keeps it.
    """

    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self._clock = clock

    @staticmethod
    def name(key: Hashable) -> str:
        """The counter row of `key` (names are at most 32 characters)."""
        return "pace:" + hashlib.sha1(repr(key).encode()).hexdigest()[:27]

    def reserve(self, key: Hashable, rate_per_second: float, burst: int) -> float:
        """Take the next slot of `key`'s bucket; the seconds to wait for it."""
        interval = round(1e6 / rate_per_second)
        name = self.name(key)
        c = table(Counter)
        with self.engine.begin() as conn:
            now = round(self._clock() * 1e6)  # after BEGIN: a wait for the lock is not counted
            advance = (update(c).where(c.c.name == name)
                       .values(value=case((c.c.value > now, c.c.value), else_=now) + interval)
                       .returning(c.c.value))
            tat = conn.execute(advance).scalar()
            if tat is None:  # the first reservation: a new row (a racing insert retries)
                try:
                    with conn.begin_nested():
                        conn.execute(insert(c).values(name=name, value=now + interval))
                    tat = now + interval
                except IntegrityError:
                    tat = conn.execute(advance).scalar_one()
        allowed = int(tat) - burst * interval  # the slot's start, less the burst allowance
        return max(0, allowed - round(self._clock() * 1e6)) / 1e6


def build_channels(config: ChannelsFile, overrides: Mapping[str, dict[str, Any]] | None = None,
                   ) -> dict[str, Channel]:
    """Instantiate every configured channel through its registered adapter."""
    out: dict[str, Channel] = {}
    for name, ch in config.channels.items():
        settings = {**ch.settings, **((overrides or {}).get(name, {}))}
        out[name] = load_adapter(ch.adapter).from_config(name, settings)
    return out


@dataclass
class DispatchReport:
    claimed: int = 0
    sent: int = 0
    failed: int = 0
    retried: int = 0
    unknown: int = 0
    by_channel: dict[str, int] = field(default_factory=dict)

    def add(self, other: DispatchReport) -> None:
        """Add `other`'s counts to these."""
        for name in ("claimed", "sent", "failed", "retried", "unknown"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for ch, n in other.by_channel.items():
            self.by_channel[ch] = self.by_channel.get(ch, 0) + n

    def count(self, row: Row, status: SendStatus) -> None:
        """Count one message's result."""
        if status is SendStatus.SENT:
            self.sent += 1
            self.by_channel[row["channel"]] = self.by_channel.get(row["channel"], 0) + 1
        elif status is SendStatus.FAILED:
            self.failed += 1
        elif status is SendStatus.RETRY:
            self.retried += 1
        else:
            self.unknown += 1


def _send(channel: Channel, message: OutgoingMessage) -> SendResult:
    try:
        return channel.send(message)
    except Exception as exc:  # an adapter bug after the request may have left
        return SendResult(SendStatus.UNKNOWN, error=f"{type(exc).__name__}: {exc}")


class Dispatcher:
    """One worker; run as many as you like, in threads or processes, against one database."""

    def __init__(self, engine: Engine, templates: TemplateStore, channels: Mapping[str, Channel],
                 clock: Clock, *, club: Mapping[str, Any] | None = None,
                 trigger_descriptions: Mapping[str, str] | None = None,
                 trigger_purposes: Mapping[str, str] | None = None,
                 worker: str | None = None, claim_ttl: timedelta = timedelta(minutes=5),
                 concurrency: int = 1, pacing: BucketStore | None = None,
                 unsubscribe_url: Callable[[int, str], str | None] | None = None) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.engine = engine
        self.templates = templates
        self.channels = channels
        self.clock = clock
        self.club = dict(club or {})
        self.descriptions = dict(trigger_descriptions or {})
        self.purposes = dict(trigger_purposes or {})  # trigger id -> purpose; default marketing
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.claim_ttl = claim_ttl
        self.concurrency = concurrency
        self._pool: ThreadPoolExecutor | None = None
        # (customer id, channel) -> the link for List-Unsubscribe (engine.unsubscribe), or None
        self.unsubscribe_url = unsubscribe_url
        if pacing is not None:  # several processes share these senders: pace them together
            for channel in channels.values():
                limiter = getattr(channel, "limiter", None)
                if isinstance(limiter, RateLimiter):
                    limiter.store = pacing

    def run_once(self, batch_size: int = 500) -> DispatchReport:
        """Claim up to `batch_size` due messages and send them."""
        report = DispatchReport()
        self.reconcile()
        claimed = self.claim(batch_size)
        report.claimed = len(claimed)
        if not claimed:
            return report
        contexts = self._contexts(claimed)
        withdrawn = self._withdrawn(claimed)
        blocked: list[Row] = []
        finished: list[tuple[Row, SendResult]] = []
        ready: deque[tuple[Row, OutgoingMessage, Channel]] = deque()
        for row in claimed:
            if self._needs_consent(row) and (row["customer_id"], row["channel"]) in withdrawn:
                blocked.append(row)
                continue
            prepared = self._prepare(row, contexts)
            if isinstance(prepared, SendResult):
                finished.append((row, prepared))
            else:
                ready.append((row, *prepared))
        self._send_all(ready, withdrawn, blocked, finished, report)
        self._block(blocked, report)
        return report

    def close(self) -> None:
        """Stop the sending threads and close every channel's connections."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for channel in self.channels.values():
            channel.close()

    def drain(self, batch_size: int = 500) -> DispatchReport:
        """Send until nothing due is left."""
        total = DispatchReport()
        while True:
            report = self.run_once(batch_size)
            if not report.claimed:
                return total
            total.add(report)
            if report.claimed == report.retried:
                return total  # everything left is waiting for a retry time

    # steps ---------------------------------------------------------------------------------------

    def claim(self, limit: int) -> list[Row]:
        """Claim up to `limit` due messages for this worker, oldest first."""
        now = self.clock.now()
        t = table(Message)
        due = or_(
            and_(t.c.status == MessageStatus.QUEUED, t.c.due_at <= now),
            and_(t.c.status == MessageStatus.CLAIMED, t.c.claim_expires_at < now),
        )
        with self.engine.begin() as conn:
            pick = select(t.c.id).where(due).order_by(t.c.due_at, t.c.id).limit(limit)
            picked: Any = pick.scalar_subquery()
            if conn.dialect.name == "postgresql":
                # Materialised: as a plain IN subquery PostgreSQL may rescan the locking
                # LIMIT for each outer row, and claimed more than `limit` rows.
                cte = pick.with_for_update(skip_locked=True).cte("pick") \
                    .prefix_with("MATERIALIZED")
                picked = select(cte.c.id)
            rows = conn.execute(
                update(t).where(t.c.id.in_(picked), due)
                .values(status=MessageStatus.CLAIMED, claimed_by=self.worker,
                        claim_expires_at=now + self.claim_ttl)
                .returning(t.c.id, t.c.customer_id, t.c.trigger_id, t.c.channel, t.c.template,
                           t.c.recipient, t.c.attempts)
            ).mappings().all()
        return sorted((dict(r) for r in rows), key=lambda r: r["id"])

    def reconcile(self) -> int:
        """Messages left in `sending` past their claim (a crashed worker) become `unknown`."""
        now = self.clock.now()
        t = table(Message)
        with self.engine.begin() as conn:
            stale = conn.execute(
                update(t).where(t.c.status == MessageStatus.SENDING, t.c.claim_expires_at < now)
                .values(status=MessageStatus.UNKNOWN,
                        last_error="worker stopped after the request may have left")
                .returning(t.c.id)).scalars().all()
            for mid in stale:
                conn.execute(insert(Outcome).values(
                    message_id=mid, status=MessageStatus.UNKNOWN, occurred_at=now,
                    source="reconcile", detail={}))
        return len(stale)

    def _needs_consent(self, row: Row) -> bool:
        return self.purposes.get(row["trigger_id"], MARKETING) == MARKETING

    def _withdrawn(self, rows: list[Row]) -> set[tuple[int, str]]:
        """(customer, channel) pairs of `rows` whose latest marketing consent entry withdraws it."""
        wanted = {(r["customer_id"], r["channel"]) for r in rows if self._needs_consent(r)}
        if not wanted:
            return set()
        ids = sorted({cid for cid, _ in wanted})
        names = sorted({name for _, name in wanted})
        cl = table(ConsentEntry)
        out: set[tuple[int, str]] = set()
        with self.engine.connect() as conn:
            for start in range(0, len(ids), _CHUNK):
                latest = (select(func.max(cl.c.id))
                          .where(cl.c.customer_id.in_(ids[start:start + _CHUNK]),
                                 cl.c.channel.in_(names), cl.c.purpose == MARKETING)
                          .group_by(cl.c.customer_id, cl.c.channel))
                out.update((int(cid), str(ch)) for cid, ch in conn.execute(
                    select(cl.c.customer_id, cl.c.channel)
                    .where(cl.c.id.in_(latest.scalar_subquery()), cl.c.granted == false())))
        return out & wanted

    def _contexts(self, rows: list[Row]) -> dict[int, dict[str, Any]]:
        ids = sorted({r["customer_id"] for r in rows})
        c = table(Customer)
        m = table(Membership)
        out: dict[int, dict[str, Any]] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start:start + _CHUNK]
                result = conn.execute(
                    select(c, m.c.external_id.label("m_external_id"), m.c.plan, m.c.price,
                           m.c.starts_on, m.c.ends_on, m.c.status)
                    .select_from(c.outerjoin(m, m.c.id == c.c.current_membership_id))
                    .where(c.c.id.in_(chunk))).mappings()
                for row in result:
                    customer = {k: row[k] for k in c.c.keys()}  # noqa: SIM118
                    membership = None if row["m_external_id"] is None else {
                        "external_id": row["m_external_id"], "plan": row["plan"],
                        "price": row["price"], "starts_on": row["starts_on"],
                        "ends_on": row["ends_on"], "status": row["status"]}
                    out[row["id"]] = {"customer": customer, "membership": membership}
        return out

    def _prepare(self, row: Row, contexts: dict[int, dict[str, Any]],
                 ) -> tuple[OutgoingMessage, Channel] | SendResult:
        """The rendered message and its channel, or the failure that stops it before sending."""
        ctx = contexts.get(row["customer_id"], {"customer": {}, "membership": None})
        channel = self.channels.get(row["channel"])
        try:
            if channel is None:
                raise RenderError(f"channel {row['channel']!r} is not configured")
            if not row["recipient"]:
                raise RenderError("no recipient")
            rendered = self.templates.render(row["template"], row["channel"], {
                **ctx, "club": self.club, "variant": None,
                "trigger": {"id": row["trigger_id"],
                            "description": self.descriptions.get(row["trigger_id"], "")}})
        except RenderError as exc:
            return SendResult(SendStatus.FAILED, error=f"render: {exc}")
        link = None if self.unsubscribe_url is None \
            else self.unsubscribe_url(row["customer_id"], row["channel"])
        return OutgoingMessage(
            message_id=row["id"], channel=row["channel"], recipient=row["recipient"],
            body=rendered.body, subject=rendered.subject, trigger_id=row["trigger_id"],
            customer_external_id=ctx["customer"].get("external_id", ""),
            metadata={} if link is None else {"unsubscribe_url": link}), channel

    def _send_all(self, ready: deque[tuple[Row, OutgoingMessage, Channel]],
                  withdrawn: set[tuple[int, str]], blocked: list[Row],
                  finished: list[tuple[Row, SendResult]], report: DispatchReport) -> None:
        """Send `ready` in waves of `concurrency`, recording `finished` results in batches.

        An opt-out answer withdraws consent for the messages of the batch not yet sent.
        """
        in_flight: dict[Future[SendResult], Row] = {}
        # completions arrive on a queue: waiting on every future in flight costs O(in flight)
        completed: queue.SimpleQueue[Future[SendResult]] = queue.SimpleQueue()
        while ready or in_flight:
            if ready and len(in_flight) < self.concurrency:
                wave: list[tuple[Row, OutgoingMessage, Channel]] = []
                while ready and len(wave) < self.concurrency:
                    item = ready.popleft()
                    row = item[0]
                    if self._needs_consent(row) \
                            and (row["customer_id"], row["channel"]) in withdrawn:
                        blocked.append(row)
                    else:
                        wave.append(item)
                marked = self._mark_sending_many([row["id"] for row, _, _ in wave])
                for row, message, channel in wave:
                    if row["id"] in marked:
                        future = self._submit(channel, message)
                        in_flight[future] = row
                        future.add_done_callback(completed.put)
                    else:
                        report.count(row, SendStatus.UNKNOWN)  # taken over: never send twice
            if in_flight:
                done = [completed.get()]
                while not completed.empty():
                    done.append(completed.get())
                for future in done:
                    row = in_flight.pop(future)
                    result = future.result()
                    finished.append((row, result))
                    if result.error_class == ErrorClass.OPT_OUT:
                        withdrawn.add((row["customer_id"], row["channel"]))
            if len(finished) >= self.concurrency:
                self._record(finished, report)
        self._record(finished, report)

    def _submit(self, channel: Channel, message: OutgoingMessage) -> Future[SendResult]:
        """Send on the pool; inline when there is no concurrency to gain."""
        if self.concurrency == 1:
            done: Future[SendResult] = Future()
            done.set_result(_send(channel, message))
            return done
        if self._pool is None:
            # one pool for the dispatcher's life: adapters may keep per-thread connections
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="dispatch")
        return self._pool.submit(_send, channel, message)

    def _record(self, finished: list[tuple[Row, SendResult]], report: DispatchReport) -> None:
        """Write and count `finished`, then empty it."""
        if finished:
            for row, result in finished:
                report.count(row, result.status)
            self._finish_many(finished)
            finished.clear()

    def _mark_sending(self, mid: int) -> bool:
        return mid in self._mark_sending_many([mid])

    def _mark_sending_many(self, ids: list[int]) -> set[int]:
        """Mark this worker's claimed `ids` as `sending`, committed; the ids it could mark."""
        if not ids:
            return set()
        t = table(Message)
        # a fresh claim per wave, so a wave that waited behind a rate limit is not reconciled
        expires = self.clock.now() + self.claim_ttl
        with self.engine.begin() as conn:
            return {int(mid) for mid in conn.execute(
                update(t).where(t.c.id.in_(ids), t.c.status == MessageStatus.CLAIMED,
                                t.c.claimed_by == self.worker)
                .values(status=MessageStatus.SENDING, attempts=t.c.attempts + 1,
                        claim_expires_at=expires)
                .returning(t.c.id)).scalars()}

    def _block(self, rows: list[Row], report: DispatchReport) -> None:
        """Fail messages without consent, with no request: one UPDATE, one INSERT."""
        if not rows:
            return
        now = self.clock.now()
        t = table(Message)
        with self.engine.begin() as conn:
            ids = sorted(conn.execute(
                update(t).where(t.c.id.in_([r["id"] for r in rows]),
                                t.c.status == MessageStatus.CLAIMED,
                                t.c.claimed_by == self.worker)
                .values(status=MessageStatus.FAILED, last_error=NO_CONSENT)
                .returning(t.c.id)).scalars())
            if ids:
                conn.execute(insert(Outcome), [
                    {"message_id": mid, "status": MessageStatus.FAILED, "occurred_at": now,
                     "source": "dispatch", "detail": {"error": NO_CONSENT}} for mid in ids])
        marked = set(ids)
        for row in rows:
            report.count(row, SendStatus.FAILED if row["id"] in marked else SendStatus.UNKNOWN)

    def _finish_many(self, items: Iterable[tuple[Row, SendResult]]) -> None:
        """Record results in one transaction: the messages, their outcomes, any opt-outs."""
        now = self.clock.now()
        final: list[dict[str, Any]] = []
        again: list[dict[str, Any]] = []
        outcomes: list[dict[str, Any]] = []
        consents: list[dict[str, Any]] = []
        for row, result in items:
            status, due_at = self._next_status(row, result, now)
            if status is MessageStatus.QUEUED:
                again.append({"b_id": row["id"], "b_error": result.error, "b_due": due_at})
            else:
                sent = status is MessageStatus.SENT
                final.append({"b_id": row["id"], "b_status": status, "b_error": result.error,
                              "b_sent_at": now if sent else None,
                              "b_provider_id": result.provider_message_id if sent else None})
                outcomes.append({"message_id": row["id"], "status": status, "occurred_at": now,
                                 "source": "dispatch", "detail": self._detail(row, result)})
            if result.error_class == ErrorClass.OPT_OUT:
                consents.append({"customer_id": row["customer_id"], "channel": row["channel"],
                                 "purpose": MARKETING, "granted": False, "occurred_at": now,
                                 "source": self._opt_out_source(row, result)})
        with self.engine.begin() as conn:
            if final:
                conn.execute(_FINAL, final)
            if again:
                conn.execute(_AGAIN, again)
            self._insert(conn, outcomes, consents)

    @staticmethod
    def _insert(conn: Connection, outcomes: list[dict[str, Any]],
                consents: list[dict[str, Any]]) -> None:
        if outcomes:
            conn.execute(insert(Outcome), outcomes)
        if consents:
            conn.execute(insert(ConsentEntry), consents)

    @staticmethod
    def _next_status(row: Row, result: SendResult,
                     now: datetime) -> tuple[MessageStatus, datetime | None]:
        """Where a result moves the message, and when a retry is due."""
        if result.status is SendStatus.SENT:
            return MessageStatus.SENT, None
        if result.status is SendStatus.RETRY and row["attempts"] + 1 < MAX_RETRIES:
            delay = result.retry_after if result.retry_after is not None \
                else 2.0 ** (row["attempts"] + 1)
            return MessageStatus.QUEUED, now + timedelta(seconds=delay)
        if result.status is SendStatus.UNKNOWN:
            return MessageStatus.UNKNOWN, None
        return MessageStatus.FAILED, None

    @staticmethod
    def _detail(row: Row, result: SendResult) -> dict[str, Any]:
        detail: dict[str, Any] = {k: v for k, v in (("error", result.error),
                                                    ("error_class", result.error_class)) if v}
        if result.error_class == ErrorClass.INVALID_RECIPIENT:
            # the contact point itself is bad: the customer's record needs a new one
            detail["contact_point"] = {"channel": row["channel"], "recipient": row["recipient"],
                                       "valid": False}
        return detail

    def _opt_out_source(self, row: Row, result: SendResult) -> str:
        """Who withdrew consent, as `provider:code` (e.g. `twilio:21610`)."""
        channel = self.channels.get(row["channel"])
        provider = str(getattr(channel, "provider", "") or getattr(channel, "kind", "")
                       or row["channel"])
        match = _ERROR_CODE.match(result.error or "")
        return f"{provider}:{match.group(1) if match else ErrorClass.OPT_OUT}"[:64]
