"""Throw-away PKI for the HTTPS tests, made with the openssl CLI: a CA, a server certificate
for 127.0.0.1 and localhost, a client certificate from that CA, and one from a stranger CA."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _ca(d: Path, name: str) -> tuple[Path, Path]:
    key, crt = d / f"{name}.key", d / f"{name}.crt"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-days", "2", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(crt))
    return key, crt


def _leaf(d: Path, name: str, ca: tuple[Path, Path], ext: str) -> tuple[Path, Path]:
    key, csr, crt, extfile = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.crt", d / f"{name}.ext"
    extfile.write_text(ext + "\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(csr))
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]),
             "-CAcreateserial", "-days", "2", "-extfile", str(extfile), "-out", str(crt))
    return key, crt


@dataclass
class Pki:
    ca: Path
    server_key: Path
    server_crt: Path
    client_key: Path
    client_crt: Path
    stranger_key: Path
    stranger_crt: Path


def make(d: Path) -> Pki:
    ca = _ca(d, "ca")
    server = _leaf(d, "server", ca, "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                    "extendedKeyUsage=serverAuth")
    client = _leaf(d, "client", ca, "extendedKeyUsage=clientAuth")
    stranger = _leaf(d, "stranger", _ca(d, "stranger-ca"), "extendedKeyUsage=clientAuth")
    return Pki(ca[1], *server, *client, *stranger)
