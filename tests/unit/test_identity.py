"""Node key and mesh secret persistence, signatures and certificates."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mesh_llm.core.types import NodeId
from mesh_llm.errors import IdentityError
from mesh_llm.identity import (
    MeshSecret,
    NodeIdentity,
    is_node_id,
    load_or_create_identity,
    load_or_create_mesh,
    make_self_signed_certificate,
    new_mesh,
    node_id_from_certificate,
    verify_signature,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_creates_key_with_private_modes_and_reloads_same_id(tmp_path: Path) -> None:
    key_path = tmp_path / "home" / "key"
    first = load_or_create_identity(key_path, ephemeral=False)
    assert _mode(key_path) == 0o600
    assert _mode(key_path.parent) == 0o700
    assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert [p.name for p in key_path.parent.iterdir()] == ["key"]  # no temp file left
    second = load_or_create_identity(key_path, ephemeral=False)
    assert second.node_id == first.node_id
    assert is_node_id(first.node_id)
    assert first.short_id == first.node_id[:10]
    assert first.public_key_bytes == bytes.fromhex(first.node_id)


def test_ephemeral_writes_nothing(tmp_path: Path) -> None:
    key_path = tmp_path / "home" / "key"
    one = load_or_create_identity(key_path, ephemeral=True)
    two = load_or_create_identity(key_path, ephemeral=True)
    assert one.node_id != two.node_id
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage\n",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        NodeIdentity.generate().private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"password"),
        ),
    ],
    ids=["empty", "garbage", "bad-pem", "wrong-key-type", "encrypted"],
)
def test_bad_key_file_raises_and_is_left_untouched(tmp_path: Path, content: bytes) -> None:
    key_path = tmp_path / "key"
    key_path.write_bytes(content)
    key_path.chmod(0o600)
    with pytest.raises(IdentityError, match=str(key_path)):
        load_or_create_identity(key_path, ephemeral=False)
    assert key_path.read_bytes() == content
    assert [p.name for p in tmp_path.iterdir()] == ["key"]


def test_unreadable_key_path_raises(tmp_path: Path) -> None:
    key_path = tmp_path / "key"
    key_path.mkdir()  # a directory where the key should be
    with pytest.raises(IdentityError, match=str(key_path)):
        load_or_create_identity(key_path, ephemeral=False)
    assert key_path.is_dir()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs POSIX, non-root")
def test_key_file_without_read_permission_raises(tmp_path: Path) -> None:
    key_path = tmp_path / "key"
    load_or_create_identity(key_path, ephemeral=False)
    key_path.chmod(0o000)
    try:
        with pytest.raises(IdentityError, match="cannot read node key"):
            load_or_create_identity(key_path, ephemeral=False)
    finally:
        key_path.chmod(0o600)


def test_too_permissive_key_warns_but_loads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key_path = tmp_path / "key"
    created = load_or_create_identity(key_path, ephemeral=False)
    key_path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="mesh_llm.identity"):
        loaded = load_or_create_identity(key_path, ephemeral=False)
    assert loaded.node_id == created.node_id
    assert "chmod 600" in caplog.text
    assert _mode(key_path) == 0o644  # warned, not changed behind the user's back


def test_uncreatable_key_raises(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(IdentityError, match="cannot"):
        load_or_create_identity(blocker / "key", ephemeral=False)


def test_signature_verifies_only_for_signer_and_data() -> None:
    alice, bob = NodeIdentity.generate(), NodeIdentity.generate()
    signature = alice.sign(b"transcript")
    assert verify_signature(alice.node_id, b"transcript", signature)
    assert not verify_signature(alice.node_id, b"transcript!", signature)
    assert not verify_signature(bob.node_id, b"transcript", signature)
    assert not verify_signature(alice.node_id, b"transcript", signature[:-1])
    assert not verify_signature(NodeId("zz" * 32), b"transcript", signature)
    assert not verify_signature(NodeId(alice.node_id[:-2]), b"transcript", signature)


def test_repr_hides_key_material() -> None:
    identity = NodeIdentity.generate()
    assert identity.short_id in repr(identity)
    mesh = new_mesh()
    assert mesh.secret.hex() not in repr(mesh)


def test_certificate_round_trips_to_node_id() -> None:
    identity = NodeIdentity.generate()
    now = dt.datetime(2030, 1, 2, tzinfo=dt.UTC)
    cert_pem, key_pem = make_self_signed_certificate(identity, now=now)
    certificate = x509.load_pem_x509_certificate(cert_pem)
    assert node_id_from_certificate(cert_pem) == identity.node_id
    assert node_id_from_certificate(certificate) == identity.node_id
    der = certificate.public_bytes(serialization.Encoding.DER)
    assert node_id_from_certificate(der) == identity.node_id
    common_name = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    assert common_name[0].value == identity.short_id
    assert certificate.not_valid_before_utc == now - dt.timedelta(days=1)
    assert certificate.not_valid_after_utc - certificate.not_valid_before_utc >= dt.timedelta(
        days=3650
    )
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert key.public_key() == identity.private_key.public_key()


def test_node_id_from_bad_certificate_raises() -> None:
    with pytest.raises(IdentityError):
        node_id_from_certificate(b"not a certificate")


def test_node_id_from_non_ed25519_certificate_raises() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "other")])
    start = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(IdentityError, match="Ed25519"):
        node_id_from_certificate(certificate)


def test_mesh_is_created_then_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "home" / "mesh"
    first = load_or_create_mesh(path)
    assert _mode(path) == 0o600
    assert len(first.mesh_id) == 32
    assert len(first.secret) == 32
    assert load_or_create_mesh(path) == first
    assert json.loads(path.read_text())["mesh_id"] == first.mesh_id


def test_new_mesh_is_random_and_in_memory() -> None:
    one, two = new_mesh(), new_mesh()
    assert isinstance(one, MeshSecret)
    assert one.mesh_id != two.mesh_id
    assert one.secret != two.secret


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\xff\xfe",
        b"[]",
        b'{"version": 2, "mesh_id": "' + b"a" * 32 + b'", "secret": "' + b"b" * 64 + b'"}',
        b'{"version": true, "mesh_id": "' + b"a" * 32 + b'", "secret": "' + b"b" * 64 + b'"}',
        b'{"version": 1, "mesh_id": "short", "secret": "' + b"b" * 64 + b'"}',
        b'{"version": 1, "mesh_id": "' + b"a" * 32 + b'", "secret": "bb"}',
        b'{"version": 1, "mesh_id": "' + b"a" * 32 + b'", "secret": 5}',
    ],
)
def test_corrupt_mesh_file_raises_and_is_left_untouched(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "mesh"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(IdentityError, match=str(path)):
        load_or_create_mesh(path)
    assert path.read_bytes() == content


def test_creation_never_replaces_a_file_that_appeared_meanwhile(tmp_path: Path) -> None:
    from mesh_llm.identity import _create_private_file

    path = tmp_path / "key"
    path.write_bytes(b"someone else's key")
    assert not _create_private_file(path, b"ours", "node key")
    assert path.read_bytes() == b"someone else's key"
    assert [p.name for p in tmp_path.iterdir()] == ["key"]
