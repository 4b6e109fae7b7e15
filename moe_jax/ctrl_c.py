"""A Ctrl-C during start-up is never lost.

Python's own handler raises KeyboardInterrupt wherever the main thread is, and a library that
catches too much swallows it: once, under load, a run interrupted 3 s after launch (while it
imported) went on to train. The entry point installs `catch` first thing; the training loop calls
`raise_if_pressed` before its first step, so such a run stops there, having written nothing.
No JAX import here: this runs before anything heavy.
"""
import signal

_pressed = []


def _handler(signum, frame):
  _pressed.append(signum)
  signal.default_int_handler(signum, frame)  # KeyboardInterrupt, as without us


def catch():
  """Remember each SIGINT from now on, and raise KeyboardInterrupt as Python does."""
  if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not one a caller chose
    signal.signal(signal.SIGINT, _handler)


def raise_if_pressed():
  """KeyboardInterrupt if Ctrl-C was pressed since `catch`, even if someone swallowed it."""
  if _pressed:
    raise KeyboardInterrupt
