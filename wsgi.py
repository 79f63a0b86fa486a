"""The `web` process entry point: `gunicorn wsgi:app`. Production settings: without an API key
(API_KEYS, or one made by `flask --app wsgi api-keys create NAME`) it refuses to start."""

from app import create_app

app = create_app("config.ProductionConfig")
