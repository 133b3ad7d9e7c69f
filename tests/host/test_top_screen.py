"""`tfowatch top` in a real 80x24 terminal (tmux): rows from real TFO traffic, then the
keys — totals, sort by column and reverse, filter, pause, quit — read back from the screen."""

from __future__ import annotations

import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from netlab import TFOWATCH, Lab, skip_unless_root_bpf

PORT_A, PORT_B = 7201, 7202


class Tmux:
    def __init__(self, command: str, exit_file: Path) -> None:
        self.sock = f"tfw-top-{secrets.token_hex(3)}"
        self.exit_file = exit_file
        self.run("new-session", "-d", "-x", "80", "-y", "24", "-s", "top",
                 f"{command}; echo $? > {exit_file}; sleep 60")

    def run(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.sock, *args], check=True, capture_output=True,
                              text=True).stdout

    def keys(self, *keys: str, literal: bool = False) -> None:
        self.run("send-keys", "-t", "top", *(["-l"] if literal else []), *keys)

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "top")

    def wait(self, ok: Callable[[str], bool], what: str, timeout: float = 150) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.screen()
            if ok(text):
                return text
            time.sleep(0.2)
        raise AssertionError(f"screen never showed {what}:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True)


def table(text: str) -> list[dict[str, str]]:
    """The rows on screen as {header: cell}."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["NETNS"])
    heads = [h.rstrip("^v") for h in lines[start].split()]
    rows = []
    for line in lines[start + 1:]:
        cells = line.split()
        if len(cells) != len(heads) or not cells[2].isdigit():
            continue
        rows.append(dict(zip(heads, cells, strict=True)))
    return rows


def client_ports(text: str) -> list[str]:
    return [r["PORT"] for r in table(text) if r["SIDE"] == "client"]


@pytest.fixture(scope="module")
def screen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Tmux, str]]:
    skip_unless_root_bpf("top screen test", "tmux")
    lab = Lab()
    exit_file = tmp_path_factory.mktemp("top") / "exit"
    tm = Tmux(f"{TFOWATCH} top -i 0.5", exit_file)
    try:
        srv, addr = lab.server("s", "3")
        lab.start_server(srv, str(PORT_A), str(PORT_B))
        tm.wait(lambda s: "tfowatch top  kernel" in s, "the first frame")
        lab.client.peer("client", addr, str(PORT_A), "1", "--comm", "scr-a")  # cookie request
        lab.client.peer("client", addr, str(PORT_A), "2", "--comm", "scr-a")
        lab.client.peer("client", addr, str(PORT_B), "4", "--comm", "scr-b")
        tm.keys("t")
        yield tm, str(lab.client.inode)
    finally:
        tm.close()
        lab.close()


def test_rows_fit_80_columns_with_totals(screen: tuple[Tmux, str]) -> None:
    tm, client = screen
    text = tm.wait(lambda s: {"scr-a", "scr-b"} <= {r["PROCESS"] for r in table(s)} and "totals" in s,
                   "both client rows in the totals view")
    rows = {r["PROCESS"]: r for r in table(text) if r["SIDE"] == "client"}
    assert rows["scr-a"]["ACKED"] == "2" and rows["scr-b"]["ACKED"] == "4"
    assert rows["scr-a"]["NOCOOKIE"] == "1"
    assert all(len(line) <= 80 for line in text.splitlines())
    assert client.startswith(rows["scr-a"]["NETNS"].rstrip("…"))
    if "tier tracepoint" in text:  # server rows cannot fill cookie columns there
        server = [r for r in table(text) if r["SIDE"] == "server"]
        assert server and all(r["REQ"] == "n/a" for r in server)


def test_sort_by_column_and_reverse(screen: tuple[Tmux, str]) -> None:
    tm, _ = screen
    tm.keys(">", ">", ">")  # activity -> netns -> side -> port
    text = tm.wait(lambda s: "sort port " in s or s.rstrip().endswith("sort port"), "sort port")
    assert client_ports(text) == sorted(client_ports(text)) and len(set(client_ports(text))) == 2
    tm.keys("r")
    text = tm.wait(lambda s: "sort port reversed" in s, "the reversed sort")
    assert client_ports(text) == sorted(client_ports(text), reverse=True)
    tm.keys("r", *[">"] * 9)  # port -> ... -> syn_data_acked, descending
    text = tm.wait(lambda s: "sort syn_data_acked " in s, "sort by ACKED")
    acked = [int(r["ACKED"]) for r in table(text) if r["SIDE"] == "client"]
    assert acked == sorted(acked, reverse=True) and acked[0] == 4


def test_filter_then_clear(screen: tuple[Tmux, str]) -> None:
    tm, _ = screen
    tm.keys("/")
    tm.keys("scr-a", literal=True)
    tm.keys("Enter")
    text = tm.wait(lambda s: "filter 'scr-a'" in s, "the filter")
    assert {r["PROCESS"] for r in table(text)} == {"scr-a"}
    tm.keys("Escape")
    tm.wait(lambda s: {"scr-a", "scr-b"} <= {r["PROCESS"] for r in table(s)}, "both rows again")


def test_pause_and_quit(screen: tuple[Tmux, str]) -> None:
    tm, _ = screen
    tm.keys("p")
    tm.wait(lambda s: "PAUSED" in s, "PAUSED")
    tm.keys("p")
    tm.wait(lambda s: "PAUSED" not in s, "resumed")
    tm.keys("q")
    deadline = time.monotonic() + 30
    while not tm.exit_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert tm.exit_file.read_text().strip() == "0"
