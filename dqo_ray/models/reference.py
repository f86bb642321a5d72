"""pi_ref's log-probs of sampled response tokens (pure torch, no Ray).

One class for every place that scores trajectories with the reference policy: the engine
actors, which score each chunk as it is sampled (the reference model stays loaded for the
run), and the Ray Data reference stage for ingested data (`dqo_ray.data.streams`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from dqo_ray.data.batch import pad_trajectories
from dqo_ray.models.forward import sequence_logprobs
from dqo_ray.models.loading import load_policy, resolve_dtype

log = logging.getLogger(__name__)


class ReferenceModel:
    """The frozen reference policy, loaded once; `logprobs` scores batches of rows."""

    def __init__(self, model_path: str, pad_id: int, device: torch.device | str = "cpu",
                 batch_size: int = 16) -> None:
        self.device = torch.device(device)
        dtype = resolve_dtype("auto", self.device)
        self.model = load_policy(model_path, dtype=dtype).to(self.device).eval()
        self.model.requires_grad_(False)
        self.pad_id, self.batch_size, self.path = pad_id, batch_size, model_path
        log.info("pi_ref loaded from %s on %s (scores %d rows a forward)", model_path,
                 self.device, batch_size)

    @torch.no_grad()
    def logprobs(self, prompt_ids: Sequence[Sequence[int]],
                 response_ids: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """log pi_ref(a_h | s_h) per response token of each row: float32 [len(response)]."""
        out: list[np.ndarray] = []
        for k in range(0, len(prompt_ids), self.batch_size):
            rows = [{"prompt_ids": list(p), "response_ids": list(r), "reward": 0.0,
                     "finish_reason": "stop"}
                    for p, r in zip(prompt_ids[k:k + self.batch_size],
                                    response_ids[k:k + self.batch_size], strict=True)]
            padded = pad_trajectories(rows, self.pad_id)
            mask = padded["response_mask"][:, 1:]  # [B, L-1]: index t scores token t+1
            scores = sequence_logprobs(self.model, padded["input_ids"].to(self.device),
                                       padded["attention_mask"].to(self.device)).float().cpu()
            out += [scores[i][mask[i]].numpy().astype(np.float32) for i in range(len(rows))]
        return out
