"""The serving pointer: an immutable `ModelStore` snapshot, swapped whole under a lock.

Request handlers read one reference (`current()`, or the delegating methods) and keep the entry
they got: a request admitted on one version carries that version's `ServedModel` into the
engine and finishes on it even after a swap. The replaced version is freed when its last
request lets go of it (nothing else holds a reference).
"""

from __future__ import annotations

import threading

from server.store import ModelEntry, ModelStore


class LiveStore:
    """The served models, replaced one model at a time without pausing readers."""

    def __init__(self, store: ModelStore) -> None:
        self._store = store
        self._lock = threading.Lock()

    def current(self) -> ModelStore:
        """The snapshot serving right now (immutable)."""
        return self._store

    def replace(self, entry: ModelEntry) -> ModelStore:
        """Serve `entry` in place of its model's current entry (or add it); the new snapshot."""
        with self._lock:
            self._store = self._store.with_entry(entry)
            return self._store

    def get(self, name: str, version: int = 0) -> ModelEntry:
        """The served model `name` in the current snapshot (see `ModelStore.get`)."""
        return self._store.get(name, version)

    def entries(self) -> tuple[ModelEntry, ...]:
        """Every served model of the current snapshot, sorted by name."""
        return self._store.entries()

    def names(self) -> tuple[str, ...]:
        """The served models' names, sorted."""
        return self._store.names()

    def find(self, name: str) -> ModelEntry | None:
        """The served entry of `name`, or None when it is not served."""
        store = self._store
        return store.get(name) if name in store.names() else None

    def __len__(self) -> int:
        return len(self._store)
