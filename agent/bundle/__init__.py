"""Signed model bundles, the trust root and deployment orders (a shared contract: ``docs/bundle-format.md``).

The release tool writes bundles with it, the fleet server checks uploads and signs orders with it, and the agent
verifies both with it. Everything here is pure: bytes and the trusted time in, verified objects or a typed
:class:`BundleError` out. It imports only the standard library, ``cryptography`` and the other shared contracts,
and reads or writes nothing but the streams handed to it.

Device-side flow::

    root = TrustRoot.from_bytes(provisioned_root_json)          # then root = root.update(next_root) per rotation
    now = trusted_now(time.time(), persisted_trusted_time)
    order = verify_order(command.order, root, device_id=me, last_sequence=last, now=now)
    vb = verify_bundle(open(path, "rb"), root, now=now, profile=profile, sink=staging.open_file)
    check_order_matches(order, vb, downloaded_length=os.path.getsize(path))
    check_version(model=..., version=..., digest=vb.digest, hwm_version=..., hwm_digest=...,
                  allow_downgrade=order.allow_downgrade)
"""

from agent.bundle.canonical import canonical_json, strict_loads
from agent.bundle.container import (
    BLOCK_SIZE,
    MANIFEST_NAME,
    SIGNATURES_NAME,
    VerifiedBundle,
    add_signatures,
    read_manifest,
    verify_bundle,
    write_bundle,
)
from agent.bundle.errors import (
    BundleError,
    DigestError,
    ExpiredError,
    ExtraMemberError,
    FormatError,
    IncompatibleError,
    MemberError,
    MissingMemberError,
    OrderError,
    OrderMismatchError,
    ReplayedOrderError,
    RollbackError,
    SignatureError,
    SizeError,
    TrustRootError,
    WrongDeviceError,
)
from agent.bundle.keys import (
    KEYTYPE,
    MANIFEST_PREFIX,
    ORDER_PREFIX,
    ROOT_PREFIX,
    PublicKey,
    SigningKey,
    parse_signature_list,
)
from agent.bundle.manifest import (
    FILE_PATH_PATTERN,
    MANIFEST_FORMAT,
    MANIFEST_TYPE,
    MAX_FILES,
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURES_BYTES,
    PAYLOAD_PREFIX,
    RUNTIME_SUFFIXES,
    FileEntry,
    HealthSpec,
    Manifest,
    build_manifest,
)
from agent.bundle.orders import (
    MAX_ORDER_BYTES,
    ORDER_FORMAT,
    ORDER_TYPE,
    DeploymentOrder,
    check_order_matches,
    make_order_signed,
    verify_order,
)
from agent.bundle.rules import check_compatible, check_version, trusted_now
from agent.bundle.trust import (
    MAX_ROOT_BYTES,
    ROLE_NAMES,
    ROOT_FORMAT,
    ROOT_TYPE,
    Role,
    TrustRoot,
    make_root_signed,
    sign_document,
)

__all__ = [
    "BLOCK_SIZE",
    "FILE_PATH_PATTERN",
    "KEYTYPE",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "MANIFEST_PREFIX",
    "MANIFEST_TYPE",
    "MAX_FILES",
    "MAX_MANIFEST_BYTES",
    "MAX_ORDER_BYTES",
    "MAX_ROOT_BYTES",
    "MAX_SIGNATURES_BYTES",
    "ORDER_FORMAT",
    "ORDER_PREFIX",
    "ORDER_TYPE",
    "PAYLOAD_PREFIX",
    "ROLE_NAMES",
    "ROOT_FORMAT",
    "ROOT_PREFIX",
    "ROOT_TYPE",
    "RUNTIME_SUFFIXES",
    "SIGNATURES_NAME",
    "BundleError",
    "DeploymentOrder",
    "DigestError",
    "ExpiredError",
    "ExtraMemberError",
    "FileEntry",
    "FormatError",
    "HealthSpec",
    "IncompatibleError",
    "Manifest",
    "MemberError",
    "MissingMemberError",
    "OrderError",
    "OrderMismatchError",
    "PublicKey",
    "ReplayedOrderError",
    "Role",
    "RollbackError",
    "SignatureError",
    "SigningKey",
    "SizeError",
    "TrustRoot",
    "TrustRootError",
    "VerifiedBundle",
    "WrongDeviceError",
    "add_signatures",
    "build_manifest",
    "canonical_json",
    "check_compatible",
    "check_order_matches",
    "check_version",
    "make_order_signed",
    "make_root_signed",
    "parse_signature_list",
    "read_manifest",
    "sign_document",
    "strict_loads",
    "trusted_now",
    "verify_bundle",
    "verify_order",
    "write_bundle",
]
