"""LlamaGen, checkpoint-compatible: the VQ tokenizer, the class-conditional GPT and its DD student.

Three models, each configured by a small dataclass:

* ``VQModel`` (``VQConfig``): the VQ-16 family image tokenizer. A taming-style conv encoder maps an
  image in [-1, 1] to a grid of ``codebook_dim`` vectors; both the vectors and the codebook are
  l2-normalised before the nearest-code lookup; a conv decoder maps (possibly continuous) vectors back.
* ``GPT`` (``GPTConfig``): the class-conditional LlamaGen transformer. The sequence is
  [class token, image tokens in raster order]; RMSNorm, SwiGLU, 2D RoPE and no absolute position
  embedding. The logit at sequence position p predicts image token p.
* ``DDStudent`` (``DDConfig``): the Distilled-Decoding student of microsoft/distilled_decoding. Same
  blocks; its input tokens are continuous vectors (data before step t, noise from t on), and it returns
  logits and a continuous embedding for every token, computed at that token's own position.

Modules: ``tokenizer``, ``gpt`` (with LlamaGen's sampling rules), ``student``, ``teacher`` (``LlamaGenTeacher``,
the ``dd.method.teacher.Teacher`` adapter: one token per AR step), ``checkpoints`` (``load_teacher`` /
``load_student`` read the released files; state-dict keys, shapes and dtypes are those of the original code,
FoundationVision/LlamaGen and microsoft/distilled_decoding, so released weights load unchanged), ``golden``
(checks against the original code) and ``family`` (the ``Family`` adapter the rest of the project uses).
"""
