"""On the engine path too: both CFG halves of a prompt share one index set, and special tokens survive."""

from __future__ import annotations

import torch

from tests.runtime.conftest import T5_LEN, generate
from tokprune import runtime


def _spy(view, seen):
    executor = view._pruner.executor

    def spy(pruner, st, inputs):
        seen.append((st.step, inputs.img_idx.clone(), None if inputs.txt_idx is None else inputs.txt_idx.clone()))
        return executor(pruner, st, inputs)

    view._pruner.executor = spy


def test_engine_path_shares_indices_and_protects_special_tokens(pruned_export, fresh_pipe):
    from tokprune.pruning.text import special_token_mask

    rt = runtime.load(pruned_export, backend="onnxruntime")
    try:
        view = runtime.attach(fresh_pipe, rt)
        seen = []
        _spy(view, seen)
        prompts = ["a red circle on a blue background", "two small green squares at the top"]
        generate(fresh_pipe, prompt=prompts)
        assert "encode_prompt" in fresh_pipe.__dict__  # attach installed the special-token mask
        runtime.detach(fresh_pipe)
        assert "encode_prompt" not in fresh_pipe.__dict__  # detach restored the pipeline
    finally:
        rt.close()
    pruned = [(idx, txt) for step, idx, txt in seen if idx.shape[1] < 256]
    assert len(pruned) == 2  # steps 1 and 3 of the export's schedule (step 2 is a reuse step)
    expected = torch.cat([special_token_mask(fresh_pipe, ["", ""], max_sequence_length=T5_LEN),
                          special_token_mask(fresh_pipe, prompts, max_sequence_length=T5_LEN)])
    # after a single dense step nothing has changed yet: the first selection is the spatial spread order;
    # later ones follow each prompt's own guided prediction
    assert not torch.equal(pruned[-1][0][0], pruned[-1][0][1])
    for idx, txt in pruned:
        assert idx.shape[0] == 4 and torch.equal(idx[:2], idx[2:])  # [uncond x2; cond x2]
        for row in range(4):
            must = set(torch.nonzero(expected[row]).flatten().tolist())
            assert must and must <= set(txt[row].tolist())
