"""decodekit-xtc: XTC, Exclude Top Choices, for decodekit (settings ``xtc_probability``,
``xtc_threshold``, ``xtc_seed``)."""

from decodekit_xtc.xtc import XTC

__all__ = ["XTC"]
