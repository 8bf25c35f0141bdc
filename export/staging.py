"""Write files aside and rename them into place together, or not at all.

Exports go into hidden temporary files in the destination directory (so the final rename is
atomic on one file system). Nothing is renamed until every file is written and checked; on any
error every temporary file is removed, so a failed export leaves the directory as it was.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import TracebackType


class Staging:
    """Collects staged files for one directory; `commit()` renames them all into place.

    Use as a context manager: leaving the block without `commit()` (normally or by an
    exception) deletes every staged file.

    Args:
        directory: The destination directory (must exist).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ValueError(f"directory must be an existing directory, got {self.directory}")
        self._staged: dict[str, Path] = {}

    def path(self, name: str) -> Path:
        """A fresh temporary path that `commit()` will rename to `directory / name`."""
        if name in self._staged or "/" in name or name in ("", ".", ".."):
            raise ValueError(f"name must be a new plain file name, got {name!r}")
        handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.directory)
        os.close(handle)
        # mkstemp creates 0600; exports are read by the server, possibly as another user.
        os.chmod(temporary, 0o644)
        self._staged[name] = Path(temporary)
        return self._staged[name]

    @property
    def staged(self) -> dict[str, Path]:
        """Final name -> temporary path of every staged file."""
        return dict(self._staged)

    def commit(self) -> None:
        """fsync and rename every staged file into place."""
        for temporary in self._staged.values():
            with open(temporary, "rb") as handle:
                os.fsync(handle.fileno())
        for name, temporary in self._staged.items():
            os.replace(temporary, self.directory / name)
        self._staged.clear()

    def discard(self) -> None:
        """Delete every staged file that was not committed."""
        for temporary in self._staged.values():
            temporary.unlink(missing_ok=True)
        self._staged.clear()

    def __enter__(self) -> Staging:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.discard()
