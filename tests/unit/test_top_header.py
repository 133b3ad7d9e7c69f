"""What `tfowatch top`'s header says when a frame is short of something (no BPF needed)."""

from __future__ import annotations

from tfowatch.top.session import Frame, Options, header_lines


def frame(**kw: object) -> Frame:
    return Frame(time=0.0, interval_s=1.0, tier="tracepoint", mode="auto", kernel="6.18", lost=0,
                 available=set(), rows=[], **kw)  # type: ignore[arg-type]


def test_a_quiet_frame_says_nothing_extra() -> None:
    assert len(header_lines(frame(), Options())) == 1


def test_folded_rows_and_failed_parts_are_named() -> None:
    lines = header_lines(frame(folded=7, failed=["kernel"]), Options(series_cap=3))
    assert any(line.startswith("FOLDED: 7 events") and "--series-cap 3" in line for line in lines)
    assert any(line.startswith("INCOMPLETE: could not read kernel") for line in lines), lines


def test_unwatched_listeners_are_named() -> None:
    lines = header_lines(frame(unwatched=2), Options())
    assert any(line.startswith("UNWATCHED: 2 listeners open before start") for line in lines), lines
