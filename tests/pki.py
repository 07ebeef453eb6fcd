"""Certificates for the TLS tests, made by the tests themselves (cryptography): a CA, a
server certificate for localhost / 127.0.0.1 and a client certificate it signed, and another
CA's client certificate."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    server: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(subject) if issuer is None else issuer[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    signer = key if issuer is None else issuer[1]
    return builder.sign(signer, hashes.SHA256())


@dataclass(frozen=True)
class Pki:
    """A CA, a server certificate and a client certificate it signed, and a rogue CA's
    client certificate, all as PEM files under ``root``."""

    root: Path

    def path(self, name: str) -> Path:
        return self.root / name


def write_pem(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.with_suffix(".key").write_bytes(pem)


def make_pki(root: Path, server_name: str = "server") -> Pki:
    root.mkdir(parents=True, exist_ok=True)
    ca_key, rogue_key = new_key(), new_key()
    ca = certificate("esans test CA", ca_key, None)
    rogue = certificate("another CA", rogue_key, None)
    write_pem(root / "ca", ca, None)
    write_pem(root / "rogue-ca", rogue, None)
    for name, issuer, server in (
        (server_name, (ca, ca_key), True),
        ("client", (ca, ca_key), False),
        ("rogue-client", (rogue, rogue_key), False),
    ):
        key = new_key()
        write_pem(root / name, certificate(name, key, issuer, server=server), key)
    return Pki(root)
