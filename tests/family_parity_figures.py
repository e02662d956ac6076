"""Prints the parity figures of BUILD_NOTES.md "Llama-3 / Mistral / Qwen2 decoders and the SigLIP
tower": the configs and inputs of test_models_families.py, max |ours - transformers|.

    PYTHONPATH=$PWD:$PWD/tests python tests/family_parity_figures.py
"""
import numpy as np, jax.numpy as jnp, torch, transformers
import test_models_families as t
from conftest import hf_llava_from_model
from llava_jax.models import create_model
from llava_jax.convert import hf_config, mapping
for name in sorted(t.FAMILIES):
    config = t.family_config(name)
    model = create_model(config, seed=1)
    ref = hf_llava_from_model(model)
    ids, mask, px = t.batch(config)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(px), attention_mask=jnp.asarray(mask)))
    theirs = t.hf_logits(ref, ids, mask, px)
    v = mask.astype(bool)
    print(f"{name:9s} logits max|diff| {np.abs(ours[v]-theirs[v]).max():.2e}  (max|logit| {np.abs(theirs[v]).max():.2f}, {v.sum()} tokens)")
config = t.family_config("qwen2", vision_feature_layer=(0, 1, 2, 3))
m = create_model(config, seed=2)
ref = transformers.SiglipVisionModel(hf_config.hf_vision_config(config.vision)).eval()
p = "vision_tower.vision_model."
ref.load_state_dict({k[len(p):]: torch.from_numpy(np.array(v, np.float32)) for k, v in mapping.torch_tensors(m).items() if k.startswith(p)}, strict=False)
_, _, px = t.batch(config)
f = np.asarray(m.vision_tower(jnp.asarray(px[:, 0])))
with torch.no_grad():
    out = ref(t.torch_pixels(px), output_hidden_states=True)
w = config.vision.hidden_size
d = max(np.abs(f[..., i*w:(i+1)*w] - h.numpy()).max() for i, h in enumerate(out.hidden_states))
last = np.abs(np.asarray(m.vision_tower.pooled_input(jnp.asarray(f[..., -w:]))) - out.last_hidden_state.numpy()).max()
print(f"SigLIP hidden states max|diff| {d:.2e}, last_hidden_state {last:.2e}")
