"""Every thread's Python stack, written every few seconds: where a run that outlives its work waits.

faulthandler.dump_traceback_later did this before, from a C watchdog thread that reads the other
threads' frames without the GIL. Under a training loop that read races the frames it walks: with a
dump every 10 ms a quick run crashed with a segmentation fault two times in three (Python 3.11,
torch 2.14), and once in the test suite at every 0.5 s. Here a Python thread formats the frames
while it holds the GIL, so a dump cannot crash the run it watches.

What that thread cannot see is a main thread that holds the GIL in C and never lets go. For that
case the run's end still says where it was: on SIGTERM (what `timeout` sends at a limit) faulthandler
writes every stack once from the signal handler and the signal then ends the process as before.
"""

import faulthandler
import signal
import sys
import threading
import time
import traceback


def _write_stacks(started: float, every: float) -> None:
    names = {t.ident: t.name for t in threading.enumerate()}
    me = threading.get_ident()
    lines = [f"--- stacks at {time.monotonic() - started:.1f} s (every {every:g} s)\n"]
    for ident, frame in sys._current_frames().items():
        if ident == me:
            continue
        lines.append(f"Thread {names.get(ident, '?')} ({ident:#x}), most recent call last:\n")
        lines.extend(traceback.format_stack(frame))
    sys.stderr.write("".join(lines))
    sys.stderr.flush()


def dump_stacks_every(seconds: float) -> None:
    """Write every other thread's stack to stderr every `seconds`, from a daemon thread (it never
    keeps a finished run alive), and every thread's once at SIGTERM."""
    if seconds <= 0:
        raise ValueError(f"stacks every {seconds:g} s: the interval must be positive")
    started = time.monotonic()

    def loop() -> None:
        while True:
            time.sleep(seconds)
            _write_stacks(started, seconds)

    threading.Thread(target=loop, name="stack-dumps", daemon=True).start()
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
