"""Throwaway certificates for the transport tests, made at test time.

Never committed: each run gets fresh keys in a temporary directory.
"""

from __future__ import annotations

import datetime
import ipaddress
import pathlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAME = "wafsvc.internal"


@dataclass
class Pki:
    ca: pathlib.Path
    server_cert: pathlib.Path
    server_key: pathlib.Path
    client_cert: pathlib.Path
    client_key: pathlib.Path
    rogue_ca: pathlib.Path           # an unrelated CA
    rogue_client_cert: pathlib.Path  # signed by the rogue CA
    rogue_client_key: pathlib.Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _cert(subject: str, key, issuer_name: x509.Name, issuer_key, *, ca: bool = False,
          sans: list | None = None, usage=None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: pathlib.Path, name: str, cert: x509.Certificate, key=None) -> tuple:
    cert_path = directory / f"{name}.crt"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is None:
        return cert_path, None
    key_path = directory / f"{name}.key"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def make_pki(directory: pathlib.Path) -> Pki:
    def key():
        return ec.generate_private_key(ec.SECP256R1())

    ca_key, rogue_key = key(), key()
    ca = _cert("modsec-spoa test CA", ca_key, _name("modsec-spoa test CA"), ca_key, ca=True)
    rogue = _cert("rogue CA", rogue_key, _name("rogue CA"), rogue_key, ca=True)
    server_key, client_key, rogue_client_key = key(), key(), key()
    server = _cert("wafsvc", server_key, ca.subject, ca_key, usage=ExtendedKeyUsageOID.SERVER_AUTH,
                   sans=[x509.DNSName(SERVER_NAME), x509.DNSName("localhost"),
                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = _cert("gateway", client_key, ca.subject, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue_client = _cert("gateway", rogue_client_key, rogue.subject, rogue_key,
                         usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    ca_path, _ = _write(directory, "ca", ca)
    rogue_path, _ = _write(directory, "rogue-ca", rogue)
    server_cert, server_key_path = _write(directory, "server", server, server_key)
    client_cert, client_key_path = _write(directory, "client", client, client_key)
    rogue_cert, rogue_key_path = _write(directory, "rogue-client", rogue_client, rogue_client_key)
    return Pki(ca_path, server_cert, server_key_path, client_cert, client_key_path,
               rogue_path, rogue_cert, rogue_key_path)
