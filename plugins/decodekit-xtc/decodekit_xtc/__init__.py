"""decodekit-xtc: XTC, Exclude Top Choices, for decodekit (settings ``xtc_probability``,
``xtc_threshold``, ``xtc_seed``, ``xtc_min_keep``)."""

from decodekit_xtc.xtc import XTC

__all__ = ["XTC"]
