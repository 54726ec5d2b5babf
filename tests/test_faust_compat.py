"""stream.faust_compat relies on private Faust/aiokafka names: fail loudly when an upgrade moves them."""

from __future__ import annotations

from importlib.metadata import version

from livemb.stream import faust_compat


def test_private_names_still_exist() -> None:
    assert faust_compat.missing_private_api() == []


def test_private_name_check_sees_instance_attributes_and_misses() -> None:
    """`Producer.buffer` is set in __init__: the check finds it by its annotation, and still
    reports a name that is neither an attribute nor annotated."""
    from faust.transport.producer import Producer

    assert faust_compat._has(Producer, "buffer") and not hasattr(Producer, "buffer")
    assert not faust_compat._has(Producer, "no_such_buffer")
    names = {name for _, name in faust_compat.PRIVATE_API}
    assert {"_recovery_started_at", "_recovery_ended_at", "buffer", "max_messages"} <= names


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
