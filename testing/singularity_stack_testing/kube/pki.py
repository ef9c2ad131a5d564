"""A throwaway certificate authority for a test cluster, made with the openssl command (EC keys: fast).

Every file lands in one directory: ``ca.crt``/``ca.key``, then ``<name>.crt``/``<name>.key`` per certificate
issued, and the service-account signing key pair ``sa.key``/``sa.pub``.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Sequence
from pathlib import Path

DAYS = "7"
_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


class PkiError(RuntimeError):
    """openssl is missing or refused a request; the message carries its stderr."""


def openssl(workdir: Path, *args: str) -> None:
    try:
        result = subprocess.run(["openssl", *args], cwd=workdir, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise PkiError("the openssl command is missing (Debian package openssl)") from None
    if result.returncode != 0:
        raise PkiError(f"openssl {' '.join(args)} failed: {result.stderr.strip()}")


def make_ca(workdir: Path) -> None:
    openssl(
        workdir,
        *("req", "-x509", *_EC_KEY, "-keyout", "ca.key", "-out", "ca.crt", "-days", DAYS),
        *("-subj", "/CN=singularity-stack test CA"),
        *("-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"),
    )


def subject_alt_names(ips: Sequence[str] = (), dns_names: Sequence[str] = ()) -> str:
    return ", ".join([*(f"IP:{ip}" for ip in ips), *(f"DNS:{name}" for name in dns_names)])


def issue(
    workdir: Path,
    name: str,
    common_name: str,
    *,
    organization: str = "",
    server_names: str = "",
    client: bool = False,
) -> None:
    """Sign ``<name>.crt`` with the CA: a serving certificate for ``server_names`` and/or a client certificate.

    For a client certificate the API server takes the user from the CN and the groups from O.
    """
    subject = f"/CN={common_name}" + (f"/O={organization}" if organization else "")
    usages = [*(["serverAuth"] if server_names else []), *(["clientAuth"] if client else [])]
    if not usages:
        raise PkiError(f"certificate {name!r} is neither for a server nor for a client")
    extensions = [
        "basicConstraints = critical, CA:FALSE",
        "keyUsage = critical, digitalSignature, keyEncipherment",
        f"extendedKeyUsage = {', '.join(usages)}",
        *([f"subjectAltName = {server_names}"] if server_names else []),
    ]
    (workdir / f"{name}.ext").write_text("\n".join(extensions) + "\n")
    openssl(workdir, "req", "-new", *_EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject)
    openssl(
        workdir,
        *("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-days", DAYS),
        *("-set_serial", str(secrets.randbits(63)), "-extfile", f"{name}.ext", "-out", f"{name}.crt"),
    )


def make_service_account_key(workdir: Path) -> None:
    openssl(workdir, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "sa.key")
    openssl(workdir, "pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub")
