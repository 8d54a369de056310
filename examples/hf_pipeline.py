"""Record a Hugging Face ``pipeline`` call: the recorder hooks the pipeline's model.

Run: ``python examples/hf_pipeline.py`` — generates with SmolLM2 through
``transformers.pipeline`` and prints the recorded steps (one per forward call).
"""

from __future__ import annotations

from integrations import Recorder, exporters, triggers


def main() -> None:
    from transformers import pipeline

    from analysis.models import load_smollm2

    model, tok = load_smollm2()
    pipe = pipeline("text-generation", model=model, tokenizer=tok, device="cpu")
    ex = exporters.InMemoryExporter()
    rec = Recorder(model, tokenizer=tok, exporter=ex, sites=["blocks.-1.resid_post"],
                   trigger=triggers.Always())
    with rec.request(request_id="pipe-1") as req:
        out = pipe([{"role": "user", "content": "Say hello in French."}], max_new_tokens=6,
                   do_sample=False)
        req.set_output(text=str(out[0]["generated_text"][-1]["content"]))
    rec.shutdown()
    inc = ex.incidents[-1]
    site = inc.sites()[0]
    print("answer:", out[0]["generated_text"][-1]["content"])
    print(f"{site}: steps {inc.steps(site)} (prefill + decode steps)")


if __name__ == "__main__":
    main()
