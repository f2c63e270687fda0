"""The paper's method, family-agnostic (Sec. 3, Alg. 1-4): every function here sees a teacher only through the
``Teacher`` interface and a student only through its forward ``student(x, labels, t, rows=None)``.

| concept | module |
|---|---|
| the teacher interface (token layout, KV-cached next-step probabilities, encode / decode) | ``teacher`` |
| the flow-matching map of one token (Sec. 3.2, Eq. 3-4) | ``flow`` |
| noise/data pair generation (Alg. 1), the shard format, the pair set and its index | ``pairs`` |
| the student's output parameterisation (Eq. 6) | ``student`` |
| distillation (Alg. 2, Eq. 7, App. C) | ``distill`` |
| DD few-step (Alg. 3), teacher-involved (Alg. 4), teacher, skip-n, onestep* sampling | ``sample`` |
"""
