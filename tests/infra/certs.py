"""Throw-away X.509 material for the test servers: a CA, server certificates and signing keys.

Contract: every function returns ``cryptography`` objects or writes PEM files; nothing touches the network
and nothing is cached between calls. Certificates are valid from one hour ago for one day, which is plenty
for a test run and tolerates small clock differences between Python and the Go registry.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
KeyType = Literal["rsa", "ec"]


def generate_key(key_type: KeyType = "ec") -> PrivateKey:
    """A fresh private key: RSA 2048 or EC P-256."""
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _validity() -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    return now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1)


def make_self_signed(key: PrivateKey, common_name: str, *, ca: bool) -> x509.Certificate:
    """A self-signed certificate for ``key``; with ``ca=True`` it may sign other certificates."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before, not_after = _validity()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if ca:
        usage = x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=True,
            crl_sign=True,
            encipher_only=False,
            decipher_only=False,
        )
        builder = builder.add_extension(usage, critical=True)
    return builder.sign(key, hashes.SHA256())


def make_server_cert(
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    key: PrivateKey,
    *,
    ips: Sequence[str] = ("127.0.0.1", "::1"),
    dns_names: Sequence[str] = ("localhost",),
) -> x509.Certificate:
    """A TLS server certificate for ``key`` with the given IP and DNS SANs, signed by the CA."""
    sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    sans += [x509.DNSName(name) for name in dns_names]
    not_before, not_after = _validity()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0] if dns_names else ips[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    return builder.sign(ca_key, hashes.SHA256())


def write_cert(path: Path, *certs: x509.Certificate) -> Path:
    """Write one or more certificates as concatenated PEM; returns ``path``."""
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return path


def write_key(path: Path, key: PrivateKey) -> Path:
    """Write an unencrypted PKCS#8 PEM private key with mode 0600; returns ``path``."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.write_bytes(pem)
    path.chmod(0o600)
    return path


def libtrust_key_id(key: PrivateKey) -> str:
    """The docker/libtrust key ID of ``key``'s public half.

    libtrust (and so distribution 2.x, which looks ``kid`` up among the keys of its ``rootcertbundle``)
    defines it as base32 of the first 240 bits of sha256(DER SubjectPublicKeyInfo), 48 characters split
    into 12 groups of 4 joined by ':'.
    """
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode("ascii").rstrip("=")
    return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


def cert_der_b64(cert: x509.Certificate) -> str:
    """Standard (not URL-safe) base64 of the DER certificate, the form a JWS ``x5c`` header carries."""
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode("ascii")
