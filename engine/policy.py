"""The contact policy: between evaluation and the outbox, set-wise, in the tick's transaction.

For the occurrences a tick writes, in this order, each step set-wise over all of them (never a
round trip per customer):

1. **channel**: the first of the trigger's (or variant's) channel and its fallbacks that the
   customer can receive: a contact point, consent for the trigger's purpose (the latest
   `consent_log` entry, else the channel's default in `config/policy.yaml`), allowed for the
   customer's segment, and, for a trigger with `in_quiet_hours: fallback`, open now in the
   customer's time zone. None: `skipped` with each channel's reason
   (`no_consent (sms); no_contact_point (email)`). The evaluator writes each occurrence with the
   chosen channel, or skipped with the reasons (`decision_sql`), and counts the refusals with
   the tick's other statuses.
2. **quiet hours**: a message due while its channel is closed in the customer's local time is
   deferred to the next local opening (`deferred: quiet_hours until 2026-03-09T08:00-07:00`);
   the outbox message is due then. Local times come from `zoneinfo`, so daylight-saving days
   are right. Customers without a time zone use the club's.
3. **budgets and caps** (marketing only): the per-cycle contact budget, each segment's per-channel
   cycle caps, then each frequency cap. Where a customer's new occurrences exceed what is left,
   the higher `priority` wins (ties: trigger id), and the rest are `skipped` with the reason:
   `cycle_budget 15/15` or `frequency_cap 1 per 1d` when nothing was left before this tick,
   `lower_priority than <trigger>` when a higher-priority trigger of the same tick took the room.
   The ranking reads only the customers a limit may touch (a temporary table filled once per
   tick): those with several messages in the tick or earlier messages near a limit, and their
   messages of the tick through the occurrences' customer index. The table's counts of earlier
   messages keep only the messages of the customer's current membership and those due within
   the longest frequency cap. SQLite reads just those, through the outbox's (customer,
   membership) and (customer, due) indexes; PostgreSQL's planner joins the counted customers
   by one pass over the outbox instead (cheaper, by its costs, than a probe per customer).

Every skipped occurrence keeps its reason; deferred ones keep theirs while they are messages.
Counting for caps and budgets takes every earlier message that was not refused before leaving
(status other than `failed`), including messages deferred to later.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ColumnElement,
    Connection,
    DateTime,
    FromClause,
    Insert,
    Integer,
    MetaData,
    Select,
    String,
    Table,
    Update,
    and_,
    bindparam,
    case,
    func,
    insert,
    literal,
    literal_column,
    not_,
    null,
    or_,
    select,
    true,
    union_all,
    update,
)

from engine.config import PolicyFile, QuietHours
from engine.db import analyze_scratch, empty_scratch
from engine.models import (
    ConsentEntry,
    Customer,
    Message,
    MessageStatus,
    Occurrence,
    OccurrenceStatus,
    table,
)
from engine.rulefile import Trigger
from engine.sqlfn import among, unindexed

__all__ = ["ContactPolicy", "PolicyReport", "next_opening"]

InZones = Callable[[Collection[str]], ColumnElement[bool]]
ByZone = Callable[[dict[str, Any], Any], ColumnElement[Any]]


def _at_risk_table(limits: int) -> Table:
    """The tick's marketing customers with their counts (`ContactPolicy._at_risk`): one row per
    customer of the tick's messages, with the membership they were sent under (key 0: none),
    the customer's number of messages in the tick and the counted messages under each limit,
    refilled in each tick's transaction; a temporary table, private to its connection, named by
    its number of limits."""
    return Table(f"policy_at_risk_{limits}", MetaData(),
                 Column("customer_id", BigInteger, primary_key=True),
                 Column("membership_key", BigInteger, primary_key=True),
                 Column("tick_n", Integer, nullable=False),
                 *(Column(f"used_{j}", Integer, nullable=False) for j in range(limits)),
                 prefixes=["TEMPORARY"])


def _over(counts: Table, j: int, k: int) -> ColumnElement[bool]:
    """The customer's messages in the tick could take them over the limit `j` of `k`."""
    return counts.c[f"used_{j}"] + counts.c.tick_n > k


MESSAGE = str(OccurrenceStatus.MESSAGE)
# the start of `decision_sql`'s value where no channel can take an occurrence: its reasons follow
REFUSED = "!"
SKIPPED = str(OccurrenceStatus.SKIPPED)
NO_CONTACT = "no_contact_point"


def next_opening(window: QuietHours, tz: str, now: datetime) -> datetime | None:
    """The next instant (UTC, naive) `window` opens in zone `tz` after `now`; None if open now."""
    zone = ZoneInfo(tz)
    local = now.replace(tzinfo=UTC).astimezone(zone)
    if window.is_open(local.time()):
        return None
    for days in range(3):
        day = local.date() + timedelta(days=days)
        opening = datetime.combine(day, window.start, tzinfo=zone)
        # a start inside a spring-forward gap: zoneinfo reads it with the earlier offset
        if opening > local:
            return opening.astimezone(UTC).replace(tzinfo=None)
    raise AssertionError("a daily window opens within two days")  # pragma: no cover


def _local_label(instant: datetime, tz: str) -> str:
    """`2026-03-09T08:00-07:00`: the local time a marketer reads, with its offset."""
    local = instant.replace(tzinfo=UTC).astimezone(ZoneInfo(tz))
    return local.isoformat(timespec="minutes")


@dataclass
class PolicyReport:
    """What the policy did in one tick."""

    deferred: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason kind -> count

    def skip(self, kind: str, count: int) -> None:
        if count:
            self.skipped[kind] = self.skipped.get(kind, 0) + count


@dataclass(frozen=True)
class _Statements:
    budgets: list[tuple[str, Update]]
    # the counts, what fills them and which limits have a customer at risk; None: no limits
    at_risk: tuple[Table, Insert, dict[str, Update], Select[Any]] | None


@dataclass(frozen=True)
class _Limit:
    """One budget or cap: at most `k` counted marketing messages per customer (and `channel`)
    in the membership cycle (`cycle`) or since `since`, over the tick's occurrences `where`."""

    kind: str
    k: int
    label: str
    channel: str | None = None
    cycle: bool = False
    since: Any = None  # a bound parameter: the start of the cap's window
    where: tuple[ColumnElement[bool], ...] = ()


class ContactPolicy:
    """The policy of `config/policy.yaml` for one rule set."""

    def __init__(self, policy: PolicyFile, contact: Mapping[str, str],
                 triggers: Sequence[Trigger]) -> None:
        self.policy = policy
        self.contact = dict(contact)  # channel -> customer column holding its contact point
        self.triggers = {t.id: t for t in triggers}
        self.marketing = sorted(t.id for t in triggers if t.purpose == "marketing")
        self._quiet_channels = sorted(policy.quiet_hours)
        self._built: _Statements | None = None

    # the tick's step -----------------------------------------------------------------------------

    def params(self, tick_id: int, now: datetime, zones: Collection[str],
               default_tz: str) -> dict[str, Any]:
        """The values the policy's expressions and statements are bound to in one tick: the tick,
        the zones where each quiet-hours channel is shut now (`closed_<i>`, and whether the
        club's zone is one of them: `closed_<i>_club`), the start of each cap's window
        (`since_<i>`) and of the longest (`policy_window`)."""
        params: dict[str, Any] = {"policy_tick": tick_id, "policy_now": now}
        for i, name in enumerate(self._quiet_channels):
            window = self.policy.quiet_hours[name]
            shut = {tz for tz in zones if next_opening(window, tz, now) is not None}
            params[f"closed_{i}"] = sorted(shut)
            params[f"closed_{i}_club"] = default_tz in shut
        for i, cap in enumerate(self.policy.frequency_caps):
            params[f"since_{i}"] = now - cap.per
        if self.policy.frequency_caps:
            params["policy_window"] = now - max(cap.per for cap in self.policy.frequency_caps)
        return params

    def apply(self, conn: Connection, params: dict[str, Any], now: datetime,
              zones: Collection[str], in_zones: InZones, by_zone: ByZone) -> PolicyReport:
        """Deferral and budgets for the occurrences of the tick `params` are bound to, whose
        channels (or refusals) the evaluator wrote with `decision_sql`. The evaluator counts the
        refusals, with the tick's other statuses."""
        report = PolicyReport()
        tick_id = params["policy_tick"]
        closed = {name: set(params[f"closed_{i}"])
                  for i, name in enumerate(self._quiet_channels)}
        self._defer(conn, tick_id, now, zones, closed, in_zones, by_zone, report)
        budgets = self._statements.budgets
        if budgets:
            assert self._statements.at_risk is not None
            counts, fill, tallies, risky = self._statements.at_risk
            empty_scratch(conn, counts)
            conn.execute(fill, params)
            # without statistics PostgreSQL took the counts for 200 customers, and hashed the
            # outbox to join them
            analyze_scratch(conn, counts, ("customer_id", "membership_key"))
            conn.execute(tallies[conn.dialect.name], params)
            # A limit no customer can exceed in this tick stops nothing (the skips of the limits
            # before it only lower what it ranks): its UPDATE, a pass over the tick's marketing
            # messages, is not run. In a steady tick that is most of them.
            at_risk = conn.execute(risky).one()
            for (kind, statement), any_at_risk in zip(budgets, at_risk, strict=True):
                if any_at_risk:
                    report.skip(kind, int(conn.execute(statement, params).rowcount or 0))
        return report

    @property
    def _statements(self) -> _Statements:
        """The policy's statements, built once: each tick only binds its parameters (tick,
        closed zones, cap windows), so SQLAlchemy's compiled cache serves every later tick."""
        if self._built is None:
            limits = self._limits()
            at_risk = self._at_risk(limits) if limits else None
            budgets = [] if at_risk is None else [
                (limit.kind, self._limit(j, limit, at_risk[0])) for j, limit in enumerate(limits)]
            self._built = _Statements(budgets, at_risk)
        return self._built

    # 1. channel ----------------------------------------------------------------------------------

    def decision_sql(self, trig: Trigger, c: FromClause, variant: ColumnElement[Any],
                     customer_id: ColumnElement[Any]) -> ColumnElement[Any]:
        """The channel an occurrence of `trig` goes out on, over the customer row `c`, the
        occurrence's `variant` and its customer's id, bound by `params`; where none can take
        it, `REFUSED` and each channel's reason (`!no_consent (sms); no_contact_point
        (email)`): one expression, so that the reasons are worked out only for those rows."""
        wait = trig.action.in_quiet_hours == "wait"

        def first(names: list[str]) -> ColumnElement[Any]:
            whens = [(self._can(ch, trig, c, customer_id, quiet=not wait), literal(ch))
                     for ch in names]
            if not wait:  # nothing open now: wait for the first channel that is otherwise fine
                whens += [(self._can(ch, trig, c, customer_id, quiet=False), literal(ch))
                          for ch in names]
            reasons = [self._why_not(ch, trig, c, customer_id, quiet=not wait) for ch in names]
            refused = literal(REFUSED) + reasons[0]
            for part in reasons[1:]:
                refused = refused + literal("; ") + part
            return case(*whens, else_=refused)

        default, variants = self._channel_lists(trig)
        if not variants:
            return first(default)
        return case(*((variant == name, first(chs)) for name, chs in variants.items()),
                    else_=first(default))

    def _channel_lists(self, trig: Trigger) -> tuple[list[str], dict[str, list[str]]]:
        """The trigger's channels in order of preference, and each variant's own if it has one."""
        default = list(dict.fromkeys([trig.action.channel, *trig.action.fallback]))
        variants = {name: list(dict.fromkeys([v.channel, *trig.action.fallback]))
                    for name, v in trig.variants.items() if v.channel}
        return default, variants

    def _has_contact(self, channel: str, c: Any) -> ColumnElement[bool]:
        column = c.c[self.contact[channel]]
        return and_(column.is_not(None), column != "")

    def _segment_allows(self, channel: str, c: Any) -> ColumnElement[bool]:
        barred = sorted(name for name, seg in self.policy.segments.items()
                        if seg.channels is not None and channel not in seg.channels)
        if not barred:
            return true()
        return or_(c.c.segment.is_(None), c.c.segment.not_in(barred))

    def _consents(self, channel: str, trig: Trigger,
                  customer_id: ColumnElement[Any]) -> ColumnElement[bool]:
        cl = table(ConsentEntry)
        latest = (select(cl.c.granted)
                  .where(cl.c.customer_id == customer_id, cl.c.channel == channel,
                         cl.c.purpose == trig.purpose)
                  .order_by(cl.c.id.desc()).limit(1).scalar_subquery())
        default = self.policy.consent.granted_by_default(channel, trig.purpose)
        return func.coalesce(latest, literal(default, Boolean())).is_(True)

    def _open_now(self, channel: str, trig: Trigger, c: Any) -> ColumnElement[bool]:
        """The channel is open in the customer's zone now (bound per tick: `closed_<i>` lists
        the zones where it is shut, `closed_<i>_club` whether the club's zone is one of them)."""
        if channel not in self._quiet_channels or not self._quiet_applies(trig):
            return true()
        i = self._quiet_channels.index(channel)
        shut = or_(c.c.timezone.in_(bindparam(f"closed_{i}", expanding=True)),
                   and_(c.c.timezone.is_(None),
                        bindparam(f"closed_{i}_club", type_=Boolean()).is_(True)))
        return not_(shut)

    def _quiet_applies(self, trig: Trigger) -> bool:
        return trig.purpose == "marketing" or self.policy.transactional_quiet_hours

    def _can(self, channel: str, trig: Trigger, c: Any, customer_id: ColumnElement[Any], *,
             quiet: bool) -> ColumnElement[bool]:
        checks = [self._has_contact(channel, c), self._segment_allows(channel, c),
                  self._consents(channel, trig, customer_id)]
        if quiet:
            checks.append(self._open_now(channel, trig, c))
        return and_(*checks)

    def _why_not(self, channel: str, trig: Trigger, c: Any, customer_id: ColumnElement[Any], *,
                 quiet: bool) -> ColumnElement[Any]:
        whens = [(not_(self._has_contact(channel, c)), literal(f"{NO_CONTACT} ({channel})")),
                 (not_(self._segment_allows(channel, c)),
                  func.coalesce(literal("segment ") + c.c.segment, literal("segment"))
                  + literal(f" excludes {channel}")),
                 (not_(self._consents(channel, trig, customer_id)),
                  literal(f"no_consent ({channel})"))]
        if quiet:
            whens.append((not_(self._open_now(channel, trig, c)),
                          literal(f"quiet_hours ({channel})")))
        return case(*whens, else_=literal(f"unavailable ({channel})"))

    # 2. quiet hours ------------------------------------------------------------------------------

    def _defer(self, conn: Connection, tick_id: int, now: datetime, zones: Collection[str],
               closed: dict[str, set[str]], in_zones: InZones, by_zone: ByZone,
               report: PolicyReport) -> None:
        o = table(Occurrence)
        c = table(Customer)
        applies = [t for t, trig in self.triggers.items() if self._quiet_applies(trig)]
        for channel, window in self.policy.quiet_hours.items():
            shut = sorted(closed.get(channel, ()))
            if not shut or not applies:
                continue
            until = {tz: next_opening(window, tz, now) for tz in shut}
            labels = {tz: f"deferred: quiet_hours until {_local_label(at, tz)}"
                      for tz, at in until.items() if at is not None}
            result = conn.execute(
                update(o).where(o.c.tick_id == tick_id, o.c.status == MESSAGE,
                                o.c.channel == channel, o.c.trigger_id.in_(applies),
                                c.c.id == o.c.customer_id, in_zones(shut))
                .values(not_before=by_zone(until, DateTime()), reason=by_zone(labels, String())))
            report.deferred += int(result.rowcount or 0)

    # 3. budgets and caps -------------------------------------------------------------------------

    def _limits(self) -> list[_Limit]:
        """The budgets and caps, in the order they are applied: cycle budget, segment caps,
        frequency caps."""
        if not self.marketing:
            return []
        o = table(Occurrence)
        out: list[_Limit] = []
        if self.policy.cycle_budget is not None:
            k = self.policy.cycle_budget
            out.append(_Limit("cycle_budget", k, f"cycle_budget {k}/{k}", cycle=True))
        for name, seg in sorted(self.policy.segments.items()):
            for channel, k in sorted(seg.max_per_cycle.items()):
                out.append(_Limit("segment_budget", k,
                                  f"segment_budget {name}: {channel} {k}/{k}", channel=channel,
                                  cycle=True,
                                  where=(o.c.channel == channel, self._in_segment(o, name))))
        for i, cap in enumerate(self.policy.frequency_caps):
            out.append(_Limit("frequency_cap", cap.max, f"frequency_cap {cap.label}",
                              channel=cap.channel,
                              since=bindparam(f"since_{i}", type_=DateTime()),
                              where=(o.c.channel == cap.channel,) if cap.channel else ()))
        return out

    def _at_risk(self, limits: Sequence[_Limit],
                 ) -> tuple[Table, Insert, dict[str, Update], Select[Any]]:
        """The counts every limit reads: each limit's ranking UPDATE then reads them by key
        instead of counting the customer's messages again, and passes over the customers whose
        messages in the tick and counted messages stay within it (most of a steady tick's
        customers). Filled in two steps: the tick's marketing customers (`fill`), then their
        earlier messages (`tallies`, by dialect): the messages of the current membership, and
        those of other memberships due within the longest frequency cap's window
        (`policy_window`), not the customer's whole history."""
        counts = _at_risk_table(len(limits))
        o = table(Occurrence)
        m = table(Message)
        # A customer's occurrences in one tick carry one membership: the customer's current
        # one, which the tick does not change. So one group per customer gives both the
        # customer's messages in the tick and their membership, without a window over the
        # (customer, membership) groups, which both databases sorted the tick's messages for.
        fill = insert(counts).from_select(
            [col.name for col in counts.columns],
            select(o.c.customer_id, func.max(func.coalesce(o.c.membership_id, 0)), func.count(),
                   *(literal_column("0") for _ in limits))
            .where(o.c.tick_id == bindparam("policy_tick", type_=Integer),
                   o.c.status == MESSAGE, o.c.trigger_id.in_(self.marketing))
            .group_by(o.c.customer_id))

        k = counts.alias("tick")
        counted = and_(m.c.trigger_id.in_(self.marketing), m.c.status != MessageStatus.FAILED)

        def earlier(on: ColumnElement[bool], cycle: bool,
                    *where: ColumnElement[bool]) -> Select[Any]:
            """The customers' counted messages joined `on` one index, flagged as of the
            current membership (`cycle`) or not. The counts drive the join: on SQLite, their
            key is kept off its index, which would otherwise offer a pass over the outbox."""
            return (select(k.c.customer_id, m.c.channel, m.c.due_at,
                           literal_column("1" if cycle else "0").label("cycle"))
                    .select_from(k.join(m, and_(m.c.customer_id == unindexed(k.c.customer_id),
                                                on)))
                    .where(counted, *where))

        window = bindparam("policy_window", type_=DateTime())
        windowed = any(limit.since is not None for limit in limits)
        cycled = any(limit.cycle for limit in limits)
        # SQLite: one join per index of the outbox, each read through its index
        if cycled:
            # key 0 is a customer without a membership, whose messages have none either
            parts = [earlier(m.c.membership_id == k.c.membership_key, True),
                     earlier(m.c.membership_id.is_(None), True, k.c.membership_key == 0)]
            if windowed:
                parts.append(earlier(m.c.due_at > window, False,
                                     func.coalesce(m.c.membership_id, 0) != k.c.membership_key))
        else:
            parts = [earlier(m.c.due_at > window, False)]
        # PostgreSQL: one join that keeps a message of the current membership or within the
        # window. Its planner joins each branch of the union above by a pass over the whole
        # outbox (cheaper, by its costs, than a probe of an index per counted customer), so
        # the union read the outbox twice where this reads it once.
        if cycled:
            current = or_(m.c.membership_id == k.c.membership_key,
                          and_(m.c.membership_id.is_(None), k.c.membership_key == 0))
            kept = or_(current, m.c.due_at > window) if windowed else current
            cycle: ColumnElement[Any] = case((current, 1), else_=0)
        else:
            kept, cycle = m.c.due_at > window, literal_column("0")
        one_pass = (select(k.c.customer_id, m.c.channel, m.c.due_at, cycle.label("cycle"))
                    .select_from(k.join(m, and_(m.c.customer_id == k.c.customer_id, kept)))
                    .where(counted))
        tallies = {dialect: self._tally(counts, found, limits)
                   for dialect, found in (("sqlite", union_all(*parts).subquery("earlier")),
                                          ("postgresql", one_pass.subquery("earlier")))}
        # whether any customer is at risk of each limit, in one pass over the counts
        risky = select(*(func.coalesce(func.max(case((_over(counts, j, limit.k), 1), else_=0)), 0)
                         for j, limit in enumerate(limits)))
        return counts, fill, tallies, risky

    @staticmethod
    def _tally(counts: Table, found: Any, limits: Sequence[_Limit]) -> Update:
        """The UPDATE of `counts` with each limit's count of the messages `found`."""
        def used(limit: _Limit) -> ColumnElement[Any]:
            terms: list[ColumnElement[bool]] = []
            if limit.channel:
                terms.append(found.c.channel == limit.channel)
            if limit.cycle:
                terms.append(found.c.cycle == 1)
            if limit.since is not None:
                terms.append(found.c.due_at > limit.since)
            return func.sum(case((and_(*terms), 1), else_=0))

        tallied = (select(found.c.customer_id,
                          *(used(limit).label(f"used_{j}") for j, limit in enumerate(limits)))
                   .group_by(found.c.customer_id).subquery("tallied"))
        return (update(counts).where(counts.c.customer_id == tallied.c.customer_id)
                .values({f"used_{j}": tallied.c[f"used_{j}"] for j in range(len(limits))}))

    @staticmethod
    def _in_segment(o: Any, segment: str) -> ColumnElement[bool]:
        c = table(Customer)
        inside: ColumnElement[bool] = o.c.customer_id.in_(
            select(c.c.id).where(c.c.segment == segment))
        return inside

    def _priority(self, o: Any) -> ColumnElement[Any]:
        groups: dict[int, list[str]] = {}
        for trig in self.triggers.values():
            groups.setdefault(trig.priority, []).append(trig.id)
        return case(*((o.c.trigger_id.in_(sorted(ids)), literal(p))
                      for p, ids in sorted(groups.items())), else_=literal(0))

    def _limit(self, j: int, limit: _Limit, counts: Table) -> Update:
        """Skip the tick's marketing messages beyond `limit.k` per customer (and channel),
        counting the customer's earlier messages (`used_<j>` of the counts) first and the higher
        priorities of the tick next. Only customers whose messages in the tick could take them
        over the limit are ranked."""
        o = table(Occurrence)
        k = limit.k
        used = (select(counts.c[f"used_{j}"]).where(counts.c.customer_id == o.c.customer_id,
                                     counts.c.membership_key
                                     == func.coalesce(o.c.membership_id, 0))
                .scalar_subquery())
        # The tick's messages of the customers at risk, read through the customers' index of
        # occurrences (customer, fired_at): a steady tick has a few thousand such messages among
        # tens of thousands. The other indexed terms are kept off their indexes: the tick's own
        # (`tick_id + 0`: PostgreSQL's statistics do not know a tick just written, take it for
        # one row and would read all of its messages through it, probing the counts for each),
        # and on SQLite the triggers' (the occurrences' key), which holds every earlier tick's.
        at_risk = and_(among(o.c.customer_id, select(counts.c.customer_id)
                             .where(_over(counts, j, k))),
                       o.c.fired_at == bindparam("policy_now", type_=DateTime()),
                       o.c.tick_id + literal_column("0")
                       == bindparam("policy_tick", type_=Integer),
                       unindexed(o.c.trigger_id).in_(self.marketing))
        partition = [o.c.customer_id, o.c.channel] if limit.channel else [o.c.customer_id]
        order = [self._priority(o).desc(), o.c.trigger_id]
        ranked = (select(o.c.id,
                         func.row_number().over(partition_by=partition, order_by=order)
                         .label("rank"),
                         func.first_value(o.c.trigger_id).over(partition_by=partition,
                                                               order_by=order).label("winner"),
                         used.label("used"))
                  .where(at_risk, o.c.status == MESSAGE, *limit.where)
                  .subquery("ranked"))
        # `lower_priority` only when another trigger of this tick took the room
        reason = case((or_(ranked.c.used >= k, ranked.c.winner == o.c.trigger_id),
                       literal(limit.label)),
                      else_=literal("lower_priority than ") + ranked.c.winner)
        return (update(o).where(o.c.id == ranked.c.id, ranked.c.rank + ranked.c.used > k)
                .values(status=SKIPPED, reason=reason, not_before=null(), recipient=null()))
