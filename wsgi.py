"""The `web` process entry point (`gunicorn wsgi:app`), also what `flask --app wsgi` commands load.

Production settings: without an API key (API_KEYS, or one made by `flask --app wsgi api-keys create NAME`)
the web refuses to start; a setting with a bad value stops any process with one line naming it.
"""

import sys

from app import create_app
from config import SettingsError

# gunicorn stops, instead of booting the worker again and again, when a worker exits with this status.
WORKER_BOOT_ERROR = 3

try:
    app = create_app("config.ProductionConfig")
except SettingsError as exc:
    print(f"configuration error: {exc}", file=sys.stderr)
    sys.exit(WORKER_BOOT_ERROR)
