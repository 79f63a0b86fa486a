"""The tables: customers (their opt-outs and imports), campaigns, their outbound messages and the counts
of those; API keys, idempotency keys and the service's own secrets."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ColumnElement,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    case,
    literal,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app import clock
from app.extensions import db


def utcnow() -> datetime:
    return clock.now()


class UTCDateTime(TypeDecorator):
    """A timestamp that is always timezone-aware UTC in Python, on PostgreSQL and on SQLite."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        # SQLite keeps no offset: store naive UTC there.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# BIGINT on PostgreSQL; SQLite only auto-increments a column declared INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")
# JSONB on PostgreSQL (operators, a GIN index), JSON text on SQLite.
JsonObject = JSON().with_variant(JSONB(), "postgresql")


class CampaignStatus:
    DRAFT = "draft"
    SCHEDULED = "scheduled"
    SENDING = "sending"
    PAUSED = "paused"  # an operator paused it, or a provider refused the account: nothing is sent until resumed
    SENT = "sent"
    FAILED = "failed"
    CANCELED = "canceled"  # final: its pending messages were canceled
    ALL = (DRAFT, SCHEDULED, SENDING, PAUSED, SENT, FAILED, CANCELED)
    EDITABLE = (DRAFT, SCHEDULED)
    SENDABLE = (DRAFT, SCHEDULED, SENDING)
    PAUSABLE = (SCHEDULED, SENDING)
    CANCELABLE = (DRAFT, SCHEDULED, SENDING, PAUSED)
    RETRYABLE = (SENDING, SENT, FAILED)  # retry-failed takes these back to sending


class CampaignPriority:
    """A campaign's share of the send workers beside other campaigns sending at once (its window's weight)."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"
    ALL = (HIGH, NORMAL, LOW)


class MessageStatus:
    PENDING = "pending"  # waits its turn: no job in Redis yet (or held until `not_before`: quiet hours, a provider)
    QUEUED = "queued"  # in its campaign's window: its send job (`job_seq`) is in Redis
    SENDING = "sending"  # claimed by a worker (`claimed_by`, until `lease_until`): at the provider now
    SENT = "sent"  # accepted by the provider
    DELIVERED = "delivered"  # the provider's receipt says it reached the handset (a read one too)
    UNDELIVERED = "undelivered"  # accepted, then the receipt says it could not be delivered
    FAILED = "failed"  # never accepted, or refused for good
    CANCELED = "canceled"  # still pending when its campaign was canceled: never sent
    ALL = (PENDING, QUEUED, SENDING, SENT, DELIVERED, UNDELIVERED, FAILED, CANCELED)
    ACCEPTED = (SENT, DELIVERED, UNDELIVERED)  # the provider took it
    UNFINISHED = (PENDING, QUEUED, SENDING)  # a campaign with any of these is still sending


class ErrorClass:
    """What a provider's refusal means for the message (docs/providers.md)."""

    PERMANENT = "permanent"  # the recipient can never receive it: failed at once, no retry
    TRANSIENT = "transient"  # worth retrying (RETRY_INTERVALS)
    THROTTLED = "throttled"  # slow down: tried again later without using a retry
    ACCOUNT = "account"  # nothing succeeds until a person acts (balance, credentials, sender id): pauses the campaign
    # The request went out and no answer came (a read timeout, a dropped connection): the provider may have
    # taken it. Not retried unless RETRY_UNKNOWN; retry-failed leaves it unless asked (`include_unknown`).
    UNKNOWN = "unknown"
    ALL = (PERMANENT, TRANSIENT, THROTTLED, ACCOUNT, UNKNOWN)


class Channel:
    SMS = "sms"
    WHATSAPP = "whatsapp"
    ALL = (SMS, WHATSAPP)


class Customer(db.Model):
    __tablename__ = "customers"
    # A location's customers, newest first: the audience of a send, and the filtered list page by page.
    __table_args__ = (Index("ix_customers_location_id", "location", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # E.164 allows 15 digits, but libphonenumber validates longer numbers (Germany has 17-digit ones).
    phone: Mapped[str] = mapped_column(String(32), unique=True)
    first_name: Mapped[str | None] = mapped_column(String(100))
    last_name: Mapped[str | None] = mapped_column(String(100))
    location: Mapped[str | None] = mapped_column(String(100))
    preferred_product: Mapped[str | None] = mapped_column(String(200))
    # ISO 3166 alpha-2 region of the phone number, set with it (app.customers.phones.country_of): filters
    # compare a column rather than parsing a million numbers per query.
    country: Mapped[str | None] = mapped_column(String(2))
    # The business's own data about the customer (app.customers.attributes): `{"tier": "gold", "spend": 120}`.
    attributes: Mapped[dict] = mapped_column(JsonObject, default=dict, server_default=text("'{}'"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    # Shown with the customer; a page of customers loads theirs in one more query. Written only through
    # `app.customers.optouts` (statements, not the ORM), and deleted with the customer by the database.
    opt_outs: Mapped[list[CustomerOptOut]] = relationship(lazy="selectin", viewonly=True)


class OptOutSource:
    """Where a customer's opt-out came from (docs/providers.md)."""

    KEYWORD = "keyword"  # they replied an opt-out keyword (STOP, ...) to one of our numbers
    PROVIDER = "provider"  # the provider told us: Africa's Talking's opt-out notification, Twilio's 21610
    API = "api"  # POST /customers/{id}/opt-out
    IMPORT = "import"  # an import's `opted_out_sms` / `opted_out_whatsapp` column
    ALL = (KEYWORD, PROVIDER, API, IMPORT)


class CustomerOptOut(db.Model):
    """A customer who must not be messaged on a channel: one row per (customer, channel), deleted when they
    opt back in. A table of its own rather than columns on customers: opt-outs are few next to customers,
    so the send's `NOT EXISTS` is a hash anti-join against a small table (or an index probe per customer),
    and customers' rows and their indexes are untouched by opt-outs arriving from webhooks."""

    __tablename__ = "customer_opt_outs"

    # The primary key serves the send's anti-join probe (customer_id, channel) and the customer's own list.
    customer_id: Mapped[int] = mapped_column(Integer, ForeignKey("customers.id", ondelete="CASCADE"), primary_key=True)
    channel: Mapped[str] = mapped_column(String(16), primary_key=True)
    opted_out_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    source: Mapped[str] = mapped_column(String(16))


class ImportStatus:
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    ALL = (QUEUED, RUNNING, DONE, FAILED)
    ACTIVE = (QUEUED, RUNNING)


class CustomerImport(db.Model):
    """A CSV import too big to answer at once, run by a job: its progress and running report.

    `bytes_done` and `lines_done` say where the last committed batch ended in the upload; the counts
    and errors are those of everything before it, committed with it."""

    __tablename__ = "customer_imports"
    # The reconciler looks for active imports left untouched.
    __table_args__ = (Index("ix_customer_imports_status_updated_at", "status", "updated_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default=ImportStatus.QUEUED)
    status_reason: Mapped[str | None] = mapped_column(Text)
    bytes_total: Mapped[int] = mapped_column(BigInteger)
    bytes_done: Mapped[int] = mapped_column(BigInteger, default=0)
    lines_done: Mapped[int] = mapped_column(BigInteger, default=0)
    created_count: Mapped[int] = mapped_column(Integer, default=0)
    updated_count: Mapped[int] = mapped_column(Integer, default=0)
    invalid_count: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[list] = mapped_column(JSON, default=list)
    errors_truncated: Mapped[bool] = mapped_column(Boolean, default=False)
    # Runs started since the last progress: an import that keeps failing at the same place is given up.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    @property
    def report(self) -> dict:
        """The import's report so far, in the shape of a synchronous import's answer."""
        return {
            "created": self.created_count,
            "updated": self.updated_count,
            "invalid": self.invalid_count,
            "errors": self.errors,
            "errors_truncated": self.errors_truncated,
        }


class CustomerImportChunk(db.Model):
    """A piece of an import's upload (about 1 MB), kept in the database until the import ends: the
    worker running it may be on another machine, and Redis may lose data."""

    __tablename__ = "customer_import_chunks"

    import_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("customer_imports.id", ondelete="CASCADE"), primary_key=True
    )
    start: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # offset of its first byte in the upload
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Segment(db.Model):
    """A saved filter (app.audiences.filters) with a name: an audience a send names by id, evaluated when
    the send runs (or, for a scheduled campaign, when it fires)."""

    __tablename__ = "segments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    filter: Mapped[dict] = mapped_column(JsonObject)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class Campaign(db.Model):
    __tablename__ = "campaigns"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    channel: Mapped[str] = mapped_column(String(16), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True, default=CampaignStatus.DRAFT)
    base_template: Mapped[str] = mapped_column(Text)
    scheduled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # An approved WhatsApp template, `{"name": ..., "language": ...}`, sent with one body parameter per
    # placeholder of `base_template`; without it WhatsApp messages go as text.
    whatsapp_template: Mapped[dict | None] = mapped_column(JSON)
    # Whether QUIET_HOURS hold its messages (in each recipient's local time); false for what may go at
    # night (a one-time code, an outage notice).
    respect_quiet_hours: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))
    # Its share of the send workers beside other campaigns sending at once: `high`, `normal` or `low`
    # weight its window (app.messaging.send.window).
    priority: Mapped[str] = mapped_column(
        String(8), default=CampaignPriority.NORMAL, server_default=CampaignPriority.NORMAL
    )
    # Whether FREQUENCY_CAP leaves out customers messaged enough lately: true for one-time codes and service
    # notices, which go whatever the marketing before them.
    ignore_frequency_cap: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    # Whether its messages' http(s) URLs become short links that count clicks (app.links); on for a new
    # campaign, off for those made before links existed (their bodies stay exactly as rendered).
    track_links: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("false"))
    # A segment a send to this scheduled campaign named: evaluated when the campaign fires (its customers
    # then get their messages), and cleared then. A segment named here cannot be deleted.
    segment_id: Mapped[int | None] = mapped_column(
        Integer, ForeignKey("segments.id", name="fk_campaigns_segment_id_segments", ondelete="SET NULL")
    )
    # Why a campaign ended `failed` when no message says it (e.g. it reached its time with no recipients),
    # or why it was paused by a provider's account-level refusal.
    status_reason: Mapped[str | None] = mapped_column(Text)
    # A send to a large audience adds its recipients in batches of RECIPIENT_BATCH customers, in id order
    # (app.messaging.recipient_batches): the first in the request, the rest after its answer. While it adds,
    # `adding_audience` is the audience (a segment as its filter when sent), `adding_after` the last customer
    # id covered and `adding_at` the last batch's commit; all three are null otherwise, and the campaign
    # cannot end meanwhile. `last_send`: the latest audience send's counts (added, skipped_opted_out,
    # skipped_frequency_cap), as they grow.
    # A WhatsApp campaign's SMS fallback (app.messaging.fallback): `{"base_template", "on", "not_delivered_within"}`,
    # the SMS sent to a customer its WhatsApp message could not reach; null without one.
    sms_fallback: Mapped[dict | None] = mapped_column(JSON)
    # A/B variants (app.messaging.variants): 2 to 5 of `{"name", "base_template", "whatsapp_template",
    # "weight"}`; each recipient gets one, chosen from the campaign and the customer. Null without.
    variants: Mapped[list | None] = mapped_column(JSON)
    adding_audience: Mapped[dict | None] = mapped_column(JSON)
    adding_after: Mapped[int | None] = mapped_column(BigInteger)
    adding_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_send: Mapped[dict | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class OutboundMessage(db.Model):
    __tablename__ = "outbound_messages"
    __table_args__ = (
        # One message per customer per campaign on the campaign's channel, and at most one fallback (an SMS
        # replacing it, `fallback_for`). Customer first, so that it also finds a customer's messages (the
        # delete check) and no separate index is kept up to date on every insert and update.
        Index(
            "uq_outbound_messages_customer_campaign_fallback",
            "customer_id",
            "campaign_id",
            text("(fallback_for IS NOT NULL)"),
            unique=True,
        ),
        # A message's fallback, found from the message it replaces; one each.
        Index(
            "uq_outbound_messages_fallback_for",
            "campaign_id",
            "fallback_for",
            unique=True,
            postgresql_where=text("fallback_for IS NOT NULL"),
            sqlite_where=text("fallback_for IS NOT NULL"),
        ),
        # Stats and the status-filtered listing; also keyset walks over a campaign's pending messages.
        Index("ix_outbound_messages_campaign_status", "campaign_id", "status", "id"),
        # The unfiltered listing, newest first, without sorting a million rows.
        Index("ix_outbound_messages_campaign_id", "campaign_id", "id"),
        # Stats count the messages waiting out quiet hours: few rows, and only pending ones with a time.
        Index(
            "ix_outbound_messages_waiting",
            "campaign_id",
            "not_before",
            postgresql_where=text("status = 'pending' AND not_before IS NOT NULL"),
            sqlite_where=text("status = 'pending' AND not_before IS NOT NULL"),
        ),
        # What a window refill takes next: pending messages not held by quiet hours, in id order (those
        # held are found by `ix_outbound_messages_waiting` once due).
        Index(
            "ix_outbound_messages_ready",
            "campaign_id",
            "id",
            postgresql_where=text("status = 'pending' AND not_before IS NULL"),
            sqlite_where=text("status = 'pending' AND not_before IS NULL"),
        ),
        # Claims whose lease may have passed: only messages being sent are in it.
        Index(
            "ix_outbound_messages_leases",
            "lease_until",
            postgresql_where=text("status = 'sending'"),
            sqlite_where=text("status = 'sending'"),
        ),
        # A customer's messages a provider took, by when: the frequency cap and `messaged_within` count them
        # with one index range per customer.
        Index(
            "ix_outbound_messages_customer_sent_at",
            "customer_id",
            "sent_at",
            postgresql_where=text("sent_at IS NOT NULL"),
            sqlite_where=text("sent_at IS NOT NULL"),
        ),
        # A delivery receipt finds its message by the provider's id; one message per id and provider.
        Index(
            "uq_outbound_messages_provider_message_id",
            "provider",
            "provider_message_id",
            unique=True,
            postgresql_where=text("provider_message_id IS NOT NULL"),
            sqlite_where=text("provider_message_id IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    # No foreign keys, on purpose: their per-row checks doubled the cost of a 100k-row send. Rows are
    # only created by INSERT ... SELECT FROM customers under the campaign's row lock and a key-share lock on
    # each customer row, a customer with messages cannot be deleted through the API (the delete locks the
    # customer row first, so it waits for a send in progress), and the send job fails a message whose
    # customer is gone.
    campaign_id: Mapped[int] = mapped_column(Integer)
    customer_id: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=MessageStatus.PENDING)
    rendered_content: Mapped[str | None] = mapped_column(Text)
    # The SMS segments the rendered body takes (app.messaging.segments), set with it by the send job; null
    # for WhatsApp and for a message never rendered.
    segments: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    # The provider's code for the last error (`21211`, `131047`, `InvalidPhoneNumber`, ...), and its class.
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_class: Mapped[str | None] = mapped_column(String(16))
    retry_count: Mapped[int] = mapped_column(Integer, default=0)
    # Who took it, and the id they gave it (a receipt finds the message by it).
    provider: Mapped[str | None] = mapped_column(String(32))
    provider_message_id: Mapped[str | None] = mapped_column(String(128))
    # When the provider took it (set by the record of a `sent` outcome), when its receipt said delivered, and
    # when one said read (a read WhatsApp message stays delivered). A retry clears them.
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    read_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Which send job may claim it: `outbound_message-<id>-<job_seq>`, counted up each time the message
    # enters its campaign's window, so that a job left from an earlier turn never claims it.
    job_seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The worker that claimed it (`sending`), and until when: past it the claim is taken to be dead and
    # the reconciler puts the message back in line (app.messaging.reconcile). `claim_token` names the
    # claim: the outcome is recorded only by the claim that holds it.
    claimed_by: Mapped[str | None] = mapped_column(String(100))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    claim_token: Mapped[int | None] = mapped_column(BigInteger)
    # When a message held by quiet hours may go (the window's end in its recipient's time zone); kept after
    # it goes, as a record. Set by the send job (`lifecycle.HOLD_UNTIL`), never a status change.
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # When the provider held it back to be tried later (WhatsApp 131049: Meta keeps marketing to this user
    # in check): it went back to pending until `not_before`, 24 h on. Once only: held again, it fails.
    provider_held_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The WhatsApp message this SMS replaces (its campaign's `sms_fallback`); null for a message on its
    # campaign's own channel. A fallback goes by SMS whatever its campaign's channel.
    fallback_for: Mapped[int | None] = mapped_column(BigInteger)
    # The campaign's variant it was rendered from (its name), chosen when it was created; null without.
    variant: Mapped[str | None] = mapped_column(String(40))
    # The original URLs its short links lead to, by position (app.links: the position is in each code); null
    # when it was sent without any. Clicks per position (`{"0": 3}`), all its clicks, and the first one's time.
    # A click changes these only, never the status.
    links: Mapped[list | None] = mapped_column(JsonObject)
    link_clicks: Mapped[dict | None] = mapped_column(JsonObject)
    clicks: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    first_clicked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


def message_channel(fallback_for, campaign_channel) -> ColumnElement[str]:
    """The channel a message goes by, from its `fallback_for` and its campaign's channel: sms for a fallback."""
    return case((fallback_for.is_not(None), literal(Channel.SMS)), else_=campaign_channel)


class CampaignMessageCount(db.Model):
    """A campaign's messages in one status: how many, how many read, how many clicked and their clicks, their
    SMS segments. Kept by PostgreSQL itself (migrations 0011, 0015): triggers on `outbound_messages` append
    every statement's net change to `CampaignMessageCountChange`, and `app.messaging.stats.fold` adds those
    here, so that a campaign's stats read a few rows however many messages it has.
    Empty on SQLite, where stats count the rows."""

    __tablename__ = "campaign_message_counts"

    campaign_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # A message status, or a key of a variant's or the fallbacks' counts (`app.messaging.stats.KEY`).
    status: Mapped[str] = mapped_column(String(64), primary_key=True)
    messages: Mapped[int] = mapped_column(BigInteger, default=0)
    read: Mapped[int] = mapped_column(BigInteger, default=0)
    segments: Mapped[int] = mapped_column(BigInteger, default=0)
    clicked: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    clicks: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class CampaignMessageCountChange(db.Model):
    """One statement's net change to a campaign's counts in one status, appended by the triggers. Only
    ever inserted by writers (no row is updated, so concurrent sends and receipts never wait on each
    other here) and moved into `CampaignMessageCount` by the fold."""

    __tablename__ = "campaign_message_count_changes"
    __table_args__ = (Index("ix_campaign_message_count_changes_campaign_id", "campaign_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(64))
    messages: Mapped[int] = mapped_column(BigInteger, default=0)
    read: Mapped[int] = mapped_column(BigInteger, default=0)
    segments: Mapped[int] = mapped_column(BigInteger, default=0)
    clicked: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    clicks: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class DeliveryReceipt(db.Model):
    """A delivery receipt no message could take when it arrived: its provider id was not recorded yet (a
    fast provider's receipt beats the worker's commit: applied once it is), or never is (kept for
    inspection)."""

    __tablename__ = "delivery_receipts"
    __table_args__ = (Index("ix_delivery_receipts_provider_message_id", "provider", "provider_message_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    provider: Mapped[str] = mapped_column(String(32))
    provider_message_id: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16))  # the message status it means (read: `delivered` + read)
    read: Mapped[bool] = mapped_column(Boolean, default=False)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_class: Mapped[str | None] = mapped_column(String(16))  # a failure's class (permanent or transient)
    error: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKey(db.Model):
    """A key for the API. Only the SHA-256 of the key is stored; the key itself is shown once."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class IdempotencyKey(db.Model):
    """The first answer to a POST sent with an `Idempotency-Key`, per key owner.

    `status_code` is null while the first request is in progress."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("owner", "key", name="uq_idempotency_keys_owner_key"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    owner: Mapped[str] = mapped_column(String(100))
    key: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int | None] = mapped_column(Integer)
    response_body: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class ServiceSecret(db.Model):
    """A secret the service made for itself, kept here so that every process of a deployment shares it
    without configuration: the secret key when SECRET_KEY is not set (`app.secrets`)."""

    __tablename__ = "service_secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
