"""The container image, really built and run the way the DaemonSet runs it.

There is no image registry here, so the base is built from Debian's packages (mmdebstrap →
`podman import`), the image with `podman build` from the repository's Containerfile, and it
runs with the pod spec of deploy/kubernetes/tfowatch.yaml translated to podman flags: the
same capabilities, hostPID, host network, read-only root, the same host mounts and config.
It must reach the tier `tfowatch probes` plans on the host and count a TFO exchange in
namespaces on the host exactly."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from lab import pip_cert
from netlab import Lab, config_hz, planned_plan, scrape, series, skip_unless_root_bpf, tfo_exchange

from tfowatch import __version__

ROOT = Path(__file__).parents[2]
MANIFEST = ROOT / "deploy" / "kubernetes" / "tfowatch.yaml"
BASE = "localhost/tfowatch-base:bookworm"
NAME = "tfowatch-test"
# This sandbox, not the image: crun refuses hybrid cgroup hierarchies ("cgroups in hybrid mode
# not supported"), so runc runs the containers; and podman's default rlimits exceed the
# hard limits here (setrlimit EPERM), so they are set within them.
PODMAN = ["podman", "--runtime", "runc"]
LIMITS = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]


def manifest() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text()) if d}


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in args."""
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], text)


def pod_as_podman(docs: dict[str, dict[str, Any]], config_dir: Path, node_ip: str) -> list[str]:
    """`podman run` flags and arguments for the DaemonSet's pod: one source of truth."""
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["privileged"] is False
    flags = ["--pid", "host"] if pod["hostPID"] else []
    flags += ["--network", "host"] if pod["hostNetwork"] else []
    flags += ["--user", str(sc["runAsUser"]), "--cap-drop", "all",
              *(f"--cap-add=CAP_{cap}" for cap in sc["capabilities"]["add"])]
    flags += ["--read-only"] if sc["readOnlyRootFilesystem"] else []
    flags += ["--security-opt", "no-new-privileges"] if sc["allowPrivilegeEscalation"] is False else []
    seccomp = sc["seccompProfile"]["type"]
    assert seccomp in ("RuntimeDefault", "Unconfined"), seccomp
    flags += ["--security-opt", "seccomp=unconfined"] if seccomp == "Unconfined" else []  # else podman's
    flags += ["--memory", c["resources"]["limits"]["memory"].replace("Mi", "m")]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for m in c["volumeMounts"]:
        v, ro = volumes[m["name"]], ":ro" if m.get("readOnly") else ""
        if "hostPath" in v:
            flags += ["-v", f"{v['hostPath']['path']}:{m['mountPath']}{ro}"]
        elif "configMap" in v:
            for key, text in docs["ConfigMap"]["data"].items():
                (config_dir / key).write_text(text)
            flags += ["-v", f"{config_dir}:{m['mountPath']}{ro}"]
        else:
            size = v["emptyDir"]["sizeLimit"].replace("Mi", "m")
            flags += ["--tmpfs", f"{m['mountPath']}:size={size}"]
    env = {e["name"]: node_ip for e in c["env"] if e["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"}
    return [*flags, *(f"--env={k}={v}" for k, v in env.items()), c["image"],
            *(expand(a, env) for a in c["args"])]


def podman(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)


def build_base() -> None:
    """A Debian 12 base from Debian's packages, with the host's apt sources."""
    if podman("image", "exists", BASE).returncode == 0:
        return
    sources = sorted(str(p) for p in Path("/etc/apt/sources.list.d").glob("*.sources"))
    sources += ["/etc/apt/sources.list"] if Path("/etc/apt/sources.list").exists() else []
    mm = subprocess.Popen(["mmdebstrap", "--variant=minbase", "--quiet", "bookworm", "-", *sources],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    imp = subprocess.run([*PODMAN, "import", "-q", "-", BASE], stdin=mm.stdout, capture_output=True,
                         text=True, timeout=900)
    assert mm.wait(timeout=60) == 0, mm.stderr.read().decode() if mm.stderr else ""
    assert imp.returncode == 0, imp.stderr


@pytest.fixture(scope="module")
def image() -> str:
    skip_unless_root_bpf("container test", "podman", "mmdebstrap", "runc")
    build_base()
    tag = manifest()["DaemonSet"]["spec"]["template"]["spec"]["containers"][0]["image"]
    # The machine's own trust for PyPI (a TLS-intercepting proxy here), handed to the build.
    cert = pip_cert()
    trust = ["-v", f"{cert}:/run/pip-ca.crt:ro", "--build-arg", "PIP_CERT=/run/pip-ca.crt"] if cert else []
    started = time.monotonic()
    res = podman("build", "-q", "--network", "host", *LIMITS, *trust, "--build-arg", f"BASE={BASE}",
                 "-t", tag, "-f", str(ROOT / "Containerfile"), str(ROOT), timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    size = podman("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip()
    print(f"image {tag}: built in {time.monotonic() - started:.0f} s, {int(size) / 1e6:.0f} MB")
    return str(tag)


def test_the_daemonset_names_this_image() -> None:
    (c,) = manifest()["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    assert c["image"] == f"tfowatch:{__version__}"
    text = (ROOT / "Containerfile").read_text()
    assert 'ENTRYPOINT ["/opt/tfowatch/bin/tfowatch"]' in text


@pytest.fixture
def container(image: str, tmp_path: Path, request: pytest.FixtureRequest
              ) -> Iterator[tuple[str, subprocess.CompletedProcess[str]]]:
    """The DaemonSet's pod as a podman container. An indirect parameter changes it: `seccomp`
    overrides the manifest's profile, `unmount` drops a volume mount, `flags` adds podman's."""
    podman("rm", "-f", "-t", "0", NAME)
    docs = manifest()
    (c,) = docs["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    change = getattr(request, "param", {})
    c["securityContext"]["seccompProfile"]["type"] = change.get(
        "seccomp", c["securityContext"]["seccompProfile"]["type"])
    c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] not in change.get("unmount", ())]
    run_args = pod_as_podman(docs, tmp_path, "127.0.0.1")
    port = re.search(r":(\d+)$", run_args[-1])
    assert port, run_args[-1]
    started = podman("run", "-d", "--name", NAME, *LIMITS, *change.get("flags", ()), *run_args)
    try:
        assert started.returncode == 0, started.stderr
        yield f"127.0.0.1:{port.group(1)}", started
    finally:
        logs = podman("logs", NAME).stderr
        podman("rm", "-f", "-t", "20", NAME)
        print(logs[-3000:])


def wait_for_metrics(listen: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://{listen}/metrics", timeout=2)
            return
        except OSError:
            state = podman("inspect", "--format", "{{.State.Status}}", NAME).stdout.strip()
            assert state == "running", podman("logs", NAME).stderr[-3000:]
            time.sleep(0.5)
    pytest.fail("the container did not serve /metrics in 120 s")


def test_image_runs_as_the_daemonset_does_and_counts_exactly(container: tuple[str, Any]) -> None:
    listen, _ = container
    wait_for_metrics(listen)
    lab = Lab()
    try:
        exchange = tfo_exchange(lab)
        samples = scrape(f"http://{listen}/metrics")
        (info,) = [dict(k) for k in series(samples, "tfowatch_build_info")]
        assert info["tier"] == info["planned_tier"] == planned_plan()["tier"] != "counters", info
        attached = series(samples, "tfowatch_probe_attached")
        assert attached and set(attached.values()) == {1.0}, attached
        exchange.assert_counted_exactly(samples)
        # Cgroup paths resolve through the read-only cgroup mount (containers are named by them).
        assert any(dict(k).get("cgroup") for k in series(samples, "tfowatch_syn_data_sent_total"))
    finally:
        lab.close()
    logs = podman("logs", NAME).stderr
    assert " ERROR " not in logs and f"tier {info['tier']}, serving" in logs, logs[-2000:]


@pytest.mark.parametrize("container", [{"seccomp": "RuntimeDefault"}], indirect=True)
def test_a_default_seccomp_profile_that_denies_bpf_is_named(container: tuple[str, Any]) -> None:
    """Why the DaemonSet says Unconfined: under this runtime's default profile bpf() needs
    CAP_SYS_ADMIN. The daemon must say exactly that, not blame the kernel headers."""
    listen, _ = container
    wait_for_metrics(listen)
    samples = scrape(f"http://{listen}/metrics")
    profile = json.loads(Path("/usr/share/containers/seccomp.json").read_text())
    bpf_rules = [r for r in profile["syscalls"] if "bpf" in r["names"] and r["action"] == "SCMP_ACT_ALLOW"]
    if all(r.get("includes", {}).get("caps") != ["CAP_SYS_ADMIN"] for r in bpf_rules):
        pytest.skip("this runtime's default seccomp profile lets CAP_BPF call bpf()")
    degraded = {dict(k)["reason"]: v for k, v in series(samples, "tfowatch_tier_degraded").items()}
    assert degraded == {"bpf_denied": 1.0}, degraded
    assert "seccomp" in podman("logs", NAME).stderr


def kernel_hz(listen: str) -> dict[str, float]:
    wait_for_metrics(listen)
    return {dict(k)["source"]: v for k, v in series(scrape(f"http://{listen}/metrics"),
                                                       "tfowatch_kernel_hz").items()}


def test_the_daemonset_finds_config_hz(container: tuple[str, Any]) -> None:
    """The pod spec's mounts give the daemon the kernel's tick rate, which times the blackhole
    state: from /proc/config.gz, or the host's /boot it mounts."""
    hz, where = config_hz()
    source = "/proc/config.gz" if where == "/proc/config.gz" else "/boot/config-RELEASE"
    assert kernel_hz(container[0]) == {source: hz}


# Hide every kernel config from the container (without the /boot mount; a masked file reads as
# empty): the runtime's default mask on /proc/timer_list leaves no source; unmasked, the tick
# rate is measured from its jiffies.
HIDE_CONFIG = {"unmount": ("boot",), "flags": ("--security-opt", "mask=/proc/config.gz")}
MEASURE_HZ = {"unmount": ("boot",), "flags": ("--security-opt", "mask=/proc/config.gz",
                                              "--security-opt", "unmask=/proc/timer_list")}


@pytest.mark.parametrize("container", [HIDE_CONFIG, MEASURE_HZ], ids=["no-source", "timer-list"],
                         indirect=True)
def test_an_unknown_config_hz_is_loud_and_timer_list_measures_it(container: tuple[str, Any],
                                                                 request: pytest.FixtureRequest) -> None:
    hz, _ = config_hz()
    found = kernel_hz(container[0])
    logs = podman("logs", NAME).stderr
    if request.node.callspec.id == "no-source":
        assert found == {"": 0.0}, found
        assert "CONFIG_HZ unknown" in logs and "fix:" in logs, logs[-2000:]
    else:
        assert found == {"/proc/timer_list": hz}, found
        assert "CONFIG_HZ unknown" not in logs, logs[-2000:]


def test_no_container_state_is_left() -> None:
    if shutil.which("podman") is None or os.geteuid() != 0:
        pytest.skip("podman not installed or not root")
    assert podman("container", "exists", NAME).returncode == 1
