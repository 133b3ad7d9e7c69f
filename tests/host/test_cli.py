"""Bad input: a clear one-line error and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from netlab import TFOWATCH
from support import one_line_error, tfowatch

from tfowatch.core.kernel import detect


@pytest.mark.parametrize(("args", "words"), [
    (["run", "--bogus"], "unrecognized arguments: --bogus"),
    (["run", "--listen", "a" * 64 + ".example:9100", "--check-config"], "is not a host name"),
    (["run", "--listen", "foo..bar:9100", "--check-config"], "is not a host name"),
    (["run", "--perf-pages", "1048576", "--check-config"], "must be at most 16384"),
    (["run", "--listen", "127.0.0.1:\u00b2", "--check-config"], "expected HOST:PORT"),
    (["run", "--listen", "nowhere"], "bad listen address"),
    (["run", "--listen", "127.0.0.1:70000"], "bad listen address"),
    (["run", "--mode", "fentry"], "--mode: must be one of auto, kprobe"),
    (["run", "--series-cap", "0"], "--series-cap: must be at least 1"),
    (["run", "--series-cap", "many"], "invalid int value"),
    (["run", "--perf-pages", "100"], "must be a power of two"),
    (["run", "--header-timeout", "0", "--check-config"], "--header-timeout: must be from 1 to 60, not 0"),
    (["run", "--netns-share", "101", "--check-config"], "--netns-share: must be from 1 to 100, not 101"),
    (["run", "--header-timeout", "3600", "--check-config"], "must be from 1 to 60"),
    (["run", "--listen", "no-such-host.invalid:9100"], "bad listen address"),
    (["run", "--web-config-file", "/nonexistent/web.yml"], "cannot read web config"),
    (["frobnicate"], "invalid choice"),
    (["run", "--config", "/nonexistent/tfowatch.toml"], "cannot read config"),
])
def test_bad_flags(args: list[str], words: str) -> None:
    one_line_error(tfowatch(*args), 2, words)


@pytest.mark.parametrize(("text", "words"), [
    ('listen = "127.0.0.1:1"\ncolour = "blue"\n', "unknown key 'colour'"),
    ("series_cap = \"many\"\n", "series_cap must be a whole number, not 'many'"),
    ("series_cap = true\n", "series_cap must be a whole number"),
    ("mode = \n", "config"),
    ('mode = "sideways"\n', "mode: must be one of"),
    ("series_cap = 0\n", "series_cap: must be at least 1"),
    ('listen = "10.0.0.1"\n', "bad listen address '10.0.0.1': expected HOST:PORT"),
    ('listen = "300.1.2.3:9100"\n', "bad listen address '300.1.2.3:9100'"),
    ('log_level = "LOUD"\n', "log_level: must be one of DEBUG"),
    ("max_connections = 1.5\n", "max_connections must be a whole number"),
])
def test_bad_config(tmp_path: Path, text: str, words: str) -> None:
    cfg = tmp_path / "tfowatch.toml"
    cfg.write_text(text)
    one_line_error(tfowatch("run", "--config", str(cfg)), 2, words)


def test_flags_override_the_file_and_check_config_says_what_it_would_run(tmp_path: Path) -> None:
    cfg = tmp_path / "tfowatch.toml"
    cfg.write_text('listen = "127.0.0.1:9300"\nseries_cap = 50\nmode = "counters"\nperf_pages = 64\n')
    res = tfowatch("run", "--config", str(cfg), "--series-cap", "70", "--check-config")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ("tfowatch: config OK: http://127.0.0.1:9300/metrics, mode counters, "
                                  "series_cap 70, netns_share 50%, perf_pages 64, max_connections 16, "
                                  "header_timeout 5 s, "
                                  "netns_grace 300 s, series_ttl 3600 s")


def test_every_run_flag_is_a_config_key() -> None:
    """The flags and the file's keys come from one table: --help lists each key as a flag."""
    from tfowatch.exporter.config import OPTIONS, Settings

    helptext = tfowatch("run", "--help").stdout
    for opt in OPTIONS:
        assert opt.flag in helptext
    assert {o.key for o in OPTIONS} == set(vars(Settings()))


AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
             "--bounding-set=-all"]


def as_user(*args: str) -> subprocess.CompletedProcess[str]:
    return tfowatch(*args, pre=AS_NOBODY if os.geteuid() == 0 else [])


def test_not_root() -> None:
    one_line_error(as_user("run"), 1, "must run as root")


def test_a_user_can_plan_and_read_facts() -> None:
    """`probes` and `facts` answer a user (tracefs is root's): the tiers they cannot see are
    named, with why, and nothing is a traceback."""
    res = as_user("probes", "--json")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    tiers = json.loads(res.stdout)["tiers"]
    assert "tracefs is not readable by this user" in tiers["tracepoint"], tiers
    res = as_user("facts")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert "tracefs is not readable" in json.loads(res.stdout)["tracefs_error"]


@pytest.mark.usefixtures("root_bpf")
def test_kprobe_mode_without_kprobes() -> None:
    if detect().kprobes:
        pytest.skip("this kernel has kprobes: covered by the VM lab's success path instead")
    one_line_error(tfowatch("run", "--mode", "kprobe", "--listen", "127.0.0.1:1"), 1,
                   "kprobes unavailable")


@pytest.mark.usefixtures("root_bpf")
def test_port_in_use() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        one_line_error(tfowatch("run", "--listen", f"127.0.0.1:{port}"), 1, "Address already in use")


@pytest.mark.usefixtures("root_bpf")
def test_bcc_missing(tmp_path: Path) -> None:
    """A Python without BCC (here: a bcc package that fails to import) gets the install hint."""
    fake = tmp_path / "bcc"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('No module named bcc')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    one_line_error(tfowatch("run", "--mode", "tracepoint", "--listen", "127.0.0.1:1", env=env), 1,
                   "apt install python3-bpfcc")


def test_probes_json_names_every_design_card_point() -> None:
    res = tfowatch("probes", "--json")
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    points = {p["point"] for p in plan["points"]}
    assert {"tcp_fastopen_cookie_gen", "tcp_fastopen_check", "tcp_send_syn_data",
            "tcp_twsk_unique"} <= points
    for p in plan["points"]:
        assert p["why"] and p["tier"] in ("kprobe", "sockops", "tracepoint", "counters")
        assert p["attachments"] or p["counter"]
    tiers = plan["tiers"]
    assert tiers["counters"] == []
    assert plan["metrics"] == tiers[plan["tier"]]
    if not detect().kprobes:
        assert tiers["kprobe"].startswith("unavailable: --mode kprobe: kprobes unavailable")


HEAVY = {"bcc", "pyroute2", "prometheus_client", "rich", "bcrypt"}
IMPORTED = """import contextlib, sys
from tfowatch import cli
with contextlib.suppress(SystemExit):
    cli.main(sys.argv[1:])
print(" ".join(sorted({name.split(".")[0] for name in sys.modules})))
"""


@pytest.mark.parametrize("argv", [["--help"], ["hash-password", "--help"], ["top", "--help"],
                                  ["run", "--check-config", "--listen", "127.0.0.1:1"]])
def test_light_commands_import_nothing_heavy(argv: list[str]) -> None:
    """The parser and the config check load no BPF loader, netlink, exporter or screen library."""
    res = subprocess.run([sys.executable, "-c", IMPORTED, *argv], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-1000:]
    assert not HEAVY & set(res.stdout.splitlines()[-1].split()), res.stdout.splitlines()[-1]


@pytest.mark.parametrize(("stdin", "words"), [
    (b"x" * 73 + b"\n", "the password is 73 bytes; bcrypt uses at most 72"),
    (b"\xff\xfe\n", "not UTF-8"),
    (b"\n", "no password on stdin"),
])
def test_hash_password_refuses_what_bcrypt_cannot_hash(stdin: bytes, words: str) -> None:
    res = subprocess.run([str(TFOWATCH), "hash-password"], input=stdin, capture_output=True, timeout=60)
    one_line_error(subprocess.CompletedProcess(res.args, res.returncode, res.stdout.decode(),
                                               res.stderr.decode(errors="replace")), 2, words)


# A well-formed hash (the OpenBSD test vector of "U*U").
VALID_HASH = "$2b$10$" + "N9qo8uLOickgx2ZMRZoMye" + "IjZAgcfl7p92ldGxad68LJZdL17lhWy"


@pytest.mark.parametrize(("text", "words"), [
    (b"basic_auth_users:\n  123: '" + VALID_HASH.encode() + b"'\n", "user name 123 is not a string"),
    (b"basic_auth_users:\n  alice: '$2b$10$" + b"!" * 53 + b"'\n", "is not a bcrypt hash"),
    (b"\xff: x\n", "not UTF-8"),
])
def test_bad_web_configs_are_one_line_errors(tmp_path: Path, text: bytes, words: str) -> None:
    cfg = tmp_path / "web.yml"
    cfg.write_bytes(text)
    one_line_error(tfowatch("run", "--web-config-file", str(cfg), "--check-config"), 2, words)


def test_a_config_that_is_not_utf8_is_a_one_line_error(tmp_path: Path) -> None:
    cfg = tmp_path / "tfowatch.toml"
    cfg.write_bytes(b'listen = "127.0.0.1:9100"\n\xff\n')
    one_line_error(tfowatch("run", "--config", str(cfg), "--check-config"), 2, "not UTF-8")


def test_a_relative_web_config_in_a_config_file_is_the_files(tmp_path: Path) -> None:
    """`web_config_file = "web.yml"` in /etc/tfowatch/tfowatch.toml means /etc/tfowatch/web.yml,
    wherever the daemon was started from."""
    (tmp_path / "web.yml").write_text(f"basic_auth_users:\n  prometheus: '{VALID_HASH}'\n")
    cfg = tmp_path / "tfowatch.toml"
    cfg.write_text('web_config_file = "web.yml"\n')
    res = subprocess.run([str(TFOWATCH), "run", "--config", str(cfg), "--check-config"],
                         capture_output=True, text=True, timeout=60, cwd="/")
    assert res.returncode == 0 and "basic auth: 1 user(s)" in res.stdout, res.stdout + res.stderr
