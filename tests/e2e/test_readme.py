"""The README's recorder example runs as written on the real SmolLM2 and records activations
(the guardrail flags after ``generate()``, inside the request); the Quick start is the two
commands; the environment variables the CLI reads are documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[2] / "README.md"


def _block_after(heading: str, lang: str) -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index(heading):]
    found = re.search(rf"```{lang}\n(.*?)```", section, re.S)
    assert found, f"no {lang} block after {heading!r}"
    return found.group(1)


@pytest.mark.slow
@pytest.mark.real_model
def test_the_recorder_example_records_activations_on_smollm2() -> None:
    from analysis.models import load_smollm2
    from examples.asgi_app import SYSTEM
    from model_forensics.demo import INJECTED

    model, tokenizer = load_smollm2()
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": INJECTED}]
    inputs = dict(tokenizer.apply_chat_template(msgs, add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True))
    inputs.update(max_new_tokens=8, do_sample=False)
    code = _block_after("## Using the recorder", "python")
    ns = {"model": model, "tokenizer": tokenizer, "inputs": inputs}
    with torch.no_grad():
        exec(compile(code, str(README), "exec"), ns)
    ns["rec"].shutdown()
    inc = ns["inc"]
    assert inc.manifest["trigger"]["reason"] == "prompt_injection"     # the model failed
    assert inc.manifest["activations"] == "captured"
    assert inc.manifest["trigger"]["captured_by"]["rule"] == "flight_recorder"
    assert len(inc.sites()) == 30 and inc.steps("blocks.0.resid_post") == list(range(8))
    prompt_len = inputs["input_ids"].shape[1]
    assert tuple(inc.tensor("blocks.0.resid_post", step=0).shape) == (1, prompt_len, 576)


def test_quick_start_is_the_two_commands_and_the_environment_is_documented() -> None:
    quick = _block_after("## Quick start", "bash")
    assert [line.split("#")[0].strip() for line in quick.splitlines()] == ["make demo",
                                                                          "make test"]
    text = README.read_text(encoding="utf-8")
    for documented in ("FORENSICS_SIDECAR`", "FORENSICS_SIDECAR__<SECTION>__<KEY>",
                       "FORENSICS_TOKEN", "uvicorn examples.asgi_app:app",
                       "forensics incidents push", "forensics report"):
        assert documented in text, documented
