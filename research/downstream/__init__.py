"""Downstream evaluation: multiple-choice log-likelihood scoring (lm-evaluation-harness's
method), readers of HellaSwag/ARC/PIQA-shaped data, and ``stdlib_mc``, an offline task
held out from pretraining by the corpus split.

* scoring.py: ``score(model, tokenizer, examples, max_len=)`` -> acc / acc_norm per example;
* readers.py: JSONL and TFDS readers; stdlib_task.py: the offline task;
* tasks.py: ``--tasks`` specs, ``run_tasks``; stats.py: Wilson intervals;
* results.py: metrics.jsonl rows and ``downstream_columns(run_dir)`` for sweep tables.
"""
