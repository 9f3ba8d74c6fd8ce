"""A conformance kit for processors and samplers: Hypothesis strategies and the property suite.

Plugin authors check their classes in one line each::

    from decodekit.testing import check_processor, check_sampler

    def test_xtc_conforms():
        check_processor(XTC)

The same checks are available as pytest fixtures (``decodekit_check_processor``,
``decodekit_check_sampler``) once decodekit is installed.
"""

from decodekit.testing.strategies import Case, cases, input_ids_for, logits
from decodekit.testing.suite import check_processor, check_processor_output, check_sampler, params_strategy

__all__ = [
    "Case",
    "cases",
    "check_processor",
    "check_processor_output",
    "check_sampler",
    "input_ids_for",
    "logits",
    "params_strategy",
]
