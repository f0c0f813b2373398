"""What one training step reads: batches of procedural scenes with their tokenized captions, built on the
CPU (in DataLoader workers on CUDA), and the text encoders' half of ``encode_prompt`` for token ids.

Example::

    from tokprune.yardstick.train_data import BatchStream, batches
    it = batches(BatchStream(first_step=0, batch=4), workers=0)
    next(it)["params"].shape        # (4, 3, 5): scene parameters for dataset.render
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from tokprune.yardstick.dataset import TRAIN_SEED, sample_spec, scene_params

__all__ = ["BatchStream", "batches", "encode_text"]


class StepStream(torch.utils.data.IterableDataset):
    """Items ``make(step)`` for steps ``first_step, first_step + 1, ...``, dealt round-robin to DataLoader
    workers, so step ``s`` holds the same item however many workers there are."""

    first_step: int

    def make(self, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.first_step + worker
        while True:
            yield self.make(step)
            step += workers


class BatchStream(StepStream):
    """Ready batches for consecutive steps of the train stream, built on CPU (in DataLoader workers).

    Each item: ``params`` (B, 3, 5) int32 scene parameters for :func:`render`, and with
    tokenizers also ``clip_ids`` (B, 77) / ``t5_ids`` (B, L) of the captions, a
    ``cfg_dropout`` share of them replaced by "" (the pipeline's negative prompt). Step ``s``
    always holds the same scenes and drops (seeded by ``seed, s``), however many workers.
    """

    def __init__(self, first_step: int, batch: int, offset: int = 0, tokenizers=None, max_sequence_length: int = 32,
                 cfg_dropout: float = 0.0, seed: int = 0):
        self.first_step, self.batch, self.offset = first_step, batch, offset
        self.tokenizers, self.max_sequence_length = tokenizers, max_sequence_length
        self.cfg_dropout, self.seed = cfg_dropout, seed

    def make(self, step: int) -> dict[str, torch.Tensor]:
        specs = [sample_spec(self.offset + step * self.batch + i, TRAIN_SEED) for i in range(self.batch)]
        item = {"params": scene_params(specs)}
        if self.tokenizers is not None:
            drop = np.random.default_rng([self.seed, step, 7]).random(self.batch) < self.cfg_dropout
            captions = ["" if d else s.caption for s, d in zip(specs, drop)]
            clip, t5 = self.tokenizers
            # Exactly the pipeline's tokenizer calls (StableDiffusion3Pipeline._get_clip/_get_t5_prompt_embeds).
            item["clip_ids"] = clip(captions, padding="max_length", max_length=clip.model_max_length,
                                    truncation=True, return_tensors="pt").input_ids
            item["t5_ids"] = t5(captions, padding="max_length", max_length=self.max_sequence_length,
                                truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
        return item


def batches(stream: StepStream, workers: int, pin_memory: bool = False):
    """Iterate a stream; with ``workers`` > 0 in worker processes (on CUDA the CPU work would stall the GPU)."""
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                         prefetch_factor=4 if workers else None, persistent_workers=False)
    return iter(loader)


def encode_text(pipe, clip_ids: torch.Tensor, t5_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt_embeds (B, 77 + L, D), pooled (B, 2 * clip_hidden))`` from token ids.

    The model half of ``StableDiffusion3Pipeline.encode_prompt`` (clip_skip None: CLIP's
    penultimate hidden states, pooled text_embeds; CLIP padded to T5's width and put first),
    so tokenizing can happen in workers. Tested equal to ``encode_prompt``.
    """
    hidden, pooled = [], []
    for enc in (pipe.text_encoder, pipe.text_encoder_2):
        out = enc(clip_ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out[0])
    clip = torch.cat(hidden, dim=-1)  # (B, 77, 2 * clip_hidden)
    t5 = pipe.text_encoder_3(t5_ids)[0]  # (B, L, D)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)
