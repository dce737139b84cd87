"""Clients that load a running search service (`composeae serve`): threads sending
`POST /search` back to back, for the serving tests and `bench/bench_serve.py`."""

from __future__ import annotations

import random
import threading
import time

import requests


class SearchClients:
    """`threads` clients, each searching a reference drawn from `refs` with `text` again and
    again while the `with` block runs. Every answer is kept as (seconds, status, version) twice:
    per client in `per_client` (what one client saw, in order) and all together in `answers`
    (in the order they came back). Status 0 is a request that got no answer."""

    def __init__(self, base: str, refs: list[str], threads: int,
                 text: str = "make the red circle blue", k: int = 10,
                 headers: dict[str, str] | None = None):
        self.base, self.refs, self.text, self.k = base, refs, text, k
        self.headers = headers or {}
        self.per_client: list[list[tuple[float, int, int | None]]] = [[] for _ in range(threads)]
        self.answers: list[tuple[float, int, int | None]] = []
        self.wall = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, i: int) -> None:
        draw = random.Random(i)
        session = requests.Session()
        session.headers.update(self.headers)
        while not self._stop.is_set():
            body = {"ref": draw.choice(self.refs), "text": self.text, "k": self.k}
            start = time.perf_counter()
            try:
                answer = session.post(f"{self.base}/search", json=body, timeout=120)
                status = answer.status_code
                version = answer.json().get("version") if status == 200 else None
            except requests.RequestException:
                status, version = 0, None
            record = (time.perf_counter() - start, status, version)
            with self._lock:
                self.per_client[i].append(record)
                self.answers.append(record)

    def __enter__(self) -> SearchClients:
        self._started = time.perf_counter()
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
        self.wall = time.perf_counter() - self._started
