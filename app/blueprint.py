"""The Blueprint every API blueprint uses: flask-smorest's, with a JSON parser that answers 415 for a body
sent without `Content-Type: application/json`, and 400 for any body Python's `json` cannot decode, not
only for syntax errors."""

from __future__ import annotations

import flask_smorest
from webargs.core import is_json
from webargs.flaskparser import FlaskParser
from werkzeug.exceptions import UnsupportedMediaType

NOT_JSON = "send the body as JSON, with the header `Content-Type: application/json`"


class JsonSafeParser(FlaskParser):
    def load_json(self, req, schema):
        if not is_json(req.mimetype) and (req.content_length or req.headers.get("Transfer-Encoding")):
            raise UnsupportedMediaType(NOT_JSON)
        try:
            return super().load_json(req, schema)
        except (RecursionError, ValueError) as exc:  # nesting too deep, an integer of 5,000 digits
            return self._handle_invalid_json_error(exc, req)


class Blueprint(flask_smorest.Blueprint):
    ARGUMENTS_PARSER = JsonSafeParser()
