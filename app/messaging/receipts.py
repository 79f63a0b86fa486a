"""Delivery receipts: what providers tell us happened to a message after they took it.

A receipt is applied at once to the message with its provider id, along the lifecycle's table (never a
step back, a repeat changes nothing). One that finds no message is kept in `delivery_receipts`: a fast
provider's receipt can arrive before the worker has recorded the provider id. A receipt is applied or kept,
never neither: the look for its message and its update are one statement (one snapshot), and once kept it
is looked at again, after its own commit, while the send's record looks for it after its commit: whichever
commits second finds the other. What is left the reconciler applies as soon as its message exists, however
many receipts wait that never will (a send whose answer was lost, another system on the same number); those
age out after `KEPT_RECEIPT_TTL` (counted in `/metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from flask import current_app
from sqlalchemy import delete, exists, select

from app import clock, metrics
from app.extensions import db
from app.messaging import lifecycle
from app.models import DeliveryReceipt, OutboundMessage


@dataclass(frozen=True)
class Receipt:
    """One receipt, in the service's terms: the message status it means (`read` is `delivered` plus read)."""

    provider: str
    provider_message_id: str
    status: str
    read: bool = False
    error_code: str | None = None
    error: str | None = None
    error_class: str | None = None  # a failure's class from its code (providers' `receipt_error_class`)


def record(receipts: list[Receipt]) -> dict[str, int]:
    """Apply `receipts` in one transaction, keeping those no message takes yet; commits. Counts what
    happened to them: `applied`, `unchanged` (repeats, late ones) and `kept`. A kept one is looked at again
    after the commit (its message may have been recorded meanwhile).

    One receipt (a Twilio or Africa's Talking callback) runs without a transaction around it: its
    statements are each atomic and safe alone, and a webhook burst then costs one round trip per receipt
    instead of three (BEGIN, UPDATE, COMMIT)."""
    if len(receipts) == 1 and not db.session().in_transaction():
        db.session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
    counts = {"applied": 0, "unchanged": 0, "kept": 0}
    results = []
    kept = []
    for receipt in receipts:
        applied = _apply(receipt)
        if applied is None:
            db.session.add(
                DeliveryReceipt(
                    provider=receipt.provider,
                    provider_message_id=receipt.provider_message_id,
                    status=receipt.status,
                    read=receipt.read,
                    error_code=receipt.error_code,
                    error_class=receipt.error_class,
                    error=receipt.error,
                )
            )
            kept.append(receipt)
            result = "kept"
        else:
            result = "applied" if applied else "unchanged"
        counts[result] += 1
        results.append((receipt.provider, receipt.status, result))
    db.session.commit()
    metrics.count_receipts(results)
    for receipt in kept:  # its message recorded between the look and the keeping: applied now
        apply_waiting(receipt.provider, receipt.provider_message_id)
    return counts


def _apply(receipt: Receipt) -> bool | None:
    return lifecycle.apply_receipt(
        receipt.provider,
        receipt.provider_message_id,
        receipt.status,
        read=receipt.read,
        error_code=receipt.error_code,
        error=receipt.error,
        error_class=receipt.error_class,
    )


def apply_waiting(provider: str | None = None, provider_message_id: str | None = None) -> int:
    """Apply kept receipts whose message now exists (those of one provider id; or, for the reconciler, up
    to `RECONCILE_BATCH_SIZE` of every kept receipt whose provider id a message has, found through the
    messages' index of provider ids, whatever the number of receipts that match nothing), in the order
    they arrived, and drop them; commits. Returns how many were applied."""
    stmt = select(DeliveryReceipt).order_by(DeliveryReceipt.id).with_for_update(skip_locked=True)
    if provider_message_id is None:
        stmt = stmt.where(
            exists().where(
                OutboundMessage.provider == DeliveryReceipt.provider,
                OutboundMessage.provider_message_id == DeliveryReceipt.provider_message_id,
            )
        )
    else:
        stmt = stmt.where(
            DeliveryReceipt.provider == provider, DeliveryReceipt.provider_message_id == provider_message_id
        )
    applied_ids, results = [], []
    for kept in db.session.scalars(stmt.limit(current_app.config["RECONCILE_BATCH_SIZE"])):
        outcome = _apply(
            Receipt(
                kept.provider,
                kept.provider_message_id,
                kept.status,
                kept.read,
                kept.error_code,
                kept.error,
                kept.error_class,
            )
        )
        if outcome is not None:
            applied_ids.append(kept.id)
            results.append((kept.provider, kept.status, "applied" if outcome else "unchanged"))
    if applied_ids:
        db.session.execute(delete(DeliveryReceipt).where(DeliveryReceipt.id.in_(applied_ids)))
    db.session.commit()
    metrics.count_receipts(results)
    return len(applied_ids)


def expire_kept(now=None) -> int:
    """Delete kept receipts older than `KEPT_RECEIPT_TTL` that no message took (their message was never
    recorded with that provider id: another system's message on the same number or account, or a send
    whose answer was lost); counted by provider. Commits; returns how many."""
    cutoff = (now or clock.now()) - timedelta(seconds=current_app.config["KEPT_RECEIPT_TTL"])
    providers = db.session.scalars(
        delete(DeliveryReceipt).where(DeliveryReceipt.received_at < cutoff).returning(DeliveryReceipt.provider)
    ).all()
    db.session.commit()
    metrics.count_expired_receipts(providers)
    return len(providers)
