"""VAR (next-scale prediction) and its Distilled-Decoding student, checkpoint-compatible with the
released FoundationVision/VAR and microsoft/distilled_decoding files.

Three models, read top to bottom:

1. ``VQVAE``: a taming/LDM-style conv autoencoder whose latent f [B, Cvae, h, w] is quantised
   *residually over scales*: for each patch size pn (coarse to fine) the remaining residual is
   area-downsampled to pn x pn, each vector is snapped to its nearest code, and the codes are
   bicubic-upsampled back to h x w, passed through a small residual conv "phi" and added to the
   running reconstruction f_hat. The token sequence is all scales' indices, concatenated coarse to
   fine, row-major within a scale (680 tokens for patch sizes 1,2,3,4,5,6,8,10,13,16).
2. ``VAR``: a class-conditional transformer with AdaLN blocks that predicts a whole scale at once.
   The input of scale k is the area-downsample of f_hat after scales < k; attention is block-causal
   over scales. Sampling uses a scale-wise KV cache and VAR's own classifier-free guidance
   (1+t)*cond - t*uncond with t growing linearly from 0 (first scale) to cfg (last scale).
3. ``VARStudent``: the DD student (``DD_Model``): the same transformer over an extra start token plus
   all 680 token vectors (data before step t, noise after), which outputs logits and continuous
   vectors for every token in one pass.

Modules: ``vqvae`` (1), ``transformer`` (2, with VAR's sampling rules), ``student`` (3), ``teacher`` (the
``dd.method.teacher.Teacher`` adapter: one AR step = one scale), ``checkpoints`` (the released files; state-dict keys,
shapes and nesting as FoundationVision/VAR and microsoft/distilled_decoding write them), ``golden`` (checks against
the original code) and ``family`` (the ``Family`` adapter the rest of the project uses).
"""
