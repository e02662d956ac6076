"""Inference: batched KV-cache generation on the model's own forward, and prompt batching.

    generation.py  generate(model, input_ids, ...) / stream(...): one jitted prefill + decode
                   on the model's own forward; GenerationConfig, the settings both take
    batch.py       prompts + images -> the arrays generate takes (chat, eval, serving)
    engine.py      continuous batching for the server: requests admitted into free slots of
                   one fixed-shape KV cache between decode steps (engine_ops.py: its jitted
                   programs; answer_text.py: the streamed text of one answer)

May import models/ and data/; nothing of training/, evaluation/ or convert/.
"""
