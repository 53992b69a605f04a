"""ONNX Runtime's intra-op spinning modes: the settings the config validates, without importing onnxruntime.

Latency the optimizer records (and chooses an engine by) must be measured the way
``pruneserve serve`` runs the graph, so every session :mod:`pruneserve.engines.ort` builds
takes its spinning entries here. This module imports nothing heavy: the server's config
validates ``intra_op_spinning`` against it before any engine exists.
"""

from __future__ import annotations

#: What ONNX Runtime's intra-op threads do while they wait for work (``ServeConfig.intra_op_spinning``).
SPINNING_MODES: tuple[str, ...] = ("off", "run", "always")
DEFAULT_SPINNING = "run"


def spinning_entries(mode: str = DEFAULT_SPINNING) -> dict[str, str]:
    """Session config entries for an intra-op spinning mode.

    * ``off``: threads sleep as soon as they run out of work.
    * ``run``: threads spin between the parallel steps of one run and sleep as soon as the run
      ends (``session.force_spinning_stop``). A spinning thread picks up the next step
      without a futex wake-up; measured on MiniLM at batch 1 on a 2-core VM, a run takes
      ~1.2 ms less than with ``off``.
    * ``always``: ONNX Runtime's default; threads also spin for a while after each run,
      which takes cores from the event loop and from every other session (measured: 2.5 ms
      vs 6.5 ms for the same model next to an idle spinning session).

    Raises:
        ValueError: for a mode not in :data:`SPINNING_MODES`.
    """
    if mode not in SPINNING_MODES:
        raise ValueError(f"intra-op spinning mode {mode!r} is not one of {SPINNING_MODES}; use 'run' or 'off'")
    return {
        "session.intra_op.allow_spinning": "0" if mode == "off" else "1",
        "session.inter_op.allow_spinning": "0",
        "session.force_spinning_stop": "1" if mode == "run" else "0",
    }


__all__ = ["DEFAULT_SPINNING", "SPINNING_MODES", "spinning_entries"]
