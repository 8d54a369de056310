"""Root-cause analysis of one real failure: from "unusual" to "why", and a fix you could deploy.

DESIGN §14: :func:`investigate` runs, each step verified by replay, input attribution
(:class:`InputSpans`), the causal trace and decision layer (:class:`CausalTrace`: where the
failure is read out of the injected span; :class:`SpanTrace`: after which layer removing the
span no longer removes it; each with its :class:`Consistency` over failing variants),
components (a CCA fix set patched from the twin), directions (:class:`DirectionFix`: gated removal of contrast directions, searched under a
side-effect budget, beside plain steering) and the resulting portable fix (a
:class:`~analysis.cca.FixSet`). Failure signatures are cross-validated linear probes
(:class:`LinearProbe`, :func:`cross_validate`). Fixes are checked on traffic they never saw
with :func:`flip_rate` and :func:`side_effects`. For an episode (an agent loop with tools),
:func:`counterfactual_episode` answers "would this fix have prevented the destructive action?"
by re-running it forward in the sandbox with the fix applied and local stand-ins for its tools;
``investigate(..., failing_step=)`` investigates an episode at its failing model call
(:func:`failing_call` finds it from the recorded tool calls, :func:`model_call_incident` cuts
it out).

Example::

    from analysis.rca import investigate
    rep = investigate(session, failure=Failure.text_contains("HACKED", tokenizer=tok),
                      benign=benign, contrast=controls, variants=others, tokenizer=tok)
    rep.input_spans.text, rep.trace.decision_layer, rep.fix.flip_rate
    rep.save("out/")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from integrations._lazy import lazy_exports

if TYPE_CHECKING:
    from ._counterfactual import counterfactual_episode
    from ._directions import Candidate, DirectionFix, derive_fix
    from ._episode_call import failing_call, model_call_incident
    from ._heldout import FlipRate, LiveSideEffects, flip_rate, side_effects
    from ._investigate import Investigation, investigate, load_session
    from ._probes import LinearProbe, ProbeResult, cross_validate
    from ._span_trace import SpanTrace, span_trace
    from ._spans import InputSpans, attribute_input
    from ._trace import CausalTrace, causal_trace
    from ._variants import Consistency

__all__ = [
    "Candidate",
    "CausalTrace",
    "Consistency",
    "DirectionFix",
    "FlipRate",
    "InputSpans",
    "Investigation",
    "LinearProbe",
    "LiveSideEffects",
    "ProbeResult",
    "SpanTrace",
    "attribute_input",
    "causal_trace",
    "counterfactual_episode",
    "cross_validate",
    "derive_fix",
    "failing_call",
    "flip_rate",
    "investigate",
    "load_session",
    "model_call_incident",
    "side_effects",
    "span_trace",
]

__getattr__, __dir__ = lazy_exports(__name__, {
    "Candidate": "._directions",
    "CausalTrace": "._trace",
    "Consistency": "._variants",
    "DirectionFix": "._directions",
    "FlipRate": "._heldout",
    "InputSpans": "._spans",
    "Investigation": "._investigate",
    "LinearProbe": "._probes",
    "LiveSideEffects": "._heldout",
    "ProbeResult": "._probes",
    "SpanTrace": "._span_trace",
    "attribute_input": "._spans",
    "causal_trace": "._trace",
    "counterfactual_episode": "._counterfactual",
    "cross_validate": "._probes",
    "derive_fix": "._directions",
    "failing_call": "._episode_call",
    "flip_rate": "._heldout",
    "investigate": "._investigate",
    "load_session": "._investigate",
    "model_call_incident": "._episode_call",
    "side_effects": "._heldout",
    "span_trace": "._span_trace",
})
