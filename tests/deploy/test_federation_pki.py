"""init-pki: a CA, a server certificate for the dialled names, one Flower-loadable key per hospital."""

from __future__ import annotations

import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key

from server.ops.federation_pki import PkiError, init_pki, main


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_keys_are_owner_only_and_public_files_are_readable(tmp_path: Path) -> None:
    pki = init_pki(tmp_path, hospitals=["north"])

    assert _mode(pki.ca_key) == 0o600
    assert _mode(pki.server_key) == 0o600
    assert _mode(pki.hospital_private_key("north")) == 0o600
    assert _mode(pki.ca_cert) == 0o644
    assert _mode(pki.hospital_public_key("north")) == 0o644


def test_server_certificate_names_the_dialled_hosts_and_loopback(tmp_path: Path) -> None:
    pki = init_pki(tmp_path, hosts=["coordinator.example"], ips=["10.1.2.3"])

    cert = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"coordinator.example", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("127.0.0.1"),
    }


def test_server_certificate_chains_to_the_federation_ca(tmp_path: Path) -> None:
    pki = init_pki(tmp_path)
    context = ssl.create_default_context(cafile=str(pki.ca_cert))

    context.load_cert_chain(str(pki.server_cert), str(pki.server_key))  # key matches certificate

    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)


def test_hospital_keys_load_with_flowers_own_loaders(tmp_path: Path) -> None:
    pki = init_pki(tmp_path, hospitals=["north"])

    private = load_ssh_private_key(pki.hospital_private_key("north").read_bytes(), None)
    public_bytes = try_load_public_key(pki.hospital_public_key("north"))

    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert public_bytes  # flwr supernode register accepts it (NIST EC curve, OpenSSH format)


def test_rerunning_never_overwrites_an_existing_key(tmp_path: Path) -> None:
    first = init_pki(tmp_path, hospitals=["north"])
    keys = [first.ca_key, first.server_key, first.hospital_private_key("north")]
    before = {path: path.read_bytes() for path in keys}

    second = init_pki(tmp_path, hospitals=["north", "south"])

    assert {path: path.read_bytes() for path in keys} == before
    assert second.hospital_private_key("south").exists()
    assert [p.stem for p in second.hospital_public_keys()] == ["north", "south"]


def test_a_hospital_that_brought_its_own_public_key_gets_no_private_key_here(tmp_path: Path) -> None:
    own = init_pki(tmp_path / "elsewhere", hospitals=["east"])
    pki_dir = tmp_path / "pki"
    (pki_dir / "hospitals").mkdir(parents=True)
    (pki_dir / "hospitals" / "east.pub").write_bytes(own.hospital_public_key("east").read_bytes())

    pki = init_pki(pki_dir, hospitals=["east"])

    assert not pki.hospital_private_key("east").exists()
    assert pki.hospital_public_key("east").read_bytes() == own.hospital_public_key("east").read_bytes()


def test_a_new_host_name_needs_an_explicit_certificate_renewal_that_keeps_the_key(tmp_path: Path) -> None:
    pki = init_pki(tmp_path, hosts=["old.example"])
    key_before = pki.server_key.read_bytes()

    with pytest.raises(PkiError, match="--renew-server-cert"):
        init_pki(tmp_path, hosts=["new.example"])
    init_pki(tmp_path, hosts=["new.example"], renew_server_cert=True)

    cert = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "new.example" in names.get_values_for_type(x509.DNSName)
    assert pki.server_key.read_bytes() == key_before


@pytest.mark.parametrize("bad_name", ["../escape", "with space", "", "a/b"])
def test_hospital_names_that_are_not_plain_file_names_are_refused(tmp_path: Path, bad_name: str) -> None:
    with pytest.raises(PkiError, match="hospital name"):
        init_pki(tmp_path, hospitals=[bad_name])


def test_cli_reports_a_bad_ip_and_exits_2(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    code = main(["--out", str(tmp_path), "--ip", "coordinator.example"])

    assert code == 2
    assert "--host" in caplog.text
