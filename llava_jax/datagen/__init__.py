"""GPT-assisted visual instruction data, as in the LLaVA paper, through any OpenAI-compatible
endpoint: a text-only LLM reads an image's captions and boxes and writes conversations,
detailed descriptions or complex-reasoning questions as if it saw the image.

    python -m llava_jax.datagen --annotations=captions.json,instances.json --kind=conversation \\
        --endpoint=URL --model=NAME --output=conv.jsonl --to-llava=llava_conv.json

    annotations.py  COCO captions + instances files, or {image, captions, boxes} JSONL
    prompts.py      the editable prompt files (prompts/<kind>/), messages per image
    parse.py        replies -> (question, answer) turns, or why not
    generate.py     the resumable run: requests, replies flushed to JSONL, rejects logged
    llava.py        JSONL -> deduplicated LLaVA training JSON

Requests go through `llava_jax.evaluation.openai_client` (the client the LLaVA-Bench judge
uses). May import data/ and that client only (tests/test_layout.py); no jax.
"""
