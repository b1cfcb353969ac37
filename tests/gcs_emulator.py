"""A local Google Cloud Storage for tests and benchmarks: gcp-storage-emulator on 127.0.0.1.

    with GcsEmulator() as gcs:          # a child process on a free port (portpicker)
      gcs.configure_this_process()      # os.environ (STORAGE_EMULATOR_HOST, ...) and fsspec
      gcs.create_bucket("bucket")       # then gs://bucket/... works for gcsfs, epath, orbax

What the variables do: gcsfs (and google-cloud-storage) send every request to
``STORAGE_EMULATOR_HOST`` without credentials; tensorstore, which orbax uses for array
data, has its own endpoint setting, ``TENSORSTORE_GCS_HTTP_URL``, and
``GOOGLE_AUTH_TOKEN_FOR_TESTING`` makes it send a fixed token instead of looking for
credentials (both are what tensorstore's own GCS tests set). Nothing reaches the network.

The emulator is run by ``python tests/gcs_emulator.py PORT`` (``serve``), with these
changes to gcp-storage-emulator 2026.7.19, each because a real bucket behaves so and the
code under test relies on it:

- **Generation preconditions** (``ifGenerationMatch``, ``ifGenerationNotMatch`` on
  uploads, compose, copy/rewrite and delete) are honoured: a mismatch is HTTP 412, as on
  GCS. The emulator ignores them, so without this a create-only lock would look
  exclusive without being tested. Every mutating request runs under one exclusive lock,
  so the check and the write are one step (GCS makes them atomic too), and reads share
  it: the emulator stores an object's bytes and its metadata in two steps, and a read
  between them would return new bytes under the old generation (GCS never does).
- Downloads carry ``x-goog-generation`` (GCS sends it; tensorstore reads it).
- Requests are served by a thread each (``ThreadingHTTPServer``), as the many
  connections of tensorstore and of a parallel image reader expect, and the in-memory
  store no longer rewrites a JSON copy of all metadata on every write (O(objects) per
  upload).

Its output goes to a temporary file, not a pipe: the emulator logs an error line for
every 404 (each ``exists`` check), and a pipe nobody reads fills up and then blocks every
request thread on the logging lock (seen as a hung orbax save). For debugging, with
``GCS_EMULATOR_LOG=FILE`` set, SIGUSR1 writes the last requests (method, URL, status) to
``FILE.recent``. ``GcsEmulator(latency_ms=…)`` adds a round trip to every request
(``benchmarks/storage.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http import HTTPStatus

_MUTATING = ("POST", "PUT", "DELETE", "PATCH")
RECENT = __import__("collections").deque(maxlen=200000)  # the last requests, dumped on SIGUSR1
# Added to every request (GCS_EMULATOR_LATENCY_MS): what a real bucket's round trip costs.
LATENCY_S = float(os.environ.get("GCS_EMULATOR_LATENCY_MS", "0")) / 1000


class _ReadWriteLock:
  """Many readers or one writer."""

  def __init__(self):
    self._cond = threading.Condition()
    self._readers = 0
    self._writer = False

  @contextlib.contextmanager
  def shared(self):
    with self._cond:
      while self._writer:
        self._cond.wait()
      self._readers += 1
    try:
      yield
    finally:
      with self._cond:
        self._readers -= 1
        self._cond.notify_all()

  @contextlib.contextmanager
  def exclusive(self):
    with self._cond:
      while self._writer or self._readers:
        self._cond.wait()
      self._writer = True
    try:
      yield
    finally:
      with self._cond:
        self._writer = False
        self._cond.notify_all()


def _patch_emulator():
  from gcp_storage_emulator import server, storage
  from gcp_storage_emulator.handlers import objects

  lock = _ReadWriteLock()
  storage.Storage._write_config_to_file = lambda self: None  # in memory: nothing to persist

  def current_generation(st, bucket, name) -> str:
    try:
      return str(st.get_file_obj(bucket, name)["generation"])
    except Exception:  # NotFound: "0" is what GCS compares for an absent object
      return "0"

  def failed(request, st, bucket, name) -> bool:
    if not bucket or not name:
      return False
    gen = current_generation(st, bucket, name)
    match = request.query.get("ifGenerationMatch")
    not_match = request.query.get("ifGenerationNotMatch")
    return bool((match and match[0] != gen) or (not_match and not_match[0] == gen))

  def precondition_failed(response):
    response.status = HTTPStatus.PRECONDITION_FAILED
    response.json(
        {
            "error": {
                "code": 412,
                "message": "Precondition Failed",
                "errors": [{"reason": "conditionNotMet", "message": "Precondition Failed"}],
            }
        }
    )

  def target(request, st):
    """(bucket, object) a mutating request writes or deletes."""
    p = request.params
    if "dest_object_id" in p:  # copyTo / rewriteTo: the precondition is on the destination
      return p["dest_bucket_name"], p["dest_object_id"]
    if "object_id" in p:  # compose, delete, patch
      return p.get("bucket_name"), p["object_id"]
    if "upload_id" in request.query:  # a resumable upload's chunk: the object of its session
      try:
        return p.get("bucket_name"), st.get_resumable_file_obj(request.query["upload_id"][0])["name"]
      except Exception:
        return None, None
    if "name" in request.query:
      return p.get("bucket_name"), request.query["name"][0]
    try:  # multipart upload: the name is in the metadata part
      return p.get("bucket_name"), request.data["meta"].get("name")
    except Exception:
      return None, None

  def guarded(handler):
    def run(request, response, st, *args, **kwargs):
      try:
        return _run(request, response, st, *args, **kwargs)
      finally:
        RECENT.append(
            (
                time.time(),
                request.method,
                request.full_url.split("127.0.0.1")[-1][:200],
                getattr(response, "status", None),
                dict(request.query),
            )
        )

    def _run(request, response, st, *args, **kwargs):
      if LATENCY_S:
        time.sleep(LATENCY_S)  # a network round trip (benchmarks), outside the lock
      if request.method not in _MUTATING:
        with lock.shared():
          return handler(request, response, st, *args, **kwargs)
      with lock.exclusive():
        bucket, name = target(request, st)
        if failed(request, st, bucket, name):
          return precondition_failed(response)
        return handler(request, response, st, *args, **kwargs)

    return run

  def with_generation_header(handler):
    def run(request, response, st, *args, **kwargs):
      try:
        obj = st.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
      except Exception:
        pass
      return handler(request, response, st, *args, **kwargs)

    return run

  handlers = []
  for regex, methods in server.HANDLERS:
    if "object_id" in regex and "GET" in methods:  # metadata and media reads of one object
      methods = {**methods, "GET": with_generation_header(methods["GET"])}
    wrapped = {m: guarded(h) for m, h in methods.items()}  # the header read under the lock too
    handlers.append((regex, wrapped))
  server.HANDLERS = tuple(handlers)
  # Uploads POSTed to .../o without a route of their own fall back to objects.insert.
  objects.insert = guarded(objects.insert)
  server.objects = objects

  from http.server import ThreadingHTTPServer

  class ThreadedAPI(server.APIThread):

    def run(self):
      import functools

      ThreadingHTTPServer.daemon_threads = True
      self._httpd = ThreadingHTTPServer(
          (self._host, self._port), functools.partial(server.RequestHandler, self._storage)
      )
      self.is_running.set()
      self._httpd.serve_forever()

  server.APIThread = ThreadedAPI
  return server


def serve(port: int):
  """Runs the patched emulator on 127.0.0.1:port in memory until killed."""
  import logging

  log_file = os.environ.get("GCS_EMULATOR_LOG")  # every request, for debugging a test
  logging.basicConfig(level=logging.WARNING)
  logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # an error line per 404
  for name in ("api.object", "api.bucket", "gcp_storage_emulator.storage"):
    logging.getLogger(name).setLevel(logging.CRITICAL)
  server = _patch_emulator()
  if log_file:
    import signal

    def dump(*_):
      with open(log_file + ".recent", "w") as f:
        f.writelines(f"{t:.3f} {m} {u} {st} {q}\n" for t, m, u, st, q in list(RECENT))

    signal.signal(signal.SIGUSR1, dump)
  srv = server.create_server("127.0.0.1", port, in_memory=True)
  srv.run()


class GcsEmulator:
  """The emulator in a child process (so pod subprocesses reach it too); see the module docstring."""

  def __init__(self, port: int | None = None, latency_ms: float = 0.0):
    import portpicker

    self.latency_ms = latency_ms
    self.port = port or portpicker.pick_unused_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.env = {
        "STORAGE_EMULATOR_HOST": self.url,
        "TENSORSTORE_GCS_HTTP_URL": self.url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "GOOGLE_CLOUD_PROJECT": "test",
        "FSSPEC_GCS_TOKEN": "anon",
        "NO_GCE_CHECK": "true",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
    self._proc: subprocess.Popen | None = None

  def start(self) -> "GcsEmulator":
    # Its output goes to a file: a pipe nobody reads fills up (the emulator logs every 404)
    # and then blocks every request thread on the logging lock.
    self._log = tempfile.TemporaryFile()
    env = {**os.environ, "GCS_EMULATOR_LATENCY_MS": str(self.latency_ms)}
    self._proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), str(self.port)], stdout=self._log, stderr=self._log, env=env
    )
    deadline = time.time() + 30
    while time.time() < deadline:
      if self._proc.poll() is not None:
        self._log.seek(0)
        raise RuntimeError(f"the GCS emulator exited: {self._log.read().decode()[-2000:]}")
      try:
        urllib.request.urlopen(self.url + "/", timeout=1).read()
        return self
      except (urllib.error.URLError, ConnectionError, OSError):
        time.sleep(0.05)
    self.stop()
    raise RuntimeError(f"the GCS emulator did not answer on {self.url} within 30 s")

  def configure_this_process(self):
    """Points this process at the emulator: ``os.environ`` (inherited by subprocesses) and
    fsspec's defaults, which fsspec read from the environment when it was imported."""
    os.environ.update(self.env)
    import fsspec

    fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"
    try:
      import gcsfs

      gcsfs.GCSFileSystem.clear_instance_cache()
    except ImportError:
      pass

  def create_bucket(self, name: str):
    req = urllib.request.Request(
        f"{self.url}/storage/v1/b?project=test",
        method="POST",
        data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(req, timeout=10).read()

  def stop(self):
    if self._proc is not None and self._proc.poll() is None:
      self._proc.terminate()
      try:
        self._proc.wait(10)
      except subprocess.TimeoutExpired:
        self._proc.kill()
        self._proc.wait()
    self._proc = None
    if getattr(self, "_log", None) is not None:
      self._log.close()
      self._log = None

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()


if __name__ == "__main__":
  serve(int(sys.argv[1]))
