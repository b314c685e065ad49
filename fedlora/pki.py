"""Keys and certificates for a real deployment: TLS for the SuperLink, EC keys for SuperNode authentication.

* ``create_ca``: a self-signed certificate authority (``ca.crt``, ``ca.key``).
  SuperNodes and the ``flwr`` CLI trust it through ``--root-certificates``.
* ``create_server_certificate``: the SuperLink's certificate (``server.pem``,
  ``server.key``) signed by the CA, valid for the given host names and IPs.
* ``create_node_key``: a SuperNode's ECDSA P-384 key pair in OpenSSH format
  (``<name>`` and ``<name>.pub``), the format Flower's node authentication reads;
  the public half is registered with ``flwr supernode register``.

Private keys are written with mode 0600 and nothing existing is overwritten
unless ``force`` is set; a CA is not replaced while a server certificate it
signed is there (that certificate would stop verifying). Certificates carry
subject and authority key identifiers, which strict X.509 verification (Python
3.13's default) requires. Node names must be plain file names and host names
valid DNS names, so neither can write outside the folder nor forge a SAN entry.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


class KeyExistsError(FileExistsError):
    """A key or certificate is already there and ``force`` was not given."""


def check_node_name(name: str) -> str:
    """A node key's name: 1-64 letters, digits, ``.``, ``_``, ``-``, starting with a letter or digit (no paths)."""
    if not NODE_NAME.fullmatch(name):
        raise ValueError(f"node name {name!r} must be 1-64 letters, digits, '.', '_' or '-', starting with no symbol")
    return name


def check_host(host: str) -> str:
    """A DNS name for a certificate's SAN: dot-separated labels of letters, digits and inner hyphens, ≤ 253 chars."""
    if len(host) > 253 or not all(DNS_LABEL.fullmatch(label) for label in host.removesuffix(".").split(".")):
        raise ValueError(f"host name {host!r} is not a valid DNS name")
    return host


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None


def _write(path: Path, data: bytes, mode: int, force: bool) -> None:
    """Create ``path`` with ``mode`` from the start (no window with looser permissions)."""
    if path.exists() and not force:
        raise KeyExistsError(f"{path} exists; refusing to overwrite it (use --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def _check_free(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise KeyExistsError(f"{', '.join(existing)} exist(s); refusing to overwrite (use --force to replace)")


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _certificate(
    subject: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Name | None,
    signer: ec.EllipticCurvePrivateKey,
    days: int,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
    )
    identifiers = [
        (x509.SubjectKeyIdentifier.from_public_key(public_key), False),
        (x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), False),
    ]
    for extension, critical in [*extensions, *identifiers]:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signer, hashes.SHA256())


def create_ca(directory: Path, name: str = "fedlora CA", days: int = 3650, force: bool = False) -> Path:
    """Write ``ca.crt`` and ``ca.key`` (0600) to ``directory``; returns the certificate's path.

    Even with ``force``, a CA is not replaced while ``server.pem`` in the same
    folder is signed by it: every node would reject the SuperLink afterwards.
    """
    crt, key_path = directory / "ca.crt", directory / "ca.key"
    _check_free([crt, key_path], force)
    _check_no_dependent_server(directory)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = _certificate(
        name,
        key.public_key(),
        None,
        key,
        days,
        [
            (x509.BasicConstraints(ca=True, path_length=0), True),
            (
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                True,
            ),
        ],
    )
    _write(key_path, _pem_key(key), 0o600, force)
    _write(crt, cert.public_bytes(serialization.Encoding.PEM), 0o644, force)
    return crt


def _check_no_dependent_server(directory: Path) -> None:
    server, ca = directory / "server.pem", directory / "ca.crt"
    if not (server.exists() and ca.exists()):
        return
    try:
        x509.load_pem_x509_certificate(server.read_bytes()).verify_directly_issued_by(
            x509.load_pem_x509_certificate(ca.read_bytes())
        )
    except (ValueError, TypeError, InvalidSignature):
        return  # not signed by this CA: replacing the CA does not break it
    raise KeyExistsError(
        f"{server} is signed by the CA in {ca}; replacing the CA would invalidate it. Remove server.pem and "
        "server.key first, then create the CA and a new server certificate (`fedlora pki server`)"
    )


def create_server_certificate(
    directory: Path, hosts: list[str], ips: list[str], days: int = 825, force: bool = False
) -> Path:
    """Write the SuperLink's ``server.pem`` and ``server.key`` (0600), signed by ``directory``'s CA."""
    if not hosts and not ips:
        raise ValueError("a server certificate needs at least one host name or IP address")
    try:
        ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no CA in {directory}: create it first (`fedlora pki ca`)") from err
    pem, key_path = directory / "server.pem", directory / "server.key"
    _check_free([pem, key_path], force)
    names = [x509.DNSName(check_host(h)) for h in hosts] + [x509.IPAddress(_ip(ip)) for ip in ips]
    key = ec.generate_private_key(ec.SECP384R1())
    cert = _certificate(
        (hosts or ips)[0],
        key.public_key(),
        ca_cert.subject,
        ca_key,
        days,
        [
            (x509.SubjectAlternativeName(names), False),
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        ],
    )
    _write(key_path, _pem_key(key), 0o600, force)
    _write(pem, cert.public_bytes(serialization.Encoding.PEM), 0o644, force)
    return pem


def create_node_key(directory: Path, name: str, force: bool = False) -> Path:
    """Write a SuperNode's key pair ``<name>`` (0600) and ``<name>.pub`` in OpenSSH format; returns the public one."""
    private, public = directory / check_node_name(name), directory / f"{name}.pub"
    _check_free([private, public], force)
    key = ec.generate_private_key(ec.SECP384R1())
    private_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public_bytes = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(private, private_bytes, 0o600, force)
    _write(public, public_bytes + f" fedlora-{name}\n".encode(), 0o644, force)
    return public
