"""Fault injection for tests and operators: make one rank misbehave at a chosen training step.

    EPRUNTIME_FAULT="hang:rank=1:step=3"           rank 1 stops responding before step 3
    EPRUNTIME_FAULT="exit:rank=1:step=3"           rank 1 dies (exit code 1 by default) there
    EPRUNTIME_FAULT="exit:rank=1:step=3:code=9"    ... with another exit code
    EPRUNTIME_FAULT="sleep:rank=1:step=3:seconds=20"  rank 1 is 20 s late there (a straggler)
    EPRUNTIME_FAULT="overflow:rank=0:step=3"       rank 0's batch of step 3 holds values that
                                                   overflow float32 in the forward (loss NaN)
    EPRUNTIME_FAULT="kill_in_save:rank=1:step=8"   rank 1 SIGKILLs itself while the checkpoint
                                                   of step 8 is being saved, once its shard is on
                                                   disk and before the checkpoint is committed;
                                                   only in a job's first run (torchrun restarts
                                                   have TORCHELASTIC_RESTART_COUNT > 0)

`step` counts training steps from 0 and is checked just before that step's forward pass, so the
other ranks are blocked in that step's first collective. A `hang` or a `sleep` longer than
`parallel.timeout_s` makes them fail with the named timeout error (epruntime.cli) instead of
waiting forever; an `exit` makes them lose their peer. Unset or empty: no fault, no cost.
A malformed value is a ConfigError naming EPRUNTIME_FAULT, raised before any process group exists.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass

from epruntime.config import ConfigError

ENV_VAR = "EPRUNTIME_FAULT"
KINDS = ("hang", "exit", "sleep", "overflow", "kill_in_save")


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int
    step: int
    seconds: float = 0.0
    code: int = 1

    def maybe_fire(self, rank: int, step: int, batch=None) -> None:
        """Inject the fault if this is its rank and step (`overflow` edits `batch` in place)."""
        if rank != self.rank or step != self.step or self.kind == "kill_in_save":
            return
        print(f"{ENV_VAR}: injecting {self.kind} on rank {rank} at step {step}", file=sys.stderr,
              flush=True)
        if self.kind == "overflow":  # finite, so it passes the input checks; +-3e38 sums to inf
            sign = (batch.images.new_ones(batch.images.shape[-1]).cumsum(0) % 2) * 2 - 1
            batch.images.copy_(3e38 * sign.expand_as(batch.images))
            return
        if self.kind == "exit":
            os._exit(self.code)  # no clean-up, no goodbye to the other ranks: as a crash
        if self.kind == "sleep":
            time.sleep(self.seconds)
            return
        while True:  # hang: alive but silent until killed
            time.sleep(3600)


    def in_save(self, rank: int, step: int) -> None:
        """`kill_in_save`: called by the checkpoint writer once this rank's shard is durable."""
        if (self.kind != "kill_in_save" or rank != self.rank or step != self.step
                or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"):
            return
        print(f"{ENV_VAR}: injecting {self.kind} on rank {rank} at step {step}", file=sys.stderr,
              flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def parse_fault(spec: str | None) -> Fault | None:
    """`kind:key=value:...` -> Fault; None or '' -> None; anything else malformed -> ConfigError."""
    if not spec or not spec.strip():
        return None
    kind, *fields = spec.strip().split(":")
    if kind not in KINDS:
        raise ConfigError(f"{ENV_VAR}={spec!r}: unknown fault {kind!r} (expected one of "
                          f"{', '.join(KINDS)}, e.g. hang:rank=1:step=3)")
    allowed = {"rank": int, "step": int, "seconds": float, "code": int}
    values: dict = {}
    for field in fields:
        key, sep, value = field.partition("=")
        if not sep or key not in allowed:
            raise ConfigError(f"{ENV_VAR}={spec!r}: bad field {field!r} (expected rank=N, step=N, "
                              "seconds=S or code=N)")
        try:
            values[key] = allowed[key](value)
        except ValueError:
            raise ConfigError(f"{ENV_VAR}={spec!r}: {key}={value!r} is not a number") from None
    missing = [k for k in ("rank", "step") if k not in values]
    if kind == "sleep" and "seconds" not in values:
        missing.append("seconds")
    if missing:
        raise ConfigError(f"{ENV_VAR}={spec!r}: missing {', '.join(missing)}")
    if values["rank"] < 0 or values["step"] < 0 or values.get("seconds", 0) < 0:
        raise ConfigError(f"{ENV_VAR}={spec!r}: rank, step and seconds must be >= 0")
    return Fault(kind, **values)


def from_env() -> Fault | None:
    return parse_fault(os.environ.get(ENV_VAR))
