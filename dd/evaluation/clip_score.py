"""Prompt alignment of text-to-image samples: CLIP score (torchmetrics' ``CLIPScore``).

CLIP score = max(100 cos(image embedding, caption embedding), 0), averaged over samples; torchmetrics computes it
with a ``transformers`` CLIP model. Sample i was generated from row ``labels[i]`` of the prompt file the sampler's
caption features encode, so that row's prompt is its caption. As for the other metrics, the samples are cut into
``splits`` equal parts and the result is the mean over the parts with its standard error (``clip_score_std``).

The model is a Hugging Face id that torchmetrics knows (``openai/clip-vit-large-patch14``, the default; fetched into
the Hugging Face cache on first use) or a local folder holding a saved ``CLIPModel`` and ``CLIPProcessor``.
(GigaGAN's evaluation, which LlamaGen uses, reports CLIP score with OpenCLIP ViT-bigG/14: not the same number.)
"""
from __future__ import annotations

import numpy as np
import torch

from dd.evaluation.sample_sets import SampleSet, SampleSetError, load_sample_set

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"


class _FeatureTensors(torch.nn.Module):
    """A ``CLIPModel`` whose ``get_image_features`` / ``get_text_features`` return the projected embeddings as
    tensors: torchmetrics 1.9 expects tensors, ``transformers`` 5 returns them as ``pooler_output`` of an output
    object. Nothing else changes."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    @staticmethod
    def _tensor(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs):
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def clip_model_loader(model: str):
    """What torchmetrics' ``CLIPScore`` takes as its model: a loader of the model and processor from a Hugging Face
    id or a local folder (torchmetrics itself accepts only the ids it lists, and no folder)."""
    def load():
        from transformers import CLIPModel, CLIPProcessor

        clip = CLIPModel.from_pretrained(model).eval().requires_grad_(False)
        return _FeatureTensors(clip), CLIPProcessor.from_pretrained(model)
    return load


def sample_prompts(samples: SampleSet, prompts_path, column: str) -> list[str]:
    """The prompt of every sample (its label is its row in the prompt file)."""
    from dd.pipeline.prompt_files import read_prompts

    rows = [r[column] for r in read_prompts(prompts_path, column)]
    if samples.labels is None:
        raise SampleSetError(f"{samples.source}: CLIP score needs the prompt row of every sample (labels)")
    labels = np.asarray(samples.labels)
    if labels.min() < 0 or labels.max() >= len(rows):
        raise SampleSetError(f"{samples.source}: labels must be rows 0..{len(rows) - 1} of {prompts_path}, got "
                             f"{labels.min()}..{labels.max()}")
    return [rows[i] for i in labels]


def clip_scores(samples_npz, prompts_path, column: str = "prompt", model: str = DEFAULT_CLIP_MODEL, *,
                splits: int = 1, batch_size: int = 64, device: str | None = None,
                prompts: list[str] | None = None) -> dict:
    """{"clip_score", "clip_score_std" (splits > 1), "clip_model"} of a labelled sample set. ``prompts``: every
    sample's prompt as ``sample_prompts`` gave it (the prompt file is then not read again)."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    samples = samples_npz if isinstance(samples_npz, SampleSet) else load_sample_set(samples_npz)
    if prompts is None:
        prompts = sample_prompts(samples, prompts_path, column)
    elif len(prompts) != len(samples):
        raise SampleSetError(f"{samples.source}: {len(prompts)} prompts for {len(samples)} samples")
    if splits < 1 or len(samples) % splits:
        raise SampleSetError(f"{len(samples)} samples do not split into {splits} equal parts")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    metric = CLIPScore(model_name_or_path=clip_model_loader(model)).to(device)
    n = len(samples) // splits
    parts = []
    for k in range(splits):
        metric.reset()
        parts.append(_part_score(metric, samples, prompts, k * n, (k + 1) * n, batch_size, device))
    out = {"clip_score": float(np.mean(parts)), "clip_model": str(model)}
    if splits > 1:
        out["clip_score_std"] = float(np.std(parts, ddof=1) / np.sqrt(splits))
    return out


@torch.no_grad()
def _part_score(metric, samples: SampleSet, prompts: list[str], begin: int, end: int, batch_size: int,
                device: str) -> float:
    for i in range(begin, end, batch_size):
        j = min(i + batch_size, end)
        images = torch.from_numpy(np.ascontiguousarray(samples.images[i:j])).to(device)  # uint8 [b, 3, H, W]
        metric.update(list(images), prompts[i:j])
    return float(metric.compute())
