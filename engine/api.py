"""The HTTP API: ingestion, the triggers and their previews, a customer's messages, ticks.

    GET  /healthz                                  liveness (no key)
    POST /v1/customers/bulk                        upsert customers by external_id
    POST /v1/memberships/bulk                      upsert memberships by external_id
    POST /v1/consents/bulk                         append consent given or withdrawn
    POST /v1/events/bulk                           record events (re-sending one with its
                                                   external_id is harmless)
    GET  /v1/triggers                              every trigger: state, errors, counters
    GET  /v1/triggers/{trigger_id}/preview         who the trigger would fire for now
    GET  /v1/customers/{external_id}/messages      the customer's messages and their outcomes
    GET  /v1/customers/{external_id}/explain       the customer's whole story (`explain`)
    GET  /v1/stats[?window_days=N]                 per-trigger lift vs holdout (`stats`)
    POST /v1/tick                                  run one tick now (e.g. after ingestion)
    POST /webhooks/...                             provider callbacks (engine.webhooks); each
                                                   checks its provider's signature, not the key
    GET  /unsubscribe/{token}                      an email's unsubscribe link (engine.unsubscribe):
    POST /unsubscribe/{token}                      a confirm page, then the withdrawal; the token
                                                   is signed, no key

Every other path needs the key of `TOUCHPOINTS_API_KEY` in the `X-API-Key` header; it is checked
before the request body is read, and `create_app` refuses to build an app without a key, so the
API is never open. The OpenAPI pages (`/openapi.json`, `/docs`, `/redoc`) are open too.

A bulk batch is one transaction: it is written whole or not at all (422 naming the items at
fault), and never affects the batches before or after it.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, overload

from fastapi import APIRouter, Body, FastAPI, HTTPException, Path, Query, Request, Security
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select, text
from starlette.types import ASGIApp, Receive, Scope, Send

from engine import __version__
from engine.evaluation import TickBusy, TickKind
from engine.explain import explain_customer
from engine.importer import describe_error
from engine.ingest import ConsentIn, CustomerIn, EventIn, IngestResult, MembershipIn
from engine.models import Customer, Message, Outcome, TriggerState, table
from engine.rulefile import EventWhen, RelativeWhen, ScheduleWhen, StageWhen, Trigger
from engine.runtime import Runtime
from engine.unsubscribe import make_unsubscribe_router
from engine.webhooks import make_webhook_router

__all__ = ["API_KEY_HEADER", "MAX_ITEMS", "NoApiKey", "create_app"]

API_KEY_HEADER = "X-API-Key"
SIGNED_PREFIX = "/webhooks/"  # provider callbacks: each checks its provider's signature
# paths that carry their own proof instead of the key: provider signatures, signed links
SIGNED_PREFIXES = (SIGNED_PREFIX, "/unsubscribe/")
MAX_ITEMS = 10_000
# A 422 lists at most this many field errors; the message gives the total.
MAX_REPORTED = 1_000


class NoApiKey(RuntimeError):
    """The API was asked to start without an API key."""


# response models ---------------------------------------------------------------------------------

class Problem(BaseModel):
    """An error with one message."""

    detail: str


class FieldError(BaseModel):
    """One invalid value: where it is (`["body", "items", 3, "email"]`) and what is wrong."""

    loc: list[str | int]
    msg: str
    type: str


class ValidationProblem(BaseModel):
    """Invalid input: a summary and every invalid value; nothing of the request was written."""

    message: str
    detail: list[FieldError]


class Health(BaseModel):
    status: str


class BulkResult(BaseModel):
    """Rows accepted; an event already received under its external_id counts, once stored."""

    written: int


class TriggerStatus(StrEnum):
    """Whether a trigger runs, and if not, why."""

    ACTIVE = "active"
    DISABLED = "disabled"  # `enabled: false` in its rule file
    BROKEN = "broken"  # its rule file, condition or template has errors
    REMOVED = "removed"  # known to the database, gone from the rule files


class TriggerOut(BaseModel):
    """A trigger as marketers see it, with what the engine knows about it."""

    id: str
    description: str = ""
    stage: list[str] = Field(default_factory=list)
    when: str | None = None
    channel: str | None = None
    path: str | None = None
    status: TriggerStatus
    enabled: bool
    errors: list[str] = Field(default_factory=list)
    fired_total: int = 0
    last_tick_at: datetime | None = None


class PreviewRow(BaseModel):
    external_id: str
    arm: str
    variant: str | None
    channel: str | None
    status: str


class PreviewOut(BaseModel):
    """Who the trigger would fire for if a tick ran now; nothing is written."""

    trigger: str
    now: datetime
    would_fire: int
    would_send: int
    held_out: int
    skipped: int
    matching_conditions: int = Field(
        description="customers in the trigger's stage whose conditions hold, whenever it is due")
    sample: list[PreviewRow]


class OutcomeOut(BaseModel):
    status: str
    occurred_at: datetime
    source: str
    detail: dict[str, Any]


class MessageOut(BaseModel):
    """One message of the outbox, with its outcomes oldest first."""

    id: int
    trigger_id: str
    channel: str
    template: str
    recipient: str | None
    status: str
    created_at: datetime
    due_at: datetime
    sent_at: datetime | None
    attempts: int
    provider_message_id: str | None
    last_error: str | None
    outcomes: list[OutcomeOut]


class CustomerMessages(BaseModel):
    customer: str
    messages: list[MessageOut] = Field(description="newest first")


class TickRequest(BaseModel):
    """How to tick: incremental by default (only customers whose data changed)."""

    model_config = ConfigDict(extra="forbid")

    dry_run: bool = False
    kind: TickKind = TickKind.INCREMENTAL


class TickOut(BaseModel):
    tick_id: int
    kind: TickKind
    now: datetime
    dry_run: bool
    stage_changes: int
    occurrences: dict[str, int]
    messages: int
    held_out: int
    skipped: int
    deferred: int = Field(description="messages put off to after the channel's quiet hours")
    stopped: dict[str, int] = Field(description="occurrences the contact policy skipped, by step")
    seconds: float


class CustomersBatch(BaseModel):
    items: list[CustomerIn] = Field(max_length=MAX_ITEMS)


class MembershipsBatch(BaseModel):
    items: list[MembershipIn] = Field(max_length=MAX_ITEMS)


class EventsBatch(BaseModel):
    items: list[EventIn] = Field(max_length=MAX_ITEMS)


class ConsentsBatch(BaseModel):
    items: list[ConsentIn] = Field(max_length=MAX_ITEMS)


# helpers -----------------------------------------------------------------------------------------

@overload
def _utc(moment: datetime) -> datetime: ...


@overload
def _utc(moment: None) -> None: ...


def _utc(moment: datetime | None) -> datetime | None:
    """Stored timestamps are naive UTC; say so on the wire."""
    return None if moment is None else moment.replace(tzinfo=UTC)


def _loc_text(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _unprocessable(errors: list[FieldError], summary: str) -> JSONResponse:
    shown = "; ".join(f"{_loc_text(e.loc)}: {e.msg}" for e in errors[:3])
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    body = ValidationProblem(message=f"{summary}: {shown}{more}", detail=errors[:MAX_REPORTED])
    return JSONResponse(body.model_dump(mode="json"), status_code=422)


def _when(trigger: Trigger) -> str:
    when = trigger.when
    if isinstance(when, EventWhen):
        return f"event {when.event}"
    if isinstance(when, StageWhen):
        return f"entered stage {when.stage_entered}"
    if isinstance(when, RelativeWhen):
        side = "before" if when.before is not None else "after"
        return f"{when.days} days {side} {when.anchor.value} at {when.at:%H:%M} local"
    assert isinstance(when, ScheduleWhen)
    return f"schedule {when.schedule} local"


def _duplicates(external_ids: Sequence[str]) -> list[FieldError]:
    first: dict[str, int] = {}
    errors = []
    for i, key in enumerate(external_ids):
        if key in first:
            errors.append(FieldError(loc=["body", "items", i, "external_id"], type="duplicate",
                                     msg=f"duplicate external_id {key!r} (first at index "
                                         f"{first[key]})"))
        else:
            first[key] = i
    return errors


class _RequireApiKey:
    """Rejects requests without the right key before the body is read (pure ASGI middleware)."""

    def __init__(self, app: ASGIApp, key: bytes, open_paths: frozenset[str]) -> None:
        self.app = app
        self.key = key
        self.open_paths = open_paths
        self.header = API_KEY_HEADER.lower().encode("ascii")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in self.open_paths \
                or path.startswith(SIGNED_PREFIXES):
            await self.app(scope, receive, send)
            return
        given = next((value for name, value in scope["headers"] if name == self.header), None)
        if given is not None and secrets.compare_digest(given, self.key):
            await self.app(scope, receive, send)
            return
        detail = (f"missing API key: send it in the {API_KEY_HEADER} header" if given is None
                  else f"invalid API key in the {API_KEY_HEADER} header")
        response = JSONResponse(Problem(detail=detail).model_dump(), status_code=401,
                                headers={"WWW-Authenticate": f'APIKey header="{API_KEY_HEADER}"'})
        await response(scope, receive, send)


TAGS = [
    {"name": "ingestion", "description": "Customers, memberships and events from the club's "
                                         "systems, in batches of up to 10,000."},
    {"name": "triggers", "description": "The rule files' triggers: state, errors, previews."},
    {"name": "customers", "description": "What the engine did for one customer."},
    {"name": "ticks", "description": "Run the evaluation now instead of waiting for the "
                                     "scheduler."},
    {"name": "health", "description": "Liveness, without a key."},
]


# the app -----------------------------------------------------------------------------------------

def create_app(runtime: Runtime) -> FastAPI:
    """The API over one runtime; NoApiKey if `settings.api_key` is not set."""
    secret = runtime.settings.api_key
    key = secret.get_secret_value() if secret is not None else ""
    if not key.strip():
        raise NoApiKey("no API key configured: set TOUCHPOINTS_API_KEY; the API never runs open")
    if not key.isascii() or not key.isprintable() or key != key.strip():
        raise NoApiKey("TOUCHPOINTS_API_KEY must be printable ASCII without surrounding spaces "
                       "(it travels in an HTTP header)")

    app = FastAPI(title="Touchpoints", version=__version__, openapi_tags=TAGS,
                  description="Lifecycle trigger engine: ingest the club's data, inspect and "
                              f"preview triggers, follow messages. Send the key in "
                              f"`{API_KEY_HEADER}`.")
    open_paths = frozenset(p for p in ("/healthz", app.openapi_url, app.docs_url,
                                       app.swagger_ui_oauth2_redirect_url, app.redoc_url) if p)
    app.add_middleware(_RequireApiKey, key=key.encode("ascii"), open_paths=open_paths)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [FieldError(loc=list(e["loc"]), msg=describe_error(e), type=e["type"])
                  for e in exc.errors()]
        return _unprocessable(errors, f"{len(errors)} invalid value(s), nothing was written")

    # The middleware enforces the key; this declares it, so that OpenAPI shows the scheme.
    scheme = APIKeyHeader(name=API_KEY_HEADER, auto_error=False,
                          description="the key of TOUCHPOINTS_API_KEY")
    v1 = APIRouter(prefix="/v1", dependencies=[Security(scheme)],
                   responses={401: {"model": Problem, "description": "missing or wrong API key"},
                              422: {"model": ValidationProblem,
                                    "description": "invalid input; nothing was written"}})

    @app.get("/healthz", tags=["health"], response_model=Health)
    def healthz() -> Health:
        """The process runs and reaches its database."""
        with runtime.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return Health(status="ok")

    def _written(result: IngestResult, column: str) -> BulkResult | JSONResponse:
        if result.errors:
            errors = [FieldError(loc=["body", "items", e.index, column], msg=e.message,
                                 type="unknown_customer") for e in result.errors]
            return _unprocessable(errors, f"{len(errors)} item(s) refer to unknown customers, "
                                          "nothing of this batch was written")
        return BulkResult(written=result.written)

    @v1.post("/customers/bulk", tags=["ingestion"], response_model=BulkResult)
    def customers_bulk(batch: CustomersBatch) -> BulkResult | JSONResponse:
        """Create or update customers by external_id."""
        duplicates = _duplicates([c.external_id for c in batch.items])
        if duplicates:
            return _unprocessable(duplicates, "repeated external_id, nothing was written")
        return _written(runtime.ingestor.customers(batch.items), "external_id")

    @v1.post("/memberships/bulk", tags=["ingestion"], response_model=BulkResult)
    def memberships_bulk(batch: MembershipsBatch) -> BulkResult | JSONResponse:
        """Create or update memberships by external_id; their customers must exist."""
        duplicates = _duplicates([m.external_id for m in batch.items])
        if duplicates:
            return _unprocessable(duplicates, "repeated external_id, nothing was written")
        return _written(runtime.ingestor.memberships(batch.items), "customer_external_id")

    @v1.post("/events/bulk", tags=["ingestion"], response_model=BulkResult)
    def events_bulk(batch: EventsBatch) -> BulkResult | JSONResponse:
        """Record events; one whose external_id was seen before is not stored again."""
        return _written(runtime.ingestor.events(batch.items), "customer_external_id")

    @v1.post("/consents/bulk", tags=["ingestion"], response_model=BulkResult)
    def consents_bulk(batch: ConsentsBatch) -> BulkResult | JSONResponse:
        """Append consent entries (given or withdrawn); the latest per customer, channel and
        purpose is the customer's current consent."""
        result = runtime.ingestor.consents(batch.items, runtime.config.channels.channels)
        if result.errors:
            errors = [FieldError(
                loc=["body", "items", e.index,
                     "channel" if e.message.startswith("unknown channel") else
                     "customer_external_id"],
                msg=e.message, type="unknown_reference") for e in result.errors]
            return _unprocessable(errors, f"{len(errors)} item(s) refer to unknown customers or "
                                          "channels, nothing of this batch was written")
        return BulkResult(written=result.written)

    @v1.get("/stats", tags=["statistics"])
    def stats(window_days: Annotated[int | None, Query(
                  ge=1, le=3650, description="re-score every goal with this window")] = None,
              ) -> dict[str, Any]:
        """Per trigger, variant, stage, channel, segment and rule-file version: treated vs
        holdout conversion, lift with its 95% interval, p-value (`touchpoints stats`)."""
        from engine.stats import compute_stats, goals_of

        return compute_stats(runtime.engine, goals_of(runtime.ruleset.triggers),
                             window_days=window_days).as_dict()

    @v1.get("/triggers", tags=["triggers"], response_model=list[TriggerOut])
    def triggers() -> list[TriggerOut]:
        """Every trigger: loaded, disabled, broken (with its errors) and removed ones."""
        with runtime.engine.connect() as conn:
            states = {row.trigger_id: row for row in conn.execute(select(table(TriggerState)))}
        out: dict[str, TriggerOut] = {}
        for loaded in runtime.ruleset.triggers:
            trig = loaded.trigger
            state = states.get(trig.id)
            out[trig.id] = TriggerOut(
                id=trig.id, description=trig.description, stage=list(trig.stages),
                when=_when(trig), channel=trig.action.channel, path=str(loaded.path),
                status=TriggerStatus.ACTIVE if trig.enabled else TriggerStatus.DISABLED,
                enabled=trig.enabled, fired_total=state.fired_total if state else 0,
                last_tick_at=_utc(state.last_tick_at) if state else None)
        for trigger_id, diagnostics in runtime.ruleset.broken.items():
            messages = [str(d) for d in diagnostics]
            if trigger_id in out:  # e.g. a second trigger under the same id
                out[trigger_id].errors.extend(messages)
                continue
            state = states.get(trigger_id)
            path = getattr(diagnostics[0], "path", None) if diagnostics else None
            out[trigger_id] = TriggerOut(
                id=trigger_id, path=None if path is None else str(path),
                status=TriggerStatus.BROKEN, enabled=False, errors=messages,
                fired_total=state.fired_total if state else 0,
                last_tick_at=_utc(state.last_tick_at) if state else None)
        for trigger_id, state in states.items():
            if trigger_id not in out:
                out[trigger_id] = TriggerOut(
                    id=trigger_id, path=state.path, status=TriggerStatus.REMOVED, enabled=False,
                    errors=[str(e) for e in (state.errors or {}).get("errors", [])],
                    fired_total=state.fired_total, last_tick_at=_utc(state.last_tick_at))
        return sorted(out.values(), key=lambda t: (t.path or "", t.id))

    @v1.get("/triggers/{trigger_id}/preview", tags=["triggers"], response_model=PreviewOut,
            responses={404: {"model": Problem}, 409: {"model": Problem}})
    def preview(trigger_id: Annotated[str, Path(max_length=128)],
                sample: Annotated[int, Query(ge=0, le=1000)] = 10) -> PreviewOut:
        """Count and a sample of who the trigger would fire for if a tick ran now."""
        loaded = {t.trigger.id: t.trigger for t in runtime.ruleset.triggers}
        if trigger_id in runtime.ruleset.broken and trigger_id not in loaded:
            errors = "; ".join(str(d) for d in runtime.ruleset.broken[trigger_id])
            raise HTTPException(409, f"trigger {trigger_id!r} is broken and disabled: {errors}")
        if trigger_id not in loaded:
            raise HTTPException(404, f"unknown trigger {trigger_id!r}")
        if not loaded[trigger_id].enabled:
            raise HTTPException(409, f"trigger {trigger_id!r} is disabled in its rule file")
        try:
            result = runtime.evaluator.preview(trigger_id, sample=sample)
        except LookupError as exc:
            raise HTTPException(404, str(exc)) from None
        return PreviewOut.model_validate(
            {**result, "now": datetime.fromisoformat(result["now"]).replace(tzinfo=UTC)})

    @v1.get("/customers/{external_id}/messages", tags=["customers"],
            response_model=CustomerMessages, responses={404: {"model": Problem}})
    def customer_messages(external_id: Annotated[str, Path(max_length=128)],
                          limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> CustomerMessages:
        """The customer's messages, newest first, each with its outcomes (status history)."""
        m, o = table(Message), table(Outcome)
        with runtime.engine.connect() as conn:
            customer_id = conn.execute(
                select(Customer.id).where(Customer.external_id == external_id)).scalar()
            if customer_id is None:
                raise HTTPException(404, f"unknown customer {external_id!r}")
            messages = conn.execute(
                select(m).where(m.c.customer_id == customer_id)
                .order_by(m.c.created_at.desc(), m.c.id.desc()).limit(limit)).mappings().all()
            ids = [row["id"] for row in messages]
            history: dict[int, list[OutcomeOut]] = {i: [] for i in ids}
            if ids:
                for row in conn.execute(select(o).where(o.c.message_id.in_(ids))
                                        .order_by(o.c.occurred_at, o.c.id)).mappings():
                    history[row["message_id"]].append(OutcomeOut(
                        status=row["status"], occurred_at=_utc(row["occurred_at"]),
                        source=row["source"], detail=row["detail"] or {}))
        return CustomerMessages(customer=external_id, messages=[MessageOut(
            id=row["id"], trigger_id=row["trigger_id"], channel=row["channel"],
            template=row["template"], recipient=row["recipient"], status=row["status"],
            created_at=_utc(row["created_at"]), due_at=_utc(row["due_at"]),
            sent_at=_utc(row["sent_at"]), attempts=row["attempts"],
            provider_message_id=row["provider_message_id"], last_error=row["last_error"],
            outcomes=history[row["id"]]) for row in messages])

    @v1.get("/customers/{external_id}/explain", tags=["customers"],
            responses={404: {"model": Problem}})
    def customer_explain(external_id: Annotated[str, Path(max_length=128)],
                         trigger: Annotated[str | None, Query(max_length=128)] = None,
                         ) -> JSONResponse:
        """The customer's whole story: stage and stage history, each trigger's conditions with
        the values seen, consent per channel, every policy decision with its reason, every
        message with its outcomes."""
        with runtime.engine.connect() as conn:
            try:
                report = explain_customer(
                    conn, external_id, runtime.ruleset.triggers, runtime.evaluator.lifecycle,
                    runtime.config.club.timezone, runtime.clock.now(), only=trigger,
                    policy=runtime.config.policy, channels=list(runtime.config.channels.channels))
            except LookupError as exc:
                raise HTTPException(404, str(exc)) from None
        return JSONResponse(jsonable_encoder(report))

    @v1.post("/tick", tags=["ticks"], response_model=TickOut,
             responses={409: {"model": Problem, "description": "another process is ticking"}})
    def tick(request: Annotated[TickRequest | None, Body()] = None) -> TickOut:
        """Run one tick now; incremental unless asked for a full one."""
        request = request or TickRequest()
        try:
            result = runtime.evaluator.tick(kind=request.kind, dry_run=request.dry_run)
        except TickBusy:
            raise HTTPException(409, "another process is ticking this database; try again "
                                     "in a few seconds", headers={"Retry-After": "5"}) from None
        return TickOut.model_validate({**result.as_dict(), "now": _utc(result.now),
                                       "kind": result.kind})

    app.include_router(v1)
    # provider callbacks carry the provider's signature instead of our key
    app.include_router(make_webhook_router(runtime))
    app.include_router(make_unsubscribe_router(runtime))
    return app
