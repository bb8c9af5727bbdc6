"""Ray Train's view of object storage: checkpoints and Ray's own bookkeeping through raptor's retries.

Ray Train writes each checkpoint, and its record of which checkpoints exist, through a pyarrow
filesystem. :class:`RetryingHandler` is that filesystem over the same fsspec filesystem every other
artifact uses, with every call retried like :func:`raptor.storage.retry`: an object store that is
down for a minute delays a checkpoint instead of failing the worker group (which would cost a
restart, or the run once ``max_failures`` are spent). Uploads are staged in a local file and put as
one object when the stream closes, so a retry never continues a torn stream; downloads land in a
local file before Ray reads them.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Any, Callable, TypeVar

from pyarrow.fs import FSSpecHandler, PyFileSystem
from pyarrow.lib import PythonFile

from raptor import storage

T = TypeVar("T")


class RetryingHandler(FSSpecHandler):
    """A pyarrow filesystem handler over an fsspec filesystem whose calls retry transient errors."""

    def __init__(self, fs: Any, patience_s: float):
        super().__init__(fs)
        self.patience_s = patience_s

    def retry(self, what: str, call: Callable[[], T]) -> T:
        return storage.retry(call, what, self.patience_s)

    def get_file_info(self, paths: list[str]) -> Any:
        return self.retry(f"looking up {paths[0] if paths else ''}", lambda: FSSpecHandler.get_file_info(self, paths))

    def get_file_info_selector(self, selector: Any) -> Any:
        return self.retry(f"listing {selector.base_dir}", lambda: FSSpecHandler.get_file_info_selector(self, selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        self.retry(f"creating {path}", lambda: FSSpecHandler.create_dir(self, path, recursive))

    def delete_dir(self, path: str) -> None:
        self.retry(f"deleting {path}", lambda: FSSpecHandler.delete_dir(self, path))

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.retry(f"emptying {path}", lambda: FSSpecHandler.delete_dir_contents(self, path, missing_dir_ok))

    def delete_file(self, path: str) -> None:
        self.retry(f"deleting {path}", lambda: FSSpecHandler.delete_file(self, path))

    def move(self, src: str, dest: str) -> None:
        self.retry(f"moving {src}", lambda: FSSpecHandler.move(self, src, dest))

    def copy_file(self, src: str, dest: str) -> None:
        self.retry(f"copying {src}", lambda: FSSpecHandler.copy_file(self, src, dest))

    def open_input_stream(self, path: str) -> PythonFile:
        return self._download(path)

    def open_input_file(self, path: str) -> PythonFile:
        return self._download(path)

    def open_output_stream(self, path: str, metadata: Any = None) -> PythonFile:
        return PythonFile(_UploadOnClose(self, path), mode="w")

    def _download(self, path: str) -> PythonFile:
        """The whole object into a local (unlinked) temp file, retried as a whole."""
        if not self.retry(f"looking up {path}", lambda: self.fs.isfile(path)):
            raise FileNotFoundError(path)
        fd, local = tempfile.mkstemp(prefix="raptor-download-")
        os.close(fd)
        try:
            self.retry(f"reading {path}", lambda: self.fs.get_file(path, local))
            return PythonFile(open(local, "rb"), mode="r")
        finally:
            os.remove(local)  # the open handle keeps the data until pyarrow closes it


class _UploadOnClose(io.RawIOBase):
    """A local temp file that becomes the object at ``path`` when closed: one retried put."""

    def __init__(self, handler: RetryingHandler, path: str):
        super().__init__()
        self._handler, self._path = handler, path
        self._file = tempfile.NamedTemporaryFile(prefix="raptor-upload-", delete=False)

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return self._file.write(data)

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._file.close()
            self._handler.retry(f"writing {self._path}", lambda: self._handler.fs.put_file(self._file.name, self._path))
        finally:
            os.remove(self._file.name)
            super().close()


def filesystem(url: str, patience_s: float) -> tuple[PyFileSystem, str]:
    """The pyarrow filesystem Ray Train should use for ``url``, and the path inside it."""
    fs, path = storage.filesystem(url)
    return PyFileSystem(RetryingHandler(fs, patience_s)), path
