"""What wakes the daemon's loop: watchdog events in the inbox, filtered where they arrive."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from daemon.service.entries import is_ignored_name
from daemon.service.inbox import Inbox

logger = logging.getLogger(__name__)


class Wake(FileSystemEventHandler):
    """watchdog handler: an entry of the inbox that appears, goes or is finished wakes the loop; close events
    and renames into it are noted.

    Only what can change the loop's decision wakes it. Names being written (``.*``, ``*.tmp``, ``*.part``)
    never do: a download written in 64 KB pieces sends an event per piece. Nor do writes (a file written in
    place is complete once it settles, which the loop checks on its own clock, or once it is closed), opens
    and reads, or the inbox folder's own "modified" that comes with each of its entries' events.
    """

    # The events that wake it; also the observer's event_filter, so that inotify does not report the others.
    EVENTS = (
        FileCreatedEvent,
        DirCreatedEvent,
        FileMovedEvent,
        DirMovedEvent,
        FileDeletedEvent,
        DirDeletedEvent,
        FileClosedEvent,
    )

    def __init__(self, inbox: Inbox, wake: threading.Event) -> None:
        self.inbox = inbox
        self.wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        if not isinstance(event, self.EVENTS):
            return
        paths = [Path(os.fsdecode(p)) for p in (event.src_path, event.dest_path) if p]
        if all(is_ignored_name(path.name) for path in paths):  # a rename from a .part name is news: its dest
            return
        if isinstance(event, FileClosedEvent) and not event.is_directory:
            self.inbox.note_closed(Path(os.fsdecode(event.src_path)))
        elif isinstance(event, FileMovedEvent) and event.dest_path and not event.is_directory:
            dest = Path(os.fsdecode(event.dest_path))
            if dest.parent == self.inbox.root:
                self.inbox.note_renamed(dest)
        self.wake.set()


def new_observer() -> BaseObserver:
    """watchdog's observer for this system. On Linux, one that reports a file renamed into the inbox from
    another folder as a move (the default reports it as a creation, like a file opened there)."""
    if Observer.__module__ == "watchdog.observers.inotify":  # Linux: importable, since Observer is its class
        from watchdog.observers.inotify import InotifyObserver

        return InotifyObserver(generate_full_events=True)
    return Observer()
