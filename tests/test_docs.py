"""The OpenAPI document and the /docs page, rendered offline in headless Chromium."""

import re
import shutil
import subprocess

import pytest

from app.openapi import SWAGGER_UI_DIST

OPERATIONS = [
    ("get", "/customers"),
    ("post", "/customers"),
    ("get", "/customers/{customer_id}"),
    ("patch", "/customers/{customer_id}"),
    ("delete", "/customers/{customer_id}"),
    ("post", "/customers/import"),
    ("get", "/customers/imports/{import_id}"),
    ("get", "/campaigns"),
    ("post", "/campaigns"),
    ("get", "/campaigns/{campaign_id}"),
    ("patch", "/campaigns/{campaign_id}"),
    ("post", "/campaigns/{campaign_id}/send"),
    ("post", "/campaigns/{campaign_id}/personalized-preview"),
    ("get", "/campaigns/{campaign_id}/messages"),
    ("get", "/health"),
]


@pytest.fixture
def spec(anonymous_client) -> dict:
    response = anonymous_client.get("/openapi.json")
    assert response.status_code == 200
    return response.get_json()


def test_document_lists_every_operation(spec):
    documented = {(m, p) for p, item in spec["paths"].items() for m in item if m != "parameters"}
    assert documented == set(OPERATIONS)
    assert spec["openapi"].startswith("3.")


def test_bearer_key_is_required_everywhere_but_health(spec):
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": spec["components"]["securitySchemes"]["bearerAuth"]["description"],
    }
    assert spec["security"] == [{"bearerAuth": []}]
    for method, path in OPERATIONS:
        operation = spec["paths"][path][method]
        if path == "/health":
            assert operation["security"] == []
            assert set(operation["responses"]) == {"200", "503"}
        else:
            assert "security" not in operation  # the document-wide bearer requirement applies
            assert {"401", "429"} <= set(operation["responses"])


def test_every_error_response_has_the_error_schema(spec):
    def resolve(response: dict) -> dict:
        if "$ref" in response:
            return spec["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
        return response

    for method, path in OPERATIONS:
        for code, response in spec["paths"][path][method]["responses"].items():
            if int(code) >= 400 and path != "/health":
                schema = resolve(response)["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, code)
    error = spec["components"]["schemas"]["Error"]
    assert set(error["required"]) == {"code", "status", "message", "errors"}
    assert error["properties"]["errors"]["additionalProperties"] == {"type": "array", "items": {"type": "string"}}


def test_every_operation_documents_503_with_retry_after(spec):
    for method, path in OPERATIONS:
        response = spec["paths"][path][method]["responses"]["503"]
        if path == "/health":
            continue  # its 503 is the health report itself
        assert response == {"$ref": "#/components/responses/DatabaseUnavailable"}, (method, path)
    unavailable = spec["components"]["responses"]["DatabaseUnavailable"]
    assert set(unavailable["headers"]) == {"Retry-After"}


def test_operations_with_a_body_document_400_and_413_and_paths_with_ids_404(spec):
    for method, path in OPERATIONS:
        responses = spec["paths"][path][method]["responses"]
        if "requestBody" in spec["paths"][path][method]:
            assert {"400", "413", "422"} <= set(responses), (method, path)
            if "application/json" in spec["paths"][path][method]["requestBody"]["content"]:
                assert "415" in responses, (method, path)
        if "{" in path:
            assert "404" in responses, (method, path)


def test_docs_page_uses_only_local_assets(anonymous_client):
    page = anonymous_client.get("/docs").get_data(as_text=True)
    assert "/docs/assets/swagger-ui-bundle.js" in page
    assert "http://" not in page and "https://" not in page
    for asset in ("swagger-ui-bundle.js", "swagger-ui-standalone-preset.js", "swagger-ui.css"):
        assert (SWAGGER_UI_DIST / asset).is_file()
        assert anonymous_client.get(f"/docs/assets/{asset}").status_code == 200


def test_docs_page_renders_the_endpoint_list_offline_in_chromium(live_server, tmp_path):
    chromium = shutil.which("chromium")
    assert chromium, "install Debian's chromium package (.ci/run does)"
    dom = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            # Every host but the app's own fails to resolve: a CDN asset could not load.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            f"--user-data-dir={tmp_path / 'chromium'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            f"{live_server}/docs",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert 'class="swagger-ui' in dom and "Campaign dispatch API" in dom
    for path in {path for _, path in OPERATIONS}:
        assert f'data-path="{path}"' in dom, path
    blocks = re.findall(r'class="opblock opblock-(\w+)', dom)
    assert sorted(blocks) == sorted(method for method, _ in OPERATIONS)
