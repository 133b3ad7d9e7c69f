"""`tfowatch top` on a terminal: a Rich full-screen table and single-key commands.

Keys: q quit, < > sort column, r reverse, / filter (Enter applies, Esc clears),
p or space pause, t per-interval deltas vs totals. Columns empty in every shown row
are dropped first when the terminal is too narrow (80x24 over ssh works).
"""

from __future__ import annotations

import os
import select
import sys
import termios
import threading
import time
import tty
from types import TracebackType

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from tfowatch.top.rows import COLUMNS, KEY_FIELDS, SORT_KEYS, Column, Row, cell
from tfowatch.top.session import Frame, Options, TopSession, fmt_cell, header_lines, ordered

KEY_WIDTHS = {"netns": 12, "side": 6, "port": 5, "process": 12}
HELP = "q quit  </> sort  r reverse  / filter  p pause  t totals"
ESC = "\x1b"


class KeyReader:
    """stdin in cbreak mode; `get(timeout)` returns one key or None."""

    def __enter__(self) -> KeyReader:
        self.fd = sys.stdin.fileno()
        self.saved = termios.tcgetattr(self.fd)
        tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)

    def get(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not ready:
            return None
        return os.read(self.fd, 32).decode(errors="replace")


def fit_columns(rows: list[Row], frame: Frame, opts: Options, width: int) -> tuple[list[Column], int]:
    """Counter columns that fit `width`; empty ones go first. Returns (shown, hidden count)."""
    room = width - sum(KEY_WIDTHS.values()) - len(KEY_WIDTHS)
    cols = list(COLUMNS)

    def need(cs: list[Column]) -> int:
        return sum(max(len(c.header), 3) + 1 for c in cs)

    def empty(c: Column) -> bool:
        return c.key != opts.sort and all(cell(r, c, frame.available, True) in ("", 0, None) for r in rows)

    for c in reversed(COLUMNS):
        if need(cols) <= room:
            break
        if empty(c):
            cols.remove(c)
    while cols and need(cols) > room:
        victim = next((c for c in reversed(cols) if c.key != opts.sort), cols[-1])
        cols.remove(victim)
    return cols, len(COLUMNS) - len(cols)


def render(frame: Frame | None, opts: Options, width: int, paused: bool, prompt: str | None) -> Group:
    if frame is None:
        return Group(Text("tfowatch top: waiting for the first interval..."), Text(HELP, style="dim"))
    rows = ordered(frame, opts)
    cols, hidden = fit_columns(rows, frame, opts, width)
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False, expand=False)
    arrow = "^" if opts.reverse else "v"
    for name in KEY_FIELDS:
        title = name.upper() + (arrow if opts.sort == name else "")
        table.add_column(title, no_wrap=True, overflow="ellipsis", max_width=KEY_WIDTHS[name])
    for c in cols:
        table.add_column(c.header + (arrow if opts.sort == c.key else ""), justify="right", no_wrap=True)
    for r in rows:
        table.add_row(r.key.netns, r.key.side, r.key.port, r.key.process,
                      *(fmt_cell(cell(r, c, frame.available, opts.totals)) for c in cols))
    status = [f"sort {opts.sort}{' reversed' if opts.reverse else ''}"]
    if opts.text_filter:
        status.append(f"filter '{opts.text_filter}'")
    if hidden:
        status.append(f"+{hidden} columns hidden (wider terminal or -o json)")
    if paused:
        status.append("PAUSED")
    foot = f"filter: {prompt}_" if prompt is not None else "  ".join(status) + "   " + HELP
    return Group(*(Text(line, no_wrap=True, overflow="ellipsis") for line in header_lines(frame, opts)),
                 table, Text(foot, no_wrap=True, overflow="ellipsis", style="bold" if prompt else "dim"))


class Screen:
    def __init__(self, session: TopSession, opts: Options) -> None:
        self.session, self.opts = session, opts
        self.frame: Frame | None = None
        self.paused = False
        self.prompt: str | None = None  # filter being typed

    def on_key(self, key: str) -> bool:
        """Apply one key; False to quit."""
        if self.prompt is not None:
            if key in ("\r", "\n"):
                self.opts.text_filter, self.prompt = self.prompt, None
            elif key.startswith(ESC):
                self.opts.text_filter, self.prompt = "", None
            elif key in ("\x7f", "\b"):
                self.prompt = self.prompt[:-1]
            elif key.isprintable():
                self.prompt += key
            return True
        if key == "q":
            return False
        if key in ("<", ">"):
            i = SORT_KEYS.index(self.opts.sort) + (1 if key == ">" else -1)
            self.opts.sort = SORT_KEYS[i % len(SORT_KEYS)]
        elif key == "r":
            self.opts.reverse = not self.opts.reverse
        elif key == "/":
            self.prompt = ""
        elif key.startswith(ESC):
            self.opts.text_filter = ""
        elif key in ("p", " "):
            self.paused = not self.paused
        elif key == "t":
            self.opts.totals = not self.opts.totals
        return True

    def run(self, stop: threading.Event) -> None:
        console = Console()
        n = 0
        due = time.monotonic() + self.opts.interval
        with Live(console=console, screen=True, auto_refresh=False) as live, KeyReader() as keys:
            live.update(self._view(console), refresh=True)
            while not stop.is_set() and (self.opts.count is None or n < self.opts.count):
                key = keys.get(min(due - time.monotonic(), 0.2))
                if key is not None:
                    for k in ([key] if key.startswith(ESC) else list(key)):
                        if not self.on_key(k):
                            return
                if time.monotonic() >= due:
                    due += self.opts.interval
                    if not self.paused:
                        self.frame = self.session.sample()
                        n += 1
                elif key is None:
                    continue
                live.update(self._view(console), refresh=True)

    def _view(self, console: Console) -> Group:
        return render(self.frame, self.opts, console.size.width, self.paused, self.prompt)
