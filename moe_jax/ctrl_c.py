"""A Ctrl-C during start-up is never lost, and costs one line.

Left to Python, a Ctrl-C in the first second of `python -m experiments.run` surfaces as a
KeyboardInterrupt traceback, or as "ImportError: Encountered an error while initializing the
extension" when it lands inside a C extension's import; and raised inside a garbage-collector
callback (jax registers one) it is unraisable: Python prints "Exception ignored in ..." and goes
on, so under load a run interrupted 3 s after launch went on to train.

So the entry point calls `catch` before its imports: from then on every SIGINT is remembered.
Until `arm` (called after the heavy imports, where a KeyboardInterrupt reaches the one-line
report) a press is only remembered; after it, it also raises KeyboardInterrupt at once, as
Python would, and if that is swallowed the training loop's `raise_if_pressed` before its first
step stops the run there, having written nothing. No JAX import here: this runs first.
"""
import signal
import sys

_pressed = []
_armed = []


def _handler(signum, frame):
  _pressed.append(signum)
  if _armed:
    signal.default_int_handler(signum, frame)  # KeyboardInterrupt, as without us


def _unraisable_hook(previous):
  def hook(unraisable):
    if _pressed and isinstance(unraisable.exc_value, KeyboardInterrupt):
      return  # remembered: raise_if_pressed acts on it
    previous(unraisable)
  return hook


def catch():
  """Remember each SIGINT from now on (once per process; not over a handler a caller chose)."""
  if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _handler)
    sys.unraisablehook = _unraisable_hook(sys.unraisablehook)


def arm():
  """KeyboardInterrupt now if Ctrl-C was pressed since `catch`, and at once on later presses."""
  _armed.append(True)
  raise_if_pressed()


def raise_if_pressed():
  """KeyboardInterrupt if Ctrl-C was pressed since `catch`, even if it was swallowed."""
  if _pressed:
    raise KeyboardInterrupt
