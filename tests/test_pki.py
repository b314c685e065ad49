"""Deployment tooling: a CA, a SuperLink certificate, SuperNode keys; safe permissions, no silent overwrite."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedlora.cli import main
from fedlora.pki import KeyExistsError, create_ca, create_node_key, create_server_certificate


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_and_server_certificate_chain(tmp_path: Path) -> None:
    create_ca(tmp_path)
    create_server_certificate(tmp_path, ["localhost"], ["127.0.0.1"])
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert mode(tmp_path / "ca.key") == 0o600 and mode(tmp_path / "server.key") == 0o600


def test_node_key_is_openssh_ecdsa_with_private_mode(tmp_path: Path) -> None:
    public = create_node_key(tmp_path, "hospital-a")
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    key = serialization.load_ssh_private_key((tmp_path / "hospital-a").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert mode(tmp_path / "hospital-a") == 0o600 and mode(public) == 0o644


def test_existing_keys_are_never_overwritten_without_force(tmp_path: Path) -> None:
    create_node_key(tmp_path, "n")
    before = (tmp_path / "n").read_bytes()
    with pytest.raises(KeyExistsError, match="refusing to overwrite"):
        create_node_key(tmp_path, "n")
    create_ca(tmp_path)
    with pytest.raises(KeyExistsError):
        create_ca(tmp_path)
    assert (tmp_path / "n").read_bytes() == before
    create_node_key(tmp_path, "n", force=True)
    assert (tmp_path / "n").read_bytes() != before


def test_cli_reports_errors_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["pki", "server", "--dir", str(tmp_path), "--host", "localhost"]) == 2
    assert "no CA in" in capsys.readouterr().err
    assert main(["pki", "ca", "--dir", str(tmp_path)]) == 0
    assert main(["pki", "ca", "--dir", str(tmp_path)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(["pki", "server", "--dir", str(tmp_path)]) == 2  # neither host nor IP
