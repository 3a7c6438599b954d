"""Fine-tuning: modes (full, LoRA, linear probe) and initialisation from a pretrained model.

A fine-tuning run is an ordinary ``launch.train`` run of a task (``task=classification``,
``sft``, or ``lm`` for continued pretraining) with a ``finetune`` config section:

* ``finetune.init_from``: a pretraining workdir (or its ``checkpoints/`` dir) of ours,
  any step (``finetune.init_step``) and any mesh, or a Hugging Face checkpoint
  directory (``config.json`` + ``*.safetensors``; Llama-family or GPT-2). The backbone
  architecture and the tokenizer come from the source (:mod:`research.finetune.init`).
  Empty: from scratch.
* ``finetune.mode``: ``full`` (every parameter trains), ``lora`` (only the adapters of
  :mod:`research.models.lora`, plus a new task head), ``linear_probe`` (only the head).

The recipe layer (:mod:`research.recipe`) applies :mod:`research.finetune.feature` to the
task; the trainer never imports this package. :mod:`research.finetune.export` merges
LoRA adapters into a plain model; :mod:`research.finetune.ablation` runs the
pretrained-vs-scratch ablation.
"""
