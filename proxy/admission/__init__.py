"""The admission core: who may send a generation to a provider, and when.

Pure objects: they take a clock and a scheduler, do no I/O and never sleep, so
every rule is tested on fake time. The HTTP edge calls in; nothing here calls out
except through the callbacks it was given.
"""

from proxy.admission.clock import Clock, Scheduler, Timer
from proxy.admission.events import LimiterCounters, LimiterEvent
from proxy.admission.limiter import (
    ClientStatus,
    Limiter,
    LimiterStatus,
    Permit,
    Policy,
    Rejection,
    Waiter,
)

__all__ = [
    "ClientStatus",
    "Clock",
    "Limiter",
    "LimiterCounters",
    "LimiterEvent",
    "LimiterStatus",
    "Permit",
    "Policy",
    "Rejection",
    "Scheduler",
    "Timer",
    "Waiter",
]
