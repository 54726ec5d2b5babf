"""stream.faust_compat relies on private Faust/aiokafka names: fail loudly when an upgrade moves them."""

from __future__ import annotations

from importlib.metadata import version

from stream import faust_compat


def test_private_names_still_exist() -> None:
    assert faust_compat.missing_private_api() == []


def test_installed_faust_is_the_tested_one() -> None:
    assert version("faust-streaming").startswith(faust_compat.TESTED_FAUST + "."), (
        f"faust-streaming {version('faust-streaming')} installed; stream/faust_compat.py was written against "
        f"{faust_compat.TESTED_FAUST}.x: re-check every item there, then update TESTED_FAUST and the pin"
    )


def test_current_event_is_set_and_restored() -> None:
    import faust.streams

    class Event:  # anything weak-referenceable
        pass

    e = Event()
    before = faust.streams._current_event.get(None)
    with faust_compat.current_event(e):
        ref = faust.streams._current_event.get()
        assert ref() is e
    assert faust.streams._current_event.get(None) is before
