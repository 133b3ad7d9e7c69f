"""The /metrics endpoint's security settings, read from a YAML file in the format of
node_exporter's --web.config.file (Prometheus exporter-toolkit), so one file and one habit
serve both exporters:

    tls_server_config:
      cert_file: server.crt           # relative paths are taken from the file's directory
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # mTLS; or VerifyClientCertIfGiven
      client_ca_file: clients-ca.crt
      min_version: TLS12
    basic_auth_users:
      prometheus: $2y$10$...          # bcrypt hash: `tfowatch hash-password`

Every problem is a ConfigError naming the key, so `run --check-config` can say it in a line.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tfowatch.exporter.config import ConfigError

CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
TLS_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
TLS_KEYS = ("cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version")
TOP_KEYS = ("tls_server_config", "basic_auth_users")
BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")


@dataclass
class WebConfig:
    tls: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)
    client_auth: str = "NoClientCert"

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"


def _mapping(value: Any, where: str, known: tuple[str, ...] | None, strings: bool = True
             ) -> dict[str, Any]:
    """`value` as a mapping with only `known` keys (any, if None) and, if `strings`, string values."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping")
    for key, item in value.items():
        if known is not None and key not in known:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(known)})")
        if strings and not isinstance(item, str):
            raise ConfigError(f"{where}: {key} must be a string")
    return value


def _file(base: Path, value: str, where: str) -> str:
    path = base / value
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from exc
    return str(path)


def _tls_context(tls: dict[str, str], base: Path, where: str) -> tuple[ssl.SSLContext, str]:
    if "cert_file" not in tls or "key_file" not in tls:
        raise ConfigError(f"{where}: cert_file and key_file are both required")
    auth = tls.get("client_auth_type", "NoClientCert")
    if auth not in CLIENT_AUTH:
        raise ConfigError(f"{where}: client_auth_type must be one of {', '.join(CLIENT_AUTH)}, "
                          f"not {auth!r}")
    version = tls.get("min_version", "TLS12")
    if version not in TLS_VERSIONS:
        raise ConfigError(f"{where}: min_version must be one of {', '.join(TLS_VERSIONS)}, not {version!r}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = TLS_VERSIONS[version]
    cert, key = _file(base, tls["cert_file"], where), _file(base, tls["key_file"], where)
    try:
        ctx.load_cert_chain(cert, key, password=_no_passphrase)  # never a prompt on a terminal
    except _Encrypted as exc:
        raise ConfigError(f"{where}: key_file {key} is encrypted, and a daemon cannot ask for its "
                          "passphrase: store it decrypted, readable by tfowatch only") from exc
    except ssl.SSLError as exc:
        raise ConfigError(f"{where}: cannot use cert_file {cert} with key_file {key}: "
                          f"{exc.reason or exc}") from exc
    ctx.verify_mode = CLIENT_AUTH[auth]
    if auth != "NoClientCert":
        if "client_ca_file" not in tls:
            raise ConfigError(f"{where}: client_auth_type {auth} needs client_ca_file")
        ca = _file(base, tls["client_ca_file"], where)
        try:
            ctx.load_verify_locations(ca)
        except ssl.SSLError as exc:
            raise ConfigError(f"{where}: client_ca_file {ca} holds no usable certificate: "
                              f"{exc.reason or exc}") from exc
    return ctx, auth


def _users(users: dict[str, str], where: str) -> dict[str, bytes]:
    for user, hashed in users.items():
        if not isinstance(user, str):  # YAML reads `123:` as a number
            raise ConfigError(f"{where}: user name {user!r} is not a string (quote it)")
        if not (isinstance(hashed, str) and hashed.startswith(BCRYPT_PREFIXES) and len(hashed) == 60
                and _bcrypt_ok(hashed)):
            raise ConfigError(f"{where}: password of {user!r} is not a bcrypt hash "
                              "(make one with `tfowatch hash-password`)")
        if ":" in user:
            raise ConfigError(f"{where}: user name {user!r} contains ':'")
    return {user: hashed.encode() for user, hashed in users.items()}


def _bcrypt_ok(hashed: str) -> bool:
    """Whether bcrypt can check a password against it (a bad salt passes the shape test, then
    fails every request)."""
    import bcrypt  # only a config with users pays for it

    try:
        bcrypt.checkpw(b"", hashed.encode())
    except ValueError:
        return False
    return True


class _Encrypted(Exception):
    pass


def _no_passphrase() -> bytes:
    raise _Encrypted


def load(path: str) -> WebConfig:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read web config {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"web config {path}: not UTF-8 (byte {exc.start})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"web config {path}: not YAML: {' '.join(str(exc).split())}") from exc
    top = _mapping(data, f"web config {path}", TOP_KEYS, strings=False)
    base = Path(path).resolve().parent
    out = WebConfig(users=_users(_mapping(top.get("basic_auth_users"), f"web config {path}: "
                                          "basic_auth_users", None), f"web config {path}"))
    if "tls_server_config" in top:
        where = f"web config {path}: tls_server_config"
        out.tls, out.client_auth = _tls_context(_mapping(top["tls_server_config"], where, TLS_KEYS),
                                                base, where)
    return out
