"""What the daemon's services share, handed to each as one value."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from outbox.delivery.health import Health
from outbox.service.metrics import Metrics
from outbox.service.sdnotify import Notifier
from outbox.service.settings import Settings


@dataclass(frozen=True, eq=False)
class Context:
    health: Health  # what the daemon knows about itself
    metrics: Metrics
    notifier: Notifier  # systemd: STATUS=, WATCHDOG=1
    settings: Callable[[], Settings]  # the settings in force (a reload replaces them)
    clock: Callable[[], datetime]  # now, in UTC
    stopping: asyncio.Event  # set when the daemon stops
