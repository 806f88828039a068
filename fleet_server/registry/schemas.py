"""API schemas of the registry (devices, cohorts, versions), split by direction: ``XCreate``/``XUpdate`` are
what a client sends (unknown fields refused), ``XPublic`` what the API returns. Times are ISO 8601 UTC."""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Annotated, Any, Final

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from agent.profiles import PROFILE_NAME_PATTERN, builtin_profiles_dir, load_profiles
from agent.protocol import IDENTIFIER_PATTERN
from fleet_server.registry.labels import LABEL_KEY_PATTERN, LABEL_VALUE_PATTERN, MAX_LABELS, MAX_SELECTOR_KEYS

__all__ = [
    "MAX_BULK_MEMBERS",
    "MAX_HARDWARE_BYTES",
    "MAX_HARDWARE_KEYS",
    "BehindDevicePublic",
    "CohortCreate",
    "CohortDevicePublic",
    "CohortDevicesPublic",
    "CohortListPublic",
    "CohortMembershipPublic",
    "CohortPublic",
    "CohortUpdate",
    "DeploymentEventPublic",
    "DeviceCreate",
    "DeviceDetailPublic",
    "DeviceHistoryPublic",
    "DeviceListPublic",
    "DeviceModelPublic",
    "DeviceSummaryPublic",
    "DeviceUpdate",
    "LabelChanges",
    "MembersAdd",
    "MembersAddedPublic",
    "ModelVersionPublic",
    "RolloutEntryPublic",
    "VersionBehindPublic",
    "VersionChangeItem",
    "VersionChangeListPublic",
    "VersionCountPublic",
    "VersionDistributionPublic",
    "builtin_profile_names",
    "check_hardware",
]

MAX_HARDWARE_BYTES: Final = 16384
"""Largest ``hardware`` map, as compact JSON."""
MAX_HARDWARE_KEYS: Final = 64
MAX_BULK_MEMBERS: Final = 10_000
"""Most device ids in one ``PUT /cohorts/{name}/members``."""

DeviceId = Annotated[str, StringConstraints(pattern=f"^{IDENTIFIER_PATTERN}$")]
LabelKey = Annotated[str, StringConstraints(pattern=LABEL_KEY_PATTERN)]
LabelValue = Annotated[str, StringConstraints(pattern=LABEL_VALUE_PATTERN)]


@functools.cache
def builtin_profile_names() -> frozenset[str]:
    """Names of the firmware profiles shipped with the agent (read once, on first use)."""
    return frozenset(load_profiles(builtin_profiles_dir()))


def _profile_enum(schema: dict[str, Any]) -> None:
    """List the built-in profiles in the OpenAPI schema (evaluated when the schema is generated, not at import)."""
    schema["enum"] = sorted(builtin_profile_names())


ProfileName = Annotated[str, StringConstraints(pattern=f"^{PROFILE_NAME_PATTERN}$", max_length=64),
                        Field(json_schema_extra=_profile_enum)]
"""A built-in firmware profile name (``agent.profiles``)."""
_EXACT_KEYS: Final = {"additionalProperties": False}  # keys must match the pattern: say so in the schema
Labels = Annotated[dict[LabelKey, LabelValue], Field(max_length=MAX_LABELS, json_schema_extra=_EXACT_KEYS)]
Selector = Annotated[dict[LabelKey, LabelValue], Field(max_length=MAX_SELECTOR_KEYS, json_schema_extra=_EXACT_KEYS)]
Hardware = Annotated[dict[str, Any], Field(max_length=MAX_HARDWARE_KEYS)]
Text = Annotated[str, StringConstraints(max_length=1024, pattern=r"^[^\x00]*$")]


def check_hardware(value: dict[str, Any]) -> dict[str, Any]:
    """Plain JSON data of at most 16 KiB (compact), finite numbers only."""
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    except ValueError:
        raise ValueError("numbers must be finite") from None
    if len(text) > MAX_HARDWARE_BYTES:
        raise ValueError(f"larger than {MAX_HARDWARE_BYTES} bytes as JSON")
    return value


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeviceCreate(_In):
    """``POST /api/v1/devices``: pre-register a device."""

    id: DeviceId
    """The device id (wire identifier rule: ``[a-z0-9][a-z0-9._-]{0,63}``), as in its MQTT topics."""
    firmware_profile: ProfileName | None = None
    """One of the built-in firmware profiles (``agent.profiles``)."""
    hardware: Hardware = Field(default_factory=dict)
    labels: Labels = Field(default_factory=dict)

    @field_validator("hardware")
    @classmethod
    def check_hw(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_hardware(value)


class LabelChanges(_In):
    """``remove`` is applied first, then ``set``."""

    set: Labels = Field(default_factory=dict)
    """Labels to add or overwrite."""
    remove: Annotated[list[LabelKey], Field(max_length=MAX_LABELS)] = Field(default_factory=list)
    """Label keys to remove (absent keys are ignored)."""


class DeviceUpdate(_In):
    """``PATCH /api/v1/devices/{id}``: only the fields present change (``firmware_profile: null`` clears it)."""

    labels: LabelChanges | None = None
    firmware_profile: ProfileName | None = None
    hardware: Hardware | None = None
    """Replaces the whole hardware map (null clears it, like ``{}``)."""

    @field_validator("hardware")
    @classmethod
    def check_hw(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if value is None else check_hardware(value)


class ModelVersionPublic(BaseModel):
    model: str
    version: int


class DeviceModelPublic(BaseModel):
    """One model on a device: the version active now and the one before (``device_models``), plus the slot
    and health flag from the latest status."""

    model: str
    version: int
    previous_version: int | None
    healthy: bool | None
    changed_at: datetime
    slot: str | None = None


class _DeviceCommon(BaseModel):
    id: str
    state: str
    """``online``, ``offline``, ``stale``, ``never`` or ``revoked`` (docs/registry.md)."""
    last_status: str | None
    """``online``/``offline`` from the retained status topic and the last will (null: none or cleared)."""
    last_seen_at: datetime | None
    stale_since: datetime | None
    heartbeat_at: datetime | None
    first_seen_at: datetime | None
    registered_at: datetime | None
    revoked_at: datetime | None
    firmware_profile: str | None
    agent_version: str | None
    schema_version: str | None
    """Wire schema version (``major.minor``) of the device's latest message; older minors keep working."""
    labels: dict[str, str]


class DeviceSummaryPublic(_DeviceCommon):
    models: list[ModelVersionPublic]


class DeviceListPublic(BaseModel):
    items: list[DeviceSummaryPublic]
    next: str | None


class CohortMembershipPublic(BaseModel):
    name: str
    why: list[str]
    """``explicit`` (added by name) and/or ``selector`` (labels match)."""


class RolloutEntryPublic(BaseModel):
    """The device's row in one rollout."""

    rollout_id: str
    name: str
    model: str
    version: int
    rollout_status: str
    step: str
    since: datetime | None
    reason: str | None
    command_id: str | None
    ordered_at: datetime | None
    attempts: int
    rollback: bool


class DeploymentEventPublic(BaseModel):
    id: int
    seq: int
    kind: str
    at: datetime
    """Device clock."""
    command_id: str | None
    model: str | None
    version: int | None
    reason: str | None
    detail: dict[str, Any]
    received_at: datetime


class VersionChangeItem(BaseModel):
    id: int
    device_id: str
    model: str
    from_version: int | None
    to_version: int
    at: datetime
    rollout_id: str | None
    command_id: str | None


class DeviceHistoryPublic(BaseModel):
    """Newest first, at most ``history_limit`` of each (the full lists: ``/api/v1/version-changes?device=``)."""

    rollouts: list[RolloutEntryPublic]
    version_changes: list[VersionChangeItem]
    events: list[DeploymentEventPublic]


class DeviceDetailPublic(_DeviceCommon):
    last_status_at: datetime | None
    uptime_s: float | None
    hardware: dict[str, Any]
    registered_by: str | None
    cohorts: list[CohortMembershipPublic]
    models: list[DeviceModelPublic]
    history: DeviceHistoryPublic


class CohortCreate(_In):
    """``POST /api/v1/cohorts``."""

    name: Annotated[str, StringConstraints(pattern=f"^{IDENTIFIER_PATTERN}$")]
    description: Text = ""
    selector: Selector = Field(default_factory=dict)
    """``{label key: value}``: devices carrying every pair are members; ``{}``: explicit members only."""


class CohortUpdate(_In):
    """``PATCH /api/v1/cohorts/{name}``: only the fields present change."""

    description: Text = ""
    selector: Selector = Field(default_factory=dict)


class CohortPublic(BaseModel):
    name: str
    description: str
    selector: dict[str, str]
    created_at: datetime
    created_by: str
    updated_at: datetime
    explicit_members: int
    size: int | None = None
    """Devices the cohort resolves to now (not revoked); only on ``GET /cohorts/{name}``."""


class CohortListPublic(BaseModel):
    items: list[CohortPublic]
    next: str | None


class MembersAdd(_In):
    device_ids: Annotated[list[DeviceId], Field(min_length=1, max_length=MAX_BULK_MEMBERS)]


class MembersAddedPublic(BaseModel):
    cohort: str
    added: int
    already: int


class CohortDevicePublic(BaseModel):
    device_id: str
    why: list[str]


class CohortDevicesPublic(BaseModel):
    items: list[CohortDevicePublic]
    next: str | None


class VersionCountPublic(BaseModel):
    model: str
    version: int
    devices: int


class VersionDistributionPublic(BaseModel):
    model: str | None
    cohort: str | None
    items: list[VersionCountPublic]


class BehindDevicePublic(BaseModel):
    device_id: str
    version: int | None
    """null: the device does not serve the model (listed with ``include_missing``)."""
    previous_version: int | None
    healthy: bool | None
    changed_at: datetime | None


class VersionBehindPublic(BaseModel):
    model: str
    latest: int | None
    latest_source: str | None
    """``param``, ``bundles`` (highest uploaded bundle), ``seen`` (highest on any device) or null (unknown)."""
    cohort: str | None
    items: list[BehindDevicePublic]
    next: str | None


class VersionChangeListPublic(BaseModel):
    items: list[VersionChangeItem]
    next: str | None
