r"""Make TLS certificates and SuperNode keys for a secured deployment, kept safe.

Flower 1.42 secures a deployment in two layers:

- TLS: the SuperLink serves its APIs over HTTPS with a server certificate signed
  by a CA; SuperNodes (``--root-certificates``) and ``flwr`` (``root-certificates``
  in the Flower Configuration) trust that CA. The certificate must name every
  address it is reached by (127.0.0.1 included: the SuperLink's own SuperExec
  connects there). The CA may sign certificates for those names only (name
  constraints), so its key cannot vouch for any other server.
- SuperNode authentication (``flower-superlink --enable-supernode-auth``): each
  SuperNode holds an EC key pair in OpenSSH format; its public key is registered
  with ``flwr supernode register`` before it starts, and an unregistered node is
  refused. (Registering, and adding a connection for `flwr`: local.py.)

Neither layer authenticates the users of the SuperLink's Control API: whoever
reaches its port can start a run (docs/deployment.md, "Who can do what").

The CA's private key never lies in the SuperLink's folder: ``tls`` writes it to
``--ca-dir``, which the operator keeps elsewhere (it is needed only to renew the
server certificate). Private keys and their folders are readable by their owner
only; existing files and folders are used only if they belong to this user,
others cannot change them, and they are not symbolic links.

Command line, for a real server (certificates) and each organization (keys)::

    python -m flower_tutorial.deployment.security tls --dir certs --ca-dir ca \
        --host superlink.example.org
    python -m flower_tutorial.deployment.security renew --dir certs --ca-dir ca
    python -m flower_tutorial.deployment.security supernode-key --dir keys --name org-3
"""

from __future__ import annotations

import argparse
import datetime
import errno
import ipaddress
import itertools
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_NAMES = ("127.0.0.1", "localhost")
VALID_DAYS = 365
# A certificate this close to its end is refused for a (re)start: renew it first,
# rather than have the deployment fail in the middle of a run.
RENEW_WITHIN_DAYS = 30
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HOSTNAME = re.compile(
    r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*"
)


@dataclass(frozen=True)
class TlsFiles:
    """What the SuperLink's folder holds: the CA's certificate, its own pair."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class CaFiles:
    """The CA's certificate and private key, kept apart from the SuperLink."""

    cert: Path
    key: Path


def tls_files(certs: Path) -> TlsFiles:
    """Return the TLS file names in the SuperLink's folder `certs`."""
    return TlsFiles(certs / "ca.crt", certs / "server.pem", certs / "server.key")


def ca_files(ca_dir: Path) -> CaFiles:
    """Return the CA's file names in the folder `ca_dir`."""
    return CaFiles(ca_dir / "ca.crt", ca_dir / "ca.key")


def check_owned(path: Path, *, private: bool) -> None:
    """Refuse `path` unless it is this user's own file or folder, not a link.

    Others may not write it, nor (`private`: key material) read it. A file or
    folder that someone else can change or replace could hand the deployment
    their key, certificate or PIDs.
    """
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise ValueError(
            f"{path} is a symbolic link: refused; expected a regular file or folder."
        )
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
        raise ValueError(f"{path} is neither a regular file nor a folder: refused.")
    if info.st_uid != os.getuid():
        raise ValueError(
            f"{path} belongs to uid {info.st_uid}: refused; expected your own "
            f"(uid {os.getuid()})."
        )
    forbidden, fix = (0o077, "go-rwx") if private else (0o022, "go-w")
    if info.st_mode & forbidden:
        access = "access" if private else "write access"
        raise ValueError(
            f"{path} has mode {stat.S_IMODE(info.st_mode):04o}: refused; expected "
            f"no {access} for group and others (chmod {fix} {path})."
        )


def owned_dir(path: Path, *, private: bool) -> Path:
    """Create folder `path` (and missing parents) with mode 0700, or check it.

    An existing folder must pass `check_owned`; `private` for folders of keys.
    """
    missing = list(
        itertools.takewhile(lambda p: not os.path.lexists(p), [path, *path.parents])
    )
    for folder in reversed(missing):
        os.mkdir(folder, 0o700)
    check_owned(path, private=private)
    return path


def open_nofollow(path: Path, flags: int, mode: int = 0o600) -> int:
    """Return `os.open(path, flags)` that refuses a symbolic link at `path`."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as ex:
        if ex.errno != errno.ELOOP:
            raise
        raise ValueError(
            f"{path} is a symbolic link: refused; expected a regular file."
        ) from ex


def read_owned(path: Path, *, private: bool) -> bytes:
    """Return the content of `path` after `check_owned`."""
    check_owned(path, private=private)
    with os.fdopen(open_nofollow(path, os.O_RDONLY), "rb") as file:
        return file.read()


def write_new(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to a new file `path` through the one descriptor that made it.

    Nothing reopens it by name, so nobody can swap another file in between;
    FileExistsError if `path` exists (also as a symbolic link).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    with os.fdopen(open_nofollow(path, flags, mode), "wb") as file:
        file.write(data)


def write_replacing(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with a new file of `data` in one step (readers never see half).

    A symbolic link at `path` is replaced, never followed.
    """
    staging = path.with_name(f"{path.name}.new")
    if os.path.lexists(staging):
        os.unlink(staging)  # left by a replacement that was interrupted
    write_new(staging, data, mode)
    os.replace(staging, path)


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


def check_hosts(hosts: Sequence[str]) -> None:
    """Refuse host names a certificate cannot carry: each a DNS name or IP."""
    if not hosts:
        raise ValueError("No --host given: expected at least one name or address.")
    for host in hosts:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not _HOSTNAME.fullmatch(host) or len(host) > 253:
                raise ValueError(
                    f"--host {host!r} is not allowed: expected an IP address or a "
                    "DNS name (letters, digits, '-' and '.', no wildcards)."
                ) from None


def _san(host: str) -> x509.GeneralName:
    """Return a subjectAltName entry: an IP address or a DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _permitted(host: str) -> x509.GeneralName:
    """Return the name-constraints subtree of exactly `host`."""
    try:
        return x509.IPAddress(ipaddress.ip_network(host))
    except ValueError:
        return x509.DNSName(host)


def _make_ca(
    hosts: Sequence[str], now: datetime.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Return a CA key and certificate that may sign certificates for `hosts` only."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flower-tutorial CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        # Critical, so that a client that cannot check the constraints refuses
        # the CA instead of trusting it for every name.
        .add_extension(
            x509.NameConstraints(
                permitted_subtrees=[_permitted(h) for h in hosts],
                excluded_subtrees=None,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
            critical=False,
        )
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _issue_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: Sequence[str],
    now: datetime.datetime,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Return a SuperLink key and certificate for `hosts`, signed by the CA.

    It ends with the CA at the latest: a certificate outliving its CA is invalid.
    """
    key = ec.generate_private_key(ec.SECP384R1())
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    not_after = min(
        now + datetime.timedelta(days=VALID_DAYS), ca_cert.not_valid_after_utc
    )
    cert = (
        x509.CertificateBuilder()
        # Not a host name: with no DNS name among the certificate's names,
        # OpenSSL checks a host-like common name against the CA's name
        # constraints (CN=127.0.0.1 failed: "permitted subtree violation").
        .subject_name(
            x509.Name(
                [x509.NameAttribute(NameOID.COMMON_NAME, "flower-tutorial SuperLink")]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_ski.value
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def _now() -> datetime.datetime:
    """Return the start of a new certificate's validity."""
    # A few minutes back, for machines whose clocks differ a little.
    return datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Return `key` as unencrypted PKCS#8 PEM (what flower-superlink reads)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    """Return `cert` in PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def make_tls_files(
    certs: Path,
    hosts: Sequence[str] = LOOPBACK_NAMES,
    ca_dir: Path | None = None,
    *,
    replace: bool = False,
) -> TlsFiles:
    """Create a CA and a SuperLink certificate for `hosts` in the folder `certs`.

    The CA's key is written to `ca_dir` (with a copy of its certificate), to renew
    the server certificate later; without `ca_dir` it is discarded once it has
    signed. Refuses to overwrite existing files unless `replace`: a new CA
    silently invalidates the copies that SuperNodes and users already trust.
    """
    check_hosts(hosts)
    files = tls_files(certs)
    ca = ca_files(ca_dir) if ca_dir is not None else None
    if ca_dir is not None and ca_dir.resolve() == certs.resolve():
        raise ValueError(
            f"--ca-dir {str(ca_dir)!r} is the SuperLink's folder: expected "
            "another one, kept apart (whoever holds the CA key can sign)."
        )
    outputs = [*vars(files).values(), *(vars(ca).values() if ca else [])]
    existing = [p for p in outputs if os.path.lexists(p)]
    if existing and not replace:
        raise ValueError(
            f"TLS files exist already: {', '.join(map(str, existing))}; "
            "remove them first to make a new CA."
        )
    folders = [certs] if ca_dir is None else [certs, ca_dir]
    for folder in folders:  # all checked before either is made
        if os.path.lexists(folder):
            check_owned(folder, private=True)
    for folder in folders:
        owned_dir(folder, private=True)
    now = _now()
    ca_key, ca_cert = _make_ca(hosts, now)
    server_key, server_cert = _issue_server_cert(ca_key, ca_cert, hosts, now)
    write = write_replacing if replace else write_new
    if ca is not None:
        write(ca.key, _pem_key(ca_key))
        write(ca.cert, _pem_cert(ca_cert), 0o644)
    write(files.server_key, _pem_key(server_key))
    write(files.server_cert, _pem_cert(server_cert), 0o644)
    write(files.ca_cert, _pem_cert(ca_cert), 0o644)
    return files


def _certificate_names(cert: x509.Certificate) -> list[str]:
    """Return the DNS names and IP addresses a server certificate is valid for."""
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return [*san.get_values_for_type(x509.DNSName), *ips]


def _ca_permits(ca_cert: x509.Certificate) -> list[str]:
    """Return the names the CA may sign for (its name constraints)."""
    try:
        constraints = ca_cert.extensions.get_extension_for_class(x509.NameConstraints)
    except x509.ExtensionNotFound:
        return []
    return [
        str(name.value.network_address)
        if isinstance(name, x509.IPAddress)
        else name.value
        for name in constraints.value.permitted_subtrees or []
    ]


def check_not_expiring(paths: Sequence[Path], how_to_renew: str) -> None:
    """Refuse certificates that expired or expire within RENEW_WITHIN_DAYS days."""
    limit = datetime.datetime.now(datetime.UTC) + datetime.timedelta(
        days=RENEW_WITHIN_DAYS
    )
    for path in paths:
        cert = x509.load_pem_x509_certificate(read_owned(path, private=False))
        end = cert.not_valid_after_utc
        if end < limit:
            when = "expired" if end < datetime.datetime.now(datetime.UTC) else "expires"
            raise ValueError(
                f"The certificate {path} {when} on {end:%Y-%m-%d %H:%M} UTC "
                f"(refused within {RENEW_WITHIN_DAYS} days of its end): "
                f"{how_to_renew}"
            )


def renew_server_cert(
    certs: Path, ca_dir: Path, hosts: Sequence[str] | None = None
) -> TlsFiles:
    """Replace the SuperLink's key and certificate in `certs`, signed by the CA.

    `hosts` default to the names of the current certificate. The CA stays, so
    SuperNodes and users keep trusting the same ca.crt.
    """
    files, ca = tls_files(certs), ca_files(ca_dir)
    for folder in (certs, ca_dir):
        check_owned(folder, private=True)
    ca_pem = read_owned(ca.cert, private=False)
    if read_owned(files.ca_cert, private=False) != ca_pem:
        raise ValueError(
            f"{files.ca_cert} is not the CA of --ca-dir {str(ca_dir)!r} "
            f"({ca.cert}): expected the folders of one `tls` command."
        )
    check_not_expiring(
        [ca.cert],
        "make a new CA (`tls` into new folders) and give every SuperNode and "
        "flwr user its ca.crt.",
    )
    ca_cert = x509.load_pem_x509_certificate(ca_pem)
    if hosts is None:
        old = x509.load_pem_x509_certificate(
            read_owned(files.server_cert, private=False)
        )
        hosts = _certificate_names(old)
    check_hosts(hosts)
    permitted = _ca_permits(ca_cert)
    for host in hosts:
        if host not in permitted:
            raise ValueError(
                f"--host {host!r} is not allowed: the CA may sign only for "
                f"{', '.join(permitted) or 'no names'}; for other names make a new CA."
            )
    ca_key = serialization.load_pem_private_key(
        read_owned(ca.key, private=True), password=None
    )
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca.key} is not an EC key: expected the one `tls` wrote.")
    server_key, server_cert = _issue_server_cert(ca_key, ca_cert, hosts, _now())
    write_replacing(files.server_key, _pem_key(server_key))
    write_replacing(files.server_cert, _pem_cert(server_cert), 0o644)
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
    if not _KEY_NAME.fullmatch(name):
        raise ValueError(
            f"--name {name!r} is not allowed: expected letters, digits, '-', '_' "
            "and '.' (it names the key's files)."
        )
    private = keys / name
    owned_dir(keys, private=True)
    key = ec.generate_private_key(ec.SECP384R1())
    write_new(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    write_new(public_key_path(private), public + f" {name}\n".encode(), 0o644)
    return private


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: make or renew TLS files, or make a SuperNode key pair."""
    parser = argparse.ArgumentParser(
        prog="python -m flower_tutorial.deployment.security",
        description=__doc__.split("\n")[0],
    )
    commands = parser.add_subparsers(dest="command", required=True)
    tls = commands.add_parser("tls", help="a CA, and a SuperLink certificate and key")
    renew = commands.add_parser(
        "renew", help="a new SuperLink certificate and key from the same CA"
    )
    for cmd in (tls, renew):
        cmd.add_argument("--dir", type=Path, required=True, help="the SuperLink's")
        cmd.add_argument(
            "--ca-dir",
            type=Path,
            required=True,
            help="the CA's certificate and private key: keep it off the SuperLink",
        )
        cmd.add_argument(
            "--host",
            action="append",
            default=[],
            help="a name or IP address SuperNodes and flwr reach the SuperLink by "
            "(repeatable; `tls` always adds 127.0.0.1 and localhost; `renew` "
            "keeps the current names if none is given)",
        )
    node = commands.add_parser("supernode-key", help="a SuperNode's key pair")
    node.add_argument("--dir", type=Path, required=True)
    node.add_argument("--name", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "tls":
            hosts = [*args.host, *(h for h in LOOPBACK_NAMES if h not in args.host)]
            files = make_tls_files(args.dir, hosts, args.ca_dir)
            print(
                f"CA: {files.ca_cert}\nSuperLink: {files.server_cert}, key "
                f"{files.server_key}\nCertificate names: {', '.join(hosts)}\n"
                f"CA key: {ca_files(args.ca_dir).key} - keep it off the SuperLink's "
                "machine, readable by you only: whoever holds it can sign a "
                "certificate for these names; `renew` needs it."
            )
        elif args.command == "renew":
            files = renew_server_cert(args.dir, args.ca_dir, args.host or None)
            print(
                f"Renewed: {files.server_cert}, key {files.server_key}; restart "
                "the SuperLink to use them (SuperNodes keep their ca.crt)."
            )
        else:
            private = make_supernode_key(args.dir, args.name)
            print(f"Private key: {private}\nPublic key: {public_key_path(private)}")
    except (ValueError, OSError) as ex:
        parser.exit(2, f"error: {ex}\n")


if __name__ == "__main__":
    main()
