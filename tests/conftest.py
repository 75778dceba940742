import os
import shutil

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True, scope="session")
def _single_thread_torch():
    try:
        import torch
    except ImportError:  # the edge runtime's tests run without torch
        yield
        return
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of the system's Chromium for browser tests (driven by playwright, never downloaded): skipped
    locally when absent, a failure in CI (.ci/run installs Debian's chromium)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("Chromium is not installed: .ci/run installs Debian's chromium for the browser tests")
    pytest.skip("Chromium is not installed here (apt-get install -y chromium); CI installs it")


@pytest.fixture
def browser_page(chromium):
    """(page, errors): a page of a real headless Chromium driven by playwright, closed after the test;
    ``errors`` collects the page's script errors and failed requests."""
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
            yield page, errors
        finally:
            browser.close()
