"""The documentation: the OpenAPI document and the /docs page (rendered offline in headless Chromium), and
the Markdown documents (README.md, docs/), kept in step with the code."""

import fnmatch
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from app.messaging.lifecycle import CAMPAIGN_TRANSITIONS, IMPORT_TRANSITIONS, MESSAGE_TRANSITIONS
from app.openapi import SWAGGER_UI_DIST
from config import PROCESS_SETTINGS, SETTINGS, settings_markdown

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"

OPERATIONS = [
    ("get", "/customers"),
    ("post", "/customers"),
    ("get", "/customers/{customer_id}"),
    ("patch", "/customers/{customer_id}"),
    ("delete", "/customers/{customer_id}"),
    ("post", "/customers/{customer_id}/opt-out"),
    ("post", "/customers/{customer_id}/opt-in"),
    ("post", "/customers/import"),
    ("get", "/customers/imports/{import_id}"),
    ("get", "/campaigns"),
    ("post", "/campaigns"),
    ("get", "/campaigns/{campaign_id}"),
    ("patch", "/campaigns/{campaign_id}"),
    ("get", "/campaigns/{campaign_id}/delivery-seconds"),
    ("get", "/campaigns/{campaign_id}/links"),
    ("post", "/campaigns/{campaign_id}/send"),
    ("post", "/campaigns/{campaign_id}/estimate"),
    ("post", "/campaigns/{campaign_id}/personalized-preview"),
    ("get", "/campaigns/{campaign_id}/messages"),
    ("get", "/campaigns/{campaign_id}/messages.csv"),
    ("post", "/campaigns/{campaign_id}/pause"),
    ("post", "/campaigns/{campaign_id}/resume"),
    ("post", "/campaigns/{campaign_id}/cancel"),
    ("post", "/campaigns/{campaign_id}/retry-failed"),
    ("get", "/segments"),
    ("post", "/segments"),
    ("get", "/segments/{segment_id}"),
    ("patch", "/segments/{segment_id}"),
    ("delete", "/segments/{segment_id}"),
    ("post", "/audiences/count"),
    ("get", "/health"),
    ("get", "/metrics"),
    ("post", "/webhooks/africastalking/delivery"),
    ("post", "/webhooks/africastalking/inbound"),
    ("post", "/webhooks/africastalking/opt-out"),
    ("post", "/webhooks/twilio/status"),
    ("post", "/webhooks/twilio/inbound"),
    ("get", "/webhooks/whatsapp"),
    ("post", "/webhooks/whatsapp"),
]
# Operations that need no API key: each webhook checks its provider's own signature or token (403).
WEBHOOKS = {path for _, path in OPERATIONS if path.startswith("/webhooks/")}


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
        elif path in WEBHOOKS:
            assert operation["security"] == []
            assert {"403", "503"} <= set(operation["responses"]) and "401" not in operation["responses"]
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
            assert {"400", "413"} <= set(responses), (method, path)
            if path not in WEBHOOKS:  # a provider's body is taken as it comes, not validated field by field
                assert "422" in responses, (method, path)
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


# --- The Markdown documents ---------------------------------------------------------------------------

README_MAX_LINES = 300
FENCED_BLOCK = re.compile(r"^(`{3,}|~{3,}).*?^\1[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^()\s]+)\)")


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose(text: str) -> str:
    """`text` without its code blocks and code spans, where brackets and hashes are not Markdown."""
    return INLINE_CODE.sub("", FENCED_BLOCK.sub("", text))


def anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of every heading in `text` (a repeated heading gets `-1`, `-2`, ... as on GitHub)."""
    found: set[str] = set()
    for line in prose(text).splitlines():
        match = re.match(r"#{1,6} (.+)", line)
        if match:
            base = name = anchor(match.group(1))
            count = 0
            while name in found:
                count += 1
                name = f"{base}-{count}"
            found.add(name)
    return found


def broken_links(path: Path) -> list[str]:
    """The relative links in `path` to a file that does not exist, or to a heading it does not have."""
    broken = []
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{path.name}: {target} (no such file)")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked.read_text()):
            broken.append(f"{path.name}: {target} (no such heading in {linked.name})")
    return broken


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; keep it to {README_MAX_LINES}, details in docs/"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda path: path.name)
def test_relative_links_point_to_existing_files_and_headings(path):
    assert broken_links(path) == []


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## When Redis is down, stalled or flushed\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#when-redis-is-down-stalled-or-flushed) [ok](#a-heading) [web](https://example.com/x.md)\n"
        "[gone](missing.md) [wrong](other.md#no-such-heading)\n\n## A heading\n\n```\n[in code](nowhere.md)\n```\n"
    )
    assert broken_links(page) == [
        "page.md: missing.md (no such file)",
        "page.md: other.md#no-such-heading (no such heading in other.md)",
    ]


def test_configuration_doc_holds_the_settings_table_of_config():
    documented = (DOCS / "configuration.md").read_text()
    assert settings_markdown() in documented, (
        "docs/configuration.md's table of settings differs from config.SETTINGS: regenerate it with "
        "`flask --app wsgi settings --markdown` and paste it in"
    )


SETTING_DEFAULTS = {setting.name: setting.default for setting in (*SETTINGS, *PROCESS_SETTINGS)}
SETTING_NAME = re.compile(r"`([A-Z][A-Z0-9_]+)`")
# A default written in a row's meaning, `(20)` or `(15 s)`, or in prose, `` `NAME` (default `X`) `` and
# ``the default `NAME` (24)``.
DEFAULT_IN_CELL = re.compile(r"\((\d+(?:\.\d+)?)(?: s)?\)")
DEFAULT_IN_PROSE = (
    re.compile(r"`([A-Z][A-Z0-9_]+)`\s+\(default\s+`([^`]+)`\)"),
    re.compile(r"the\s+default\s+`([A-Z][A-Z0-9_]+)`\s+\((\d+(?:\.\d+)?)\)"),
)


def same_default(name: str, written: str) -> bool:
    """Whether `written` (a doc's words for a default: `24`, `3 s`, `empty: ...`) is the code's default."""
    code = SETTING_DEFAULTS[name]
    written = written.strip().strip("`")
    if written.startswith("empty"):
        return code == ""
    written = re.sub(r" s$", "", written)
    try:
        return float(written) == float(code)
    except ValueError:
        return written == code


def defaults_named(text: str) -> list[tuple[str, str]]:
    """Every (setting, default) a Markdown document states: in a table with a `default` column, in a
    setting's row as `(N)`, and in prose as `` `NAME` (default `X`) ``."""
    found: list[tuple[str, str]] = []
    default_column = None
    for line in text.splitlines():
        if not line.startswith("|"):
            default_column = None
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if default_column is None and "default" in [cell.lower() for cell in cells]:
            default_column = [cell.lower() for cell in cells].index("default")
            continue
        names = [name for name in SETTING_NAME.findall(cells[0]) if name in SETTING_DEFAULTS]
        if not names or cells[0].replace("`", "").replace(",", "").split() != names:
            continue
        if default_column is not None and default_column < len(cells):
            written = cells[default_column]
            values = [written] if written.startswith("empty") else re.findall(r"`([^`]*)`", written) or [written]
            if len(values) == len(names):
                found.extend(zip(names, values, strict=True))
        elif len(names) == 1:
            found.extend((names[0], value) for cell in cells[1:] for value in DEFAULT_IN_CELL.findall(cell))
    for pattern in DEFAULT_IN_PROSE:
        found.extend((name, value) for name, value in pattern.findall(text) if name in SETTING_DEFAULTS)
    return found


@pytest.mark.parametrize("path", markdown_files(), ids=lambda path: path.name)
def test_every_default_the_docs_name_is_the_codes(path):
    named = defaults_named(path.read_text())
    wrong = [f"{name}: {written!r}, the code says {SETTING_DEFAULTS[name]!r}" for name, written in named
             if not same_default(name, written)]  # fmt: skip
    assert wrong == []


def test_the_default_check_finds_a_default_that_differs():
    page = (
        "| setting | meaning |\n| --- | --- |\n| `PROVIDER_MAX_CONNECTIONS` | connections kept open (20) |\n\n"
        "| name | default | meaning |\n| --- | --- | --- |\n| `WEB_CONCURRENCY`, `WEB_THREADS` | `2`, `8` | x |\n"
        "| `QUIET_HOURS` | empty: off | x |\n\nAnd `OPT_IN_KEYWORDS` (default `START`).\n"
    )
    named = defaults_named(page)
    assert named == [
        ("PROVIDER_MAX_CONNECTIONS", "20"),
        ("WEB_CONCURRENCY", "2"),
        ("WEB_THREADS", "8"),
        ("QUIET_HOURS", "empty: off"),
        ("OPT_IN_KEYWORDS", "START"),
    ]
    assert [name for name, written in named if not same_default(name, written)] == [
        "PROVIDER_MAX_CONNECTIONS",
        "WEB_THREADS",
        "OPT_IN_KEYWORDS",
    ]


def table_under(text: str, heading: str) -> list[list[str]]:
    """The body rows of the first Markdown table after the line `heading`, as lists of cells."""
    lines = text.splitlines()
    assert heading in lines, f"no heading {heading!r}"
    rows: list[list[str]] = []
    for line in lines[lines.index(heading) + 1 :]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows or line.startswith("#"):
            break
    return rows[2:]  # below the header and its separator


def documented_transitions(heading: str) -> dict[str, set[str]]:
    """`{from: {to, ...}}` from the `| from | to | when |` table under `heading` in docs/architecture.md."""
    transitions: dict[str, set[str]] = {}
    for source, target, *_ in table_under((DOCS / "architecture.md").read_text(), heading):
        targets = transitions.setdefault(source.strip("`"), set())
        if target != "(none)":
            targets.add(target.strip("`"))
    return transitions


@pytest.mark.parametrize(
    ("heading", "table"),
    [
        ("### Campaign statuses", CAMPAIGN_TRANSITIONS),
        ("### Message statuses", MESSAGE_TRANSITIONS),
        ("### Import statuses", IMPORT_TRANSITIONS),
    ],
    ids=["campaign", "message", "import"],
)
def test_architecture_doc_shows_the_lifecycle_tables_of_the_code(heading, table):
    assert documented_transitions(heading) == {status: set(targets) for status, targets in table.items()}, (
        f"docs/architecture.md, {heading[4:]}: the table must match app/messaging/lifecycle.py"
    )


def layout_entries(path: Path) -> set[str]:
    """The paths a document's Layout block lists (`app/messaging/jobs.py`; directories end with `/`): a
    tree indented two spaces a level, the name first on its line; deeper lines continue a description."""
    block = path.read_text().split("\n## Layout\n", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    entries: set[str] = set()
    parents: list[str] = []
    for line in block.splitlines():
        if not line.strip():
            continue
        level, rest = divmod(len(line) - len(line.lstrip(" ")), 2)
        if rest or level > len(parents):
            continue  # the description of the entry above, continued
        name = line.split()[0]
        parents = parents[:level]
        entries.add("/".join([*parents, name]))
        if name.endswith("/"):
            parents.append(name.rstrip("/"))
    return entries


def ignored(name: str) -> bool:
    """Whether .gitignore keeps `name` (at the top level) out of the repository."""
    patterns = [p.strip().strip("/") for p in (ROOT / ".gitignore").read_text().splitlines() if p.strip()]
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns if not pattern.startswith("#"))


def test_the_layouts_list_every_module_and_nothing_else():
    """The README lists the top level; docs/architecture.md every module of `app`, one line each."""
    modules = {path.relative_to(ROOT).as_posix() for path in (ROOT / "app").rglob("*.py")}
    listed_modules = {
        entry
        for entry in layout_entries(DOCS / "architecture.md")
        if entry.startswith("app/") and not entry.endswith("/")
    }
    assert listed_modules == modules, (
        f"docs/architecture.md's Layout: add {sorted(modules - listed_modules)}, "
        f"remove {sorted(listed_modules - modules)}"
    )
    listed = layout_entries(README)
    top_level = {
        f"{path.name}/" if path.is_dir() else path.name
        for path in ROOT.iterdir()
        if not path.name.startswith(".") and not ignored(path.name)
    }
    assert top_level <= listed, f"README's Layout omits {sorted(top_level - listed)}"
    stale = [entry for entry in listed if not (ROOT / entry).exists() and not ignored(entry.rstrip("/"))]
    assert stale == [], f"README's Layout lists what is not there: {stale}"
