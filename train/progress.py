"""Progress within an epoch: a bar on a terminal, a line a minute in a log file (CloudWatch)."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("train")


class Progress:
    def __init__(self, total: int, description: str, enabled: bool = True, log_every_s: float = 60.0):
        self.total, self.description, self.done = total, description, 0
        self.bar = None
        self.log_every_s, self.last_log = log_every_s, time.monotonic()
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=description, unit="img", leave=False, dynamic_ncols=True)
        self.enabled = enabled

    def update(self, n: int, loss=None, step: int = 0) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if loss is not None and step % 10 == 0:  # .item() syncs the device: not every step
                self.bar.set_postfix(loss=f"{float(loss.detach()):.4f}", refresh=False)
        elif time.monotonic() - self.last_log >= self.log_every_s:
            self.last_log = time.monotonic()
            log.info("%s: %d/%d images", self.description, self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
