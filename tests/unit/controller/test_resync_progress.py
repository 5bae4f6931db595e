"""How a running resync reads in the module log and `hafs state` (controller.datapath)."""

from __future__ import annotations

from controller.datapath import describe_resync


def test_copying_shows_percent_bytes_rate_and_time_left() -> None:
    text = describe_resync(
        {
            "phase": "pass 1: copying",
            "bytes_done": 250_000_000,
            "bytes_planned": 1_000_000_000,
            "elapsed": 2.5,
        }  # fmt: skip
    )
    assert text == "pass 1: copying: 25% (250.0 of 1000.0 MB), 100.0 MB/s, about 8 s left"


def test_other_phases_and_an_empty_plan_show_the_phase_alone() -> None:
    assert describe_resync({"phase": "fetching the replica's manifest"}) == (
        "fetching the replica's manifest"
    )
    assert describe_resync({"phase": "pass 2: copying", "bytes_planned": 0}) == "pass 2: copying"
    assert describe_resync({}) == "starting"


def test_no_rate_before_any_time_passed() -> None:
    text = describe_resync({"phase": "pass 1: copying", "bytes_planned": 10, "elapsed": 0})
    assert text == "pass 1: copying: 0% (0.0 of 0.0 MB)"
