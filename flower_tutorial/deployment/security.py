"""Make TLS certificates and SuperNode keys for a secured deployment.

Flower 1.42 secures a deployment in two layers:

- TLS: the SuperLink serves its APIs over HTTPS with a server certificate signed
  by a CA; SuperNodes (``--root-certificates``) and ``flwr`` (``root-certificates``
  in the Flower Configuration) trust that CA. The certificate must name every
  address it is reached by (127.0.0.1 included: the SuperLink's own SuperExec
  connects there).
- SuperNode authentication (``flower-superlink --enable-supernode-auth``): each
  SuperNode holds an EC key pair in OpenSSH format; its public key is registered
  with ``flwr supernode register`` before it starts, and an unregistered node is
  refused. (Registering, and adding a connection for `flwr`: deployment.py.)

Command line, for a real server (certificates) and each organization (keys)::

    python -m flower_tutorial.deployment.security tls --dir certs \
        --host superlink.example.org
    python -m flower_tutorial.deployment.security supernode-key --dir keys --name org-3
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_NAMES = ("127.0.0.1", "localhost")
VALID_DAYS = 365


@dataclass(frozen=True)
class TlsFiles:
    """Where the CA and the SuperLink's certificate and key are kept."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def tls_files(certs: Path) -> TlsFiles:
    """Return the TLS file names in the folder `certs`."""
    return TlsFiles(
        certs / "ca.crt", certs / "ca.key", certs / "server.pem", certs / "server.key"
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, fmt: str) -> None:
    """Write a private key readable by its owner only."""
    encoding = {
        "pem": (serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8),
        "openssh": (serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH),
    }[fmt]
    path.touch(mode=0o600, exist_ok=False)
    path.write_bytes(key.private_bytes(*encoding, serialization.NoEncryption()))


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    """Return what a CA key (signing certificates) or a TLS server key may do.

    Strict X.509 checking (Python 3.13's default for HTTPS clients) requires it.
    """
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _san(host: str) -> x509.GeneralName:
    """Return a subjectAltName entry: an IP address or a DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_tls_files(certs: Path, hosts: Sequence[str] = LOOPBACK_NAMES) -> TlsFiles:
    """Create a CA and a SuperLink certificate for `hosts` in the folder `certs`.

    Refuses to overwrite existing files: a new CA would silently invalidate the
    copies that SuperNodes and users already trust.
    """
    files = tls_files(certs)
    certs.mkdir(parents=True, exist_ok=True)
    existing = [p for p in vars(files).values() if p.exists()]
    if existing:
        raise ValueError(
            f"TLS files exist already: {', '.join(map(str, existing))}; "
            "remove them first to make a new CA."
        )
    # A few minutes back, for machines whose clocks differ a little.
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flower-tutorial CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write_key(files.ca_key, ca_key, "pem")
    _write_key(files.server_key, server_key, "pem")
    pem = serialization.Encoding.PEM
    files.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    files.server_cert.write_bytes(server_cert.public_bytes(pem))
    return files


def public_key_path(private_key: Path) -> Path:
    """Return where the public key of `private_key` is kept (as ssh-keygen does)."""
    return private_key.with_name(private_key.name + ".pub")


def make_supernode_key(keys: Path, name: str) -> Path:
    """Create a SuperNode's key pair (`name`, `name`.pub) in the folder `keys`.

    EC P-384 in OpenSSH format, the kind ``flwr supernode register`` and
    ``flower-supernode --auth-supernode-private-key`` accept. Returns the
    private key's path.
    """
    keys.mkdir(parents=True, exist_ok=True)
    private = keys / name
    key = ec.generate_private_key(ec.SECP384R1())
    _write_key(private, key, "openssh")
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    public_key_path(private).write_bytes(public + f" {name}\n".encode())
    return private


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: make TLS files or a SuperNode key pair."""
    parser = argparse.ArgumentParser(
        prog="python -m flower_tutorial.deployment.security",
        description=__doc__.split("\n")[0],
    )
    commands = parser.add_subparsers(dest="command", required=True)
    tls = commands.add_parser("tls", help="a CA, and a SuperLink certificate and key")
    tls.add_argument("--dir", type=Path, required=True)
    tls.add_argument(
        "--host",
        action="append",
        default=[],
        help="a name or IP address SuperNodes and flwr reach the SuperLink by "
        "(repeatable; 127.0.0.1 and localhost are always included)",
    )
    node = commands.add_parser("supernode-key", help="a SuperNode's key pair")
    node.add_argument("--dir", type=Path, required=True)
    node.add_argument("--name", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "tls":
            hosts = [*args.host, *(h for h in LOOPBACK_NAMES if h not in args.host)]
            files = make_tls_files(args.dir, hosts)
            print(
                f"CA: {files.ca_cert}\nSuperLink: {files.server_cert}, key "
                f"{files.server_key}\nCertificate names: {', '.join(hosts)}"
            )
        else:
            private = make_supernode_key(args.dir, args.name)
            print(f"Private key: {private}\nPublic key: {public_key_path(private)}")
    except (ValueError, FileExistsError) as ex:
        parser.exit(2, f"error: {ex}\n")


if __name__ == "__main__":
    main()
