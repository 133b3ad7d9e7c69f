"""Namespace identity by cookie (issue 16, case 1): the bookkeeping, without a kernel."""

from __future__ import annotations

from tfowatch.core.netns import Generations


def test_another_cookie_at_an_inode_replaces_it_once_and_the_old_ones_events_are_late() -> None:
    replaced: list[tuple[int, int]] = []
    gens = Generations(lambda ino, cookie: replaced.append((ino, cookie)))
    gens.seed({10: 4100, 11: 0})  # 0: a namespace read without a cookie says nothing
    assert gens.admit(10, 4100) and replaced == []
    # the kernel hands cookies out in per-CPU batches: the new namespace's may be the smaller
    assert gens.admit(10, 7) and replaced == [(10, 7)] and gens.reused == 1
    assert gens.admit(10, 7) and replaced == [(10, 7)]  # the same one, not replaced again
    assert not gens.admit(10, 4100, n=3) and gens.late == 3 and replaced == [(10, 7)]
    assert gens.admit(11, 5) and replaced == [(10, 7)]  # first seen: nothing to replace
    assert gens.admit(12, 0)  # an event without a cookie (a kernel before 5.12) is its inode's


def test_a_forgotten_inode_starts_anew_and_disabled_generations_admit_everything() -> None:
    replaced: list[tuple[int, int]] = []
    gens = Generations(lambda ino, cookie: replaced.append((ino, cookie)))
    gens.admit(10, 1)
    gens.admit(10, 2)
    gens.forget({10})
    assert gens.admit(10, 1) and replaced == [(10, 2)]  # 1 is first seen again, not late
    off = Generations(lambda ino, cookie: replaced.append((ino, cookie)), enabled=False)
    assert off.admit(10, 1) and off.admit(10, 2) and off.reused == 0
