"""decodekit-dry: the DRY repetition penalty for decodekit (settings ``dry_multiplier``, ``dry_base``,
``dry_allowed_length``, ``dry_sequence_breakers``, ``dry_penalty_last_n``)."""

from decodekit_dry.dry import DEFAULT_SEQUENCE_BREAKERS, DRY

__all__ = ["DEFAULT_SEQUENCE_BREAKERS", "DRY"]
