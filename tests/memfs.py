"""An in-memory Beam filesystem (``mem://``), for tests of non-local outputs.

Object-store-like (no directories, listing by prefix, rename as copy + delete), as
GCS and S3 behave. Defining the class registers its scheme with Beam's FileSystems.
"""

import io
import threading
import time

from apache_beam.io.filesystem import BeamIOError, CompressionTypes, FileMetadata, FileSystem

STORE: dict[str, bytes] = {}
_LOCK = threading.Lock()


class _Writer(io.BytesIO):
  def __init__(self, path):
    super().__init__()
    self._path = path

  def close(self):
    if not self.closed:
      with _LOCK:
        STORE[self._path] = self.getvalue()
    super().close()


class InMemoryFileSystem(FileSystem):
  @classmethod
  def scheme(cls):
    return "mem"

  def join(self, basepath, *paths):
    return "/".join([basepath.rstrip("/"), *(p.strip("/") for p in paths)])

  def split(self, path):
    head, _, tail = path.rpartition("/")
    return head, tail

  def mkdirs(self, path):
    pass

  def has_dirs(self):
    return False

  def _list(self, prefix):
    with _LOCK:
      items = [(k, len(v)) for k, v in STORE.items() if k.startswith(prefix)]
    for path, size in items:
      yield FileMetadata(path, size, time.time())

  def create(self, path, mime_type="application/octet-stream",
             compression_type=CompressionTypes.AUTO):
    return _Writer(path)

  def open(self, path, mime_type="application/octet-stream",
           compression_type=CompressionTypes.AUTO):
    with _LOCK:
      if path not in STORE:
        raise BeamIOError("open failed", {path: FileNotFoundError(path)})
      return io.BytesIO(STORE[path])

  def copy(self, sources, destinations):
    with _LOCK:
      for s, d in zip(sources, destinations):
        STORE[d] = STORE[s]

  def rename(self, sources, destinations):
    with _LOCK:
      for s, d in zip(sources, destinations):
        STORE[d] = STORE.pop(s)

  def exists(self, path):
    with _LOCK:
      return path in STORE

  def size(self, path):
    return len(STORE[path])

  def last_updated(self, path):
    return time.time()

  def checksum(self, path):
    return str(hash(STORE[path]))

  def metadata(self, path):
    return FileMetadata(path, len(STORE[path]), time.time())

  def delete(self, paths):
    with _LOCK:
      for p in paths:
        STORE.pop(p, None)
