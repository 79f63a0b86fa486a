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

from dataclasses import replace
from datetime import datetime, timedelta

from flask import current_app
from sqlalchemy import delete, exists, select

from app import clock, metrics
from app.customers import optouts
from app.extensions import db
from app.messaging import fallback, lifecycle, providers
from app.messaging.providers.base import Receipt
from app.messaging.send import window
from app.models import Campaign, DeliveryReceipt, ErrorClass, MessageStatus, OutboundMessage

__all__ = ["Receipt", "apply_waiting", "expire_kept", "record"]

_WHATSAPP = providers.whatsapp_cloud.WhatsAppCloud.name


def record(receipts: list[Receipt]) -> dict[str, int]:
    """Apply `receipts` in one transaction, keeping those no message takes yet; commits. Counts what
    happened to them: `applied`, `unchanged` (repeats, late ones) and `kept`. A kept one is looked at again
    after the commit (its message may have been recorded meanwhile).

    One receipt (a Twilio or Africa's Talking callback) runs without a transaction around it: its
    statements are each atomic and safe alone, and a webhook burst then costs one round trip per receipt
    instead of three (BEGIN, UPDATE, COMMIT)."""
    if len(receipts) == 1 and not _acts(receipts[0]) and not db.session().in_transaction():
        db.session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
    counts = {"applied": 0, "unchanged": 0, "kept": 0}
    results = []
    kept = []
    held: list[tuple[int, datetime]] = []
    triggered: list[tuple[str, str, str]] = []
    for receipt in receipts:
        applied = _apply(receipt, held, triggered)
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
    _after_commit(held, triggered)
    for receipt in kept:  # its message recorded between the look and the keeping: applied now
        apply_waiting(receipt.provider, receipt.provider_message_id)
    return counts


def _acts(receipt: Receipt) -> bool:
    """Whether a failed receipt asks more than the failure: a hold, or an opt-out (several statements, which
    must commit together)."""
    return receipt.status == MessageStatus.FAILED and (
        providers.receipt_hold(receipt.provider, receipt.error_code) is not None
        or providers.receipt_opts_out(receipt.provider, receipt.error_code)
    )


def _apply(receipt: Receipt, held: list[tuple[int, datetime]], triggered: list[tuple[str, str, str]]) -> bool | None:
    """Apply one receipt in the caller's transaction (see `lifecycle.apply_receipt`). A failure the provider
    means as a hold (WhatsApp 131049) puts its message back in line for later, once (`held` gets its
    campaign and time, to refill its window then, after the commit); held before, it fails for good. A failure
    saying the recipient opted out with the provider (WhatsApp 131050) opts them out of the channel here. One
    that triggers an SMS fallback (WhatsApp 131026, 131047) adds its provider id and trigger to `triggered`,
    for `_after_commit` (app.messaging.fallback)."""
    if receipt.status == MessageStatus.FAILED:
        hold = providers.receipt_hold(receipt.provider, receipt.error_code)
        if hold is not None:
            until = clock.now() + hold
            error = f"{receipt.error or receipt.error_code}; held back by the provider until {until:%Y-%m-%d %H:%M} UTC"
            campaign_id = lifecycle.hold_for_provider(
                receipt.provider, receipt.provider_message_id, until, receipt.error_code, error
            )
            if campaign_id is not None:
                held.append((campaign_id, until))
                return True
            receipt = replace(receipt, error_class=ErrorClass.PERMANENT)  # held once already: it fails now
    applied = lifecycle.apply_receipt(
        receipt.provider,
        receipt.provider_message_id,
        receipt.status,
        read=receipt.read,
        error_code=receipt.error_code,
        error=receipt.error,
        error_class=receipt.error_class,
    )
    if applied and receipt.status == MessageStatus.FAILED:
        if providers.receipt_opts_out(receipt.provider, receipt.error_code):
            _opt_out_recipient(receipt)
        whatsapp = providers.whatsapp_cloud
        reason = whatsapp.FALLBACK_TRIGGERS.get(receipt.error_code or "") if receipt.provider == _WHATSAPP else None
        if reason is not None:
            triggered.append((receipt.provider, receipt.provider_message_id, reason))
    return applied


def _opt_out_recipient(receipt: Receipt) -> None:
    """The recipient of the receipt's message opted out with the provider: opt them out of the campaign's
    channel here too (`optouts.opt_out_at_provider`)."""
    found = db.session.execute(
        select(OutboundMessage.id, OutboundMessage.customer_id, Campaign.channel)
        .join(Campaign, Campaign.id == OutboundMessage.campaign_id)
        .where(
            OutboundMessage.provider == receipt.provider,
            OutboundMessage.provider_message_id == receipt.provider_message_id,
        )
    ).first()
    if found is not None and found.customer_id is not None:
        optouts.opt_out_at_provider(found.customer_id, found.channel, found.id)


def _after_commit(held: list[tuple[int, datetime]], triggered: list[tuple[str, str, str]]) -> None:
    """After the commit: each held message's campaign refills its window when the hold ends (the reconciler
    does too, should Redis lose the scheduled refill), and each failure that triggers an SMS fallback gets it
    (the reconciler makes up for one lost here)."""
    for campaign_id, until in held:
        window.schedule_refill(campaign_id, until)
    for provider, provider_message_id, reason in triggered:
        fallback.trigger_by_provider_id(provider, provider_message_id, reason)


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
    held: list[tuple[int, datetime]] = []
    triggered: list[tuple[str, str, str]] = []
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
            ),
            held,
            triggered,
        )
        if outcome is not None:
            applied_ids.append(kept.id)
            results.append((kept.provider, kept.status, "applied" if outcome else "unchanged"))
    if applied_ids:
        db.session.execute(delete(DeliveryReceipt).where(DeliveryReceipt.id.in_(applied_ids)))
    db.session.commit()
    metrics.count_receipts(results)
    _after_commit(held, triggered)
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
