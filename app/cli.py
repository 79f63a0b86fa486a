"""Operator commands: `flask seed`, `flask scheduler`, `flask up`, `flask api-keys`."""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

import click
from flask import Flask, current_app
from flask.cli import AppGroup
from sqlalchemy.exc import OperationalError

from app import auth
from app.errors import AppError
from app.seed import seed_sample_data
from config import SETTINGS, mask_url, settings_markdown, shown_value


def running_up_redis_url(instance_path: str) -> str | None:
    """The embedded Redis of a `flask up` running on `instance_path`, or None when none runs there."""
    from app.up import LOCK_FILE, REDIS_URL_FILE

    instance = Path(instance_path)
    try:
        with open(instance / LOCK_FILE) as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return (instance / REDIS_URL_FILE).read_text().strip() or None
            fcntl.flock(lock, fcntl.LOCK_UN)
    except FileNotFoundError:
        pass
    return None


def run_scheduler() -> None:
    """Register the periodic jobs, then run rq-scheduler, checking every `SCHEDULER_INTERVAL` seconds
    and riding out Redis failures (see `app.messaging.scheduler`)."""
    from app.messaging.scheduler import build_scheduler

    build_scheduler().run()


customers = AppGroup("customers", help="Customer operations.")


@customers.command("import")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
def import_customers_command(path: str) -> None:
    """Create or update customers from a CSV file (phone,first_name,last_name,location,preferred_product)."""
    from app.customers.csv_import import import_customers

    size = os.path.getsize(path)
    with open(path, "rb") as binary, click.progressbar(length=size, label="importing", show_pos=False) as bar:

        def progress(bytes_read: int) -> None:
            bar.update(bytes_read - bar.pos)

        try:
            report = import_customers(binary, progress)
        except AppError as exc:
            raise click.ClickException(exc.message) from None
    click.echo(f"created {report.created}, updated {report.updated}, invalid {report.invalid}")
    for error in report.errors:
        click.echo(f"  line {error['line']}: {error['reason']}", err=True)
    if report.errors_truncated:
        click.echo(f"  ... and {report.invalid - len(report.errors)} more", err=True)


api_keys = AppGroup("api-keys", help="Create, list and revoke API keys.")


@api_keys.command("create")
@click.argument("name")
def create_api_key(name: str) -> None:
    """Create a key named NAME and print it (shown this once; only its hash is stored)."""
    try:
        key = auth.create_key(name)
    except AppError as exc:
        raise click.ClickException(exc.message) from None
    click.echo(key)


@api_keys.command("list")
def list_api_keys() -> None:
    """List the stored keys (names and dates, never the keys)."""
    for api_key in auth.list_keys():
        state = f"revoked {api_key.revoked_at.isoformat()}" if api_key.revoked_at else "active"
        click.echo(f"{api_key.name}\tcreated {api_key.created_at.isoformat()}\t{state}")


@api_keys.command("revoke")
@click.argument("name")
def revoke_api_key(name: str) -> None:
    """Revoke the key named NAME; requests with it get 401 at once."""
    try:
        auth.revoke_key(name)
    except AppError as exc:
        raise click.ClickException(exc.message) from None
    click.echo(f"revoked {name}")


def database_unreachable_line(exc: BaseException, url: str) -> str | None:
    """One line for a command that could not connect to the database (a database that does not exist, a
    server that refuses, a wrong user), naming it as every other setting error does; None for any other
    error."""
    if not isinstance(exc, OperationalError) or "connection failed" not in str(exc.orig or exc):
        return None
    reason = str(exc.orig or exc).strip().splitlines()[0]
    for marker in ("FATAL:", "failed: "):
        if marker in reason:
            reason = reason.rsplit(marker, 1)[1].strip()
            break
    if "does not exist" in reason and "database" in reason:
        reason += " (create it first, e.g. `createdb`, or your provider's add-on)"
    return f"database error: DATABASE_URL: {reason} ({mask_url(url)})"


def _one_line_for_an_unreachable_database(url: str) -> None:
    """A `flask` command that cannot reach the database ends with one line naming it, not a traceback."""
    previous = sys.excepthook

    def hook(kind, exc, traceback) -> None:
        line = database_unreachable_line(exc, url)
        if line is None:
            previous(kind, exc, traceback)
        else:
            print(line, file=sys.stderr)

    sys.excepthook = hook


def register(app: Flask) -> None:
    if click.get_current_context(silent=True) is not None:  # a `flask` command, not a web or worker process
        _one_line_for_an_unreachable_database(app.config["SQLALCHEMY_DATABASE_URI"])
    app.cli.add_command(api_keys)
    app.cli.add_command(customers)

    @app.cli.command("seed")
    def seed() -> None:
        """Add 5 sample customers and 3 sample campaigns (skips what is there)."""
        customers, campaigns = seed_sample_data()
        click.echo(f"seeded {customers} customers and {campaigns} campaigns")

    @app.cli.command("settings")
    @click.option("--markdown", is_flag=True, help="print the documentation's table of every setting instead")
    def settings(markdown: bool) -> None:
        """Show the settings this process runs with (secrets hidden, passwords masked)."""
        if markdown:
            click.echo(settings_markdown(), nl=False)
            return
        embedded = None if os.environ.get("REDIS_URL") else running_up_redis_url(current_app.instance_path)
        for setting in SETTINGS:
            line = f"{setting.name}={shown_value(setting, current_app.config.get(setting.config_key))}"
            if setting.name == "REDIS_URL" and embedded:
                line = f"{setting.name}={embedded} (the embedded Redis of the running `flask up`)"
            click.echo(line)

    @app.cli.command("scheduler")
    def scheduler() -> None:
        """Run rq-scheduler: scheduled dispatches and the periodic reconciler."""
        run_scheduler()

    @app.cli.command("up")
    @click.option("--port", type=int, default=lambda: int(os.environ.get("PORT", 5000)), show_default="$PORT or 5000")
    @click.option("--host", default="127.0.0.1", show_default=True)
    def up(port: int, host: str) -> None:
        """Bring the whole service up: migrations, sample data, API, worker and scheduler.

        Without DATABASE_URL it uses a SQLite file; without REDIS_URL an embedded redis-server.
        """
        from app import up as local_stack

        local_stack.run(current_app._get_current_object(), host, port)
