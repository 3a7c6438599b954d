"""Model compression: knowledge distillation and pruning (README "Compression").

Both are ordinary ``launch.train`` runs with a ``distill`` / ``prune`` config section;
the recipe layer (:mod:`research.recipe`) wraps the task with
:mod:`research.compress.distill` and :mod:`research.compress.prune`:

* ``distill.teacher`` (a run workdir of ours, or an HF checkpoint dir) with
  ``distill.alpha > 0``: the student's training loss becomes
  ``(1 - alpha) * CE + alpha * T^2 * KL(p_teacher^T || p_student^T)``. The teacher
  lives inside the model as ``model.teacher`` with its weights in
  :class:`distill.TeacherParam` variables (not ``nnx.Param``): they are sharded by their
  logical axes like the student's, part of the jitted step and the checkpoint, but
  outside the optimizer (no gradient, no state).
* ``prune.method`` (``magnitude`` with Zhu & Gupta's cubic schedule, ``nm`` N:M,
  ``structured`` heads / MLP neurons): every pruned kernel gets a
  :class:`prune.PruneMask` variable beside it; the masks are applied before the forward
  pass and after every optimizer update inside the jitted step, and saved in the
  checkpoint. :mod:`research.compress.export` turns a structured result into a smaller
  model.

Config checks live in :mod:`research.feature_validation`.
"""
