"""Deployment artefacts: `make install` gives a unit that systemd-analyze verifies and rates as
docs/DEPLOYMENT.md says; the DaemonSet asks for the unit's capabilities and a config tfowatch
accepts; the multi-node scrape config passes promtool."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import certs
import pytest
import yaml
from netlab import unit_caps
from support import tfowatch

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"


def exposure(unit: Path) -> str:
    res = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                         capture_output=True, text=True, check=True)
    m = re.search(r"Overall exposure level for tfowatch.service: (\d+\.\d)", res.stdout)
    assert m, res.stdout[-500:]
    return m.group(1)


def make_install(root: Path) -> subprocess.CompletedProcess[str]:
    """`make install` with every path moved under `root`."""
    dirs = {"PREFIX": root / "usr", "LIBDIR": root / "opt", "SYSCONFDIR": root / "etc",
            "UNITDIR": root / "unit"}
    return subprocess.run(["make", "-C", str(ROOT), "install", *(f"{k}={v}" for k, v in dirs.items())],
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0 or not shutil.which("systemd-analyze"):
        pytest.skip("make install needs root and systemd-analyze (make setup installs it)")
    root = tmp_path_factory.mktemp("install")
    res = make_install(root)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return root


def test_installed_unit_verifies_and_runs_the_installed_binary(installed: Path) -> None:
    unit = installed / "unit" / "tfowatch.service"
    text = unit.read_text()
    assert f"ExecStart={installed}/usr/bin/tfowatch run --config {installed}/etc/tfowatch/tfowatch.toml" \
        in text
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr
    binary = installed / "usr" / "bin" / "tfowatch"
    check = subprocess.run([str(binary), "run", "--config", str(installed / "etc/tfowatch/tfowatch.toml"),
                            "--check-config"], capture_output=True, text=True)
    assert check.returncode == 0 and "config OK" in check.stdout, check.stderr
    # The installed package has its BPF sources, inside the install (not the checkout).
    plan = json.loads(subprocess.run([str(binary), "probes", "--json"], capture_output=True, text=True,
                                     cwd="/", check=True).stdout)
    assert plan["bpf_sources"]["missing"] == [] and plan["bpf_sources"]["dir"].startswith(str(installed))


def test_exposure_in_the_docs_is_the_measured_one(installed: Path) -> None:
    measured = exposure(installed / "unit" / "tfowatch.service")
    docs = (ROOT / "docs" / "DEPLOYMENT.md").read_text()
    assert f"rates the installed unit **{measured} OK**" in docs, f"measured {measured}"


def test_install_keeps_an_edited_config(installed: Path) -> None:
    cfg = installed / "etc" / "tfowatch" / "tfowatch.toml"
    cfg.write_text('series_cap = 7\n')
    make_install(installed).check_returncode()
    assert cfg.read_text() == 'series_cap = 7\n'


def k8s_docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "tfowatch.yaml").read_text()) if d]


def test_daemonset_asks_for_the_units_capabilities_and_mounts() -> None:
    (ds,) = [d for d in k8s_docs() if d["kind"] == "DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    caps = c["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"]
    assert sorted(x.lower() for x in caps["add"]) == unit_caps()
    assert pod["hostPID"] is True and c["securityContext"]["privileged"] is False
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/sys/kernel/btf", "/sys/kernel/tracing", "/lib/modules", "/sys/fs/cgroup"} <= mounts
    assert all(m.get("readOnly") for m in c["volumeMounts"] if m["mountPath"] != "/tmp")
    port = c["ports"][0]["containerPort"]
    assert ds["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    assert f"$(NODE_IP):{port}" in c["args"]


def test_daemonset_config_is_accepted(tmp_path: Path) -> None:
    (cm,) = [d for d in k8s_docs() if d["kind"] == "ConfigMap"]
    cfg = tmp_path / "tfowatch.toml"
    cfg.write_text(cm["data"]["tfowatch.toml"])
    res = tfowatch("run", "--config", str(cfg), "--listen", "127.0.0.1:19135", "--check-config")
    assert res.returncode == 0, res.stderr


def test_example_config_names_every_key_with_its_default() -> None:
    from tfowatch.exporter.config import OPTIONS, Settings

    text = (ROOT / "deploy" / "systemd" / "tfowatch.toml").read_text()
    for opt in OPTIONS:
        default = getattr(Settings(), opt.key)
        shown = str(default).lower() if isinstance(default, bool) else str(default)
        line = f"{opt.key} = " + (f'"{default}"' if isinstance(default, str) else shown)
        assert line in text or (default is None and f"# {opt.key} = " in text), opt.key


def test_scrape_config_passes_promtool(tmp_path: Path) -> None:
    if not shutil.which("promtool"):
        pytest.skip("promtool is not installed (make setup installs it)")
    pki = certs.make(tmp_path)
    files = {"tfowatch-ca.crt": pki.ca, "tfowatch-client.crt": pki.client_crt,
             "tfowatch-client.key": pki.client_key}
    for name, src in files.items():
        shutil.copy(src, tmp_path / name)
    (tmp_path / "tfowatch.password").write_text("secret\n")
    text = (DEPLOY / "prometheus" / "scrape.yml").read_text().replace("/etc/prometheus/", f"{tmp_path}/")
    text = text.replace("../../monitoring/", f"{ROOT}/monitoring/")
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(text)
    res = subprocess.run(["promtool", "check", "config", str(cfg)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
