"""TensorBoard event files for runs and sweeps, in a local directory or under an `s3://` URL.

What belongs here: opening an event writer for a run (`open_writer`), turning metric names into
TensorBoard tags (`tag`, `add_scalars`), and the HParams entry of a run or a Tune trial
(`write_hparams`). Training, Tune sweeps and jobs write the project's event files through these.

Why not tensorboardX's `SummaryWriter` as it is:

- Its `flush()` does not write what was just added: events go through a queue to a background
  thread, which writes and flushes them on its own clock (`flush_secs`, 120 s by default). A
  `flush()` right after `add_scalar` leaves the new events in the queue.
- Its `s3://` writer keeps the whole file in memory and PUTs all of it at each flush (with a
  new boto3 client every time); the endpoint is read from `S3_ENDPOINT` and, when that is unset,
  from boto3's own `AWS_ENDPOINT_URL`.

`EventWriter` here writes each event synchronously with tensorboardX's record writer and
protocol buffers (the record format and protos `SummaryWriter` writes), so after `flush()` everything added so far
is in the file: `os.fsync`ed for a local directory; for an `s3://` URL, written to a local temp
file and uploaded as one object (`composeae.storage.upload_file`, the project's S3 client,
honouring `AWS_ENDPOINT_URL`). Every flush replaces the object with a longer copy of the same
bytes, which is what TensorBoard's S3 reader expects (it resumes at its byte offset). Once an
object passes `max_file_bytes`, the writer starts the next event file, so a flush never uploads
more than about that much. Event file names sort in creation order (seconds, host, then the
nanoseconds and process id), so TensorBoard reads a run's files, and a resumed run's files after
the ones before the restart, in order. A resumed run passes `purge_step=<step it resumes at>`:
TensorBoard then hides the previous attempt's events from that step on.

Tags: TensorBoard tags allow only letters, digits, `_`, `-`, `.` and `/`; `tag()` replaces every
other character by `_` (exactly as tensorboardX does), so `val/R@1` is written as `val/R_1`.

HParams: the project relies on `write_hparams`, not on Ray Tune's `TBXLoggerCallback`. That
callback (added to every Tuner by default) writes the HParams summaries into each trial's own
directory only when the trial ends, marks failed trials as successful too, and lists the
metrics under their raw names (`ray/tune/val/R@1`) while the scalars it wrote carry cleaned tags
(`ray/tune/val/R_1`): TensorBoard finds no values for the recall columns. `write_hparams`
writes one HParams session per call (one per trial or run) with metric tags that match the
scalars it writes beside them. TensorBoard takes the columns of the HParams table from the first
experiment summary it finds under `--logdir`, so the entries of one sweep use the same
parameter and metric names and live in a directory of their own (not beside Ray's trial
directories, whose experiment summaries would compete): for example
`write_hparams(f"{sweep_url}/hparams", params, metrics, run_name=trial_name)`.

Viewing: `tensorboard --logdir runs` for local runs. For `s3://` logdirs TensorBoard (without
TensorFlow installed, as here) reads S3 through boto3 with the standard credential chain; the
endpoint comes from `S3_ENDPOINT` when set, else from boto3's `AWS_ENDPOINT_URL`. For an
S3-compatible server:

    AWS_ENDPOINT_URL=http://HOST:PORT AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \\
    AWS_DEFAULT_REGION=us-east-1 tensorboard --logdir s3://BUCKET/PREFIX --load_fast=false

(`--load_fast=false`: TensorBoard's fast loader reads only local and gs:// paths; with the default
`auto` it falls back by itself and prints a note). For AWS S3 itself leave out the endpoint.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from typing import Mapping

from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.proto.summary_pb2 import Summary
from tensorboardX.record_writer import RecordWriter

from composeae import storage

# Characters TensorBoard accepts in a tag (tensorboardX's `_clean_tag` uses the same set).
_INVALID_TAG_CHARACTERS = re.compile(r"[^-/\w.]")
# Above this size an S3 event file is finished and the next one started (bounds each upload).
MAX_FILE_BYTES = 1 << 20

_STATUSES = ("success", "failure", "running", "unknown")


def tag(name: str) -> str:
    """A metric name as a valid TensorBoard tag: `val/R@1` -> `val/R_1`."""
    return _INVALID_TAG_CHARACTERS.sub("_", name).lstrip("/")


class EventWriter:
    """Writes TensorBoard events under `url` (a local directory or an `s3://` prefix).

    Every `add_*` call is written before it returns; `flush()` makes all of it visible to
    TensorBoard (fsync, or one S3 upload when something was added since the last one). Use as
    a context manager or call `close()`. Thread-safe.
    """

    def __init__(self, url: str, *, purge_step: int | None = None,
                 max_file_bytes: int = MAX_FILE_BYTES):
        self.url = url if storage.is_s3(url) else os.path.abspath(url)
        self.max_file_bytes = max_file_bytes
        self._lock = threading.Lock()
        self._closed = False
        self._records: RecordWriter | None = None
        self._local_path = ""
        self._dirty = False
        self._tmp_dir = None
        if storage.is_s3(self.url):
            storage.split_s3(self.url)  # a bad URL fails here, not at the first flush
            self._tmp_dir = tempfile.mkdtemp(prefix="composeae-events-")
        else:
            os.makedirs(self.url, exist_ok=True)
        try:
            self._open_file()
            if purge_step is not None:
                # TensorBoard drops events at steps >= purge_step written before this START.
                self._write(Event(wall_time=time.time(), step=int(purge_step),
                                  session_log=SessionLog(status=SessionLog.START)))
            # A missing bucket or unreachable endpoint fails now, not in the middle of training.
            self.flush()
        except BaseException:
            self._release()
            raise
        atexit.register(self.close)

    @property
    def file_url(self) -> str:
        """The URL of the event file being written now."""
        return storage.join(self.url, os.path.basename(self._local_path))

    def _open_file(self) -> None:
        now = time.time_ns()
        name = (f"events.out.tfevents.{now // 10**9}.{socket.gethostname()}"
                f".{now % 10**9:09d}.{os.getpid()}")
        self._local_path = os.path.join(self._tmp_dir or self.url, name)
        self._records = RecordWriter(self._local_path)
        self._records.write(Event(wall_time=time.time(),
                                  file_version="brain.Event:2").SerializeToString())
        self._dirty = True

    def _write(self, event: Event) -> None:
        with self._lock:
            if self._closed:
                raise ValueError(f"event writer for {self.url} is closed")
            self._records.write(event.SerializeToString())
            self._dirty = True

    def add_summary(self, summary: Summary, step: int | None = None,
                    walltime: float | None = None) -> None:
        """Write a `Summary` (any of `tensorboardX.summary.*`: histogram, text, image...)."""
        event = Event(summary=summary, wall_time=time.time() if walltime is None else walltime)
        if step is not None:
            event.step = int(step)
        self._write(event)

    def add_scalar(self, name: str, value: float, step: int | None = None,
                   walltime: float | None = None) -> None:
        """One scalar; `name` is made a valid tag with `tag()`."""
        self.add_summary(Summary(value=[Summary.Value(tag=tag(name), simple_value=float(value))]),
                         step, walltime)

    def flush(self) -> None:
        """Make everything added so far visible to TensorBoard."""
        with self._lock:
            if self._closed:
                return
            self._flush_locked()

    def _flush_locked(self, rotate: bool = True) -> None:
        self._records.flush()
        if self._tmp_dir is None or not self._dirty:
            return
        storage.upload_file(self._local_path, self.file_url)
        self._dirty = False
        if rotate and os.path.getsize(self._local_path) >= self.max_file_bytes:
            # The uploaded object is complete; later events go to the next file.
            self._records.close()
            os.remove(self._local_path)
            self._open_file()

    def close(self) -> None:
        """Flush and close; further `add_*` calls raise, a second `close()` does nothing."""
        with self._lock:
            if self._closed:
                return
            try:
                self._flush_locked(rotate=False)
            finally:
                self._release()
                atexit.unregister(self.close)

    def _release(self) -> None:
        self._closed = True
        if self._records is not None:
            self._records.close()
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_writer(url: str, *, purge_step: int | None = None) -> EventWriter:
    """An `EventWriter` for the event files of one run under `url` (local path or `s3://`).

    `purge_step`: when a run resumes at step N, pass N so TensorBoard hides the events the
    previous attempt wrote at steps >= N.
    """
    return EventWriter(url, purge_step=purge_step)


def add_scalars(writer: EventWriter, step: int, values: Mapping[str, float], *,
                flush: bool = True) -> None:
    """Write `values` (metric name -> number) at `step` under TensorBoard tags, then flush."""
    for name, value in values.items():
        writer.add_scalar(name, value, step)
    if flush:
        writer.flush()


def _hparam_value(value):
    """bool, number or string as HParams holds them; numpy scalars as numbers; the rest as text."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy scalars
        return value.item()
    return str(value)


def hparams_summaries(hparams: Mapping[str, float | int | str | bool],
                      metrics: Mapping[str, float] | list[str], *,
                      status: str = "success") -> tuple[Summary, Summary, Summary]:
    """The HParams plugin's experiment, session-start and session-end summaries.

    `metrics` names (or a dict whose keys are the names) are listed as their tags. `None`
    parameter values are left out; values other than bool, number and string (a list chosen by
    a search space) are shown as their text.
    """
    # deferred: only HParams entries need these, and tensorboardX.summary is slow to import
    from tensorboardX.proto.api_pb2 import Status
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData, SessionEndInfo
    from tensorboardX.proto.summary_pb2 import SummaryMetadata
    from tensorboardX.summary import hparams as tbx_hparams

    if status not in _STATUSES:
        raise ValueError(f"status must be one of {_STATUSES}, not {status!r}")
    values = {k: _hparam_value(v) for k, v in hparams.items() if v is not None}
    experiment, start, _ = tbx_hparams(values, {tag(name): 0.0 for name in metrics})
    end = HParamsPluginData(session_end_info=SessionEndInfo(
        status=Status.Value(f"STATUS_{status.upper()}"), end_time_secs=time.time()), version=0)
    end_metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(
        plugin_name="hparams", content=end.SerializeToString()))
    end = Summary(value=[Summary.Value(tag="_hparams_/session_end_info", metadata=end_metadata)])
    return experiment, start, end


def write_hparams(url: str, hparams: Mapping[str, float | int | str | bool],
                  metrics: Mapping[str, float], run_name: str | None = None, *,
                  step: int = 0, status: str = "success") -> str:
    """Write one HParams session: its parameters and its metrics side by side in TensorBoard.

    The session is the run directory `url/run_name` (or `url` itself without `run_name`): one
    new event file there holds the experiment, session-start and session-end summaries and
    each metric as a scalar at `step` under its tag (`val/R@1` -> `val/R_1`). A Tune sweep
    calls it once per trial with a common `url` and the trial's name; `status` is one of
    success, failure, running, unknown. Returns the session's URL.
    """
    session_url = storage.join(url, run_name) if run_name else url
    summaries = hparams_summaries(hparams, metrics, status=status)
    with open_writer(session_url) as writer:
        for summary in summaries:
            writer.add_summary(summary)
        add_scalars(writer, step, metrics, flush=False)
    return session_url
