"""Quantization: QAT, PTQ and integer export, built on Google's qwix.

One rule set (``quant.*``, :func:`make_rules`) drives three uses of the same model:

* **QAT** (``quant.mode='qat'``, :mod:`research.quant.qat`, a recipe wrapper that works
  for every task): the task's ``build_model`` returns
  ``qwix.quantize_model(model, QatProvider(rules), tokens)``. qwix intercepts
  ``jax.lax.dot_general`` / ``jax.numpy.einsum`` inside the modules whose path matches
  ``quant.targets`` (our ``nnx.Linear`` MLP and ``nnx.Einsum`` attention projections,
  also under ``nnx.scan``) and runs them on quantized operands; the backward pass is a
  straight-through estimator (gradient passed unchanged, zeroed outside the clipping
  range when ``clip_ratio < 1``). Parameters stay float: a QAT checkpoint has the
  float checkpoint's layout, so QAT fine-tuning starts from a float run
  (``quant.init_from``, :mod:`research.quant.qat_init`) and the shared trainer,
  checkpoints and eval are reused.
* **PTQ** (``quant.mode='ptq'``, ``python -m launch.quantize``, :mod:`research.quant.ptq`):
  a float checkpoint is quantized round-to-nearest with the same rules, without training.
* **Export** (:func:`research.quant.ptq.run`): the weights become integers plus scales
  (``qwix.PtqProvider``: each target kernel is replaced by ``qvalue`` int8/int4 arrays
  with float ``scale`` (and ``zero_point``)), saved with Orbax under
  ``WORKDIR/export/``, restored and evaluated with the trainer's eval code. With int8
  weights and int8 activations the matmul is a real ``s8 x s8 -> s32`` dot_general;
  weight-only settings dequantize the weights into the float matmul.

Settings: ``weight_bits`` 8/4/2; ``act_bits`` 0 (weights only) / 8 / 4 (dynamic,
per-token abs-max); ``granularity`` per-``channel`` (one scale per output feature),
per-``tensor`` (one scale per weight and per activation), or per-``group``
(``group_size`` consecutive elements of the contraction axis share a scale); symmetric
(abs-max) or asymmetric (min/max with a zero point; 8 and 4 bits) weights.

Modules: :mod:`~research.quant.rules` (the qwix rule set and two shims over qwix
internals), :mod:`~research.quant.numerics`, :mod:`~research.quant.model_bytes`,
:mod:`~research.quant.qat`, :mod:`~research.quant.qat_init`, :mod:`~research.quant.ptq`.
Not supported by qwix: asymmetric int2 (a ConfigError), asymmetric activations.
"""

