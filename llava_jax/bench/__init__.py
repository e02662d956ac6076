"""`python -m llava_jax.bench {data,train,generate,convert}`: speed and memory against PyTorch.

One module per benchmark; each builds its reference (transformers / torch / a plain loop) in
the same run, so ratios stay comparable on a noisy machine; `common` holds what they share.
Not imported by the library.
"""
