"""The admin console in a real browser: Debian's Chromium driven by Playwright against the real server (uvicorn on
a free port) on SQLite and on a real PostgreSQL, with a seeded fleet and one user per role.

Every test opens a fresh browser context (its own cookies) and fails on any script error or Content-Security-
Policy violation in the page. Playwright never downloads a browser here: it is given Chromium's path.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, expect, sync_playwright
from playwright.sync_api import Error as PlaywrightError
from sqlalchemy.engine import Engine

from fleet_server.app import create_app
from fleet_server.console import ROLLOUT_ACTION_STATES, SECURITY_HEADERS
from fleet_server.db import create_db_engine
from fleet_server.migrate import upgrade
from fleet_server.settings import FleetSettings
from tests.server.console_support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    PASSWORD,
    STALE_AFTER_S,
    USERS,
    Fleet,
    LiveServer,
    evil_site,
    seed_fleet,
    seed_rollouts,
    seed_users,
    signing_settings,
    utcnow,
)
from tests.server.support import AUTH, TOKEN

pytestmark = pytest.mark.integration

TIMEOUT_MS = 10_000
expect.set_options(timeout=TIMEOUT_MS)


# -- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def playwright_driver() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright_driver: Playwright) -> Iterator[Browser]:
    """Debian's Chromium, headless. Not starting is a failure, never a skip: the console must be tested."""
    try:
        b = playwright_driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    except PlaywrightError as exc:
        pytest.fail(f"cannot start Chromium at {CHROMIUM} with {CHROMIUM_ARGS} (apt-get install chromium): {exc}",
                    pytrace=False)
    yield b
    b.close()


@dataclass
class Console:
    """The running server, its database and what was seeded."""

    server: LiveServer
    engine: Engine
    fleet: Fleet
    backend: str

    @property
    def url(self) -> str:
        return self.server.url

    def api(self) -> httpx.Client:
        """An API client with the bootstrap (admin) token."""
        return httpx.Client(base_url=self.url, headers=AUTH, timeout=10)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def console(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    """The real app on uvicorn with a migrated database, users of every role and a fleet."""
    if request.param == "sqlite":
        db_url = f"sqlite:///{tmp_path_factory.mktemp('console') / 'fleet.db'}"
    else:
        cluster = request.getfixturevalue("postgres_cluster")
        db_url = cluster.create_database()
    engine = create_db_engine(db_url)
    upgrade(engine)
    now = utcnow()
    seed_users(engine, now)
    fleet = seed_fleet(engine, now)
    settings = FleetSettings(database_url=db_url, api_token=TOKEN, session_cookie_secure=False,
                             device_stale_after_s=STALE_AFTER_S,
                             **signing_settings(tmp_path_factory.mktemp("keys")))
    seed_rollouts(engine, fleet)
    server = LiveServer(create_app(settings, engine=engine)).start()
    try:
        yield Console(server, engine, fleet, request.param)
    finally:
        server.stop()
        engine.dispose()


@pytest.fixture
def context(browser: Browser, console: Console) -> Iterator[BrowserContext]:
    ctx = browser.new_context(base_url=console.url)
    ctx.set_default_timeout(TIMEOUT_MS)
    yield ctx
    ctx.close()


_EXPECTED_CONSOLE_ERRORS = re.compile(r"Failed to load resource: the server responded with a status of (401|403|409)")


@pytest.fixture
def problems() -> list[str]:
    """Script errors and CSP violations seen by :func:`page` (a test may remove the ones it provokes)."""
    return []


@pytest.fixture
def page(context: BrowserContext, problems: list[str]) -> Iterator[Page]:
    """A page that records script errors and CSP violations; the test fails if there were any."""
    p = context.new_page()
    p.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))

    def on_console(msg: Any) -> None:
        if msg.type == "error" and not _EXPECTED_CONSOLE_ERRORS.search(msg.text):
            problems.append(f"console error: {msg.text}")

    p.on("console", on_console)
    yield p
    assert problems == [], problems


def login(page: Page, role: str, *, hash_: str = "#/") -> None:
    """Log in through the console's login form as the user of ``role``."""
    page.goto(f"/console/{hash_}")
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    page.get_by_label("User name").fill(USERS[role])
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#who-name")).to_have_text(USERS[role])
    expect(page.locator("#who-role")).to_have_text(role)


def session_cookie(context: BrowserContext) -> str:
    cookies = {c["name"]: c for c in context.cookies()}
    return str(cookies["fleet_session"]["value"])


def rollout_status(console: Console, rollout_id: str) -> str:
    with console.api() as api:
        r = api.get(f"/api/v1/rollouts/{rollout_id}")
        r.raise_for_status()
        return str(r.json()["status"])


def audit_records(console: Console, **filters: str) -> list[dict[str, Any]]:
    with console.api() as api:
        r = api.get("/api/v1/audit", params={**filters, "limit": 1000})
        r.raise_for_status()
        items: list[dict[str, Any]] = r.json()["items"]
        return items


# -- serving: headers, redirects, assets ------------------------------------------------------------------


def test_console_responses_carry_the_security_headers(console: Console) -> None:
    with httpx.Client(base_url=console.url, timeout=10) as http:
        for path in ("/", "/console"):
            r = http.get(path)
            assert r.status_code == 302 and r.headers["location"] == "/console/"
        for path, media in (("/console/", "text/html"), ("/console/app.js", "text/javascript"),
                            ("/console/console.css", "text/css"), ("/console/policy.json", "application/json")):
            r = http.get(path)
            assert r.status_code == 200, path
            assert r.headers["content-type"].startswith(media)
            for name, value in SECURITY_HEADERS.items():
                assert r.headers[name] == value, (path, name)
        csp = SECURITY_HEADERS["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert SECURITY_HEADERS["X-Frame-Options"] == "DENY"
        assert SECURITY_HEADERS["X-Content-Type-Options"] == "nosniff"
        etag = http.get("/console/app.js").headers["etag"]
        assert http.get("/console/app.js", headers={"If-None-Match": etag}).status_code == 304
        for bad in ("/console/secret.py", "/console/..%2F__init__.py", "/console/%2e%2e", "/console/x.html"):
            assert http.get(bad).status_code == 404, bad


class _InlineCode(HTMLParser):
    """Collects what a strict CSP would have to allow: inline scripts, style elements and attributes, event
    handler attributes, and anything loaded from another origin."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        if tag == "script" and not names.get("src"):
            self.found.append("inline <script>")
        if tag == "style":
            self.found.append("<style>")
        for name, value in attrs:
            if name == "style" or name.startswith("on"):
                self.found.append(f"{tag} {name}=")
            if name in ("src", "href") and value and re.match(r"^(https?:)?//", value):
                self.found.append(f"{tag} {name}={value} (another origin)")


def test_the_page_has_no_inline_code_and_sets_the_headers_in_the_browser(page: Page, console: Console,
                                                                         problems: list[str]) -> None:
    response = page.goto("/console/")
    assert response is not None and response.status == 200
    headers = response.all_headers()
    for name, value in SECURITY_HEADERS.items():
        assert headers[name.lower()] == value
    parser = _InlineCode()
    parser.feed(response.text())
    assert parser.found == []
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    # the browser enforces the policy (Trusted Types): strings never become code or markup, they throw
    outcome = page.evaluate("""() => {
        const out = {};
        for (const [name, f] of [
            ['handler', () => { document.createElement('button').setAttribute('onclick', 'window.__x = 1'); }],
            ['innerHTML', () => { document.body.innerHTML += '<b>x</b>'; }],
            ['scriptText', () => { document.createElement('script').textContent = 'window.__x = 2'; }],
        ]) {
            try { f(); out[name] = 'allowed'; } catch (e) { out[name] = e.name; }
        }
        out.ran = window.__x !== undefined;
        return out;
    }""")
    assert outcome == {"handler": "TypeError", "innerHTML": "TypeError", "scriptText": "TypeError", "ran": False}
    refused = [p for p in problems if "Content Security Policy" in p or "Trusted" in p]
    assert refused, "the browser reports the refusals"
    problems[:] = [p for p in problems if p not in refused]


def test_console_assets_never_use_inner_html() -> None:
    """Data is put into the page as text (``textContent``, text nodes), never parsed as markup."""
    from importlib import resources

    static = resources.files("fleet_server.console").joinpath("static")
    for name in ("app.js", "api.js", "dom.js", "views.js", "rollouts.js"):
        text = static.joinpath(name).read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in text, (name, sink)


# -- login ------------------------------------------------------------------------------------------------


def test_login_with_a_wrong_password_shows_the_error(page: Page, console: Console) -> None:
    page.goto("/console/")
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    page.get_by_label("User name").fill(USERS["operator"])
    page.get_by_label("Password").fill("not the password at all")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_test_id("login-error")).to_have_text("invalid username or password")
    expect(page.locator("#nav")).to_be_hidden()
    assert "fleet_session" not in {c["name"] for c in page.context.cookies()}
    failed = [a for a in audit_records(console, action="auth.login") if a["outcome"] == "failed"
              and a["target"] == f"user:{USERS['operator']}"]
    assert failed, "the failed login is audited"


def test_login_sets_a_strict_http_only_cookie_and_opens_the_dashboard(page: Page, console: Console) -> None:
    login(page, "viewer")
    expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()
    cookie = {c["name"]: c for c in page.context.cookies()}["fleet_session"]
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == "", "the page's scripts cannot read the session cookie"


def test_login_returns_to_the_page_asked_for(page: Page, console: Console) -> None:
    rid = console.fleet.rollouts["keep"]
    page.goto(f"/console/#/rollouts/{rid}")
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    login(page, "viewer", hash_=f"#/rollouts/{rid}")
    expect(page.get_by_test_id("rollout-status")).to_have_text("running")


# -- dashboard and lists ----------------------------------------------------------------------------------


def test_dashboard_shows_the_seeded_counts(page: Page, console: Console) -> None:
    login(page, "viewer")
    fleet = console.fleet
    for status, count in fleet.by_status.items():
        expect(page.get_by_test_id(f"count-{status}").locator(".value")).to_have_text(str(count))
    expect(page.get_by_test_id("rollouts-draft").locator(".value")).to_have_text("1")  # no test touches it
    with console.api() as api:  # other tests pause and abort rollouts: compare with the API's count now
        running = api.get("/api/v1/rollouts", params={"status": "running"}).json()["items"]
    expect(page.get_by_test_id("rollouts-running").locator(".value")).to_have_text(str(len(running)))
    versions = page.get_by_test_id("versions")
    for (model, version), count in fleet.versions.items():
        expect(versions.locator("tr", has_text=re.compile(rf"^{model}\s*{version}\s*{count}$"))).to_have_count(1)
    # a count leads to the devices behind it
    v2 = fleet.versions[("detector", 2)]
    versions.locator("tr", has_text=re.compile(rf"^detector\s*2\s*{v2}$")).get_by_role("link").click()
    expect(page.locator("#view")).to_have_attribute("data-hash", "#/devices?model=detector&version=2")
    expect(page.get_by_test_id("devices").locator("tbody tr")).to_have_count(v2)


def test_summary_counts_devices_by_the_registry_rules(console: Console) -> None:
    """``GET /api/v1/summary`` (the dashboard's numbers) agrees with the device list's own status filter."""
    assert httpx.get(f"{console.url}/api/v1/summary", timeout=10).status_code == 401
    with console.api() as api:
        body = api.get("/api/v1/summary").json()
        assert {s: n for s, n in body["devices"].items() if n} == console.fleet.by_status
        assert body["devices_total"] == len(console.fleet.devices)
        for status in ("online", "offline", "stale", "never", "revoked"):
            listed = api.get("/api/v1/devices", params={"status": status, "limit": 1000}).json()["items"]
            assert len(listed) == body["devices"][status], status
        assert body["rollouts"]["draft"] == 1 and set(body["rollouts"]) == {
            "draft", "running", "paused", "completed", "aborted", "rolled_back"}


def test_devices_list_paginates_and_filters(page: Page, console: Console) -> None:
    login(page, "viewer")
    fleet = console.fleet
    page.goto("/console/#/devices?limit=10")
    rows = page.get_by_test_id("devices").locator("tbody tr")
    ids = rows.locator("td:first-child")
    expected = sorted(fleet.devices)
    pages = [expected[i:i + 10] for i in range(0, len(expected), 10)]
    for number, want in enumerate(pages):
        expect(ids).to_have_text(want)  # exactly this page, in id order
        if number + 1 < len(pages):
            page.get_by_test_id("next-page").click()
    expect(page.get_by_test_id("next-page")).to_have_count(0)
    page.get_by_test_id("first-page").click()
    expect(ids).to_have_text(pages[0])
    # filter by status through the form
    page.get_by_label("Status").select_option("offline")
    page.get_by_role("button", name="Filter").click()
    expect(rows).to_have_count(fleet.by_status["offline"])
    expect(rows.locator("td:nth-child(2)", has_text="offline")).to_have_count(fleet.by_status["offline"])
    # a label, then a cohort
    page.goto("/console/#/devices?label=site%3Dberlin&limit=100")
    expect(rows).to_have_count(len([d for d in fleet.devices if int(d[4:]) % 2 == 0]))
    page.goto("/console/#/devices?cohort=berlin&limit=100")
    expect(rows).to_have_count(len(fleet.berlin))
    assert sorted(rows.locator("td:first-child").all_inner_texts()) == fleet.berlin


def test_device_cohort_and_bundle_pages(page: Page, console: Console) -> None:
    login(page, "viewer")
    page.goto("/console/#/devices/cam-004")
    expect(page.get_by_test_id("device-id")).to_have_text("cam-004")
    expect(page.get_by_test_id("device-labels")).to_contain_text("berlin")
    expect(page.get_by_test_id("device-versions")).to_contain_text("detector")
    page.get_by_test_id("device-cohorts").get_by_role("link", name="berlin").click()
    expect(page.get_by_role("heading", name="Cohort berlin")).to_be_visible()
    expect(page.get_by_test_id("cohort-members").locator("tbody tr")).to_have_count(len(console.fleet.berlin))
    page.goto(f"/console/#/bundles/{console.fleet.bundle_digest}")
    expect(page.get_by_test_id("bundle-summary")).to_contain_text(console.fleet.bundle_digest)


def test_data_is_shown_as_text_never_as_markup(page: Page, console: Console) -> None:
    """A cohort description written by a user is shown literally: no element, no script."""
    login(page, "viewer")
    page.goto("/console/#/cohorts")
    cell = page.get_by_test_id("cohorts").locator("tr", has_text="xss").locator("td").nth(1)
    expect(cell).to_have_text(console.fleet.xss_text)
    assert cell.locator("img, script, b").count() == 0
    assert page.evaluate("window.__pwned === undefined")


# -- rollouts: actions by role ----------------------------------------------------------------------------


def test_operator_pauses_a_running_rollout(page: Page, console: Console) -> None:
    rid = console.fleet.rollouts["pause"]
    login(page, "operator")
    page.goto(f"/console/#/rollouts/{rid}")
    expect(page.get_by_test_id("rollout-status")).to_have_text("running")
    actions = page.get_by_test_id("actions")
    expect(actions.get_by_role("button")).to_have_text(["Pause", "Abort"])  # start/retry/rollback: release managers
    expect(page.get_by_test_id("steps")).to_contain_text("healthy")
    expect(page.get_by_test_id("tally")).to_contain_text("Healthy")
    actions.get_by_role("button", name="Pause").click()
    expect(page.get_by_test_id("rollout-status")).to_have_text("paused")
    expect(page.locator("#message")).to_contain_text("paused")
    expect(actions.get_by_role("button")).to_have_text(["Resume", "Abort"])
    assert rollout_status(console, rid) == "paused"
    records = [a for a in audit_records(console, action="rollout.pause") if a["target"].endswith(rid)]
    assert len(records) == 1
    assert records[0]["actor"] == f"user:{USERS['operator']}" and records[0]["outcome"] == "ok"
    # abort asks first; cancelling the dialog changes nothing
    actions.get_by_role("button", name="Abort").click()
    expect(page.locator("#confirm")).to_be_visible()
    page.locator("#confirm-cancel").click()
    expect(page.locator("#confirm")).to_be_hidden()
    assert rollout_status(console, rid) == "paused"
    # resume again (leaves it as found for the other backend's... own fixture; and exercises resume)
    actions.get_by_role("button", name="Resume").click()
    expect(page.get_by_test_id("rollout-status")).to_have_text("running")


def test_abort_needs_confirmation_and_records_the_reason(page: Page, console: Console) -> None:
    rid = console.fleet.rollouts["abort"]
    login(page, "operator")
    page.goto(f"/console/#/rollouts/{rid}")
    page.get_by_test_id("actions").get_by_role("button", name="Abort").click()
    page.locator("#confirm-reason").fill("bad canary <b>numbers</b>")
    page.locator("#confirm-ok").click()
    expect(page.get_by_test_id("rollout-status")).to_have_text("aborted")
    expect(page.get_by_test_id("no-actions")).to_be_visible()  # an operator cannot roll back
    expect(page.get_by_test_id("rollout-reason")).to_contain_text("bad canary <b>numbers</b>")  # as text
    records = [a for a in audit_records(console, action="rollout.abort") if a["target"].endswith(rid)]
    assert len(records) == 1 and "bad canary <b>numbers</b>" in str(records[0]["detail"])


def test_an_api_error_is_shown_with_the_apis_detail(page: Page, console: Console) -> None:
    """The page was loaded while running; someone else paused it since: the API's 409 text is shown."""
    rid = console.fleet.rollouts["conflict"]
    login(page, "operator")
    page.goto(f"/console/#/rollouts/{rid}")
    expect(page.get_by_test_id("rollout-status")).to_have_text("running")
    with console.api() as api:
        api.post(f"/api/v1/rollouts/{rid}/pause", json={}).raise_for_status()
    page.get_by_test_id("actions").get_by_role("button", name="Pause").click()
    message = page.locator("#message")
    expect(message).to_have_attribute("data-kind", "error")
    expect(message).to_contain_text("paused")  # the policy's message names the current state
    assert rollout_status(console, rid) == "paused"


def test_viewer_sees_no_action_buttons_and_a_forged_request_is_refused(page: Page, console: Console) -> None:
    rid = console.fleet.rollouts["keep"]
    login(page, "viewer")
    page.goto(f"/console/#/rollouts/{rid}")
    expect(page.get_by_test_id("rollout-status")).to_have_text("running")
    expect(page.get_by_test_id("no-actions")).to_be_visible()
    expect(page.get_by_test_id("actions").get_by_role("button")).to_have_count(0)
    # the viewer forges the request the hidden button would send, with a valid session and CSRF token
    status, body = page.evaluate("""async (rid) => {
        const me = await (await fetch('/api/v1/auth/me')).json();
        const r = await fetch(`/api/v1/rollouts/${rid}/pause`, {method: 'POST',
            headers: {'Content-Type': 'application/json', 'X-CSRF-Token': me.csrf_token}, body: '{}'});
        return [r.status, await r.json()];
    }""", rid)
    assert status == 403, body
    assert "operator" in body["detail"]
    assert rollout_status(console, rid) == "running"
    denied = [a for a in audit_records(console, action="access.denied")
              if a["actor"] == f"user:{USERS['viewer']}" and rid in a["target"]]
    assert denied


def test_a_403_tells_the_user_their_role_does_not_allow_it(page: Page, console: Console) -> None:
    login(page, "operator")
    expect(page.locator("#nav-audit")).to_be_hidden()
    page.goto("/console/#/audit")
    expect(page.locator("#message")).to_contain_text("Your role does not allow this")


def test_admin_reads_the_audit_log(page: Page, console: Console) -> None:
    login(page, "admin")
    page.locator("#nav-audit").click()
    expect(page.get_by_role("heading", name="Audit log")).to_be_visible()
    page.get_by_label("Action").fill("auth.login")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("#view")).to_have_attribute("data-hash", re.compile(r"action=auth\.login"))
    rows = page.get_by_test_id("audit").locator("tbody tr")
    expect(rows.first).to_contain_text("auth.login")
    assert all("auth.login" in t for t in rows.locator("td:nth-child(3)").all_inner_texts())


# -- sessions and CSRF ------------------------------------------------------------------------------------


def test_logout_ends_the_session(page: Page, console: Console) -> None:
    rid = console.fleet.rollouts["keep"]
    login(page, "operator")
    page.goto(f"/console/#/rollouts/{rid}")
    expect(page.get_by_test_id("rollout-status")).to_have_text("running")
    cookie = session_cookie(page.context)
    page.locator("#logout").click()
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    # back to the rollout page: the console asks for a login again, nothing is shown
    page.go_back()
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    expect(page.get_by_test_id("rollout-status")).to_have_count(0)
    # the old cookie is refused by the API, even sent by hand
    with httpx.Client(base_url=console.url, cookies={"fleet_session": cookie}, timeout=10) as http:
        assert http.get("/api/v1/auth/me").status_code == 401
        assert http.get(f"/api/v1/rollouts/{rid}").status_code == 401


@pytest.mark.parametrize("origin_host", ["127.0.0.1", "localhost"])
def test_a_cross_site_form_post_with_the_session_cookie_is_refused(page: Page, console: Console, origin_host: str,
                                                                     problems: list[str]) -> None:
    """A page of another origin posts a form to the API while the operator is logged in. Same site, other
    port (the browser sends the SameSite=Strict cookie): refused by the CSRF check (403). Another site: the
    browser does not even send the cookie (401). Either way the rollout stays running."""
    rid = console.fleet.rollouts["keep"]
    login(page, "operator")
    target = f"{console.url}/api/v1/rollouts/{rid}/pause"
    with evil_site(target) as port:
        with page.expect_response(lambda r: r.url == target) as answer:
            page.goto(f"http://{origin_host}:{port}/")
        response = answer.value
        request_cookie = response.request.all_headers().get("cookie", "")
        if origin_host == "127.0.0.1":
            assert "fleet_session=" in request_cookie, "same-site: the browser sent the session cookie"
            assert response.status == 403
            assert "cross-site" in response.json()["detail"] or "CSRF" in response.json()["detail"]
        else:
            assert "fleet_session=" not in request_cookie, "cross-site: SameSite=Strict keeps the cookie home"
            assert response.status == 401
    assert rollout_status(console, rid) == "running"
    # the browser shows the API's JSON answer and asks the server for /favicon.ico (404): not the console's doing
    problems[:] = [p for p in problems if "status of 404" not in p]


def test_csrf_token_is_required_with_the_session_cookie(console: Console, browser: Browser) -> None:
    """The same request outside the browser: the session cookie alone, or with another session's token, is
    refused; with the session's own token it would pass the CSRF check (here: a viewer, so 403 by role)."""
    rid = console.fleet.rollouts["keep"]
    with httpx.Client(base_url=console.url, timeout=10) as a, httpx.Client(base_url=console.url, timeout=10) as b:
        token_a = a.post("/api/v1/auth/login", json={"username": USERS["operator"], "password": PASSWORD}).json()
        token_b = b.post("/api/v1/auth/login", json={"username": USERS["operator"], "password": PASSWORD}).json()
        url = f"/api/v1/rollouts/{rid}/pause"
        assert a.post(url, json={}).status_code == 403
        assert a.post(url, json={}, headers={"X-CSRF-Token": token_b["csrf_token"]}).status_code == 403
        assert a.post(url, json={}, headers={"X-CSRF-Token": token_a["csrf_token"],
                                             "Origin": "http://evil.example"}).status_code == 403
        assert rollout_status(console, rid) == "running"
        with contextlib.suppress(Exception):
            a.post("/api/v1/auth/logout", headers={"X-CSRF-Token": token_a["csrf_token"]})
            b.post("/api/v1/auth/logout", headers={"X-CSRF-Token": token_b["csrf_token"]})


# -- the buttons follow the API's declarations ------------------------------------------------------------


def test_policy_names_the_roles_the_action_routes_declare(console: Console) -> None:
    body = httpx.get(f"{console.url}/console/policy.json", timeout=10).json()
    actions = body["rollout_actions"]
    assert {a: actions[a]["role"] for a in actions} == {
        "start": "release_manager", "pause": "operator", "resume": "operator", "abort": "operator",
        "rollback": "release_manager", "retry-failed": "release_manager"}
    assert body["roles"] == ["viewer", "operator", "release_manager", "admin"]


def test_action_states_agree_with_the_rollout_operations() -> None:
    """:data:`ROLLOUT_ACTION_STATES` (which buttons are shown) matches what the pure operations allow."""
    from fleet_server.rollouts import operations
    from fleet_server.rollouts.errors import InvalidTransitionError
    from fleet_server.rollouts.model import Phase, Release, RolloutSpec, RolloutState, RolloutStatus

    spec = RolloutSpec("r1", "detector", 4, "ab" * 32, ["d1", "d2"], [Phase(count=2)])
    previous = Release("detector", 3, "cd" * 32)
    calls: dict[str, Callable[[RolloutState], object]] = {
        "start": lambda st: operations.start(st, 10.0),
        "pause": lambda st: operations.pause(st, 10.0),
        "resume": lambda st: operations.resume(st, 10.0),
        "abort": lambda st: operations.abort(spec, st, {}, 10.0),
        "rollback": lambda st: operations.rollback(spec, st, {}, 10.0, previous=previous),
        "retry-failed": lambda st: operations.retry_failed(spec, st, {}, 10.0),
    }
    assert set(calls) == set(ROLLOUT_ACTION_STATES)
    for action, call in calls.items():
        allowed = set()
        for status in RolloutStatus:
            if status is RolloutStatus.DRAFT:
                state = RolloutState.draft()
            elif status is RolloutStatus.ROLLED_BACK:
                state = RolloutState(status, 0, 0.0, rollback_to=previous, changed_at=0.0)
            else:
                state = RolloutState(status, 0, 0.0, changed_at=0.0)
            try:
                call(state)
            except InvalidTransitionError:
                continue
            allowed.add(status.value)
        assert allowed == set(ROLLOUT_ACTION_STATES[action]), action
