"""Generation with transformers `generate`: the fallback engine (no vLLM), and the reference.

Behaviour log-probs come from `output_scores`: HF's scores are the logits after every logits
processor, i.e. after temperature and top-p (tokens outside the nucleus at -inf), which is the
distribution `do_sample` draws from; their log_softmax is therefore the log-prob of the sampled
token under the renormalised nucleus distribution. `top_k=0` is passed explicitly because HF's
default top_k=50 would silently truncate the distribution. The model's own generation_config
(which may carry sampling defaults such as top_k or repetition_penalty) is replaced by a clean
one holding only the special-token ids, so nothing but the SamplingSpec shapes the distribution.

Stop strings (`SamplingSpec.stop`) are checked on text, as vLLM does, by a stopping criterion
that decodes each row's last few tokens after every step; the step at which a row's text first
holds one is where its response ends.
"""

from __future__ import annotations

import logging
import random

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from actors.engines.base import (
    Sample,
    SamplingSpec,
    WeightSource,
    describe_weights,
    local_checkpoint,
)
from dqo_ray.models import load_policy, load_tokenizer, resolve_dtype
from dqo_ray.models.weight_broadcast import BroadcastSeat, receive_weights
from dqo_ray.models.weights import load_blob

log = logging.getLogger(__name__)


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


class _StopStrings(StoppingCriteria):
    """Ends a row once the decoded text of its last tokens holds a stop string, and records
    the response position of the token that completed it (`ends[row]`)."""

    def __init__(self, tokenizer, stops: tuple[str, ...], prompt_width: int) -> None:
        self.tokenizer, self.stops, self.start = tokenizer, stops, prompt_width
        # A stop string of L characters spans at most L tokens when each decodes to at least
        # one character; the margin covers tokens that decode to nothing (special ones).
        self.window = max(map(len, stops)) + 4
        self.ends: dict[int, int] = {}

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        position = input_ids.shape[1] - 1 - self.start  # of the newest response token
        tails = self.tokenizer.batch_decode(
            input_ids[:, max(self.start, input_ids.shape[1] - self.window):].tolist(),
            skip_special_tokens=True)
        hit = [any(stop in tail for stop in self.stops) for tail in tails]
        for row, found in enumerate(hit):
            if found:
                self.ends.setdefault(row, position)
        return torch.tensor(hit, dtype=torch.bool, device=input_ids.device)


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """`text` up to the stop string in it that ends first, ties to the first listed (vLLM's
    choice)."""
    found = [(i + len(stop), k, i) for k, stop in enumerate(stops) if (i := text.find(stop)) >= 0]
    return text[:min(found)[2]] if found else text


class HFEngine:
    """transformers `generate`, prompts left-padded and batched by length."""

    name = "hf"

    def __init__(self, model_path: str, *, dtype: str = "auto", seed: int = 0,
                 device: str | None = None, batch_prompts: int = 32,
                 scores_budget_gb: float = 1.0) -> None:
        """batch_prompts: most prompts per `generate` call. scores_budget_gb bounds the per-step
        scores HF keeps for a batch (rows x max_new_tokens x vocab floats): batches shrink for
        large vocabularies or long generations."""
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_prompts = batch_prompts
        self.scores_budget_bytes = int(scores_budget_gb * 2**30)
        self._rng = random.Random(seed)
        with local_checkpoint(model_path) as local:
            self.tokenizer = load_tokenizer(local)
            self._load_model(local)
        self.pad_id = int(self.tokenizer.pad_token_id)
        log.info("HF engine: %s (%s, %s), EOS ids %s", model_path, self.dtype, self.device,
                 sorted(self.eos_ids))

    def _load_model(self, local_dir: str) -> None:
        model = load_policy(local_dir, dtype=self.dtype).to(self.device).eval()
        eos = set(_as_list(model.generation_config.eos_token_id))
        eos |= set(_as_list(self.tokenizer.eos_token_id))
        self.eos_ids = eos
        model.generation_config = GenerationConfig(
            bos_token_id=model.generation_config.bos_token_id,
            eos_token_id=sorted(eos), pad_token_id=self.tokenizer.pad_token_id)
        self.model = model

    def load_weights(self, source: WeightSource) -> None:
        if isinstance(source, bytes | BroadcastSeat):
            state = (load_blob(source) if isinstance(source, bytes) else dict(receive_weights(
                source.offer, source.first_rank, source.world, self.device)))
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            tied = self.model.config.tie_word_embeddings
            if unexpected or (missing and not (tied and set(missing) <= {"lm_head.weight"})):
                raise ValueError(f"weights do not fit this model: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
        else:
            with local_checkpoint(source) as local:
                self._load_model(local)
        log.info("HF engine: weights reloaded from %s", describe_weights(source))

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> list[list[Sample]]:
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt")
        seed = spec.seed if spec.seed is not None else self._rng.randrange(2**31)
        vocab = self.model.config.get_text_config().vocab_size
        row_bytes = spec.max_new_tokens * vocab * 4
        max_prompts = max(1, min(self.batch_prompts,
                                 self.scores_budget_bytes // max(1, row_bytes * spec.n)))
        # Longest first: similar lengths share a batch (little padding).
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        results: list[list[Sample] | None] = [None] * len(prompts)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(order), max_prompts):
                idx = order[start : start + max_prompts]
                for i, samples in zip(idx, self._generate_batch([prompts[i] for i in idx], spec),
                                      strict=True):
                    results[i] = samples
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _generate_batch(self, prompts: list[list[int]], spec: SamplingSpec) -> list[list[Sample]]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        config = GenerationConfig(
            do_sample=not spec.greedy,
            temperature=spec.temperature if not spec.greedy else 1.0,
            top_p=spec.top_p if not spec.greedy else 1.0,
            top_k=0,
            max_new_tokens=spec.max_new_tokens,
            num_return_sequences=spec.n,
            output_scores=True,
            return_dict_in_generate=True,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_id,
        )
        stops = _StopStrings(self.tokenizer, tuple(spec.stop), width) if spec.stop else None
        out = self.model.generate(input_ids=ids.to(self.device),
                                  attention_mask=mask.to(self.device), generation_config=config,
                                  stopping_criteria=StoppingCriteriaList([stops] if stops else []))
        new = out.sequences[:, width:]  # [B*n, T]; row b*n + j = sample j of prompt b
        logprobs = torch.stack([
            torch.log_softmax(score.float(), dim=-1).gather(-1, new[:, t : t + 1]).squeeze(-1)
            for t, score in enumerate(out.scores)
        ], dim=1).cpu()  # [B*n, T]
        new = new.cpu()

        samples: list[list[Sample]] = []
        for b in range(len(prompts)):
            per_prompt = []
            for j in range(spec.n):
                row = b * spec.n + j
                tokens = new[row].tolist()
                end = next((t for t, tok in enumerate(tokens) if tok in self.eos_ids), None)
                stop_end = stops.ends.get(row) if stops else None
                if stop_end is not None and (end is None or stop_end < end):
                    tokens = tokens[: stop_end + 1]
                    text = _cut_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=True),
                                        stops.stops)
                    finish = "stop"
                else:
                    if end is None:
                        finish = "length"
                    else:
                        tokens, finish = tokens[: end + 1], "stop"
                    text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                per_prompt.append(Sample(
                    token_ids=tokens,
                    text=text,
                    finish_reason=finish,
                    logprobs=logprobs[row, : len(tokens)].tolist(),
                ))
            samples.append(per_prompt)
        return samples
