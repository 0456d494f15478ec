"""The dashboard in a real browser (Debian's Chromium, headless) against `linearize serve`.

Each test saves screenshots of the pages it visits under its tmp_path.
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from playwright.sync_api import expect
from ui_helpers import KEYS, SCRIPTS, wait_until

XSS = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'
UPLOAD_NAME = "<img src=y onerror=alert(3)>.txt"


def tiny_spec(dataset_id: str, **overrides) -> dict:
    body = {
        "kind": "compress",
        "model": "tiny-llama",
        "layers": 2,
        "data": {"dataset_id": dataset_id},
        "calib_tokens": 256,
        "eval_tokens": 256,
        "seq_len": 64,
        "heal_steps": 0,
    }
    body.update(overrides)
    return body


def submit_and_open_the_job(page) -> str:
    """Submit the form; the job id of the page it opens."""
    page.click("#submit-form button[type=submit]")
    page.wait_for_url(re.compile(r".*/ui/jobs/job_[0-9a-f]+$"))
    return page.url.rsplit("/", 1)[1]


@pytest.fixture(scope="module")
def dataset(server, ui_text) -> str:
    with server.http() as http:
        answer = http.post("/v1/datasets", files={"file": (UPLOAD_NAME, ui_text, "text/plain")})
        assert answer.status_code == 201, answer.text
        return answer.json()["id"]


@pytest.fixture(scope="module")
def finished_jobs(server, dataset) -> list[str]:
    """Two succeeded compress jobs on the tiny model (1 and 2 layers), older first."""
    ids = []
    with server.http() as http:
        for layers in (1, 2):
            answer = http.post("/v1/jobs", json=tiny_spec(dataset, layers=layers))
            assert answer.status_code == 202, answer.text
            ids.append(answer.json()["id"])
    for job_id in ids:
        assert server.wait_terminal(job_id)["status"] == "succeeded"
    return ids


def test_serve_prints_the_dashboard_url_and_pages_carry_a_strict_csp(server):
    import httpx

    assert f"dashboard {server.url}/ui" in server.log.read_text(errors="ignore")
    root = httpx.get(server.url + "/", follow_redirects=False)
    assert root.status_code == 307 and root.headers["location"] == "/ui"
    for path in ("/ui", "/ui/jobs/job_x", "/ui/assets/app.js", "/ui/assets/app.css"):
        answer = httpx.get(server.url + path)
        assert answer.status_code == 200, path
        csp = answer.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert httpx.get(server.url + "/ui/assets/..%2Fmain.py").status_code == 404
    assert httpx.get(server.url + "/ui/nowhere").status_code == 404
    html = httpx.get(server.url + "/ui").text
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "inline script in the shell"
    assert not re.search(r"\son[a-z]+\s*=", html), "inline event handler in the shell"
    for name in SCRIPTS:
        answer = httpx.get(f"{server.url}/ui/assets/{name}")
        assert answer.status_code == 200, name
        source = answer.text
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "eval(", "new Function"):
            assert sink not in source, f"{name} uses {sink}"


def test_a_wrong_key_shows_a_clear_error_and_the_key_stays_out_of_urls_and_cookies(tab):
    requested: list[str] = []
    tab.page.on("request", lambda r: requested.append(r.url))
    tab.goto("/ui/jobs")
    tab.page.wait_for_url("**/ui/signin")
    expect(tab.page.locator("#nav")).to_be_hidden()
    tab.page.fill("#api-key", "not-a-key")
    tab.page.click("#signin-form button[type=submit]")
    error = tab.page.locator("#signin-error")
    error.wait_for(state="visible")
    assert "not accepted" in error.inner_text()
    assert tab.page.evaluate("sessionStorage.length") == 0
    tab.shot("signin-wrong-key")
    tab.sign_in("alpha")
    stored = tab.page.evaluate("sessionStorage.getItem('linearize.apiKey')")
    assert stored == KEYS["alpha"]
    assert tab.page.context.cookies() == []
    assert not [url for url in requested if KEYS["alpha"] in url or "not-a-key" in url]
    # The only console errors are the browser's notes about the 401 answer.
    assert all("401" in message for message in tab.console_errors), tab.console_errors


def test_submit_follow_report_and_download_through_the_pages(tab, server, ui_text):
    tab.sign_in()
    page = tab.page
    tab.goto("/ui/submit")
    page.fill("#model", "tiny-llama")
    page.fill("#budget", "40")
    page.fill("#calib_tokens", "0")
    page.check("#data-upload")
    page.set_input_files(
        "#data-file", files=[{"name": UPLOAD_NAME, "mimeType": "text/plain", "buffer": ui_text}]
    )
    page.click("#submit-form button[type=submit]")
    # The API's 422 items land next to the fields they name: pydantic's first, then the
    # service's own budget check.
    calib_error = page.locator('[data-field="calib_tokens"] .field-error')
    calib_error.wait_for(state="visible")
    assert "greater than or equal to 1" in calib_error.inner_text()
    page.fill("#calib_tokens", "256")
    page.click("#submit-form button[type=submit]")
    budget_error = page.locator('[data-field="budget"] .field-error')
    budget_error.wait_for(state="visible")
    assert "at most L - 2 = 4" in budget_error.inner_text()
    assert not calib_error.is_visible()
    tab.shot("submit-errors")

    page.fill("#budget", "2")
    page.fill("#eval_tokens", "256")
    page.fill("#seq_len", "64")
    page.fill("#gate_ppl_increase", "50")
    page.fill("#heal_steps", "30")
    page.fill("#metadata", f"commit=abc123\nnote={XSS}")
    # A rule between two fields (no linear block to write for a removal) lands in the banner.
    page.select_option("#method", "remove")
    page.select_option("#format", "linear")
    page.click("#submit-form button[type=submit]")
    banner = page.locator("#form-error")
    banner.wait_for(state="visible")
    assert "method=remove drops the span" in banner.inner_text()
    page.select_option("#format", "standard")
    job_id = submit_and_open_the_job(page)
    # Live progress from the SSE stream, then the report when the terminal event arrives.
    page.locator("#events li").first.wait_for(timeout=120_000)
    tab.shot("job-running")
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=180_000)
    page.locator("#artifact-table").wait_for()
    with server.http() as http:
        report = http.get(f"/v1/jobs/{job_id}/report").json()
        artifacts = http.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]
    layers = report["model"]["layers_before"]
    replaced = report["replaced_layers"]
    assert layers == 6 and len(replaced) == 2
    assert report["method"] == "remove+heal"

    # One mark per layer; the replaced ones highlighted, with a band behind each.
    chart = page.locator('svg[data-chart="linearity-score"]')
    assert chart.locator("circle.mark").count() == layers
    highlighted = chart.locator("circle.mark.replaced")
    assert sorted(int(x) for x in highlighted.evaluate_all("ns => ns.map(n => n.dataset.x)")) == (
        replaced
    )
    assert chart.locator("rect.band").count() == len(replaced)
    assert page.locator("#summary-replaced .value").inner_text() == ", ".join(map(str, replaced))
    assert page.locator('svg[data-chart="perplexity"] rect').count() >= 2
    # The healing curve is the report's: one vertex per point (30 steps, under the 200 cap).
    curve = report["selection"]["healing"]["curve"]
    assert [step for step, _ in curve] == list(range(1, 31))
    assert (
        page.locator('svg[data-chart="healing"] path.series').get_attribute("d").count("L")
        == len(curve) - 1
    )
    assert "The loss of every step." in page.locator("#healing").inner_text()
    gate_rows = page.locator("#gate-table tbody tr")
    assert gate_rows.count() == len(report["gate"]["rules"])
    assert page.locator("#trigger-table tbody tr").count() > 0

    # User-supplied strings are text, and nothing they carry ran.
    assert page.locator("#job-metadata dd").nth(1).inner_text() == XSS
    assert UPLOAD_NAME in page.locator("#job-data").inner_text()
    assert page.evaluate("window.__xss") is None
    assert page.locator("img[src=x], img[src=y]").count() == 0
    assert tab.dialogs == []

    # A download link: the file's sha256 matches the artifact list (and the page says so).
    config = next(a for a in artifacts if a["path"] == "config.json")
    row = page.locator("#artifact-table tr", has=page.locator('a[data-path="config.json"]'))
    assert row.locator(".sha").inner_text() == config["sha256"]
    with page.expect_download() as info:
        row.locator("a.download").click()
    saved = tab.shots / "downloaded-config.json"
    info.value.save_as(saved)
    assert info.value.suggested_filename == "config.json"
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == config["sha256"]
    assert json.loads(saved.read_text())["num_hidden_layers"] == layers - len(replaced)
    wait_until(lambda: "verified" in row.inner_text(), 10, what="the in-page sha256 check")
    tab.shot("job-succeeded")
    # Chromium logs each 4xx answer; the two 422s of the form are expected, nothing else.
    assert [m for m in tab.console_errors if "status of 422" not in m] == []

    # The same page on a phone: no sideways scrolling of the page itself. Opened finished, it
    # reads no events: the healing curve comes with the report.
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.set_viewport_size({"width": 390, "height": 844})
    page.reload()
    page.locator("#artifact-table").wait_for()
    page.locator('svg[data-chart="healing"] path.series').wait_for()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert [url for url in requested if "/events" in url] == []
    tab.shot("job-succeeded-phone")
    assert_an_old_report_draws_the_healing_curve_from_the_events(tab, server, job_id)


def assert_an_old_report_draws_the_healing_curve_from_the_events(tab, server, job_id):
    """A report written before selection.healing.curve existed: the page reads the events."""
    with server.http() as http:
        events = http.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["items"]
    losses = [
        e
        for e in events
        if e.get("stage") == "heal" and (e.get("message") or "").startswith("loss ")
    ]
    assert len(losses) > 1

    def without_curve(route) -> None:
        answer = route.fetch()
        old = answer.json()
        del old["selection"]["healing"]["curve"]
        route.fulfill(response=answer, json=old)

    page = tab.page
    page.route(f"**/v1/jobs/{job_id}/report", without_curve)
    with page.expect_request(re.compile(rf".*/v1/jobs/{job_id}/events\?limit=1000$")):
        page.reload()
    path = page.locator('svg[data-chart="healing"] path.series')
    path.wait_for()
    # One vertex per stored "loss" event: fewer than the steps, which is why reports carry the curve.
    assert path.get_attribute("d").count("L") == len(losses) - 1
    assert "sampled from the progress events" in page.locator("#healing").inner_text()
    page.unroute(f"**/v1/jobs/{job_id}/report")


def test_cancel_a_running_job_from_its_page(tab, server, dataset):
    with server.http() as http:
        long_job = tiny_spec(dataset, heal_steps=100_000, heal_seconds=120)
        job_id = http.post("/v1/jobs", json=long_job).json()["id"]
    tab.sign_in()
    tab.goto(f"/ui/jobs/{job_id}")
    page = tab.page
    expect(page.locator("#stage")).to_have_text("heal", timeout=150_000)
    page.click("#cancel")
    expect(page.locator("#job-status")).to_have_text("cancelled", timeout=120_000)
    page.locator("#job-error").wait_for()
    assert "cancelled" in page.locator("#job-error").inner_text()
    assert "cancelled" in page.locator(".events").inner_text()
    tab.shot("job-cancelled")
    with server.http() as http:
        assert http.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
    assert tab.console_errors == []


def test_jobs_list_is_newest_first_filters_and_pages_with_the_cursor(tab, server, finished_jobs):
    with server.http() as http:
        newest = http.get("/v1/jobs", params={"limit": 2}).json()["items"]
    tab.sign_in()
    page = tab.page
    tab.goto("/ui/jobs?limit=1")
    rows = page.locator("#jobs-table tbody tr[data-job]")
    rows.first.wait_for()
    assert rows.count() == 1 and rows.first.get_attribute("data-job") == newest[0]["id"]
    page.click("#older")
    page.wait_for_url(re.compile(r".*after=.*"))
    expect(rows.first).to_have_attribute("data-job", newest[1]["id"])
    tab.goto("/ui/jobs")
    page.select_option("#status-filter", "succeeded")
    page.wait_for_url(re.compile(r".*status=succeeded"))
    page.locator("#jobs-table tbody tr[data-job]").first.wait_for()
    shown = page.locator("#jobs-table tbody tr[data-job]")
    statuses = shown.locator("td:first-child .badge").evaluate_all(
        "ns => ns.map(n => n.textContent)"
    )
    assert statuses and set(statuses) == {"succeeded"}
    ids = shown.evaluate_all("ns => ns.map(n => n.dataset.job)")
    assert finished_jobs[1] in ids and ids.index(finished_jobs[1]) < ids.index(finished_jobs[0])
    one_layer = page.locator(f'tr[data-job="{finished_jobs[0]}"] td').nth(5)
    wait_until(lambda: one_layer.inner_text() != "–", 10, what="the report columns")
    with server.http() as http:
        report = http.get(f"/v1/jobs/{finished_jobs[0]}/report").json()
    assert one_layer.inner_text() == ", ".join(map(str, report["replaced_layers"]))
    tab.shot("jobs")
    assert tab.console_errors == []


def test_another_tenants_job_is_not_found_exactly_like_the_api(tab, server, finished_jobs):
    with server.http("beta") as http:
        assert http.get(f"/v1/jobs/{finished_jobs[0]}").status_code == 404
    tab.sign_in("beta")
    tab.goto(f"/ui/jobs/{finished_jobs[0]}")
    tab.page.locator("#not-found").wait_for()
    foreign = tab.page.locator("#not-found").inner_text()
    tab.shot("job-other-tenant")
    tab.goto("/ui/jobs/job_000000000000000000000000")
    tab.page.locator("#not-found").wait_for()
    missing = tab.page.locator("#not-found").inner_text()
    assert foreign.replace(finished_jobs[0], "ID") == missing.replace(
        "job_000000000000000000000000", "ID"
    )
    assert "job not found" in foreign
    assert tab.page.locator("#jobs-table").count() == 0


def test_compare_two_jobs_side_by_side(tab, finished_jobs):
    tab.sign_in()
    tab.goto(f"/ui/jobs/{finished_jobs[1]}")
    page = tab.page
    page.locator(f'#compare-with option[value="{finished_jobs[0]}"]').wait_for(state="attached")
    page.select_option("#compare-with", finished_jobs[0])
    page.click("#compare-go")
    page.wait_for_url(re.compile(r".*/ui/compare\?a=.*&b=.*"))
    chart = page.locator('svg[data-chart="compare-linearity"]')
    chart.wait_for()
    assert chart.locator("g.marks").count() == 2
    assert chart.locator("circle.mark").count() == 2 * 6
    assert page.locator("#compare-table tbody tr").count() == 6
    columns = page.locator("#compare-columns").inner_text()
    assert finished_jobs[0] in columns and finished_jobs[1] in columns
    tab.shot("compare")
    assert tab.console_errors == []


def test_a_failed_job_shows_its_error_and_last_events(tab, server):
    with server.http() as http:
        few_words = http.post(
            "/v1/datasets", content=b"far too short", headers={"Content-Type": "text/plain"}
        ).json()["id"]
        job_id = http.post("/v1/jobs", json=tiny_spec(few_words)).json()["id"]
    failed = server.wait_terminal(job_id)
    assert failed["status"] == "failed"
    tab.sign_in()
    tab.goto(f"/ui/jobs/{job_id}")
    error = tab.page.locator("#job-error")
    error.wait_for()
    assert error.inner_text().startswith(f"{failed['error']['code']}: ")
    assert failed["error"]["message"][:40] in error.inner_text()
    assert "status failed" in tab.page.locator(".events").inner_text()
    tab.shot("job-failed")
    assert tab.console_errors == []


def test_a_compare_jobs_page_shows_each_models_scores_and_per_layer_differences(
    tab, server, dataset
):
    spec = {
        "kind": "compare",
        "models": ["tiny-llama", "tiny-llama-b"],
        "data": {"dataset_id": dataset},
        "calib_tokens": 256,
        "seq_len": 64,
    }
    with server.http() as http:
        job_id = http.post("/v1/jobs", json=spec).json()["id"]
    assert server.wait_terminal(job_id)["status"] == "succeeded"
    with server.http() as http:
        differences = http.get(f"/v1/jobs/{job_id}/report").json()["compare"][1]["differences"]
    tab.sign_in()
    tab.goto(f"/ui/jobs/{job_id}")
    chart = tab.page.locator('svg[data-chart="compare-score"]')
    chart.wait_for()
    assert chart.locator("g.marks").count() == 2
    assert chart.locator("circle.mark").count() == 2 * 6
    rows = tab.page.locator("#compare-differences tbody tr")
    assert rows.count() == len(differences) == 6
    first = rows.first.locator("td")
    assert first.nth(2).inner_text() == f"{differences[0]['score']:.5f}"
    tab.shot("job-compare-kind")
    assert tab.console_errors == []


def test_the_jobs_list_refreshes_itself_while_a_shown_job_is_live(
    tab, server, dataset, finished_jobs
):
    tab.sign_in()
    page = tab.page
    with server.http() as http:
        # 3 s of healing at least: the job is still queued or running when the list shows it.
        live = tiny_spec(dataset, heal_steps=100_000, heal_seconds=3)
        job_id = http.post("/v1/jobs", json=live).json()["id"]
    tab.goto("/ui/jobs")
    row = page.locator(f'tr[data-job="{job_id}"]')
    row.wait_for()
    assert row.get_attribute("data-status") in ("queued", "running")
    tab.shot("jobs-live")
    finished_row = page.locator(f'tr[data-job="{finished_jobs[0]}"]')
    finished_row.evaluate("row => { row.keptByTheRefresh = true }")
    page.evaluate("window.notReloaded = true")
    list_reads: list[str] = []
    page.on("request", lambda r: list_reads.append(r.url) if "/v1/jobs?" in r.url else None)

    expect(row.locator("td:first-child .badge")).to_have_text("succeeded", timeout=120_000)
    with server.http() as http:
        report = http.get(f"/v1/jobs/{job_id}/report").json()
    replaced = row.locator("td").nth(5)
    expect(replaced).to_have_text(", ".join(map(str, report["replaced_layers"])))
    assert page.evaluate("window.notReloaded") is True
    assert list_reads, "the page did not read the list again"
    # Rows that did not change are the same nodes (no flicker), and with every shown job
    # finished the page stops reading the list (3 s refresh period).
    assert finished_row.evaluate("row => row.keptByTheRefresh") is True
    reads = len(list_reads)
    page.wait_for_timeout(4500)
    assert len(list_reads) == reads
    tab.shot("jobs-refreshed")
    assert tab.console_errors == []


def test_submit_max_layers_from_the_form_and_read_the_curve(tab, server, ui_text):
    tab.sign_in()
    page = tab.page
    tab.goto("/ui/submit")
    page.fill("#model", "tiny-llama")
    page.fill("#budget", "max")
    for field, value in (("calib_tokens", "256"), ("eval_tokens", "256"), ("seq_len", "64")):
        page.fill(f"#{field}", value)
    page.fill("#heal_steps", "3")
    page.check("#data-upload")
    page.set_input_files(
        "#data-file", files=[{"name": "max.txt", "mimeType": "text/plain", "buffer": ui_text}]
    )
    page.click("#submit-form button[type=submit]")
    budget_error = page.locator('[data-field="budget"] .field-error')
    budget_error.wait_for(state="visible")
    assert "at least one of gate_ppl_increase" in budget_error.inner_text()
    page.fill("#gate_ppl_increase", "1000")
    job_id = submit_and_open_the_job(page)
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=180_000)
    rows = page.locator("#curve-table tbody tr")
    rows.first.wait_for()
    with server.http() as http:
        report = http.get(f"/v1/jobs/{job_id}/report").json()
    assert rows.count() == len(report["curve"]) >= 2
    chosen = page.locator("#curve-table tbody tr.chosen")
    assert chosen.count() == 1
    k = next(p["k"] for p in report["curve"] if p["chosen"])
    assert chosen.locator("td").first.inner_text() == str(k) == str(report["selection"]["chosen_k"])
    tab.shot("job-max-layers-curve")
    assert [m for m in tab.console_errors if "status of 422" not in m] == []
