"""The on-device state directory layout (a shared contract: paths only, no I/O).

Everything the agent must keep across restarts and power loss lives under one directory
(``/var/lib/edge-agent`` by default; systemd's ``StateDirectory=``)::

    <root>/
      models/<model>/slots/<slot>/   one verified bundle per slot (A/B by default; N allowed)
      models/<model>/active          pointer: the name of the active slot (switched atomically)
      models/<model>/hwm             persisted version high-water mark for the model (rollback protection)
      downloads/                     partial bundle downloads (resumable; never trusted until verified)
      outbox/outbox.sqlite           store-and-forward queue of telemetry (SQLite, WAL)
      keys/                          device key and certificate, trust root (mode 0700)
      trusted_time                   the latest trusted time seen (signed order or trust root)

Slot and model names are validated here so a name can never become a path outside the root.
``docs/state-directory.md`` documents the same layout for operators.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from agent.model.identity import validate_model_name

__all__ = ["DEFAULT_SLOTS", "LAYOUT_VERSION", "StateLayout", "validate_slot_name"]

LAYOUT_VERSION = 1
DEFAULT_SLOTS: tuple[str, ...] = ("a", "b")
_SLOT = re.compile(r"[a-z][a-z0-9]{0,15}")


def validate_slot_name(name: str) -> str:
    """Slots are short lower-case names (``a``, ``b``, ``s3``); anything else is refused."""
    if _SLOT.fullmatch(name) is None:
        raise ValueError(f"invalid slot name {name!r}: 1-16 characters a-z 0-9, starting with a letter")
    return name


@dataclass(frozen=True, slots=True)
class StateLayout:
    """Paths inside the state directory. Pure: creating directories is the caller's job."""

    root: Path

    @property
    def models(self) -> Path:
        return self.root / "models"

    def model_dir(self, model: str) -> Path:
        return self.models / validate_model_name(model)

    def slots_dir(self, model: str) -> Path:
        return self.model_dir(model) / "slots"

    def slot(self, model: str, slot: str) -> Path:
        return self.slots_dir(model) / validate_slot_name(slot)

    def active_pointer(self, model: str) -> Path:
        return self.model_dir(model) / "active"

    def high_water_mark(self, model: str) -> Path:
        return self.model_dir(model) / "hwm"

    @property
    def staging(self) -> Path:
        """Where a bundle's files are written while it is verified, before they become a slot (same filesystem,
        so the move is a rename). One install at a time."""
        return self.root / "staging"

    def install_journal(self, model: str) -> Path:
        """The in-progress install of a model (step, slots, command); lets a restarted agent finish or roll back."""
        return self.model_dir(model) / "install.json"

    @property
    def trust_root(self) -> Path:
        """The current trust root (rotated in place, atomically)."""
        return self.keys / "root.json"

    @property
    def orders_dir(self) -> Path:
        return self.root / "orders"

    @property
    def order_sequence(self) -> Path:
        """The highest deployment-order sequence accepted (replay protection)."""
        return self.orders_dir / "sequence"

    @property
    def applied_commands(self) -> Path:
        """Command ids already applied and their outcome (a resent command is answered, not re-run)."""
        return self.orders_dir / "applied"

    @property
    def downloads(self) -> Path:
        return self.root / "downloads"

    @property
    def outbox_dir(self) -> Path:
        return self.root / "outbox"

    @property
    def outbox_db(self) -> Path:
        return self.outbox_dir / "outbox.sqlite"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def trusted_time(self) -> Path:
        return self.root / "trusted_time"

    @property
    def layout_marker(self) -> Path:
        """Holds ``LAYOUT_VERSION`` so a later agent can migrate an older layout."""
        return self.root / "layout"
