"""The persisted best-config cache: one JSON file that tuners write and kernels read at launch.

File format (``FORMAT_VERSION`` 1)::

    {"format": 1,
     "entries": {"<CacheKey.as_str()>": {"key": {...CacheKey fields...},
                                         "config": {"block_m": 64, "block_n": 64,
                                                    "num_warps": 4, "num_stages": 3,
                                                    "impl": "triton"},
                                         "ms": 0.41, "default_ms": 0.52,
                                         "tuned_at": "2025-01-01T12:00:00+00:00",
                                         "source": "tune"}}}

Writers take a file lock (``<path>.lock``), re-read the file under it, merge their change in and
replace the file atomically (temp file in the same directory, fsync, ``os.replace``), so two
tuners never lose each other's entries and a reader never sees half a file. Readers take no lock.

Every read goes through one reader, :func:`read_entries`. A file it cannot use (not UTF-8, not
JSON, truncated, of the wrong shape or another format version) is never moved, renamed or
written: the path may name anyone's file (``--cache results.csv``). Lookups report it once with
a ``ConfigCacheWarning`` naming it and read the cache as empty; writes (``put``, ``clear``,
``import_``, ``check_writable``) refuse with a CacheFormatError saying what is wrong and how to
go on (fix it, remove it, or name another cache). The wrong shape includes what no writer here
makes and a rewrite would silently drop or mangle: a name given twice in one object, a top-level
field besides ``format`` and ``entries``, two entries with the same key fields, a time that is
NaN, infinite, negative or too big for a float, a size below 1 or a density bucket outside
(0, 1]; ``put`` refuses the same. A directory, device or fifo in its place is never read or
moved: it is warned about on lookups and refused on writes. A lookup never raises on a bad cache
file; a file that cannot be opened at all (permissions) is warned about on lookups and raises
OSError on writes. ``check_writable`` lets a tuner fail before it measures.

Memoisation: ``ConfigCache.get`` keeps the parsed file in memory and calls ``os.stat`` once per
lookup; the memo is dropped when the file's (mtime_ns, size, inode) changes. That costs a
microsecond-scale syscall per lookup but means a long-running process sees entries that a tuner in
another process has written, with no explicit refresh. ``invalidate()`` drops it by hand.

Depends on the standard library, filelock and platformdirs only; never imports dkbench.
"""

from __future__ import annotations

import copy
import json
import math
import os
import stat
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import filelock
import platformdirs

from .keys import CacheKey, density_bucket, seqlen_bucket, source_hash
from .registry import IMPLS

__all__ = ["CONFIG_FIELDS", "ENV_VAR", "FORMAT_VERSION", "CacheFormatError", "CacheKey",
           "ConfigCache", "ConfigCacheWarning", "default_cache_path", "density_bucket",
           "load_shipped", "read_entries", "seqlen_bucket", "source_hash"]

FORMAT_VERSION = 1
ENV_VAR = "DKBENCH_CACHE"
CONFIG_FIELDS = ("block_m", "block_n", "num_warps", "num_stages")

# Long enough for a slow writer on a network filesystem; a stuck lock then fails loudly.
_LOCK_TIMEOUT_S = 60.0

# (stat stamp) of a file read from disk: changes whenever the file is replaced.
_Stamp = tuple[int, int, int]


class ConfigCacheWarning(UserWarning):
    """A cache file a lookup met was unreadable or of another format version, so it was
    ignored (and left as it is). The message names the file; ``path`` is it."""

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


class CacheFormatError(ValueError):
    """A cache file is not valid JSON in the expected format; the message names the file.

    ``stamp`` is the (mtime_ns, size, inode) of what was read, when there was something to read.
    """

    def __init__(self, path: Path, reason: str, stamp: _Stamp | None = None) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
        self.stamp = stamp

    def __reduce__(self) -> tuple[type, tuple[Path, str, _Stamp | None]]:
        # Picklable across processes despite the multi-argument constructor.
        return type(self), (self.path, self.reason, self.stamp)


def default_cache_path() -> Path:
    """``$DKBENCH_CACHE`` if set, else ``<platform user cache dir>/dkbench/configs.json``."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("dkbench")) / "configs.json"


# -- reading and validating -----------------------------------------------------------------


def _stamp(st: os.stat_result) -> _Stamp:
    return st.st_mtime_ns, st.st_size, st.st_ino


def _read_file(path: Path) -> tuple[_Stamp, bytes] | None:
    """The file's stamp and bytes, or None when it does not exist. Tests count calls to this."""
    try:
        with open(path, "rb") as f:
            # fstat on the open file: the stamp belongs to exactly the bytes we read.
            st = os.fstat(f.fileno())
            data = f.read()
    except FileNotFoundError:
        return None
    return _stamp(st), data


def read_entries(path: Path) -> tuple[_Stamp | None, dict[str, dict[str, Any]]]:
    """The one reader of cache-format files: (stamp, entries), or (None, {}) when ``path`` does
    not exist.

    Raises CacheFormatError naming ``path`` for a file that is not a usable cache file (bytes
    that are not UTF-8, text that is not JSON or is truncated, JSON of the wrong shape or format
    version), and OSError when it cannot be opened at all or is not a file: a directory, a
    device, a fifo or a socket is never read and never moved (a directory given as the cache
    path may be someone's home).
    """
    path = Path(path)
    try:
        mode: int | None = os.stat(path).st_mode
    except OSError:
        mode = None  # missing, or unreadable: the open below says which
    if mode is not None and stat.S_ISDIR(mode):
        raise IsADirectoryError(f"{path} is a directory, not a cache file; name a file, such as "
                                f"{path / 'cache.json'}")
    if mode is not None and not stat.S_ISREG(mode):
        # A device or a fifo: reading one may never end, and setting it aside would move it.
        raise OSError(f"{path} is not a regular file (a device, a fifo or a socket), so not a "
                      "cache file")
    read = _read_file(path)
    if read is None:
        return None, {}
    stamp, data = read
    try:
        # utf-8-sig: a byte-order mark that an editor added is not corruption.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CacheFormatError(path, f"not UTF-8 text ({e.reason} at byte {e.start})",
                               stamp) from None
    return stamp, _parse(text, path, stamp)


def _short(value: object) -> str:
    """``repr(value)``, cut to a readable length (a hand edit can paste a 4000-digit number)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too big for a float
        return False


def _as_float(value: object) -> object:
    """``float(value)`` (a numpy or torch scalar from a tuner), or ``value`` as it is when it has
    none, for the check to report."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return value


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_config(config: object) -> dict[str, Any]:
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be an object, got {type(config).__name__}")
    for name in CONFIG_FIELDS:
        value = config.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config[{name!r}] must be a positive int, got {_short(value)}")
    # Optional: entries written before configs named their implementation are Triton ones.
    impl = config.get("impl", "triton")
    if impl not in IMPLS:
        raise ValueError(f"config['impl'] must be one of {', '.join(IMPLS)}, got {_short(impl)}")
    return dict(config)


def _check_time(name: str, value: object) -> None:
    """ms (and default_ms, which may also be null: the default config failed) must be a finite
    number >= 0: NaN or Infinity would be written back as no JSON, and a time too big for a
    float breaks every reader that divides by it."""
    if value is None and name == "default_ms":
        return
    if not (_is_number(value) and _finite(value) and value >= 0):  # type: ignore[operator]
        allowed = "a finite number >= 0" + (" or null" if name == "default_ms" else "")
        raise ValueError(f"{name} must be {allowed}, got {_short(value)}")


def _check_key(raw: object) -> CacheKey:
    """The entry's key; its sizes must be positive and its density bucket in (0, 1], as
    `seqlen_bucket` and `density_bucket` make them (a negative or NaN bucket is a hand edit)."""
    if isinstance(raw, Mapping) and _is_number(raw.get("density_bucket")):
        density = raw["density_bucket"]
        # Checked before CacheKey rounds it: round() of a huge int overflows, of NaN stays NaN.
        if not (_finite(density) and 0 < density <= 1):
            raise ValueError(f"key['density_bucket'] must be a number in (0, 1], "
                             f"got {_short(density)}")
    key = CacheKey.from_dict(raw)  # type: ignore[arg-type]
    for name in ("head_dim", "block_size", "seqlen_bucket"):
        if getattr(key, name) < 1:
            raise ValueError(f"key[{name!r}] must be a positive int, got {getattr(key, name)!r}")
    bucket = key.seqlen_bucket
    if bucket & (bucket - 1):  # no lookup asks for it: seqlen_bucket rounds up to a power of 2
        raise ValueError(f"key['seqlen_bucket'] must be a power of two (as seqlen_bucket makes "
                         f"it), got {bucket}")
    if density_bucket(key.density_bucket) != key.density_bucket:
        # Nor for this: density_bucket rounds up to a multiple of 0.05 (0.33 is looked up as 0.35).
        raise ValueError(f"key['density_bucket'] must be a multiple of 0.05 (as density_bucket "
                         f"makes it), got {key.density_bucket:g}")
    return key


def _check_entry(raw: object) -> tuple[str, dict[str, Any]]:
    """Validate one entry; returns (key string re-derived from its key fields, entry)."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"an entry must be an object, got {type(raw).__name__}")
    key = _check_key(raw.get("key"))
    entry = dict(raw)
    entry["key"] = key.to_dict()
    entry["config"] = _check_config(raw.get("config"))
    for name in ("ms", "default_ms"):
        _check_time(name, raw.get(name))
    return key.as_str(), entry


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: a name given twice would silently keep only its last value (a second
    "entries" drops every entry of the first)."""
    seen: dict[str, Any] = {}
    for name, value in pairs:
        if name in seen:
            raise ValueError(f"the name {_short(name)} appears twice in one object")
        seen[name] = value
    return seen


def _parse(text: str, path: Path, stamp: _Stamp | None = None) -> dict[str, dict[str, Any]]:
    """Entries of a cache file's text; raises CacheFormatError naming ``path``."""
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:
        # ValueError covers JSONDecodeError and numbers too long to convert; RecursionError,
        # arrays nested thousands deep.
        raise CacheFormatError(path, f"not valid JSON ({e})", stamp) from None
    if not isinstance(data, dict) or "format" not in data:
        raise CacheFormatError(path, "not a dkbench config cache (no 'format' field)", stamp)
    version = data["format"]
    # type() check: True == 1 and 1.0 == 1, neither is format 1.
    if type(version) is not int or version != FORMAT_VERSION:
        raise CacheFormatError(
            path, f"cache format {version!r}, this version reads format {FORMAT_VERSION}", stamp
        )
    unknown = sorted(set(data) - {"format", "entries"})
    if unknown:
        # Every write keeps only these two: anything else would be dropped without a word.
        raise CacheFormatError(path, f"unknown top-level field(s) {', '.join(map(repr, unknown))}"
                               "; a cache file holds only 'format' and 'entries'", stamp)
    raw_entries = data.get("entries")
    if not isinstance(raw_entries, dict):
        raise CacheFormatError(path, "'entries' must be an object", stamp)
    entries: dict[str, dict[str, Any]] = {}
    names: dict[str, str] = {}  # key string -> the entry name it came from
    for name, raw in raw_entries.items():
        try:
            key_str, entry = _check_entry(raw)
        except (ValueError, TypeError, OverflowError) as e:
            # TypeError, OverflowError: values a hand edit can produce (an int too big to float).
            raise CacheFormatError(path, f"entry {name!r}: {e}", stamp) from None
        # The key string is re-derived from the fields, so a hand-edited name cannot mislead;
        # two entries with the same fields would keep only the last one.
        if key_str in names:
            raise CacheFormatError(path, f"entries {names[key_str]!r} and {name!r} have the same "
                                   f"key fields ({key_str!r}); keep one", stamp)
        names[key_str] = name
        entries[key_str] = entry
    return entries


def _dump(entries: Mapping[str, Any]) -> str:
    data = {"format": FORMAT_VERSION, "entries": entries}
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


def _target(path: Path) -> Path:
    """Where a write of ``path`` lands: through a symlink to the file it names (replacing the
    link itself would cut it loose from a cache kept elsewhere, e.g. in a synced folder)."""
    return Path(os.path.realpath(path)) if os.path.islink(path) else path


def _write_error(what: str, path: Path, e: OSError) -> OSError:
    """``e`` (from making ``path``'s directory or writing it) as one line that names ``path``."""
    if isinstance(e, (FileExistsError, NotADirectoryError)) and e.filename:
        # mkdir's or open's: a file where a directory of the path should be.
        why = f"{e.filename} is not a directory"
    else:
        why = e.strerror or str(e)
    return OSError(f"cannot write {what} {path}: {why}")


def _atomic_write(path: Path, text: str, what: str = "the config cache") -> None:
    """Replace ``path`` with ``text``: readers see the old file or the new one, never half.

    OSError naming ``path`` (as ``what``) when it cannot be written, including when something
    other than a regular file (a device, a fifo, a socket) is in its place: renaming over it
    would replace that, not write to it.
    """
    shown, path = path, _target(path)
    try:
        st = os.stat(path)
    except OSError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise OSError(f"cannot write {what} {shown}: it is {kind}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A short name: the temporary must fit where a long cache file name itself just fits.
        tmp = path.with_name(f".dkbench-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        # os.open with 0o666 (not mkstemp's 0o600) so the file gets the user's umask like any other.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise _write_error(what, shown, e) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_error(what, shown, e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable on POSIX; directories cannot be opened this way on Windows.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Stamps of bad files already reported in this process, so a bad file is not reported on every
# lookup (until it changes).
_reported: set[tuple[str, _Stamp]] = set()


def _report_once(path: Path, stamp: _Stamp | None, message: str) -> None:
    # A warning, never a print: the library has no console; a CLI shows it as it sees fit.
    if (str(path), stamp or (0, 0, 0)) in _reported:
        return
    _reported.add((str(path), stamp or (0, 0, 0)))
    warnings.warn(ConfigCacheWarning(message, path), stacklevel=3)


def _refused(path: Path, bad: CacheFormatError) -> CacheFormatError:
    """The error of a write to a file that is not a usable cache, which is left as it is."""
    return CacheFormatError(path, f"not a usable config cache ({bad.reason}), so it is not "
                                  "written; it is left as it is: fix it, remove it, or name "
                                  f"another cache (--cache, ${ENV_VAR})", bad.stamp)


def load_shipped(path: Path) -> dict[str, dict[str, Any]]:
    """Entries of a shipped tuned-configs file (cache format), read-only; a missing file gives {}.

    A bad shipped file is warned about (once) and treated as empty rather than failing a launch.
    """
    path = Path(path)
    try:
        return read_entries(path)[1]
    except CacheFormatError as e:
        _report_once(path, e.stamp, f"ignoring the shipped configs {path}: {e.reason}")
    except OSError as e:
        _report_once(path, None, f"ignoring the shipped configs {path}: {e}")
    return {}


# -- the cache --------------------------------------------------------------------------------


@dataclass
class ImportCounts:
    """What an import did with each entry of its source file."""

    overwrite: bool
    added: int = 0  # not cached before
    replaced: int = 0  # cached with another config or timing, overwritten
    unchanged: int = 0  # cached exactly as in the source
    kept: int = 0  # cached differently and kept, as overwrite was off

    @property
    def written(self) -> int:
        """How many entries the cache now holds as the source has them, as `import_` counts:
        with overwrite, the unchanged ones too."""
        return self.added + self.replaced + (self.unchanged if self.overwrite else 0)


class ConfigCache:
    """The best-config cache file at ``path`` (explicit path, else ``$DKBENCH_CACHE``, else the
    platform's user cache dir). Lookups are memoised; writes are locked and atomic."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path: Path = Path(path).expanduser() if path is not None else default_cache_path()
        # (stamp of the file it came from, entries); one attribute so a reader thread sees a pair.
        self._memo: tuple[_Stamp | None, dict[str, dict[str, Any]]] | None = None

    def __repr__(self) -> str:
        return f"ConfigCache({str(self.path)!r})"

    # -- reading --

    def _lock(self) -> filelock.FileLock:
        # Beside the file a symlink names: every writer of that file takes the same lock.
        target = _target(self.path)
        lock = Path(f"{target}.lock")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _write_error("the config cache", self.path, e) from None
        # filelock retries a lock file it cannot create until its timeout (a minute) as if
        # another process held it: a place no file can be made (/proc) fails here at once.
        try:
            os.close(os.open(lock, os.O_RDWR | os.O_CREAT, 0o644))
        except OSError as e:
            raise OSError(f"cannot write the config cache {self.path}: its lock file {lock} "
                          f"cannot be made ({e.strerror or e})") from None
        return filelock.FileLock(str(lock), timeout=_LOCK_TIMEOUT_S)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the file lock; TimeoutError naming the cache when another process keeps it."""
        lock = self._lock()
        try:
            lock.acquire()
        except filelock.Timeout:
            # filelock's own message names only the lock file, not the cache or the wait.
            raise TimeoutError(f"cannot write the config cache {self.path}: another process has "
                               f"held its lock {lock.lock_file} for {_LOCK_TIMEOUT_S:g} s (a "
                               "tuner still writing?); try again when it is done") from None
        try:
            yield
        finally:
            lock.release()

    def _load_locked(self) -> tuple[_Stamp | None, dict[str, dict[str, Any]]]:
        """Read the file for a write (the caller holds the lock). A bad file is refused, left as
        it is; OSError (cannot open it) propagates: a writer must not replace what it could not
        read."""
        try:
            return read_entries(self.path)
        except CacheFormatError as e:
            raise _refused(self.path, e) from None

    def _load(self, stat_stamp: _Stamp | None) -> tuple[_Stamp | None, dict[str, dict[str, Any]]]:
        """Read the file for a lookup, without the lock: a bad or unopenable file is reported
        once and read as empty, memoised under its stamp so it is not re-read until it changes."""
        try:
            return read_entries(self.path)
        except CacheFormatError as e:
            _report_once(self.path, e.stamp,
                         f"ignoring the config cache {self.path}: {e.reason}; it is left as it "
                         "is (a tune writing there refuses until it is fixed or removed)")
            return e.stamp or stat_stamp, {}
        except OSError as e:
            # Cannot open it (permissions): a launch falls back to defaults, not a crash.
            _report_once(self.path, stat_stamp, f"ignoring the config cache {self.path}: {e}")
            return stat_stamp, {}

    def check_writable(self) -> None:
        """Raise OSError naming the file when a write here would fail, CacheFormatError when the
        file there is not a usable cache (a write would refuse it). For callers (a tuner) that
        should fail before long work, not after."""
        probe = self.path.parent
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
            what = "is not a directory" if not probe.is_dir() else "is not writable"
            raise PermissionError(f"cannot write the config cache {self.path}: {probe} {what}")
        self.check_usable()
        with self._locked():
            self._load_locked()
        self.invalidate()

    def check_usable(self) -> None:
        """Raise CacheFormatError when the file is there and not a usable cache (what a write
        refuses). Writes check it before taking the lock, so a write refused never leaves a lock
        file beside someone else's file."""
        try:
            read_entries(self.path)
        except CacheFormatError as e:
            raise _refused(self.path, e) from None
        except OSError:
            pass  # the locked read reports it

    def _entries_view(self) -> dict[str, dict[str, Any]]:
        """The memoised entries (do not mutate); one os.stat decides whether they are stale."""
        try:
            st = os.stat(self.path)
            stamp: _Stamp | None = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
        memo = self._memo
        if memo is not None and memo[0] == stamp:
            return memo[1]
        memo = self._load(stamp)
        self._memo = memo
        return memo[1]

    def invalidate(self) -> None:
        """Drop the memo; the next lookup reads the file."""
        self._memo = None

    def entry(self, key: CacheKey | str) -> dict[str, Any] | None:
        """The whole entry for ``key`` (a copy), or None."""
        found = self._entries_view().get(key.as_str() if isinstance(key, CacheKey) else key)
        return copy.deepcopy(found) if found is not None else None

    def get(self, key: CacheKey | str) -> dict[str, Any] | None:
        """The launch config for ``key`` (block_m, block_n, num_warps, num_stages), or None."""
        found = self._entries_view().get(key.as_str() if isinstance(key, CacheKey) else key)
        # A copy: callers may tweak what they launch with, the memo must stay as on disk.
        return dict(found["config"]) if found is not None else None

    def entries(self) -> dict[str, dict[str, Any]]:
        """All entries by key string (a copy)."""
        return copy.deepcopy(self._entries_view())

    # -- writing --

    def _update(self, change: Callable[[dict[str, dict[str, Any]]], int]) -> int:
        """Under the lock: re-read, apply ``change`` (it returns a count), write back if nonzero."""
        self.check_usable()
        with self._locked():
            _, entries = self._load_locked()
            count = change(entries)
            if count:
                _atomic_write(self.path, _dump(entries))
        self.invalidate()
        return count

    def put(
        self,
        key: CacheKey,
        config: Mapping[str, Any],
        *,
        ms: float,
        default_ms: float,
        source: str = "tune",
    ) -> None:
        """Record ``config`` as the best for ``key``, merged into whatever the file holds now."""
        self.put_many([(key, config, ms, default_ms)], source=source)

    def put_many(self, writes: list[tuple[CacheKey, Mapping[str, Any], float, float]], *,
                 source: str = "tune") -> int:
        """:meth:`put` of several (key, config, ms, default_ms) under one lock, in one write;
        returns how many."""
        tuned_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        new: dict[str, dict[str, Any]] = {}
        for key, config, ms, default_ms in writes:
            # A default that failed has no time: null, since NaN is not JSON (jq and others
            # refuse it).
            default = _as_float(default_ms)
            raw = {"key": key.to_dict(), "config": config, "ms": _as_float(ms),
                   "default_ms": None if isinstance(default, float) and not math.isfinite(default)
                   else default,
                   "tuned_at": tuned_at, "source": source}
            # Checked as the reader checks it: one entry it refuses makes it set the whole file
            # aside, every other entry with it.
            try:
                name, entry = _check_entry(raw)
            except ValueError as e:
                raise ValueError(f"cannot cache {key.as_str()!r}: {e}") from None
            new[name] = entry

        def change(entries: dict[str, dict[str, Any]]) -> int:
            entries.update(new)
            return len(new)

        return self._update(change) if new else 0

    def clear(self) -> int:
        """Remove every entry; returns how many there were."""

        def change(entries: dict[str, dict[str, Any]]) -> int:
            n = len(entries)
            entries.clear()
            return n

        return self._update(change)

    def _is_mine(self, path: Path) -> str | None:
        """"the config cache itself" or "the config cache's lock file" when ``path`` is one of
        them (through any spelling or symlink), else None."""
        target = os.path.realpath(_target(self.path))
        real = os.path.realpath(path)
        if real == target:
            return "the config cache itself"
        if real == f"{target}.lock":
            return "the config cache's lock file"
        return None

    def export(self, dest: Path) -> int:
        """Write the entries to ``dest`` in the cache format; returns how many.

        ValueError when ``dest`` is the cache itself (a write that would skip the lock and could
        drop a concurrent tuner's entries) or its lock file (replacing it breaks the locking).
        """
        dest = Path(dest)
        mine = self._is_mine(dest)
        if mine is not None:
            raise ValueError(f"cannot write the export file {dest}: it is {mine} "
                             f"({self.path}); export to another file")
        entries = self.entries()
        _atomic_write(dest, _dump(entries), "the export file")
        return len(entries)

    def import_(self, src: Path, *, overwrite: bool = True) -> int:
        """Merge the entries of ``src`` in; returns how many were written (including those
        already cached as they are, with ``overwrite``). :meth:`merge` says which were which.

        With ``overwrite=False`` entries already in the cache are kept. A missing, corrupt or
        foreign-format ``src`` raises ValueError (CacheFormatError) naming the file.
        """
        return self.merge(src, overwrite=overwrite).written

    def merge(self, src: Path, *, overwrite: bool = True) -> ImportCounts:
        """:meth:`import_`, counting the new entries, the replaced ones, those already cached
        as they are, and those kept because they differ and ``overwrite`` is off. The file is
        rewritten only when something changed (importing a file into itself changes nothing).
        """
        src = Path(src)
        stamp, incoming = read_entries(src)
        if stamp is None:
            raise CacheFormatError(src, "no such file")
        counts = ImportCounts(overwrite=overwrite)

        def change(entries: dict[str, dict[str, Any]]) -> int:
            for name, entry in incoming.items():
                old = entries.get(name)
                if old is None:
                    counts.added += 1
                elif old == entry:
                    counts.unchanged += 1
                    continue
                elif overwrite:
                    counts.replaced += 1
                else:
                    counts.kept += 1
                    continue
                entries[name] = entry
            return counts.added + counts.replaced

        self._update(change)
        return counts
