"""/metrics security, node_exporter style: TLS, client certificates, basic auth (bcrypt), a
bound on connections, and bad web configs. Real clients: curl and Python's ssl; a real daemon."""

from __future__ import annotations

import base64
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import certs
import pytest
from netlab import TFOWATCH, free_port, skip_unless_root_bpf
from support import one_line_error, tfowatch

PASSWORD = "correct horse"


def web_config(pki: certs.Pki, password_hash: str, auth: str = "RequireAndVerifyClientCert") -> str:
    return (f"tls_server_config:\n  cert_file: {pki.server_crt.name}\n  key_file: {pki.server_key.name}\n"
            f"  client_auth_type: {auth}\n  client_ca_file: {pki.ca.name}\n"
            f"basic_auth_users:\n  prometheus: '{password_hash}'\n")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> certs.Pki:
    return certs.make(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def password_hash() -> str:
    res = subprocess.run([str(TFOWATCH), "hash-password"], input=PASSWORD + "\n", capture_output=True,
                         text=True, check=True)
    return res.stdout.strip()


@dataclass
class Server:
    url: str
    pki: certs.Pki
    proc: subprocess.Popen[str]

    def curl(self, *args: str, cert: str = "client", user: str | None = f"prometheus:{PASSWORD}",
             path: str = "/metrics") -> tuple[int, str]:
        """(curl exit code, 'HTTP status' or '') for one request."""
        cmd = ["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}",
               "--cacert", str(self.pki.ca)]
        if cert:
            cmd += ["--cert", str(getattr(self.pki, f"{cert}_crt")),
                    "--key", str(getattr(self.pki, f"{cert}_key"))]
        if user:
            cmd += ["-u", user]
        res = subprocess.run([*cmd, *args, self.url + path], capture_output=True, text=True, timeout=20)
        return res.returncode, res.stdout.strip()

    def scrape(self) -> str:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca))
        ctx.load_cert_chain(str(self.pki.client_crt), str(self.pki.client_key))
        token = base64.b64encode(f"prometheus:{PASSWORD}".encode()).decode()
        req = urllib.request.Request(self.url + "/metrics", headers={"Authorization": f"Basic {token}"})
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            return str(resp.read().decode())

    def value(self, series: str) -> float:
        for line in self.scrape().splitlines():
            if line.startswith(series + " "):
                return float(line.split()[-1])
        return 0.0


@pytest.fixture(scope="module")
def server(pki: certs.Pki, password_hash: str) -> Iterator[Server]:
    skip_unless_root_bpf("HTTPS daemon", "curl", "openssl")
    cfg = pki.ca.parent / "web.yml"
    cfg.write_text(web_config(pki, password_hash))
    port = free_port()
    proc = subprocess.Popen([str(TFOWATCH), "run", "--listen", f"127.0.0.1:{port}", "--web-config-file",
                             str(cfg), "--max-connections", "3"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    srv = Server(f"https://127.0.0.1:{port}", pki, proc)
    deadline = time.monotonic() + 60
    while srv.curl()[1] != "200":
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr and proc.stderr.read()
        time.sleep(0.3)
    yield srv
    proc.terminate()
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert "Traceback" not in err, err


def test_tls_with_client_cert_and_password_is_served(server: Server) -> None:
    assert server.curl() == (0, "200")
    body = server.scrape()
    assert "tfowatch_build_info{" in body and "tfowatch_process_resident_memory_bytes" in body


def test_wrong_or_missing_password_is_401(server: Server) -> None:
    before = server.value('tfowatch_http_requests_total{code="401"}')
    assert server.curl(user="prometheus:wrong") == (0, "401")
    assert server.curl(user=None) == (0, "401")
    assert server.curl(user=f"nobody:{PASSWORD}") == (0, "401")
    assert server.curl(user="prometheus:" + "x" * 100) == (0, "401")  # over bcrypt's 72 bytes
    assert server.value('tfowatch_http_requests_total{code="401"}') == before + 4


def test_client_without_a_trusted_cert_fails_the_handshake(server: Server) -> None:
    before = server.value('tfowatch_http_connections_refused_total{reason="tls_failed"}')
    for cert in ("", "stranger"):
        code, status = server.curl(cert=cert)
        assert code != 0 and status == "000", (cert, code, status)
    assert server.value('tfowatch_http_connections_refused_total{reason="tls_failed"}') == before + 2


def test_server_cert_is_checked_by_the_client(server: Server) -> None:
    """curl trusting another CA refuses the server: the daemon serves the configured cert."""
    code, _ = server.curl("--cacert", str(server.pki.ca.with_name("stranger-ca.crt")))
    assert code == 60  # CURLE_PEER_FAILED_VERIFICATION


def test_plain_http_to_the_tls_port_gets_a_400_that_says_so(server: Server) -> None:
    http_url = server.url.replace("https://", "http://") + "/metrics"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(http_url, timeout=10)
    assert err.value.code == 400
    assert b"HTTP request to an HTTPS server" in err.value.read()
    assert server.curl() == (0, "200")


def test_idle_connections_do_not_hold_the_slots_and_are_cut_at_the_deadline(server: Server) -> None:
    """Twice as many idle connections as answer slots (3): curl, which sends its request at
    once, is still answered; the idle ones are closed by the daemon after header_timeout (5 s)
    and counted. (Before the deadline, 3 idle connections refused every scrape.)"""
    before = server.value('tfowatch_http_connections_refused_total{reason="timeout"}')
    host, port = server.url.removeprefix("https://").split(":")
    t0 = time.monotonic()
    idle = [socket.create_connection((host, int(port)), timeout=15) for _ in range(6)]
    try:
        assert server.curl() == (0, "200")
        for s in idle:
            assert s.recv(1) == b""  # the daemon closed it
        assert 4.5 < time.monotonic() - t0 < 10
    finally:
        for s in idle:
            s.close()
    assert server.value('tfowatch_http_connections_refused_total{reason="timeout"}') >= before + 6


def test_scrape_self_metrics(server: Server) -> None:
    before = server.value("tfowatch_scrape_duration_seconds_count")
    server.scrape()
    assert server.value("tfowatch_scrape_duration_seconds_count") == before + 2
    assert server.value("tfowatch_series_cap") == 1000


@pytest.mark.parametrize(("edit", "words"), [
    (lambda t: t.replace("cert_file: server.crt", "cert_file: gone.crt"), "cannot read"),
    (lambda t: t.replace("key_file: server.key", "key_file: client.key"), "cannot use cert_file"),
    (lambda t: t.replace("client_ca_file: ca.crt", "client_ca_file: server.key"), "client_ca_file"),
    (lambda t: t.replace("  client_ca_file: ca.crt\n", ""), "needs client_ca_file"),
    (lambda t: t.replace("RequireAndVerifyClientCert", "Sometimes"), "client_auth_type must be one of"),
    (lambda t: t.replace("  key_file: server.key\n", ""), "cert_file and key_file are both required"),
    (lambda t: t.replace("client_auth_type", "client_auth"), "unknown key 'client_auth'"),
    (lambda t: t.split("basic_auth_users")[0] + "basic_auth_users:\n  prometheus: hunter2\n",
     "not a bcrypt hash"),
    (lambda t: t + "  : [\n", "not YAML"),
    (lambda t: t + "tls_config: {}\n", "unknown key 'tls_config'"),
])
def test_bad_web_config(pki: certs.Pki, password_hash: str, tmp_path: Path, edit: object,
                        words: str) -> None:
    assert callable(edit)
    for f in pki.ca.parent.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = tmp_path / "web.yml"
    cfg.write_text(edit(web_config(pki, password_hash)))
    one_line_error(tfowatch("run", "--web-config-file", str(cfg), "--check-config"), 2, words)


def test_an_encrypted_key_is_a_one_line_error_not_a_prompt(pki: certs.Pki, password_hash: str,
                                                           tmp_path: Path) -> None:
    """A daemon has no terminal: OpenSSL's passphrase prompt would hang or fail with a traceback."""
    key = tmp_path / "encrypted.key"
    subprocess.run(["openssl", "pkey", "-in", str(pki.server_key), "-aes256", "-passout", "pass:x",
                    "-out", str(key)], check=True, capture_output=True)
    cfg = pki.ca.parent / "web-encrypted-key.yml"  # beside the certificates it names
    text = web_config(pki, password_hash)
    cfg.write_text(text.replace(f"key_file: {pki.server_key.name}", f"key_file: {key}"))
    assert str(key) in cfg.read_text()
    res = subprocess.run([str(TFOWATCH), "run", "--web-config-file", str(cfg), "--check-config"],
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    one_line_error(res, 2, "is encrypted")


def test_good_web_config_checks(pki: certs.Pki, password_hash: str) -> None:
    cfg = pki.ca.parent / "web-ok.yml"
    cfg.write_text(web_config(pki, password_hash))
    res = tfowatch("run", "--web-config-file", str(cfg), "--check-config")
    assert res.returncode == 0, res.stderr
    assert "https://127.0.0.1:19135/metrics" in res.stdout and "RequireAndVerifyClientCert" in res.stdout


def test_sighup_reloads_the_web_config_and_keeps_it_when_the_new_one_is_bad(tmp_path: Path) -> None:
    """As Prometheus does on SIGHUP: the next connection is served with the file as it is now; a
    file that no longer checks is logged as an ERROR and the config in use stays."""
    skip_unless_root_bpf("SIGHUP test")
    import bcrypt

    def users(name: str) -> str:
        return f"basic_auth_users:\n  {name}: '{bcrypt.hashpw(b'pw', bcrypt.gensalt(4)).decode()}'\n"

    cfg = tmp_path / "web.yml"
    cfg.write_text(users("alice"))
    listen = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen([str(TFOWATCH), "run", "--mode", "counters", "--listen", listen,
                             "--web-config-file", str(cfg)], stderr=subprocess.PIPE, text=True)

    def code(user: str) -> int:
        req = urllib.request.Request(f"http://{listen}/metrics", headers={
            "Authorization": "Basic " + base64.b64encode(f"{user}:pw".encode()).decode()})
        try:
            return int(urllib.request.urlopen(req, timeout=5).status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    try:
        deadline = time.monotonic() + 60
        while code("alice") != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (code("alice"), code("bob")) == (200, 401)
        cfg.write_text(users("bob"))
        proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert (code("alice"), code("bob")) == (401, 200)
        cfg.write_text("basic_auth_users:\n  bob: not-a-hash\n")
        proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert code("bob") == 200 and proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "SIGHUP: web config" in err and "reloaded" in err
    assert "ERROR SIGHUP: web config not reloaded, the one in use stays" in err, err
    assert "Traceback" not in err, err
