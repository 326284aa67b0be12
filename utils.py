"""Small helpers shared by the scripts: one-line errors and interrupts, devices, safe file writes and folder
locks, JSON and text files."""
import contextlib
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor

import torch


class UserError(Exception):
    """A problem with the user's input (config, files, flags), reported as one line, exit code 2."""


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt is for Ctrl-C (a BaseException, so `except Exception` lets it by)."""


@contextlib.contextmanager
def on_interrupt(note):
    """While inside, Ctrl-C or SIGTERM ends the script with one line, 'interrupted: ' + note(), which says what
    was finished and how to continue (note is called then, so it can count what is done; the innermost wins)."""
    try:
        yield
    except (KeyboardInterrupt, Terminated) as e:
        if not hasattr(e, "note"):
            e.note = note()
        raise


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name when it has none), at most `limit` characters:
    what a one-line error quotes of a library's multi-line one."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


def first_call_or_fallback(call, fallback, log, what_instead: str):
    """call() (the first call of a torch.compile'd function, where compilation happens); if it fails,
    one message and fallback() instead: compilers fail in many ways, and none should end a run."""
    try:
        return call()
    except Exception as e:
        log(f"torch.compile failed ({type(e).__name__}: {first_line(e)}); {what_instead}")
        return fallback()


def enable_tf32(device: torch.device) -> None:
    """TF32 matrix products and convolutions on CUDA: about 10 bits of mantissa, ample for training and sampling
    (metrics.full_fp32 turns it off for the Inception features)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA on a machine without it is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"unknown device '{name}'; use auto, cuda or cpu")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device):
    """The autocast dtype for train/sample precision 'auto'|'bf16'|'fp16'|'fp32' (None = no autocast).

    'auto' is bf16 on GPUs that support it, fp16 on older GPUs and fp32 on the CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


@contextlib.contextmanager
def writing(path: str):
    """Inside, a failed write of `path` (a full disk, a folder without write permission) becomes a one-line
    UserError naming it. torch.save reports a full disk as a RuntimeError from its zip writer ('failed
    writing file', or 'unexpected pos' when the file was cut short), so RuntimeErrors count too."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        raise UserError(f"cannot write '{path}' ({reason}); is the disk full, or the folder not writable? "
                        "Free some space or choose another folder") from None


def atomic_write(path: str, write_fn) -> None:
    """Write a file so that readers see the old or the new version, never half of one.

    write_fn(f) writes to an open binary file in the same folder; it is flushed and fsynced, then renamed
    over `path` (os.replace is atomic on POSIX and Windows). On any failure the temporary file is removed
    and the old `path` is left as it was; a failed write is a UserError (see `writing`)."""
    folder = os.path.dirname(os.path.abspath(path))
    with writing(path):
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")

    def write_synced(tmp):
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes owner-only files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
    replace_via(path, tmp, write_synced)


def replace_via(path: str, tmp: str, write_tmp) -> None:
    """Write-then-rename: write_tmp(tmp) makes the file `tmp` in path's folder, which then replaces `path`
    (os.replace is atomic on POSIX and Windows), so a reader or a killed run never sees half a file. On any failure
    `tmp` is removed and `path` is left as it was; a failed write is a UserError (see `writing`)."""
    with writing(path):
        try:
            write_tmp(tmp)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise


class FolderLock:
    """An exclusive OS-level lock on FOLDER/.lock, so that two runs never write one folder at the same time.
    The kernel releases it when the process ends, however it ends: a killed run leaves no stale lock."""

    def __init__(self, folder: str, what: str):
        self.folder, self.what, self.fd = folder, what, None

    def __enter__(self):
        import fcntl
        path = os.path.join(self.folder, ".lock")
        with writing(path):
            os.makedirs(self.folder, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"'{self.folder}' is in use by another {self.what} (process {holder}); wait for it "
                            "to finish, or choose another folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # closing releases the lock; the file stays (removing it would race a new lock)


def thread_map(fn, items, workers: int | None = None):
    """fn over items in threads, in order (PIL releases the GIL while decoding). When the caller stops early
    (an error, Ctrl-C), the items not yet started are cancelled instead of decoded to the end."""
    pool = ThreadPoolExecutor(workers)  # None: min(32, cores + 4), as Python chooses
    try:
        yield from pool.map(fn, items)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def read_text(path: str, what: str) -> str:
    """The text of a UTF-8 file (a byte-order mark dropped); a missing file or one that is not UTF-8 is a
    one-line UserError naming it as `what`."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{what} '{path}' is not UTF-8 text (byte {e.start} cannot be decoded); save it as "
                        "UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read {what} '{path}' ({e.strerror or e})") from None


def read_json(path: str, what: str, kind: type = dict, advice: str = ""):
    """The JSON object (or list: `kind`) in a UTF-8 file; one that cannot be read, is not JSON or holds something
    else is a one-line UserError naming it as `what`, then `advice` (how to go on)."""
    text = read_text(path, what)
    try:
        data = json.loads(text)
    except ValueError as e:
        raise UserError(f"{what} '{path}' is not JSON ({first_line(e)}){advice}") from None
    if not isinstance(data, kind):
        raise UserError(f"{what} '{path}' is not a JSON {'object' if kind is dict else 'list'}{advice}")
    return data


def write_json(path: str, data) -> None:
    """`data` as indented JSON, written atomically."""
    atomic_write(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))


def check_writable(path: str, folder: bool = False) -> None:
    """Fail now rather than after sampling when `path` (a file, or a folder) cannot be written."""
    parent = path if folder else os.path.dirname(os.path.abspath(path))
    if not folder and os.path.isdir(path):
        raise UserError(f"cannot write '{path}': it is a folder; give a file name")
    try:
        os.makedirs(parent, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise UserError(f"cannot write '{path}' ({e.strerror or e})") from None
