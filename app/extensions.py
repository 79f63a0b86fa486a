"""Extension objects, bound to the app in `create_app`."""

from __future__ import annotations

from apispec.ext.marshmallow import MarshmallowPlugin
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase

from app.openapi import CommonResponsesPlugin, DocumentedApi, schema_name


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)
migrate = Migrate()
api = DocumentedApi(
    spec_kwargs={
        "marshmallow_plugin": MarshmallowPlugin(schema_name_resolver=schema_name),
        "extra_plugins": [CommonResponsesPlugin()],
    }
)
