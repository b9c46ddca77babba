"""The federation's certificates and identities: one CA, one server certificate, one key per hospital.

``init-pki`` writes this layout (private keys 0600, everything else 0644)::

    DIR/ca.crt                  federation root certificate; every hospital and the coordinator trust it
    DIR/ca.key                  CA private key; keep it offline once the certificates are issued
    DIR/server.crt, server.key  the coordinator's TLS certificate (SANs: the names and IPs given,
                                plus localhost and 127.0.0.1 for the coordinator's own loopback use)
    DIR/hospitals/NAME.key      a hospital's node-authentication private key (EC P-384, OpenSSH format,
                                what ``flower-supernode --auth-supernode-private-key`` loads)
    DIR/hospitals/NAME.pub      its public key (OpenSSH format, what ``flwr supernode register`` takes)

Re-running never overwrites a key: an existing key is kept and reused (with a log line), and files
are created with ``link()``, which fails instead of replacing. Only ``--renew-server-cert`` replaces
``server.crt`` (a public file), re-signing the existing server key, e.g. to add a host name.
A hospital that prefers to keep its private key at home generates it itself
(``ssh-keygen -t ecdsa -b 384 -N "" -f NAME.key``) and sends only ``NAME.pub``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.atomic_io import atomic_write_bytes

logger = logging.getLogger(__name__)

CA_VALIDITY_DAYS = 3650
SERVER_VALIDITY_DAYS = 825
LOOPBACK_NAMES = ("localhost",)
LOOPBACK_IPS = ("127.0.0.1",)
_HOSPITAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class PkiError(ValueError):
    """The PKI directory or a requested name is unusable; the message says which file and what to do."""


@dataclass(frozen=True)
class FederationPki:
    """Where each file of a federation's PKI lives under ``root``."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def hospitals_dir(self) -> Path:
        return self.root / "hospitals"

    def hospital_private_key(self, name: str) -> Path:
        return self.hospitals_dir / f"{name}.key"

    def hospital_public_key(self, name: str) -> Path:
        return self.hospitals_dir / f"{name}.pub"

    def hospital_public_keys(self) -> list[Path]:
        """Every ``hospitals/*.pub`` present, sorted by name."""
        if not self.hospitals_dir.is_dir():
            return []
        return sorted(self.hospitals_dir.glob("*.pub"))


def init_pki(
    out: str | Path,
    hosts: Sequence[str] = (),
    ips: Sequence[str] = (),
    hospitals: Sequence[str] = (),
    renew_server_cert: bool = False,
) -> FederationPki:
    """Create (or complete) a federation PKI under ``out``; never overwrite a private key.

    Parameters
    ----------
    out : directory to write into; created if missing.
    hosts : DNS names hospitals dial to reach the coordinator (server-certificate SANs).
    ips : IP addresses hospitals dial (server-certificate SANs).
    hospitals : hospital names; each gets ``hospitals/NAME.key`` + ``NAME.pub`` unless they exist.
    renew_server_cert : re-issue ``server.crt`` for the existing server key even if it exists.
    """
    pki = FederationPki(Path(out))
    pki.root.mkdir(parents=True, exist_ok=True)
    for name in hospitals:
        _check_hospital_name(name)
    parsed_ips = [_parse_ip(ip) for ip in ips]

    ca_key = _load_or_create_private_key(pki.ca_key, ec.SECP384R1(), "CA key")
    ca_cert = _load_or_create_ca_cert(pki.ca_cert, ca_key)
    server_key = _load_or_create_private_key(pki.server_key, ec.SECP384R1(), "server TLS key")
    _ensure_server_cert(pki, ca_key, ca_cert, server_key, list(hosts), parsed_ips, renew_server_cert)
    for name in hospitals:
        _ensure_hospital_keys(pki, name)
    return pki


def _check_hospital_name(name: str) -> None:
    if not _HOSPITAL_NAME.match(name):
        raise PkiError(
            f"hospital name {name!r} is not usable as a file name; use letters, digits, '-', '_' "
            "or '.', starting with a letter or digit (at most 64 characters)"
        )


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise PkiError(f"--ip {text!r} is not an IP address; put host names under --host") from None


def _load_or_create_private_key(
    path: Path, curve: ec.EllipticCurve, role: str
) -> ec.EllipticCurvePrivateKey:
    if path.exists():
        logger.info("kept existing %s %s (never overwritten)", role, path)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise PkiError(
                f"{path}: not an unencrypted PEM private key ({exc}); move it away to create a new one"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{path}: expected an EC private key; move it away to create a new one")
        return key
    key = ec.generate_private_key(curve)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _create_file(path, pem, private=True)
    logger.info("created %s %s", role, path)
    return key


def _load_or_create_ca_cert(path: Path, ca_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    if path.exists():
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        if cert.public_key() != ca_key.public_key():
            raise PkiError(
                f"{path} was not issued for the key in {path.with_name('ca.key')}; "
                "the PKI directory mixes two federations: start from an empty directory"
            )
        logger.info("kept existing CA certificate %s", path)
        return cert
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtl federation CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _create_file(path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    logger.info("created CA certificate %s", path)
    return cert


def _ensure_server_cert(
    pki: FederationPki,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    server_key: ec.EllipticCurvePrivateKey,
    hosts: list[str],
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
    renew: bool,
) -> None:
    names = list(dict.fromkeys([*hosts, *LOOPBACK_NAMES]))
    addresses = list(dict.fromkeys([*ips, *(ipaddress.ip_address(ip) for ip in LOOPBACK_IPS)]))
    if pki.server_cert.exists() and not renew:
        missing = _sans_missing(x509.load_pem_x509_certificate(pki.server_cert.read_bytes()), names, addresses)
        if missing:
            raise PkiError(
                f"{pki.server_cert} does not cover {', '.join(missing)}; re-run with "
                "--renew-server-cert to re-issue it for the existing server key"
            )
        logger.info("kept existing server certificate %s", pki.server_cert)
        return
    now = dt.datetime.now(dt.timezone.utc)
    common_name = hosts[0] if hosts else str(addresses[0])
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(a) for a in addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_VALIDITY_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    if pki.server_cert.exists():
        _replace_public_file(pki.server_cert, pem)
        logger.info("re-issued server certificate %s for %s", pki.server_cert, ", ".join(map(str, names + addresses)))
    else:
        _create_file(pki.server_cert, pem, private=False)
        logger.info("created server certificate %s for %s", pki.server_cert, ", ".join(map(str, names + addresses)))


def _sans_missing(
    cert: x509.Certificate,
    names: list[str],
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [*names, *map(str, addresses)]
    have_names = set(san.get_values_for_type(x509.DNSName))
    have_ips = set(san.get_values_for_type(x509.IPAddress))
    return [n for n in names if n not in have_names] + [str(a) for a in addresses if a not in have_ips]


def _ensure_hospital_keys(pki: FederationPki, name: str) -> None:
    private_path = pki.hospital_private_key(name)
    public_path = pki.hospital_public_key(name)
    pki.hospitals_dir.mkdir(parents=True, exist_ok=True)
    if private_path.exists():
        logger.info("kept existing key of hospital %r: %s (never overwritten)", name, private_path)
        if not public_path.exists():
            key = serialization.load_ssh_private_key(private_path.read_bytes(), password=None)
            _create_file(public_path, _openssh_public(key, name), private=False)
        return
    if public_path.exists():
        logger.info(
            "hospital %r brought its own key (%s present, no private key here): nothing to create",
            name,
            public_path,
        )
        return
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    _create_file(private_path, private, private=True)
    _create_file(public_path, _openssh_public(key, name), private=False)
    logger.info("created node key of hospital %r: %s (+ .pub)", name, private_path)


def _openssh_public(key: object, comment: str) -> bytes:
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"hospital {comment!r}: its private key is not an EC key; Flower node auth needs EC")
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return public + f" {comment}\n".encode()


def _create_file(path: Path, data: bytes, private: bool) -> None:
    """Write ``data`` to a new file at ``path``; fail rather than replace an existing one.

    The content is written and fsynced under a temporary name, then hard-linked into place:
    ``link()`` refuses an existing target, so a key can never be overwritten, and a reader never
    sees a half-written file.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp_name, path)
        except FileExistsError:
            raise PkiError(f"{path} appeared while it was being created; re-run init-pki") from None
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def _replace_public_file(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data, mode=0o644)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtl-coordinator init-pki",
        description="Create the federation CA, the coordinator's TLS certificate and one node key per hospital. "
        "Existing keys are kept, never overwritten.",
    )
    parser.add_argument("--out", required=True, type=Path, help="PKI directory to create or complete")
    parser.add_argument(
        "--host", action="append", default=[], help="DNS name hospitals dial (repeatable); localhost is always added"
    )
    parser.add_argument(
        "--ip", action="append", default=[], help="IP address hospitals dial (repeatable); 127.0.0.1 is always added"
    )
    parser.add_argument(
        "--hospital", action="append", default=[], help="hospital name; creates hospitals/NAME.key + NAME.pub"
    )
    parser.add_argument(
        "--renew-server-cert",
        action="store_true",
        help="re-issue server.crt for the existing server key (e.g. after adding a --host)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``fedtl-coordinator init-pki``: returns 0 on success, 2 on a PKI error (message on stderr)."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        pki = init_pki(args.out, args.host, args.ip, args.hospital, args.renew_server_cert)
    except PkiError as exc:
        logger.error("init-pki: %s", exc)
        return 2
    logger.info(
        "PKI ready in %s: give each hospital %s and its own hospitals/NAME.key; keep %s offline",
        pki.root,
        pki.ca_cert.name,
        pki.ca_key.name,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
