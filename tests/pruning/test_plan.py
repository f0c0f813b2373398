"""PrunePlan: probe steps (where the dense text-importance probe runs) and step kinds."""

from tokprune.pruning.plan import ALL, PrunePlan


def test_probe_steps_only_last_dense_before_text_pruning():
    # dense, dense, image-pruned (full text), text-pruned, reuse, dense refresh, text-pruned
    plan = PrunePlan((ALL, ALL, 8, ALL, 0, ALL, 8), text_keep=(ALL, ALL, ALL, 4, ALL, ALL, 4))
    assert plan.probe_steps() == (1, 5)
    assert plan.is_dense(0) and not plan.is_dense(3) and not plan.is_dense(2)
    assert plan.prunes_text_at(3) and not plan.prunes_text_at(4)


def test_probe_steps_empty_without_text_pruning():
    assert PrunePlan((ALL, ALL, 8, 0)).probe_steps() == ()
    assert PrunePlan((ALL, 8), text_keep=(ALL, ALL)).probe_steps() == ()


def test_text_pruned_keep_all_image_is_not_dense():
    plan = PrunePlan((ALL, ALL), text_keep=(ALL, 3))
    assert plan.is_dense(0) and not plan.is_dense(1)
    assert plan.probe_steps() == (0,)
