"""The Ray Serve application on the local Ray, with its registry and indexes on moto S3: the HTTP
API and its answers to bad input, a promotion swapped in under a request loop without a failed
request, a rollback, an alias moved to a version that has no index yet or whose index is not
its own, credentials, hostile clients on raw sockets, and `registry add` of a trained run
followed by the service. One service (module-scoped) serves them all, with a token."""

from __future__ import annotations

import base64
import collections
import time
from pathlib import Path

import pytest
import requests

from composeae.cli import main
from composeae.testing.checkpoints import random_checkpoint
from composeae.testing.console import own_lines
from composeae.testing.localcluster import free_port
from composeae.testing.clients import SearchClients

ROOT = Path(__file__).resolve().parents[1]


TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
READ_TIMEOUT_S = 3.0
"""The service's body read timeout in these tests (short, so slow clients are let go soon)."""


def _register(registry, checkpoint: str, run: str, data: str) -> int:
    record = {"date": "2026-12-01", "model": "composeae",
              "evaluation": {"split": "test", "table": {"test/R@1": 0.1}},
              "data": {"url": data, "fingerprint": None},
              "decision": {"metric": "test/R@1", "promote": False}}
    return registry.register(checkpoint, run_name=run, record=record)[0]["version"]


@pytest.fixture(scope="module")
def service(ray_local, s3_server, css_tiny, tmp_path_factory):
    """A registry on S3 with versions 1 and 2 indexed, `champion` -> 1, served on a free port."""
    import boto3
    from ray import serve

    from composeae.registry.store import ModelRegistry
    from composeae.serve.app import build_app
    from composeae.serve.auth import Access, digest
    from composeae.serve.http_limits import Limits
    from composeae.serve.index import build_index, registry_index_url, resolve_model

    bucket = f"serve-{int(time.time() * 1000)}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/registry"
    registry = ModelRegistry.create(url)
    for seed in (0, 1):
        checkpoint = random_checkpoint(css_tiny, tmp_path_factory.mktemp(f"ckpt{seed}"), seed)
        version = _register(registry, checkpoint, f"run-{seed}", css_tiny)
        build_index(resolve_model(None, url, str(version)), css_tiny,
                    registry_index_url(url, version), workers=2)
    registry.promote(1)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(url, "champion", poll_s=0.5, num_cpus=0.5,
                        access=Access(digest(TOKEN)),
                        limits=Limits(read_timeout_s=READ_TIMEOUT_S)),
              name="composeae", route_prefix="/")
    yield {"base": f"http://127.0.0.1:{port}", "port": port, "registry": registry, "url": url}
    serve.shutdown()


def _search(base: str, **body) -> requests.Response:
    return requests.post(f"{base}/search", json=body, headers=AUTH, timeout=60)


def _get(url: str) -> requests.Response:
    return requests.get(url, headers=AUTH, timeout=30)


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

    image = _get(base + data["results"][0]["url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content.startswith(b"\x89PNG")
    # The same picture uploaded instead of named: the same ranking, with the reference itself
    # no longer left out.
    reference = _get(f"{base}/image/{ids[5]}").content
    uploaded = _search(base, image=base64.b64encode(reference).decode(),
                       text="make the red circle blue", k=6)
    assert uploaded.status_code == 200
    ranked = [r["id"] for r in uploaded.json()["results"]]
    assert [i for i in ranked if i != ids[5]][:5] == [r["id"] for r in data["results"]]

    page = _get(base + "/")
    assert page.status_code == 200 and '<form id="query">' in page.text
    assert page.text.count('class="pick"') > 10
    status = _get(base + "/status").json()
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
    ({"image": "A" * (6 * 2**20), "text": "x"}, 413, "body may be at most"),
    ({"image": "%%%", "text": "x"}, 400, "not valid base64"),
    ({"ref": "ID", "text": "x", "colour": "red"}, 400, "unknown field 'colour'"),
    ({"ref": ["ID"], "text": "x"}, 400, "ref must be a string"),
    ({"ref": "ID", "text": "x", "k": True}, 400, "k must be a whole number"),
    ("not json", 400, "JSON object"),
    ("[" * 50000 + "]" * 50000, 400, "nested too deeply"),
])
def test_bad_requests_get_one_sentence_and_the_service_carries_on(service, body, status,
                                                                   message):
    base, ids = service["base"], _ids(service)
    if isinstance(body, dict):
        body = {k: ids[0] if v == "ID" else v for k, v in body.items()}
        answer = requests.post(f"{base}/search", json=body, headers=AUTH, timeout=60)
    else:
        answer = requests.post(f"{base}/search", data=body, headers=AUTH, timeout=60)
    assert answer.status_code == status
    assert list(answer.json()) == ["error"] and message in answer.json()["error"]
    assert "\n" not in answer.json()["error"]
    assert _search(base, ref=ids[0], text="x", k=1).status_code == 200
    assert _get(f"{base}/image/no-such-id").status_code == 404


class RequestLoop(SearchClients):
    """Two clients searching one reference, and what each saw: `wait_for` a version on both."""

    def __init__(self, base: str, ref: str, threads: int = 2):
        super().__init__(base, [ref], threads, text="make the circle red", k=3, headers=AUTH)

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
    assert _get(base + "/status").json()["version"] == 2

    # A rollback reaches the service the same way: back to version 1 and its index.
    with RequestLoop(base, ids[7]) as loop:
        registry.rollback(reason="test: roll back")
        loop.wait_for(1)
    assert loop.failures() == 0
    status = _get(base + "/status").json()
    assert status["version"] == 1 and status["index"].endswith("indexes/000001")


def test_an_alias_moved_to_a_version_without_an_index_keeps_the_old_one(service, css_tiny,
                                                                        tmp_path):
    base, registry, ids = service["base"], service["registry"], _ids(service)
    bare = _register(registry, random_checkpoint(css_tiny, tmp_path, seed=2), "run-bare",
                     css_tiny)
    before = _get(base + "/status").json()["version"]
    registry.set_alias("champion", bare, reason="test: no index yet")
    try:
        deadline = time.monotonic() + 60
        status = {}
        while time.monotonic() < deadline:
            status = _get(base + "/status").json()
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
    number = _register(registry, random_checkpoint(css_tiny, tmp_path, seed=3), "run-cli",
                       css_tiny)
    registry.set_alias("candidate", number)
    assert main(["serve", "--registry", service["url"], "--alias", "candidate"]) == 2
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 1 and f"(version {number}) has no index" in err[0]


CHROMIUM = "/usr/bin/chromium"
"""Debian's chromium (`apt-get install chromium`; `make test` installs it when missing)."""


def test_the_page_in_a_headless_browser_shows_k_result_images(service, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no {CHROMIUM} (make test installs it)")
    base = service["base"]
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: chromium's sandbox refuses to run as root, as CI containers do.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"{base}/?token={TOKEN}")
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


def test_the_clusters_serve_config_passes_ray_serves_schema_and_builds(monkeypatch):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from composeae.errors import UserError
    from composeae.serve.app import app_builder
    from composeae.serve.auth import TOKEN_ENV

    path = ROOT / "cluster" / "serve.yaml"
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    (app,) = config.applications
    assert app.import_path == "composeae.serve.app:app_builder"
    assert [d.name for d in app.deployments] == ["SearchService"]
    (deployment,) = app.deployments
    assert deployment.max_queued_requests > 0 and config.http_options.request_timeout_s > 0
    # The token comes from the nodes' environment (a secret); without it nothing is deployed.
    monkeypatch.delenv(app.args.get("token_env", TOKEN_ENV), raising=False)
    with pytest.raises(UserError, match="needs a token"):
        app_builder(app.args)
    monkeypatch.setenv(app.args.get("token_env", TOKEN_ENV), TOKEN)
    assert app_builder(app.args) is not None  # the import path resolves and binds its args


def test_without_the_token_every_endpoint_but_health_answers_401(service):
    base, ids = service["base"], _ids(service)
    calls = [("POST", "/search", {"ref": ids[2], "text": "x", "k": 2}),
             ("GET", f"/image/{ids[2]}", None), ("GET", "/status", None), ("GET", "/", None)]
    for method, path, body in calls:
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"},
                        {"Authorization": TOKEN}):
            refused = requests.request(method, base + path, json=body, headers=headers,
                                       timeout=30)
            assert refused.status_code == 401, (path, headers)
            assert refused.headers["www-authenticate"] == "Bearer"
            assert "needs its token" in refused.json()["error"]
            assert service["url"] not in refused.text  # no registry or index URL
        allowed = requests.request(method, base + path, json=body, headers=AUTH, timeout=30)
        assert allowed.status_code == 200, (path, allowed.text)
    assert requests.get(f"{base}/status?token={TOKEN}", timeout=30).status_code == 401
    assert service["url"] in _get(base + "/status").json()["registry"]
    # The page opened with ?token= carries it to its script, which sends it as the header.
    page = requests.get(f"{base}/?token={TOKEN}", timeout=30)
    assert page.status_code == 200 and f'const TOKEN = "{TOKEN}";' in page.text
    assert requests.get(f"{base}/healthz", timeout=30).json() == {"status": "ok"}


def test_serving_beyond_loopback_without_a_token_is_refused_before_anything(tmp_path, capsys):
    missing = str(tmp_path / "no-registry")
    assert main(["serve", "--registry", missing, "--host", "0.0.0.0"]) == 2
    err = own_lines(capsys.readouterr().err)
    assert err == ["error: refusing to serve 0.0.0.0 without a token: anyone who can reach it "
                   "could search and read /status; give --token-file FILE, or --insecure to "
                   "serve it open on purpose"]
    short = tmp_path / "token"
    short.write_text("abc\n")
    assert main(["serve", "--registry", missing, "--token-file", str(short)]) == 2
    assert "must be 16 to 512 characters" in capsys.readouterr().err
    # With a token (or --insecure) the bind passes, and the next check is the registry.
    short.write_text(TOKEN + "\n")
    for extra in (["--token-file", str(short)], ["--insecure"]):
        assert main(["serve", "--registry", missing, "--host", "0.0.0.0", *extra]) == 2
        assert "no model registry at" in capsys.readouterr().err


def test_an_alias_moved_to_a_version_whose_index_is_not_its_own_is_refused_once(
        service, css_tiny, tmp_path):
    """An index written into the version's folder by `index --checkpoint` (another model, no
    version in its manifest) is refused and reported, not loaded at every poll."""
    from composeae.serve.index import build_index, registry_index_url, resolve_model

    base, registry, url = service["base"], service["registry"], service["url"]
    number = _register(registry, random_checkpoint(css_tiny, tmp_path / "own", seed=4),
                       "run-foreign", css_tiny)
    other = random_checkpoint(css_tiny, tmp_path / "other", seed=5)
    build_index(resolve_model(other, None, None), css_tiny, registry_index_url(url, number),
                workers=2)
    before = _get(base + "/status").json()
    registry.set_alias("champion", number, reason="test: a foreign index")
    try:
        deadline, status = time.monotonic() + 60, {}
        while time.monotonic() < deadline and not status.get("pending"):
            status = _get(base + "/status").json()
            time.sleep(0.3)
        assert status["version"] == before["version"]
        assert "refusing the index" in status["pending"]
        assert f"not for version {number}" in status["pending"]
        attempts = status["load_attempts"]
        time.sleep(2.5)  # five polls
        assert _get(base + "/status").json()["load_attempts"] == attempts
        assert _search(base, ref=_ids(service)[1], text="x", k=2).json()["version"] == \
            before["version"]
    finally:
        registry.rollback(reason="test: restore")


def _no_server_errors(codes: list[int]) -> list[int]:
    return [c for c in codes if c >= 500]


def test_hostile_clients_get_4xx_and_leave_the_replica_as_it_was(service):
    """At least 200 hostile requests on raw sockets and plain HTTP: no 5xx, no restart of the
    replica, and its memory grows by less than 50 MB; a valid search answers within 2 s while
    40 slow clients hold connections. Prints the figures (`pytest -s -k hostile`)."""
    from composeae.testing import hostile

    base, port, ids = service["base"], service["port"], _ids(service)
    ref, json_headers = ids[4], {**AUTH, "Content-Type": "application/json"}
    first = _get(base + "/status").json()
    pid = first["replica"]["pid"]
    for _ in range(3):  # warm: the model, the threads, the allocator
        assert _search(base, ref=ref, text="make the red circle blue", k=3).status_code == 200
    rss_before = hostile.rss_mb(pid)
    codes: dict[str, list[int]] = {}
    started = time.monotonic()

    def post(name: str, body: bytes) -> None:
        answer = requests.post(f"{base}/search", data=body, headers=json_headers, timeout=60)
        codes.setdefault(name, []).append(answer.status_code)

    def expect(name: str, allowed: set[int]) -> None:
        assert set(codes[name]) <= allowed, (name, codes[name])

    # Oversized bodies: declared (a lie and the truth), and chunked with no length.
    codes["declared 1 GB"] = [hostile.raw(port, hostile.head(
        "POST", "/search", {**json_headers, "Content-Length": "1000000000"}) + b"{}")]
    post("8 MB body", b" " * (8 * 2**20))
    flood = [hostile.chunked_flood(port, "/search", json_headers, 300 * 2**20)
             for _ in range(3)]
    codes["chunked 300 MB"] = [status for status, _ in flood]
    for name in ("declared 1 GB", "8 MB body"):
        expect(name, {413})
    expect("chunked 300 MB", {411})
    # A Content-Length that promises more than comes: answered when the read times out.
    lie = time.monotonic()
    codes["short body"] = [hostile.raw(port, hostile.head(
        "POST", "/search", {**json_headers, "Content-Length": "100"}) + b"{}")]
    assert time.monotonic() - lie < READ_TIMEOUT_S + 5
    expect("short body", {408})

    # 40 slow clients hold connections; valid searches still answer within 2 s.
    slow = hostile.SlowClients(port, 40, AUTH)
    try:
        valid = []
        for i in range(5):
            tick = time.monotonic()
            answer = _search(base, ref=ids[10 + i], text="make the red circle blue", k=3)
            valid.append(time.monotonic() - tick)
            assert answer.status_code == 200
        codes["slow clients"] = slow.statuses(READ_TIMEOUT_S + 30)
    finally:
        slow.close()
    expect("slow clients", {408})
    assert max(valid) < 2.0, valid

    for kind in ("list", "object"):
        for depth in (50_000, 5_000, 900):
            post(f"deep {kind}", hostile.deep_json(depth, kind))
    expect("deep list", {400})
    expect("deep object", {400})
    for field, value, body in hostile.odd_bodies(ref):
        # A string is a text, however odd ("NaN", a NUL, emoji): those are answered.
        odd_text = field == "text" and isinstance(value, str) and 0 < len(value) <= 500
        post("odd texts" if odd_text else "odd types", hostile.json_body(body))
    expect("odd types", {400, 404, 413})
    expect("odd texts", {200})
    for fmt, data in hostile.images().items():
        image = base64.b64encode(data).decode()
        post(f"image {fmt}", hostile.json_body({"image": image, "text": "x", "k": 2}))
        expect(f"image {fmt}", {200} if fmt in ("PNG", "JPEG", "WEBP") else {400})
    assert {"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "EPS"} <= {
        name.split()[1] for name in codes if name.startswith("image ")}
    for side in (5000, 20_000, 60_000):
        bomb = base64.b64encode(hostile.png_bomb(side, side)).decode()
        post("decompression bomb", hostile.json_body({"image": bomb, "text": "x"}))
    expect("decompression bomb", {400})
    for path in ("/image/../../etc/passwd", "/image/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
                 "/image//etc/passwd", "/image/s3:%2f%2fother%2fx", "/image/" + "a" * 5000):
        codes.setdefault("path-like ids", []).append(
            hostile.raw(port, hostile.head("GET", path, AUTH)))
    for path_id in ("../../etc/passwd", "/etc/passwd", "s3://other/x"):
        post("path-like ids", hostile.json_body({"ref": path_id, "text": "x"}))
    expect("path-like ids", {400, 404})
    for body in hostile.random_bodies(60):
        post("random bodies", body)
    expect("random bodies", {400})
    for data in hostile.random_bodies(20, seed=1, largest=4096):
        codes.setdefault("random requests", []).append(hostile.raw(port, data, timeout=10))
    codes["bad Content-Length"] = [hostile.raw(port, hostile.head(
        "POST", "/search", {**json_headers, "Content-Length": "-5"}) + b"{}")]

    seconds = time.monotonic() - started
    everything = [c for name in codes for c in codes[name]]
    after = _get(base + "/status").json()
    rss_after = hostile.rss_mb(pid)
    print(f"\nhostile clients: {len(everything)} requests in {seconds:.1f} s; answers "
          f"{dict(sorted(collections.Counter(everything).items()))}; slowest valid search "
          f"under 40 slow clients {max(valid):.3f} s; replica RSS {rss_before:.1f} -> "
          f"{rss_after:.1f} MB ({rss_after - rss_before:+.1f}); chunked bodies stopped after "
          f"{[sent // 2**20 for _, sent in flood]} MB sent")
    assert len(everything) >= 200
    assert not _no_server_errors(everything), codes
    assert (after["replica"], after["swaps"]) == (first["replica"], first["swaps"])
    assert rss_after - rss_before < 50
    assert _search(base, ref=ref, text="x", k=2).status_code == 200


def test_registry_add_of_a_trained_run_is_served_and_searched(service, css_tiny, tmp_path):
    """A tiny run trained here, added with its index and promoted: the service follows the
    alias and its answers name the added version; adding the same weights again finds that
    version."""
    from composeae.config import load_config
    from composeae.registry.add import add_checkpoint
    from composeae.run.driver import prepare_run, run_training

    cfg = load_config(str(ROOT / "jobs/configs/tiny.yaml"), [
        f"data.url={css_tiny}", f"train.storage={tmp_path / 'runs'}", "train.name=added",
        "train.steps=2", "train.eval_every=2", "ray.num_workers=1"])
    summary = run_training(prepare_run(cfg))
    base, url, registry = service["base"], service["url"], service["registry"]
    before = registry.aliases().aliases["champion"]
    added = add_checkpoint(url, summary.run_url, data=css_tiny, promote=True, workers=1)
    number = added.version["version"]
    assert added.created and added.promoted["previous"] == before
    assert registry.aliases().aliases["champion"] == number
    version = registry.version(number)
    assert version["source_checkpoint"] == f"{summary.run_url}/final"
    assert version["run_url"] == summary.run_url and version["data"]["url"] == css_tiny
    assert version["evaluation"]["table"] == summary.test and summary.test
    assert len(version["data"]["fingerprint"]) == 64
    try:
        deadline, answer = time.monotonic() + 60, {}
        while time.monotonic() < deadline and answer.get("version") != number:
            answer = _search(base, ref=_ids(service)[3], text="make the red circle blue",
                             k=4).json()
            time.sleep(0.3)
        assert answer["version"] == number and len(answer["results"]) == 4
        again = add_checkpoint(url, f"{summary.run_url}/final/model.pt")
        assert not again.created and again.version == version
        assert registry.versions()[-1] == number
    finally:
        registry.promote(before, reason="test: restore", expect=number)


def test_requests_errors_latency_and_swaps_are_exported_as_ray_metrics(service):
    """What Prometheus (and the dashboard's Grafana) reads from the node's metrics agent."""
    import ray

    base, ids = service["base"], _ids(service)
    assert _search(base, ref=ids[1], text="x", k=2).status_code == 200
    assert requests.get(base + "/status", timeout=30).status_code == 401
    assert _search(base, ref=ids[1], text="", k=2).status_code == 400
    swaps = _get(base + "/status").json()["swaps"]
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    wanted = ['composeae_serve_requests_total{', 'route="search"', 'code="401"',
              'composeae_serve_errors_total{', 'composeae_serve_latency_s_bucket{',
              'composeae_serve_version{']
    if swaps:
        wanted.append('composeae_serve_swaps_total{')
    deadline, text = time.monotonic() + 90, ""
    while time.monotonic() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        if all(w in text for w in wanted):
            break
        time.sleep(2)
    ours = [line for line in text.splitlines() if "composeae_serve" in line]
    assert all(w in text for w in wanted), "\n".join(ours)
    errors = [line for line in ours if line.startswith("ray_composeae_serve_errors_total{")]
    assert any('code="401"' in line and 'route="status"' in line for line in errors), errors
    assert not any('code="200"' in line for line in errors)
