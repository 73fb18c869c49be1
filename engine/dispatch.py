"""The dispatcher: claims due messages from the outbox, renders them, sends them, records outcomes.

Every message moves queued -> claimed -> sending -> sent | failed | unknown, each step committed:
- claiming is one UPDATE over a batch (`FOR UPDATE SKIP LOCKED` on PostgreSQL, so several workers
  never claim the same message; SQLite has a single writer);
- `sending` is committed before the request leaves, so a crash after that point leaves the message
  in `sending`, and `reconcile` marks it `unknown` instead of sending it again;
- a claim that expires before `sending` is safe to claim again: no request left.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, and_, insert, or_, select, update

from channels.base import Channel, OutgoingMessage, SendResult, SendStatus, load_adapter
from engine.clock import Clock
from engine.config import ChannelsFile
from engine.models import Customer, Membership, Message, MessageStatus, Outcome, table
from engine.templates import RenderError, TemplateStore

__all__ = ["DispatchReport", "Dispatcher", "build_channels"]

MAX_RETRIES = 5


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


class Dispatcher:
    """One worker; run as many as you like against PostgreSQL."""

    def __init__(self, engine: Engine, templates: TemplateStore, channels: Mapping[str, Channel],
                 clock: Clock, *, club: Mapping[str, Any] | None = None,
                 trigger_descriptions: Mapping[str, str] | None = None,
                 worker: str | None = None, claim_ttl: timedelta = timedelta(minutes=5)) -> None:
        self.engine = engine
        self.templates = templates
        self.channels = channels
        self.clock = clock
        self.club = dict(club or {})
        self.descriptions = dict(trigger_descriptions or {})
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.claim_ttl = claim_ttl

    def run_once(self, batch_size: int = 500) -> DispatchReport:
        """Claim up to `batch_size` due messages and send them."""
        report = DispatchReport()
        self.reconcile()
        claimed = self.claim(batch_size)
        report.claimed = len(claimed)
        if not claimed:
            return report
        contexts = self._contexts(claimed)
        for row in claimed:
            status = self._send_one(row, contexts)
            if status is SendStatus.SENT:
                report.sent += 1
                report.by_channel[row["channel"]] = report.by_channel.get(row["channel"], 0) + 1
            elif status is SendStatus.FAILED:
                report.failed += 1
            elif status is SendStatus.RETRY:
                report.retried += 1
            else:
                report.unknown += 1
        return report

    def close(self) -> None:
        """Close every channel's connections."""
        for channel in self.channels.values():
            channel.close()

    def drain(self, batch_size: int = 500) -> DispatchReport:
        """Send until nothing due is left."""
        total = DispatchReport()
        while True:
            report = self.run_once(batch_size)
            if not report.claimed:
                return total
            for name in ("claimed", "sent", "failed", "retried", "unknown"):
                setattr(total, name, getattr(total, name) + getattr(report, name))
            for ch, n in report.by_channel.items():
                total.by_channel[ch] = total.by_channel.get(ch, 0) + n
            if report.claimed == report.retried:
                return total  # everything left is waiting for a retry time

    # steps ---------------------------------------------------------------------------------------

    def claim(self, limit: int) -> list[dict[str, Any]]:
        now = self.clock.now()
        t = table(Message)
        due = or_(
            and_(t.c.status == MessageStatus.QUEUED, t.c.due_at <= now),
            and_(t.c.status == MessageStatus.CLAIMED, t.c.claim_expires_at < now),
        )
        with self.engine.begin() as conn:
            pick = select(t.c.id).where(due).order_by(t.c.due_at, t.c.id).limit(limit)
            if conn.dialect.name == "postgresql":
                pick = pick.with_for_update(skip_locked=True)
            rows = conn.execute(
                update(t).where(t.c.id.in_(pick.scalar_subquery()), due)
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

    def _contexts(self, rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
        ids = sorted({r["customer_id"] for r in rows})
        c = table(Customer)
        m = table(Membership)
        out: dict[int, dict[str, Any]] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
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

    def _send_one(self, row: dict[str, Any], contexts: dict[int, dict[str, Any]]) -> SendStatus:
        mid = row["id"]
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
            self._finish(mid, SendResult(SendStatus.FAILED, error=f"render: {exc}"), row)
            return SendStatus.FAILED
        if not self._mark_sending(mid):
            return SendStatus.UNKNOWN  # someone else took it over; do not send twice
        message = OutgoingMessage(
            message_id=mid, channel=row["channel"], recipient=row["recipient"],
            body=rendered.body, subject=rendered.subject, trigger_id=row["trigger_id"],
            customer_external_id=ctx["customer"].get("external_id", ""))
        try:
            result = channel.send(message)
        except Exception as exc:  # an adapter bug after the request may have left
            result = SendResult(SendStatus.UNKNOWN, error=f"{type(exc).__name__}: {exc}")
        self._finish(mid, result, row)
        return result.status

    def _mark_sending(self, mid: int) -> bool:
        t = table(Message)
        with self.engine.begin() as conn:
            return bool(conn.execute(
                update(t).where(t.c.id == mid, t.c.status == MessageStatus.CLAIMED,
                                t.c.claimed_by == self.worker)
                .values(status=MessageStatus.SENDING, attempts=t.c.attempts + 1)).rowcount)

    def _finish(self, mid: int, result: SendResult, row: dict[str, Any]) -> None:
        now = self.clock.now()
        t = table(Message)
        values: dict[str, Any] = {"last_error": result.error}
        if result.status is SendStatus.SENT:
            values.update(status=MessageStatus.SENT, sent_at=now,
                          provider_message_id=result.provider_message_id)
        elif result.status is SendStatus.RETRY and row["attempts"] + 1 < MAX_RETRIES:
            delay = result.retry_after if result.retry_after is not None \
                else 2.0 ** (row["attempts"] + 1)
            values.update(status=MessageStatus.QUEUED, due_at=now + timedelta(seconds=delay),
                          claimed_by=None, claim_expires_at=None)
        elif result.status is SendStatus.UNKNOWN:
            values.update(status=MessageStatus.UNKNOWN)
        else:
            values.update(status=MessageStatus.FAILED)
        outcome = MessageStatus(values["status"])
        with self.engine.begin() as conn:
            conn.execute(update(t).where(t.c.id == mid).values(**values))
            if outcome is not MessageStatus.QUEUED:
                detail = {k: v for k, v in (("error", result.error),
                                            ("error_class", result.error_class)) if v}
                conn.execute(insert(Outcome).values(
                    message_id=mid, status=outcome, occurred_at=now, source="dispatch",
                    detail=detail))
