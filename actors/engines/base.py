"""The generation-engine interface: prompts (token ids) in, samples with behaviour log-probs out.

Two implementations: `VLLMEngine` (in-process `vllm.LLM`) and `HFEngine` (transformers
`generate`); `actors.engines.factory.make_engine` picks one. Both return, per sampled token, the log-probability under the distribution it was
actually drawn from (docs/algorithm.md section 3.3): softmax(logits / temperature), renormalised over
the top-p nucleus. Greedy decoding (temperature 0) reports the untempered log-probs.

A response that ends with EOS has finish_reason "stop" and keeps the EOS token (and its log-prob)
as its last token; one that ends with a stop string (`SamplingSpec.stop`) has finish_reason
"stop", keeps the token that completed it, and its text ends before it; one cut at
`max_new_tokens` has finish_reason "length".
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from dqo_ray.io import filesystem, is_uri
from dqo_ray.models.weight_broadcast import BroadcastSeat

WeightSource = str | bytes | BroadcastSeat
"""A refresh's weights: an HF checkpoint folder (path or URI), the trainer's safetensors
bytes (`dqo_ray.models.weights.weights_blob`), or this engine's seat in the trainer's
broadcast (`dqo_ray.models.weight_broadcast`)."""

log = logging.getLogger(__name__)


@dataclass
class SamplingSpec:
    n: int = 1
    """Samples per prompt."""
    temperature: float = 1.0
    """0 = greedy (then n must be 1: every sample would be identical)."""
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None
    """Makes one call reproducible. Pass a different seed per call (e.g. base seed + chunk
    index): the same seed on the same prompt draws the same samples again. None = the engine's
    own random stream (seeded at construction)."""
    stop: tuple[str, ...] = ()
    """Strings that end a response besides EOS (the plain prompt template's next "Question:",
    `dqo_ray.tasks.prompts.stop_strings`). A response ends at the token that completes one:
    finish_reason "stop", that token (and its log-prob) kept as the last one, the text cut
    before the stop string."""

    def __post_init__(self) -> None:
        problems = []
        if self.n < 1:
            problems.append(f"n: {self.n} must be >= 1")
        if self.temperature < 0:
            problems.append(f"temperature: {self.temperature} must be >= 0")
        if self.temperature == 0 and self.n != 1:
            problems.append(f"n: {self.n} must be 1 for greedy decoding (temperature 0)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p: {self.top_p} must be in (0, 1]")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens: {self.max_new_tokens} must be >= 1")
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            problems.append(f"stop: {self.stop!r} must be a sequence of non-empty strings")
        if problems:
            raise ValueError("invalid SamplingSpec: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Sample:
    token_ids: list[int]
    """Response tokens; ends with EOS, or the token completing a stop string, when
    finish_reason is "stop"."""
    text: str
    """The response decoded with special tokens (EOS, padding) skipped, and cut before the
    stop string it ended with."""
    finish_reason: str
    """"stop" (ended with EOS or a stop string) or "length" (hit max_new_tokens)."""
    logprobs: list[float]
    """logprobs[i] = log-prob of token_ids[i] under the distribution it was sampled from."""


@runtime_checkable
class GenerationEngine(Protocol):
    name: str

    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> list[list[Sample]]:
        """prompts: token-id lists, already templated. Returns spec.n samples per prompt, in
        prompt order."""
        ...

    def load_weights(self, source: WeightSource) -> None:
        """Refresh the weights in place, with no restart, from `source`, of the same
        architecture and tokenizer."""
        ...


def describe_weights(source: WeightSource) -> str:
    """For log lines: the folder, or the size of the weights handed over in memory."""
    if isinstance(source, bytes):
        return f"memory ({len(source) / 2**20:.1f} MiB)"
    if isinstance(source, BroadcastSeat):
        return (f"the trainer's {source.offer.backend} broadcast "
                f"({source.offer.nbytes / 2**20:.1f} MiB)")
    return str(source)


def materialise(uri: str, dest: str | os.PathLike) -> str:
    """Copies the top-level files of a checkpoint folder on any pyarrow filesystem (`s3://`,
    `gs://`, `file://`, ...) into the local folder `dest`; returns `dest`. Sub-folders (e.g.
    optimizer state) are skipped: an HF checkpoint is flat."""
    import pyarrow.fs as pafs

    fs, root = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    files = [info for info in infos if info.type == pafs.FileType.File]
    if not files:
        raise FileNotFoundError(f"no files in checkpoint {uri!r}")
    local = pafs.LocalFileSystem()
    for info in files:
        pafs.copy_files(info.path, os.path.join(os.fspath(dest), info.base_name),
                        source_filesystem=fs, destination_filesystem=local)
    log.info("materialised %s (%d files) to %s", uri, len(files), dest)
    return os.fspath(dest)


@contextlib.contextmanager
def local_checkpoint(checkpoint_dir: str | os.PathLike) -> Iterator[str]:
    """Yields a local folder holding the checkpoint: the path itself, or for a URI a temporary
    copy (see `materialise`), deleted on exit."""
    checkpoint_dir = os.fspath(checkpoint_dir)
    if not is_uri(checkpoint_dir):
        yield checkpoint_dir
        return
    with tempfile.TemporaryDirectory(prefix="dqo-ckpt-") as tmp:
        yield materialise(checkpoint_dir, tmp)
