"""Customers: create, change, list and delete, one transaction each."""

from __future__ import annotations

import json
from collections.abc import Mapping

from flask import current_app
from sqlalchemy import delete, exists, select
from sqlalchemy.exc import IntegrityError

# Modules, not names: app.audiences reads customers' modules too, and either package may be imported first.
from app.audiences import filters, segments
from app.customers import attributes, optouts
from app.customers.phones import InvalidPhone, country_of, normalize_phone
from app.errors import ConflictError, NotFoundError, ValidationFailed
from app.extensions import db
from app.models import Customer, OptOutSource, OutboundMessage
from app.pagination import paginate


def get_customer(customer_id: int) -> Customer:
    customer = db.session.get(Customer, customer_id)
    if customer is None:
        raise NotFoundError(f"customer {customer_id} not found")
    return customer


def _normalized(phone: str) -> str:
    try:
        return normalize_phone(phone, current_app.config["DEFAULT_PHONE_REGION"])
    except InvalidPhone as exc:
        raise ValidationFailed(f"phone: {exc}", {"phone": [str(exc)]}) from None


def _check_phone_free(phone: str, customer_id: int | None = None) -> None:
    taken = db.session.scalar(select(Customer.id).where(Customer.phone == phone, Customer.id != (customer_id or 0)))
    if taken is not None:
        db.session.rollback()
        raise ConflictError(f"phone {phone} already belongs to customer {taken}", {"phone": ["already taken"]})


def _save(customer: Customer) -> Customer:
    """Commit `customer`; a phone taken meanwhile by a concurrent request is a 409."""
    try:
        db.session.commit()
    except IntegrityError:  # a concurrent request took the phone between the check and the commit
        db.session.rollback()
        raise ConflictError(
            f"phone {customer.phone} already belongs to another customer", {"phone": ["already taken"]}
        ) from None
    return customer


def _checked_attributes(stored: Mapping | None, change: Mapping) -> dict:
    """`change` merged into `stored`; a 422 when the whole is over the limits."""
    result = attributes.merged(stored, change)
    problem = attributes.size_problem(result)
    if problem:
        db.session.rollback()
        raise ValidationFailed(f"attributes: {problem}", {"attributes": [problem]})
    return result


def create_customer(data: Mapping) -> Customer:
    phone = _normalized(data["phone"])
    _check_phone_free(phone)
    values = {**data, "phone": phone, "country": country_of(phone)}
    values["attributes"] = _checked_attributes({}, data.get("attributes") or {})
    customer = Customer(**values)
    db.session.add(customer)
    return _save(customer)


def update_customer(customer_id: int, data: Mapping) -> Customer:
    """Change the fields `data` names; `attributes` merge into the stored ones (null removes a key)."""
    changes = dict(data)
    if "attributes" in changes:
        # Locked: two PATCHes naming different keys both keep theirs.
        customer = db.session.scalar(
            select(Customer)
            .where(Customer.id == customer_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        if customer is None:
            raise NotFoundError(f"customer {customer_id} not found")
        changes["attributes"] = _checked_attributes(customer.attributes, changes["attributes"] or {})
    else:
        customer = get_customer(customer_id)
    if "phone" in changes:
        changes["phone"] = _normalized(changes["phone"])
        _check_phone_free(changes["phone"], customer_id)
        changes["country"] = country_of(changes["phone"])
    for key, value in changes.items():
        setattr(customer, key, value)
    return _save(customer)


def delete_customer(customer_id: int) -> None:
    """Delete a customer who has no messages, safe against a concurrent send.

    A send's `INSERT ... SELECT` holds a key-share lock on each customer row it reads until it
    commits (see `create_pending_messages`). Locking the row first makes this wait for such a send,
    and the conditional DELETE that follows, a new statement, sees its committed messages. A send that
    comes second waits for this lock and then skips the deleted row.
    """
    db.session.execute(select(Customer.id).where(Customer.id == customer_id).with_for_update())
    deleted = db.session.execute(
        delete(Customer).where(Customer.id == customer_id, ~exists().where(OutboundMessage.customer_id == customer_id))
    ).rowcount
    db.session.commit()
    if not deleted:
        get_customer(customer_id)  # 404 when there is no such customer
        raise ConflictError(f"customer {customer_id} has messages in campaigns; their history is kept")


def list_customers(
    page_size: int,
    page: int | None = None,
    cursor: str | None = None,
    location: str | None = None,
    opted_out: str | None = None,
    filter: str | None = None,  # noqa: A002 - the query parameter's name
    segment_id: int | None = None,
) -> dict:
    stmt = select(Customer)
    if filter is not None:
        stmt = stmt.where(filters.compile_filter(_parsed_filter(filter), "filter"))
    if segment_id is not None:
        stmt = stmt.where(segments.segment_condition(segment_id))
    if location is not None:
        stmt = stmt.where(Customer.location == location)
    if opted_out is not None:
        stmt = stmt.where(optouts.opted_out(opted_out))
    return paginate(stmt, Customer.id, "customers", page_size, page, cursor)


def _parsed_filter(text: str) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ValidationFailed(f"filter: not JSON ({exc})", {"filter": [f"not JSON: {exc}"]}) from None


def opt_out(customer_id: int, channel: str) -> Customer:
    """Opt the customer out of `channel` (source `api`); opting out again keeps the first time and source.
    Messages of theirs still queued on that channel are canceled when their send job runs."""
    customer = get_customer(customer_id)
    optouts.opt_out_ids([customer.id], channel, OptOutSource.API)
    db.session.commit()
    db.session.refresh(customer)
    return customer


def opt_in(customer_id: int, channel: str) -> Customer:
    """Opt the customer back in to `channel`; a customer not opted out stays as they are."""
    customer = get_customer(customer_id)
    optouts.opt_in_ids([customer.id], channel)
    db.session.commit()
    db.session.refresh(customer)
    return customer
