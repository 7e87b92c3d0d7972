"""For a class that hands its work to rooms of its own (the connection store, the exporter):
the names its users know stay its own."""

from __future__ import annotations


def room_attribute(room: str, name: str) -> property:
    """The attribute `name` of the owner's room `room` (an attribute of the owner), read and
    set as the owner's."""
    def get(owner):
        return getattr(getattr(owner, room), name)

    def set_(owner, value) -> None:
        setattr(getattr(owner, room), name, value)
    return property(get, set_)
