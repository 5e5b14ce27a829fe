"""Small helpers shared by the library and the CLI."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import DiffpruneError


def denoiser_of(obj):
    """The denoiser inside a diffusers pipeline (unet or transformer), or the object itself."""
    for attr in ("unet", "transformer"):
        m = getattr(obj, attr, None)
        if m is not None and hasattr(obj, "scheduler"):
            return m
    return obj


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DiffpruneError(f"{name} must be a positive integer, got {value!r}")
    return value


def ratio(value: float, name: str = "--ratio") -> float:
    if not (0.0 < float(value) < 1.0):
        raise DiffpruneError(f"{name} must lie strictly between 0 and 1, got {value}")
    return float(value)


# ----- bounded JSON ---------------------------------------------------------------------------------------------
# Every JSON artifact diffprune reads is small (kilobytes; DiP-GO histories a few MB): the limits stop a damaged or
# hostile file from costing memory or recursing before anything about it is known.
MAX_JSON_BYTES = 64 * 2 ** 20
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


def duration(seconds: float) -> str:
    """A time for people: seconds, minutes or hours."""
    return f"{seconds:.0f} s" if seconds < 90 else (f"{seconds / 60:.0f} min" if seconds < 5400
                                                    else f"{seconds / 3600:.1f} h")


def json_safe(obj):
    """obj with numpy (or torch) arrays and scalars made Python values, tuples made lists and dict keys strings:
    what json.dumps takes."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy arrays and scalars, tensors
        return json_safe(obj.tolist())
    return obj


def json_depth(data: bytes) -> int:
    """Deepest nesting of objects/arrays in JSON text (strings skipped), without parsing it."""
    import numpy as np
    bare = np.frombuffer(_JSON_STRING.sub(b'""', data), dtype=np.uint8)
    step = np.zeros(256, dtype=np.int64)
    step[[ord("["), ord("{")]] = 1
    step[[ord("]"), ord("}")]] = -1
    depth = np.cumsum(step[bare])
    return int(depth.max()) if depth.size else 0


def loads_json(data: str | bytes, source: str, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH):
    """json.loads with size and nesting-depth limits checked first; any failure is a DiffpruneError naming
    `source` (the file, or what the text is)."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise DiffpruneError(f"{source}: {len(raw)} bytes of JSON, more than the {max_bytes} a diffprune file "
                             f"can hold; the file is damaged or not a diffprune file")
    depth = json_depth(raw)
    if depth > max_depth:
        raise DiffpruneError(f"{source}: JSON nested {depth} deep (at most {max_depth} allowed); the file is "
                             f"damaged or not a diffprune file")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DiffpruneError(f"{source}: corrupt JSON ({e})") from None


def read_json(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH):
    """A JSON file read with the limits of loads_json (the size is checked before reading). A missing file
    raises FileNotFoundError (callers say what was expected there); every other failure a DiffpruneError."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise DiffpruneError(f"{path}: {size} bytes, more than the {max_bytes} a diffprune JSON file can "
                                     f"hold; the file is damaged or not a diffprune file")
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise
    except IsADirectoryError:
        raise DiffpruneError(f"{path} is a directory, not a JSON file") from None
    except OSError as e:
        raise DiffpruneError(f"{path}: cannot read it ({e.strerror or e})") from None
    return loads_json(data, str(path), max_bytes, max_depth)


# ----- writing outputs ------------------------------------------------------------------------------------------

def umask() -> int:
    """The process's umask (temporary files are created 0600/0700; outputs get the modes the user asked for)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    old = os.umask(0o022)  # no /proc: the classic swap (not thread-safe, hence the fallback only)
    os.umask(old)
    return old


def atomic_write_bytes(path: str | os.PathLike, data: bytes):
    """Write a file so that readers see the old content or the new, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str):
    atomic_write_bytes(path, text.encode())


@contextlib.contextmanager
def output_directory(path: str | os.PathLike, overwrite: bool = False):
    """Build a result directory under a temporary name and move it into place only when complete, so an
    error or Ctrl-C never leaves a half-written directory. Refuses to replace an existing one unless asked."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise DiffpruneError(f"{path} already exists; choose another output path or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.partial."))
    os.chmod(tmp, 0o777 & ~umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        if not overwrite:  # someone else made it while we worked: theirs is not ours to delete
            shutil.rmtree(tmp, ignore_errors=True)
            raise DiffpruneError(f"{path} appeared while this run was working (another writer?); nothing was "
                                 f"replaced: choose another output path or pass --overwrite")
        shutil.rmtree(path)
    os.replace(tmp, path)


# Temporary names made by atomic_write_bytes (mkstemp: 8 random characters) and output_directory; a killed run
# leaves them behind. They are removed by the next run that claims the same output.
def _debris(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.(?:[a-z0-9_]{{8}}\.tmp|partial\.[a-z0-9_]{{8}})$")


_ANY_DEBRIS = re.compile(r"^\..+\.(?:[a-z0-9_]{8}\.tmp|partial\.[a-z0-9_]{8})$")


def remove_debris(directory: str | os.PathLike, name: str | None = None) -> list[str]:
    """Delete the temporaries of interrupted writes in `directory` (of output `name` only, or of any output).
    Only call it while holding the claim on what is written there: a live writer's temporaries look the same."""
    directory = Path(directory)
    pattern = _debris(name) if name is not None else _ANY_DEBRIS
    removed = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in directory.iterdir():
            if pattern.match(entry.name):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry.name)
    return removed


def _lock(lock: Path, path: Path, what: str) -> int:
    import fcntl
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            try:  # the holder we waited for may have removed the file: then this lock is on a ghost, retry
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
                if path.exists() and not os.access(path, os.W_OK | (os.X_OK if path.is_dir() else 0)):
                    raise PermissionError(13, "Permission denied")
                return fd
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DiffpruneError(f"{path} is being written by another diffprune run (process {holder}); wait for "
                                 f"it to finish, or choose another {what}") from None
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def lock_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.parent / f".{path.name}.lock"


@contextlib.contextmanager
def claim_output(path: str | os.PathLike, what: str = "output"):
    """Claim an output location for this run before any long work: its directory must be writable, and no other
    diffprune run may hold it (a second writer gets a DiffpruneError, never a silent replacement). The claim is
    an flock on a `.NAME.lock` file beside the output, released when the run ends or dies (a killed run leaves
    no stale claim). Holding it, the debris of an earlier killed run writing the same output is removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _lock(lock_path(path), path, what)
    except OSError as e:
        raise DiffpruneError(f"cannot write {what} {path}: {e.strerror or e}; choose a writable location") from None
    lock = lock_path(path)
    try:
        remove_debris(path.parent, path.name)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def own_storage(module):
    """Copy every parameter and buffer into freshly allocated memory.

    safetensors memory-maps the file, and tensors at unaligned offsets take different SIMD code paths, so a
    loaded model can differ from the saved one in the last bit. A copy makes reloads bit-identical."""
    import torch
    with torch.no_grad():
        for p in module.parameters():
            p.data = p.data.clone()
        for name, b in list(module.named_buffers()):
            owner, _, leaf = name.rpartition(".")
            mod = module.get_submodule(owner) if owner else module
            mod._buffers[leaf] = b.clone()
    return module
