"""Issue 17, admin actions: switching the live model (and fine-tuning) is refused on the server
for signed-in users without the admin role and, without sign-in, unless --admin-open."""
import pytest

from mrg_core import auth
from tests.e2e.serving import serve_app
from tests.factories import save_tiny_versions
from tests.e2e.test_browser import WAIT_MS, wait_text
from ui import models_panel as mp

pytestmark = pytest.mark.e2e
FAST = 1_000  # PBKDF2 iterations: the test's logins stay quick


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_versions(tmp_path_factory.mktemp("e2e_admin"))


def _serve(models, db, **build_kw):
    return serve_app(models / "tiny-1.0.0", db, model_roots=[models], **build_kw)


@pytest.fixture(scope="module")
def signed_in(models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e_admin_auth")
    users = tmp / "users.txt"
    auth.add_user(users, "ada", "ada-password", FAST)  # a radiologist
    auth.add_user(users, "root", "root-password", FAST, admin=True)
    demo, engine = _serve(models, tmp / "r.db", auth=auth.load_auth(users))
    try:
        yield demo.local_url, engine
    finally:
        demo.close()
        engine.store.close()


@pytest.fixture(scope="module")
def anonymous(models, tmp_path_factory):
    demo, engine = _serve(models, tmp_path_factory.mktemp("e2e_admin_open") / "r.db")
    try:
        yield demo.local_url, engine
    finally:
        demo.close()
        engine.store.close()


def _page(browser, url, user=None, password=None):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    if user:  # Gradio's login route; the session cookie lands in this browser context
        r = page.request.post(url.rstrip("/") + "/login", form={"username": user, "password": password})
        assert r.ok, r.status
    page.goto(url)
    page.locator("#generate").wait_for(timeout=WAIT_MS)
    page.get_by_text("Model (admin)", exact=True).click()
    page.locator("#use-model").wait_for(timeout=WAIT_MS)
    return page


def _choose(page, label_part: str):
    page.locator("#model-version input").click()
    page.get_by_role("option").filter(has_text=label_part).first.click()


def test_a_signed_in_user_without_the_admin_role_cannot_switch_the_model(browser, signed_in):
    url, engine = signed_in
    page = _page(browser, url, "ada", "ada-password")
    wait_text(page, "#model-message", "Read-only")  # told before trying
    _choose(page, "2.0.0")
    page.locator("#use-model").click()
    wait_text(page, "#model-message", "Only an administrator can switch the live model")
    assert "does not have the admin role" in page.locator("#model-message").inner_text()
    assert engine.model_info["version"] == "1.0.0"
    page.locator("#finetune").click()  # (without the check: "Not enough corrections…")
    wait_text(page, "#model-message", "Only an administrator can start fine-tuning")
    page.context.close()


def test_an_admin_can_switch_the_model(browser, signed_in):
    url, engine = signed_in
    page = _page(browser, url, "root", "root-password")
    assert "Read-only" not in page.locator("#model-message").inner_text()
    _choose(page, "2.0.0")
    page.locator("#use-model").click()
    wait_text(page, "#model-message", "Now using")
    assert engine.model_info["version"] == "2.0.0"
    page.context.close()


def test_without_sign_in_the_panel_is_read_only(browser, anonymous):
    url, engine = anonymous
    page = _page(browser, url)
    wait_text(page, "#model-message", "Read-only")
    _choose(page, "2.0.0")
    page.locator("#use-model").click()
    wait_text(page, "#model-message", "--admin-open")
    assert engine.model_info["version"] == "1.0.0"
    page.context.close()


def test_admin_check_policy():
    check = auth.make_checker({"ada": auth.hash_password("x", FAST)})  # no roles at all
    assert mp.admin_check(check, "ada") is not None  # signed in, not an admin
    check.admins = frozenset({"ada"})
    assert mp.admin_check(check, "ada") is None
    assert mp.admin_check(check, "eve", admin_open=True) is not None  # roles decide with auth
    assert mp.admin_check(None, None) is not None
    assert mp.admin_check(None, None, admin_open=True) is None
