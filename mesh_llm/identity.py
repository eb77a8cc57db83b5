"""Node identity and mesh secret: the Ed25519 node key, the mesh id and secret, TLS certificates.

Inputs are file paths (the node key, by default `~/.mesh-llm/key`, and the mesh file,
`~/.mesh-llm/mesh`); outputs are `NodeIdentity` and `MeshSecret` values, signatures, and a
self-signed X.509 certificate made from the node key for QUIC (TLS 1.3). The key file is an
unencrypted PEM PKCS#8 private key (`-----BEGIN PRIVATE KEY-----`, what
`openssl genpkey -algorithm ed25519` writes); the mesh file is JSON
`{"version": 1, "mesh_id": "<32 hex>", "secret": "<64 hex>"}`. Missing files are created
atomically with mode 0600 in a 0700 directory. A file that exists but cannot be read or parsed
raises `IdentityError` and is never replaced: replacing it would silently change the node id or
split the mesh. Imports no asyncio or network module.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.x509.oid import NameOID

from mesh_llm.core.types import NodeId
from mesh_llm.core.types import short_id as _short_id
from mesh_llm.errors import IdentityError

logger = logging.getLogger(__name__)

PUBLIC_KEY_BYTES = 32
MESH_FILE_VERSION = 1
MESH_ID_BYTES = 16
MESH_SECRET_BYTES = 32
CERT_VALIDITY = dt.timedelta(days=3650)
# Back-dated so that a peer whose clock is a little behind still accepts the certificate.
CERT_BACKDATE = dt.timedelta(days=1)
_MAX_FILE_BYTES = 64 * 1024
_HEX_DIGITS = frozenset("0123456789abcdef")


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """A node's Ed25519 key pair; the node id is the hex of the raw 32-byte public key."""

    private_key: Ed25519PrivateKey

    def __repr__(self) -> str:
        # Never show key material in logs or tracebacks.
        return f"NodeIdentity(node_id={self.short_id!r})"

    @classmethod
    def generate(cls) -> NodeIdentity:
        """A fresh random identity, in memory only."""
        return cls(Ed25519PrivateKey.generate())

    @property
    def public_key_bytes(self) -> bytes:
        """The raw 32-byte Ed25519 public key."""
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def node_id(self) -> NodeId:
        """64 lowercase hex characters of the public key."""
        return NodeId(self.public_key_bytes.hex())

    @property
    def short_id(self) -> str:
        return _short_id(self.node_id)

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of `data`."""
        return self.private_key.sign(data)

    def private_key_pem(self) -> bytes:
        """The private key as unencrypted PEM PKCS#8: the key file format."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


@dataclass(frozen=True, slots=True)
class MeshSecret:
    """A mesh: its public id (32 hex chars) and the 32-byte secret that admits nodes to it."""

    mesh_id: str
    secret: bytes = field(repr=False)


def is_node_id(text: str) -> bool:
    """True if `text` is a well-formed node id: 64 lowercase hex characters."""
    return _is_lower_hex(text, 2 * PUBLIC_KEY_BYTES)


def verify_signature(node_id: NodeId, data: bytes, signature: bytes) -> bool:
    """True if `signature` is the Ed25519 signature of `data` by the key of `node_id`.

    A malformed node id or signature gives False, never an exception.
    """
    if not is_node_id(node_id):
        return False
    try:
        public_key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(node_id))
        public_key.verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def load_or_create_identity(key_path: Path, *, ephemeral: bool) -> NodeIdentity:
    """The node identity stored at `key_path`, created there if missing.

    `ephemeral` gives a fresh in-memory key and touches no file. Raises `IdentityError` if the
    file exists but cannot be read or is not an Ed25519 PEM PKCS#8 private key, or if it cannot
    be created. A file readable by group or others only logs a warning.
    """
    if ephemeral:
        identity = NodeIdentity.generate()
        logger.info("using an ephemeral node key: node id %s", identity.short_id)
        return identity
    data = _read_private_file(key_path, "node key")
    if data is None:
        identity = NodeIdentity.generate()
        if _create_private_file(key_path, identity.private_key_pem(), "node key"):
            logger.info("created node key %s: node id %s", key_path, identity.short_id)
            return identity
        # Another process created the file first: use its key so that both agree.
        data = _read_existing(key_path, "node key")
    return _parse_identity(key_path, data)


def new_mesh() -> MeshSecret:
    """A fresh random mesh id and secret, in memory only."""
    return MeshSecret(secrets.token_hex(MESH_ID_BYTES), secrets.token_bytes(MESH_SECRET_BYTES))


def load_or_create_mesh(path: Path) -> MeshSecret:
    """The mesh stored at `path`, created there (with a new random id and secret) if missing.

    Raises `IdentityError` if the file exists but cannot be read or parsed, or cannot be created.
    """
    data = _read_private_file(path, "mesh file")
    if data is None:
        mesh = new_mesh()
        if _create_private_file(path, _mesh_to_json(mesh), "mesh file"):
            logger.info("created mesh %s in %s", mesh.mesh_id, path)
            return mesh
        data = _read_existing(path, "mesh file")
    return _parse_mesh(path, data)


def make_self_signed_certificate(
    identity: NodeIdentity, *, now: dt.datetime | None = None
) -> tuple[bytes, bytes]:
    """A self-signed X.509 certificate for the node key, and the key: `(cert PEM, key PEM)`.

    The subject CN (and a DNS subject alternative name) is the short node id; the certificate
    is valid from one day before `now` (default: the wall clock, UTC) for about ten years.
    Peers authenticate by the key in it (`node_id_from_certificate`), not by a CA.
    """
    start = (now or dt.datetime.now(dt.UTC)) - CERT_BACKDATE
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.short_id)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(identity.private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + CERT_VALIDITY)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(identity.short_id)]), critical=False
        )
        .sign(identity.private_key, algorithm=None)  # Ed25519 signs without a separate hash
    )
    return certificate.public_bytes(serialization.Encoding.PEM), identity.private_key_pem()


def node_id_from_certificate(certificate: bytes | x509.Certificate) -> NodeId:
    """The node id of the Ed25519 key in `certificate` (a parsed certificate, DER or PEM).

    Raises `IdentityError` if the certificate cannot be parsed or its key is not Ed25519.
    """
    try:
        if isinstance(certificate, bytes):
            if certificate.lstrip().startswith(b"-----BEGIN"):
                certificate = x509.load_pem_x509_certificate(certificate)
            else:
                certificate = x509.load_der_x509_certificate(certificate)
        public_key = certificate.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise IdentityError(f"peer certificate cannot be parsed: {exc}") from exc
    if not isinstance(public_key, Ed25519PublicKey):
        raise IdentityError(
            "peer certificate does not carry an Ed25519 key: the peer is not a mesh-llm node"
        )
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return NodeId(raw.hex())


def _is_lower_hex(text: str, length: int) -> bool:
    return len(text) == length and _HEX_DIGITS.issuperset(text)


def _parse_identity(path: Path, data: bytes) -> NodeIdentity:
    advice = (
        "restore it from a backup, or move it away to create a new node key "
        "(this changes the node id)"
    )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:  # raised for a password-protected key
        raise IdentityError(f"node key {path} is encrypted; {advice}") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise IdentityError(
            f"node key {path} is corrupt or not a PEM PKCS#8 private key; {advice}"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(
            f"node key {path} holds a {type(key).__name__}, not an Ed25519 key; {advice}"
        )
    return NodeIdentity(key)


def _mesh_to_json(mesh: MeshSecret) -> bytes:
    document = {"version": MESH_FILE_VERSION, "mesh_id": mesh.mesh_id, "secret": mesh.secret.hex()}
    return (json.dumps(document, indent=2) + "\n").encode("utf-8")


def _parse_mesh(path: Path, data: bytes) -> MeshSecret:
    advice = (
        "restore it from a backup, or move it away to start a new mesh "
        "(invite tokens of the old mesh stop working)"
    )
    try:
        document = json.loads(data.decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise IdentityError(f"mesh file {path} is not valid JSON; {advice}") from exc
    if not isinstance(document, dict):
        raise IdentityError(f"mesh file {path} is not a JSON object; {advice}")
    version = document.get("version")
    if version != MESH_FILE_VERSION or isinstance(version, bool):
        raise IdentityError(
            f"mesh file {path} has version {version!r}, this mesh-llm reads version "
            f"{MESH_FILE_VERSION}; upgrade mesh-llm or {advice}"
        )
    mesh_id, secret = document.get("mesh_id"), document.get("secret")
    if not isinstance(mesh_id, str) or not _is_lower_hex(mesh_id, 2 * MESH_ID_BYTES):
        raise IdentityError(f"mesh file {path} has no valid mesh_id (32 hex chars); {advice}")
    if not isinstance(secret, str) or not _is_lower_hex(secret, 2 * MESH_SECRET_BYTES):
        raise IdentityError(f"mesh file {path} has no valid secret (64 hex chars); {advice}")
    return MeshSecret(mesh_id, bytes.fromhex(secret))


def _read_private_file(path: Path, what: str) -> bytes | None:
    """The bytes of `path`, or None if it does not exist; warns if others can read it."""
    try:
        with path.open("rb") as file:
            status = os.fstat(file.fileno())
            data = file.read(_MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise IdentityError(
            f"cannot read {what} {path}: {exc.strerror or exc}; "
            f"check that it is a file you own and readable (chmod 600 {path})"
        ) from exc
    if not stat.S_ISREG(status.st_mode):
        raise IdentityError(f"{what} {path} is not a regular file; move it away")
    if len(data) > _MAX_FILE_BYTES:
        raise IdentityError(f"{what} {path} is too large to be a {what}; move it away")
    if os.name == "posix" and status.st_mode & 0o077:
        logger.warning(
            "%s %s is accessible by group or others (mode %03o); run: chmod 600 %s",
            what,
            path,
            stat.S_IMODE(status.st_mode),
            path,
        )
    return data


def _read_existing(path: Path, what: str) -> bytes:
    data = _read_private_file(path, what)
    if data is None:
        raise IdentityError(f"{what} {path} vanished while it was being created; try again")
    return data


def _create_private_file(path: Path, data: bytes, what: str) -> bool:
    """Create `path` with `data`, mode 0600, atomically and without replacing a file.

    Returns False if another process created `path` first. Raises `IdentityError`.
    """
    parent = path.parent
    temporary = parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        if not parent.exists():
            parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            parent.chmod(0o700)  # mkdir's mode is masked by the umask
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "wb") as file:
                os.fchmod(file.fileno(), 0o600)  # the umask may have removed bits we want
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            created = _publish(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        if created:
            _fsync_directory(parent)
    except OSError as exc:
        raise IdentityError(
            f"cannot create {what} {path}: {exc.strerror or exc}; check that {parent} is writable"
        ) from exc
    return created


def _publish(temporary: Path, path: Path) -> bool:
    # A hard link, unlike a rename, fails instead of replacing a file created meanwhile.
    try:
        os.link(temporary, path)
    except FileExistsError:
        return False
    except OSError:
        # Some file systems have no hard links; fall back to a rename.
        if path.exists():
            return False
        os.replace(temporary, path)
    return True


def _fsync_directory(directory: Path) -> None:
    if os.name != "posix":
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
