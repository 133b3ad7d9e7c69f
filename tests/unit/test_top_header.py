"""What `tfowatch top`'s header says when a frame is short of something (no BPF needed)."""

from __future__ import annotations

from tfowatch.top.session import Frame, Options, header_lines


def frame(**kw: object) -> Frame:
    return Frame(**{"time": 0.0, "interval_s": 1.0, "tier": "tracepoint", "mode": "auto", "kernel": "6.18",
                    "lost": 0, "available": set(), "rows": []} | kw)  # type: ignore[arg-type]


def test_a_quiet_frame_says_nothing_extra() -> None:
    assert len(header_lines(frame(), Options())) == 1


def test_folded_rows_and_failed_parts_are_named() -> None:
    lines = header_lines(frame(folded=7, failed=["kernel"]), Options(series_cap=3))
    assert any(line.startswith("FOLDED: 7 events") and "--series-cap 3" in line for line in lines)
    assert any(line.startswith("INCOMPLETE: could not read kernel") for line in lines), lines


def test_unwatched_listeners_are_named() -> None:
    lines = header_lines(frame(unwatched=2), Options())
    assert any(line.startswith("UNWATCHED: 2 listeners open before start") for line in lines), lines


def test_destinations_the_path_breaks_get_a_line_each_up_to_a_bound() -> None:
    from collections import defaultdict

    from tfowatch.top.rows import Row, RowKey
    from tfowatch.top.session import MAX_PATH_LINES

    def row(port: int, **totals: int) -> Row:
        return Row(RowKey("5", "client", str(port), "curl"), totals=defaultdict(int, totals))

    healthy = row(80, syn_data_sent=4, syn_data_acked=4, cookie_unavailable=1)
    timed_out = row(443, tfo_timeout=1, syn_data_sent=1)
    lines = header_lines(frame(rows=[healthy, timed_out]), Options())
    assert [line for line in lines if line.startswith("PATH")] == [
        "PATH timeouts: curl -> :443 (netns 5): TFO connections timed out (SYN-ACKs or data eaten: "
        "blackhole)"]
    stripped = [row(1000 + i, cookie_unavailable=2) for i in range(MAX_PATH_LINES + 2)]
    lines = [line for line in header_lines(frame(rows=stripped), Options()) if line.startswith("PATH")]
    assert len(lines) == MAX_PATH_LINES + 1 and lines[-1].startswith("PATH: 2 more destinations"), lines
    assert all("no cookie" in line for line in lines[:-1])
