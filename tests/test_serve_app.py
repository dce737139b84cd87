"""The Ray Serve application on the local Ray, with its registry and indexes on moto S3: the HTTP
API and its answers to bad input, a promotion swapped in under a request loop without a failed
request, a rollback, and an alias moved to a version that has no index yet."""

from __future__ import annotations

import base64
import time

import pytest
import requests

from composeae.cli import main
from composeae.testing.checkpoints import random_checkpoint
from composeae.testing.console import own_lines
from composeae.testing.localcluster import free_port
from composeae.testing.clients import SearchClients


def _register(registry, checkpoint: str, run: str) -> int:
    record = {"date": "2026-12-01", "model": "composeae",
              "evaluation": {"split": "test", "table": {"test/R@1": 0.1}},
              "decision": {"metric": "test/R@1", "promote": False}}
    return registry.register(checkpoint, run_name=run, record=record)[0]["version"]


@pytest.fixture(scope="module")
def service(ray_local, s3_server, css_tiny, tmp_path_factory):
    """A registry on S3 with versions 1 and 2 indexed, `champion` -> 1, served on a free port."""
    import boto3
    from ray import serve

    from composeae.registry.store import ModelRegistry
    from composeae.serve.app import build_app
    from composeae.serve.index import build_index, registry_index_url, resolve_model

    bucket = f"serve-{int(time.time() * 1000)}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/registry"
    registry = ModelRegistry.create(url)
    for seed in (0, 1):
        checkpoint = random_checkpoint(css_tiny, tmp_path_factory.mktemp(f"ckpt{seed}"), seed)
        version = _register(registry, checkpoint, f"run-{seed}")
        build_index(resolve_model(None, url, str(version)), css_tiny,
                    registry_index_url(url, version), workers=2)
    registry.promote(1)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(url, "champion", poll_s=0.5, num_cpus=0.5), name="composeae",
              route_prefix="/")
    yield {"base": f"http://127.0.0.1:{port}", "registry": registry, "url": url}
    serve.shutdown()


def _search(base: str, **body) -> requests.Response:
    return requests.post(f"{base}/search", json=body, timeout=60)


def _ids(service) -> list[str]:
    from composeae.serve.index import load_index, registry_index_url

    return load_index(registry_index_url(service["url"], 1)).ids


def test_search_api_answers_with_ids_scores_urls_and_version(service):
    base, ids = service["base"], _ids(service)
    answer = _search(base, ref=ids[5], text="make the red circle blue", k=5)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert data["version"] == 1 and data["k"] == 5 and len(data["results"]) == 5
    assert all(r["id"] in ids and r["id"] != ids[5] for r in data["results"])
    scores = [r["score"] for r in data["results"]]
    assert scores == sorted(scores, reverse=True)

    image = requests.get(base + data["results"][0]["url"], timeout=30)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content.startswith(b"\x89PNG")
    # The same picture uploaded instead of named: the same ranking, with the reference itself
    # no longer left out.
    reference = requests.get(f"{base}/image/{ids[5]}", timeout=30).content
    uploaded = _search(base, image=base64.b64encode(reference).decode(),
                       text="make the red circle blue", k=6)
    assert uploaded.status_code == 200
    ranked = [r["id"] for r in uploaded.json()["results"]]
    assert [i for i in ranked if i != ids[5]][:5] == [r["id"] for r in data["results"]]

    page = requests.get(base + "/", timeout=30)
    assert page.status_code == 200 and '<form id="query">' in page.text
    assert page.text.count('class="pick"') > 10
    status = requests.get(base + "/status", timeout=30).json()
    assert (status["version"], status["count"], status["pending"]) == (1, 240, None)


@pytest.mark.parametrize("body, status, message", [
    ({"ref": "ID"}, 400, "modifier text is missing or empty"),
    ({"ref": "ID", "text": "   "}, 400, "modifier text is missing or empty"),
    ({"ref": "ID", "text": "x", "k": 0}, 400, "k must be a whole number from 1 to 240"),
    ({"ref": "ID", "text": "x", "k": "many"}, 400, "k must be a whole number"),
    ({"ref": "no-such-id", "text": "x"}, 404, "no gallery image 'no-such-id'"),
    ({"text": "x"}, 400, "give a reference"),
    ({"image": base64.b64encode(b"not a picture").decode(), "text": "x"}, 400,
     "reference image cannot be read"),
    ({"image": "A" * (6 * 2**20), "text": "x"}, 400, "larger than"),
    ({"image": "%%%", "text": "x"}, 400, "not valid base64"),
    ("not json", 400, "JSON object"),
])
def test_bad_requests_get_one_sentence_and_the_service_carries_on(service, body, status,
                                                                   message):
    base, ids = service["base"], _ids(service)
    if isinstance(body, dict):
        body = {k: ids[0] if v == "ID" else v for k, v in body.items()}
        answer = requests.post(f"{base}/search", json=body, timeout=60)
    else:
        answer = requests.post(f"{base}/search", data=body, timeout=60)
    assert answer.status_code == status
    assert list(answer.json()) == ["error"] and message in answer.json()["error"]
    assert "\n" not in answer.json()["error"]
    assert _search(base, ref=ids[0], text="x", k=1).status_code == 200
    assert requests.get(f"{base}/image/no-such-id", timeout=30).status_code == 404


class RequestLoop(SearchClients):
    """Two clients searching one reference, and what each saw: `wait_for` a version on both."""

    def __init__(self, base: str, ref: str, threads: int = 2):
        super().__init__(base, [ref], threads, text="make the circle red", k=3)

    def wait_for(self, version: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(a and a[-1][2] == version for a in self.per_client):
                return
            time.sleep(0.2)
        raise AssertionError(f"version {version} never answered: "
                             f"{[a[-3:] for a in self.per_client]}")

    def versions(self) -> list[list[int | None]]:
        return [[v for _, _, v in a] for a in self.per_client]

    def failures(self) -> int:
        return sum(status != 200 for _, status, _ in self.answers)


def _switches(versions: list[int | None]) -> int:
    return sum(a != b for a, b in zip(versions, versions[1:]))


def test_a_promotion_is_swapped_in_under_load_without_a_failed_request(service):
    base, registry, ids = service["base"], service["registry"], _ids(service)
    with RequestLoop(base, ids[7]) as loop:
        loop.wait_for(1)
        time.sleep(1.0)
        registry.promote(2, reason="test: the nightly's new champion")
        loop.wait_for(2)
        time.sleep(1.0)  # and it stays on the new version
    counts = {v: sum(x == v for a in loop.versions() for x in a) for v in (1, 2)}
    print(f"swap under load: {len(loop.answers)} requests, "
          f"{loop.failures()} failed, answered by version 1: {counts[1]}, version 2: {counts[2]}")
    assert loop.failures() == 0
    for versions in loop.versions():
        # Each client sees the old version, then the new one, and never the old one again.
        assert versions[0] == 1 and versions[-1] == 2 and _switches(versions) == 1
    assert requests.get(base + "/status", timeout=30).json()["version"] == 2

    # A rollback reaches the service the same way: back to version 1 and its index.
    with RequestLoop(base, ids[7]) as loop:
        registry.rollback(reason="test: roll back")
        loop.wait_for(1)
    assert loop.failures() == 0
    status = requests.get(base + "/status", timeout=30).json()
    assert status["version"] == 1 and status["index"].endswith("indexes/000001")


def test_an_alias_moved_to_a_version_without_an_index_keeps_the_old_one(service, css_tiny,
                                                                        tmp_path):
    base, registry, ids = service["base"], service["registry"], _ids(service)
    bare = _register(registry, random_checkpoint(css_tiny, tmp_path, seed=2), "run-bare")
    before = requests.get(base + "/status", timeout=30).json()["version"]
    registry.set_alias("champion", bare, reason="test: no index yet")
    try:
        deadline = time.monotonic() + 60
        status = {}
        while time.monotonic() < deadline:
            status = requests.get(base + "/status", timeout=30).json()
            if status["pending"]:
                break
            time.sleep(0.3)
        assert status["version"] == before and f"version {bare} has no index" in status["pending"]
        answer = _search(base, ref=ids[1], text="x", k=2)
        assert answer.status_code == 200 and answer.json()["version"] == before
    finally:
        registry.rollback(reason="test: restore")


def test_serve_command_refuses_an_alias_without_an_index(service, css_tiny, tmp_path, capsys):
    registry = service["registry"]
    assert main(["serve", "--registry", service["url"], "--alias", "nope"]) == 2
    assert "has no alias 'nope'" in capsys.readouterr().err
    number = _register(registry, random_checkpoint(css_tiny, tmp_path, seed=3), "run-cli")
    registry.set_alias("candidate", number)
    assert main(["serve", "--registry", service["url"], "--alias", "candidate"]) == 2
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 1 and f"(version {number}) has no index" in err[0]


CHROMIUM = "/usr/bin/chromium"
"""Debian's chromium (`apt-get install chromium`; `make test` installs it when missing)."""


def test_the_page_in_a_headless_browser_shows_k_result_images(service, tmp_path):
    from pathlib import Path

    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no {CHROMIUM} (make test installs it)")
    base = service["base"]
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: chromium's sandbox refuses to run as root, as CI containers do.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(base + "/")
            pick = page.locator("img.pick").nth(3)
            pick.click()
            assert page.input_value("#ref") == pick.get_attribute("data-id")
            page.fill("#text", "make the red circle blue")
            page.fill("#k", "6")
            page.click("button[type=submit]")
            page.wait_for_selector("#results img.result >> nth=5")
            assert page.locator("#results img.result").count() == 6
            # Every result image was fetched from GET /image/ID and decoded by the browser.
            page.wait_for_function("Array.from(document.querySelectorAll('#results img'))"
                                   ".every(i => i.complete && i.naturalWidth > 0)")
            assert "answered by version" in page.text_content("#answer")
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

            page.fill("#text", "")
            page.click("button[type=submit]")
            page.wait_for_selector("#answer.error")
            assert "missing or empty" in page.text_content("#answer")
            assert page.locator("#results img").count() == 0
        finally:
            browser.close()


def test_the_clusters_serve_config_passes_ray_serves_schema_and_builds():
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from composeae.serve.app import app_builder

    path = Path(__file__).resolve().parents[1] / "cluster" / "serve.yaml"
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    (app,) = config.applications
    assert app.import_path == "composeae.serve.app:app_builder"
    assert [d.name for d in app.deployments] == ["SearchService"]
    assert app_builder(app.args) is not None  # the import path resolves and binds its args
