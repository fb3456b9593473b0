"""Result PDFs on disk: streamed, checked, fsynced and renamed into place.

Layout, read by the site's access-checked download script:
``{dir}/{USER_ID}/{EXTERNAL_ORDER_ID}.pdf``.
A download goes to a hidden temporary file in the same folder (same file system, so the
rename is atomic), is checked, fsynced, and renamed into place only when the order's
database transaction is about to commit: a reader never sees half a file. Files are 0640
and folders 0750 whatever the process umask.

The checks are here, not in the adapters, and the same for every PDF whatever brought it
(a ``PdfRef``: bytes inline in the LIS's answer, a URL the adapter resolves, or the order's
id): it starts with ``%PDF-``, its last ``EDGE_BYTES`` hold ``%%EOF`` (a form cut short
has none), and it is at most ``pdf.max_bytes``. Each is checked on the file as it is on
disk; a PDF that fails is ``BadLisData`` and leaves no file behind.

A temporary file's name carries its writer's process tag (``labsync.process_tag``), so the
sweep at the start of every pass removes the files of a writer that died (SIGKILL, a
crash, a reboot) at once, and leaves a live writer's alone, another instance's included.
A write the folder refuses (full, read-only, permissions) is a ``DiskError``: a problem of
the host that the pass reports once.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast

from labsync import process_tag
from labsync.errors import BadLisData, DiskError, PdfError, PermanentLisError
from labsync.model import BY_ORDER, PdfKind, PdfRef

FILE_MODE = 0o640
DIR_MODE = 0o750
TEMP_SUFFIX = ".part"
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
_CHUNK = 64 * 1024
# The folder, not the order: every order needing the folder meets these the same way.
_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                          errno.EFBIG, errno.EIO})


def _write_error(exc: OSError, message: str) -> PdfError:
    """``message`` as the error it is: a ``DiskError`` if the folder refused the write."""
    if exc.errno in _DISK_ERRNOS:
        return DiskError(message, reason=exc.strerror or type(exc).__name__)
    return PdfError(message)


def _writer_tag(temp_name: str) -> str:
    """The process tag in a temporary file's name (``.{id}.{tag}.{random}.part``), or ''."""
    parts = temp_name[1:-len(TEMP_SUFFIX)].rsplit(".", 2)
    return parts[1] if len(parts) == 3 else ""


def is_safe_name(external_id: str) -> bool:
    """Letters, digits, ``.``, ``_``, ``-``; not starting with ``.``; at most 100 characters."""
    return bool(_SAFE_NAME.fullmatch(external_id))


@dataclass(slots=True)
class StagedPdf:
    """A downloaded, checked PDF waiting in its temporary file for ``publish``."""

    temp_path: Path
    final_path: Path
    size: int
    sha256: str
    published: bool = False


PDF_MAGIC = b"%PDF-"
PDF_TRAILER = b"%%EOF"
EDGE_BYTES = 1024  # how far from the end %%EOF may be: writers pad with newlines or NULs


def check_pdf(head: bytes, tail: bytes, size: int, *, max_bytes: int, what: str) -> None:
    """The PDF check, the one for every adapter: ``BadLisData`` unless ``head`` (the first
    bytes) starts with ``%PDF-``, ``tail`` (the last ``EDGE_BYTES``) holds ``%%EOF`` and
    ``size`` is at most ``max_bytes``. ``what`` starts each message (``PDF of order A-1``)."""
    if size == 0:
        raise BadLisData(f"{what}: not a PDF (empty body)")
    if not head.startswith(PDF_MAGIC):
        raise BadLisData(f"{what}: not a PDF (starts with {head[:4].decode('latin-1')!r})")
    if PDF_TRAILER not in tail:
        raise BadLisData(f"{what}: PDF cut short (no %%EOF at its end)")
    if size > max_bytes:
        raise BadLisData(f"{what}: the PDF is over {max_bytes} bytes")


class PdfFetcher(Protocol):
    """What ``stage`` needs of an adapter for a by-order or URL handle (``PdfSource``)."""

    def fetch_pdf(
        self, external_id: str, sink: BinaryIO, *, max_bytes: int, ref: PdfRef = ...
    ) -> int: ...


class _Tally:
    """The staged file as the adapter's sink: hashes and counts what is written to it.

    An adapter writes the body in order, rewinding to the start (and truncating) before a
    retry, which starts the count afresh. Anything else it does (a seek elsewhere, any
    other method) leaves ``exact`` False, and the file is read back to be checked.

    The file is a new, empty, unbuffered one: each write goes straight to the kernel, and
    rewinding or truncating it before anything is written (every first attempt) needs no
    system call. Each system call hands the GIL to another worker and takes it back, which
    is most of what the workers' threads cost (docs/performance.md).
    """

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.digest = hashlib.sha256()
        self.size = 0
        self.tail = b""  # the last EDGE_BYTES written
        self.exact = True
        self._untouched = True  # nothing written yet: the file is still empty at offset 0

    def write(self, data: bytes) -> int:
        self._untouched = False
        view = memoryview(data)
        while view:  # an unbuffered write may take less than it was given
            written = self._file.write(view)
            if not written:
                raise OSError(errno.EIO, "the PDF file took no bytes")
            view = view[written:]
        self.digest.update(data)
        self.size += len(data)
        self.tail = (self.tail + bytes(data[-EDGE_BYTES:]))[-EDGE_BYTES:]
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if self._untouched and offset == 0 and whence == os.SEEK_SET:
            return 0
        self._untouched = False
        position = self._file.seek(offset, whence)
        if position == 0:
            self.digest, self.size, self.tail = hashlib.sha256(), 0, b""
        else:
            self.exact = False
        return position

    def truncate(self, size: int | None = None) -> int:
        if self._untouched and not size:
            return 0
        self._untouched = False
        return self._file.truncate(size)  # past what was counted: fstat tells at the check

    def flush(self) -> None:
        self._file.flush()

    def __getattr__(self, name: str) -> Any:
        self.exact = False
        self._untouched = False
        return getattr(self._file, name)


def _read_back(file: BinaryIO) -> tuple[int, bytes, bytes, Any]:
    """Size, first and last bytes and digest of the whole file, read from disk."""
    file.seek(0)
    digest = hashlib.sha256()
    size = 0
    head = tail = b""
    while chunk := file.read(_CHUNK):
        if not head:
            head = chunk[: len(PDF_MAGIC)]
        tail = (tail + chunk[-EDGE_BYTES:])[-EDGE_BYTES:]
        size += len(chunk)
        digest.update(chunk)
    return size, head, tail, digest


class PdfStore:
    """The PDF folder. ``stage`` may run in worker threads; ``publish`` and ``discard`` in one."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._ready: set[Path] = set()  # folders made and checked this pass
        self._tag_pid, self._tag_text = 0, ""

    def final_path(self, user_id: int, external_id: str) -> Path:
        if not is_safe_name(external_id):
            raise PdfError(f"order {external_id!r}: EXTERNAL_ORDER_ID is not a safe file name "
                           "(letters, digits, '.', '_', '-' only, not starting with '.')")
        if not isinstance(user_id, int) or user_id <= 0:
            raise PdfError(f"order {external_id}: USER_ID {user_id!r} is not a positive integer")
        return self.root / str(user_id) / f"{external_id}.pdf"

    def new_pass(self) -> None:
        """Check every folder again on its next use (its mode may have been changed)."""
        self._ready.clear()

    def _folder(self, path: Path) -> None:
        if path.parent in self._ready:
            return
        for folder in (self.root, path.parent):
            try:
                # parents too: pdf.dir may be a fresh path (each made 0750 like the rest)
                folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
                if folder.stat().st_mode & 0o777 != DIR_MODE:
                    os.chmod(folder, DIR_MODE)
            except OSError as exc:
                raise _write_error(exc, f"cannot create PDF folder {folder}: "
                                        f"{exc.strerror}") from exc
        self._ready.add(path.parent)  # a patient's forms come in a row: check once a pass

    def stage(self, user_id: int, external_id: str, source: PdfFetcher | None,
              ref: PdfRef | None = None) -> StagedPdf:
        """Put the PDF ``ref`` points to into a temporary file beside its final place, and
        check it (``check_pdf``), whatever kind of handle it is.

        ``ref`` None or ``BY_ORDER``: ``source.fetch_pdf`` by the order's id (the call of
        today's engine, ``stage(user_id, external_id, lis)``); a URL handle: ``source``
        resolves it; inline bytes are written here and need no ``source``.
        """
        final = self.final_path(user_id, external_id)
        ref = ref or BY_ORDER
        if ref.kind is not PdfKind.INLINE and source is None:
            raise PermanentLisError(f"PDF of order {external_id}: {ref!r} needs an adapter "
                                    "that fetches it")
        self._folder(final)
        try:
            try:
                fd, name = self._temp_file(final, external_id)
            except FileNotFoundError:  # the folder went away since it was checked: once more
                self._ready.discard(final.parent)
                self._folder(final)
                fd, name = self._temp_file(final, external_id)
        except OSError as exc:
            raise _write_error(exc, f"order {external_id}: cannot write in {final.parent}: "
                                    f"{exc.strerror}") from exc
        temp = Path(name)
        try:
            os.fchmod(fd, FILE_MODE)
            with os.fdopen(fd, "w+b", buffering=0) as file:
                sink = _Tally(file)
                self._fill(cast(BinaryIO, sink), external_id, source, ref)
                file.flush()
                os.fsync(file.fileno())
                size, digest = self._check(file, sink, external_id)
            return StagedPdf(temp_path=temp, final_path=final, size=size, sha256=digest)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise _write_error(exc, f"order {external_id}: cannot write PDF in {final.parent}: "
                                    f"{exc.strerror}") from exc
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    def _fill(self, sink: BinaryIO, external_id: str, source: PdfFetcher | None,
              ref: PdfRef) -> None:
        """Write the PDF of ``ref`` into ``sink``, never more than ``max_bytes`` of it."""
        if ref.kind is PdfKind.INLINE:
            data = ref.data or b""
            if len(data) > self.max_bytes:
                raise BadLisData(f"PDF of order {external_id}: the PDF is over "
                                 f"{self.max_bytes} bytes")
            view = memoryview(data)
            for start in range(0, len(view), _CHUNK):  # as an adapter streams: chunk by chunk
                sink.write(view[start:start + _CHUNK])
            return
        assert source is not None  # checked by stage before any file was made
        if ref.kind is PdfKind.BY_ORDER:  # without ``ref``: adapters written before handles
            source.fetch_pdf(external_id, sink, max_bytes=self.max_bytes)
        else:
            source.fetch_pdf(external_id, sink, max_bytes=self.max_bytes, ref=ref)

    def _temp_file(self, final: Path, external_id: str) -> tuple[int, str]:
        return tempfile.mkstemp(prefix=f".{external_id}.{self._tag()}.", suffix=TEMP_SUFFIX,
                                dir=final.parent)

    def _tag(self) -> str:
        pid = os.getpid()
        if self._tag_pid != pid:  # computed once per process
            self._tag_pid, self._tag_text = pid, process_tag.this_process()
        return self._tag_text

    def _check(self, file: BinaryIO, sink: _Tally, external_id: str) -> tuple[int, str]:
        """What was written, checked on disk (``check_pdf``), whatever the adapter. The
        digest, size and tail counted while writing are used when the file on disk agrees
        with them; otherwise the file is read back."""
        fd = file.fileno()
        if sink.exact and os.fstat(fd).st_size == sink.size:
            size, digest, tail = sink.size, sink.digest, sink.tail
            head = os.pread(fd, len(PDF_MAGIC), 0)
        else:
            size, head, tail, digest = _read_back(file)
        check_pdf(head, tail, size, max_bytes=self.max_bytes, what=f"PDF of order {external_id}")
        return size, digest.hexdigest()

    def publish(self, staged: StagedPdf) -> Path:
        """Rename the staged file into place (atomic) and make the rename durable."""
        if staged.published:
            return staged.final_path
        try:
            os.replace(staged.temp_path, staged.final_path)
            dir_fd = os.open(staged.final_path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise _write_error(exc, f"cannot move PDF into {staged.final_path}: "
                                    f"{exc.strerror}") from exc
        staged.published = True
        return staged.final_path

    def discard(self, staged: StagedPdf | None) -> None:
        if staged is not None and not staged.published:
            staged.temp_path.unlink(missing_ok=True)

    def sweep(self, older_than: float = 3600.0) -> int:
        """Delete the temporary files of writers that died; return how many.

        A file whose writer ran on this host goes as soon as that process is gone, and stays
        while it runs (this process's, another instance's). A file whose writer cannot be
        judged here (another host on a shared folder, a name without a tag) goes once it is
        ``older_than`` seconds old.
        """
        if not self.root.is_dir():
            return 0
        cutoff = time.time() - older_than
        removed = 0
        for temp in self.root.glob(f"*/.*{TEMP_SUFFIX}"):
            dead = process_tag.is_dead(_writer_tag(temp.name))
            try:
                if dead is False or (dead is None and temp.stat().st_mtime >= cutoff):
                    continue
                temp.unlink()
                removed += 1
            except FileNotFoundError:
                continue
            except OSError:
                continue  # a folder it may not write: the pass reports that when it writes
        return removed
