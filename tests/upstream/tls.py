"""TLS for the test servers: a CA made here, and a certificate for 127.0.0.1 that it
signed (what --ca-file, SSL_CERT_FILE or a trust store is then given)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Certificates:
    ca: str  # the CA's certificate (what --ca-file takes)
    cert: str  # the server's, for 127.0.0.1, signed by the CA
    key: str


def certificate(subject: str, key, issuer_name, issuer_key, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer_name or x509.Name(
                   [x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        # localhost too: libgit2 (1.9) accepts no certificate for an IP address
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def write_pem(path: str, cert: x509.Certificate) -> str:
    with open(path, "wb") as fh:
        fh.write(cert.public_bytes(serialization.Encoding.PEM))
    return path


def make_certificates(folder: str) -> Certificates:
    """A CA, and a certificate for 127.0.0.1 that it signed."""
    os.makedirs(folder, exist_ok=True)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca = certificate("mirror test CA", ca_key, None, None, ca=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = certificate("127.0.0.1", key, ca.subject, ca_key, ca=False)
    key_path = os.path.join(folder, "server.key")
    with open(key_path, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.TraditionalOpenSSL,
                                   serialization.NoEncryption()))
    return Certificates(write_pem(os.path.join(folder, "ca.pem"), ca),
                        write_pem(os.path.join(folder, "server.pem"), cert), key_path)


def server_context(certificates: Certificates) -> ssl.SSLContext:
    """What a loopback server wraps its socket in to speak HTTPS."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates.cert, certificates.key)
    return context
