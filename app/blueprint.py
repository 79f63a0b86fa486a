"""The Blueprint every API blueprint uses: flask-smorest's, with a JSON parser that answers 400 for
any body Python's `json` cannot decode, not only for syntax errors."""

from __future__ import annotations

import flask_smorest
from webargs.flaskparser import FlaskParser


class JsonSafeParser(FlaskParser):
    def load_json(self, req, schema):
        try:
            return super().load_json(req, schema)
        except (RecursionError, ValueError) as exc:  # nesting too deep, an integer of 5,000 digits
            return self._handle_invalid_json_error(exc, req)


class Blueprint(flask_smorest.Blueprint):
    ARGUMENTS_PARSER = JsonSafeParser()
