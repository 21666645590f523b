"""`make demo` until the study runner lands: micro experts, merged several ways, compared.

No training happens here yet, so the experts are synthetic and say so: *seeded* experts are
one shared seed model plus a different random drift per modality (what modality-specific
training from a seed pre-trained model produces), *naive* experts are initialised
independently (no shared seed). Each merge is scored by how closely the merged
modality-agnostic model reproduces the modality-specific model's output features on
held-out synthetic inputs, per route (image, text, image-text pair), next to the
mergeability metrics of the experts. Layer scale starts at 1.0 here so that the random
blocks change the features enough to tell the merges apart.
"""

import time
from pathlib import Path

import torch

from vlmerge.io.checkpoint import open_checkpoint
from vlmerge.io.grams import save_grams
from vlmerge.merging import merge_checkpoint
from vlmerge.merging.grams import collect_grams
from vlmerge.merging.plan import merged_key
from vlmerge.metrics import mergeability
from vlmerge.models import VLTransformer, count_parameters, load_model, model_config, save_model

DRIFT = 0.3  # per-modality drift of the seeded experts, relative to each tensor's spread
METHODS = [
    ("interpolation", {"ratio": 0.5}),
    ("arithmetic", {"lam": 0.5}),
    ("regmean", {"alpha": 0.9}),
    ("ties", {"density": 0.2, "lam": 1.0}),
    ("dare", {"drop": 0.5, "lam": 0.5}),
]


def seeded_experts(seed_model: VLTransformer, generator: torch.Generator) -> VLTransformer:
    """Every expert starts from the seed's shared weights, then drifts on its own."""
    specific = VLTransformer(seed_model.config.with_experts("all"))
    shared = seed_model.state_dict()
    state = {}
    for key, value in specific.state_dict().items():
        shared_key = merged_key(key)
        origin = shared[shared_key]
        spread = float(origin.std()) if origin.numel() > 1 and float(origin.std()) > 0 else 0.02
        drift = torch.randn(origin.shape, generator=generator) * spread * DRIFT if key != shared_key else 0
        state[key] = origin + drift
    specific.load_state_dict(state)
    return specific


def synthetic_batches(config, count: int, batch: int, generator: torch.Generator) -> list[dict]:
    """Images, text, and pairs of random content, enough to exercise every route."""
    def images():
        return torch.randn(batch, config.channels, config.image_size, config.image_size, generator=generator)

    def text():
        ids = torch.randint(1, config.vocab_size, (batch, config.max_text_len // 2), generator=generator)
        lengths = torch.randint(2, ids.shape[1] + 1, (batch,), generator=generator)
        return ids, torch.arange(ids.shape[1])[None, :] < lengths[:, None]

    batches = []
    for _ in range(count):
        ids, mask = text()
        batches += [{"images": images()}, {"text_ids": ids, "text_mask": mask},
                    {"images": images(), "text_ids": ids, "text_mask": mask}]
    return batches


@torch.no_grad()
def feature_error(reference: VLTransformer, merged: VLTransformer, batches: list[dict]) -> dict[str, float]:
    """Relative L2 error ||merged - specific|| / ||specific|| of the output features, per route."""
    errors: dict[str, list[float]] = {"image": [], "text": [], "pair": []}
    for batch in batches:
        route = "pair" if len(batch) == 3 else ("image" if "images" in batch else "text")
        expected, output = reference(**batch), merged(**batch)
        keep = expected.mask if expected.mask is not None else torch.ones(expected.hidden.shape[:2], dtype=torch.bool)
        a, b = expected.hidden[keep], output.hidden[keep]
        errors[route].append(float((b - a).norm() / a.norm()))
    return {route: sum(v) / len(v) for route, v in errors.items()}


def run_demo(out_dir: str | Path = "demo-out", size: str = "micro") -> str:
    start = time.perf_counter()
    out = Path(out_dir)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    config = model_config(size, layer_scale_init=1.0)  # blocks matter at init
    seed_model = VLTransformer(config.agnostic())
    recipes = {"seeded": seeded_experts(seed_model, generator), "naive": VLTransformer(config)}
    seed_path = save_model(seed_model, out / "seed.safetensors")
    calibration = synthetic_batches(config, 4, 8, generator)
    held_out = synthetic_batches(config, 4, 8, generator)

    lines = [f"vlmerge demo ({size} model, synthetic experts, no training yet)", ""]
    header = f"{'experts':<8} {'method':<14} {'image':>7} {'text':>7} {'pair':>7}"
    table = [header, "-" * len(header)]
    metric_lines = []
    for recipe, specific in recipes.items():
        specific_path = save_model(specific, out / f"{recipe}-specific.safetensors")
        grams, info = collect_grams(specific, calibration)
        grams_path = save_grams(out / f"{recipe}-grams.safetensors", grams, info, {"data": "synthetic calibration"})
        report = mergeability(open_checkpoint(specific_path))
        metric_lines.append(f"{recipe:<8} " + "  ".join(f"{k} {v:.3f}" for k, v in report.model.items()))
        for method, options in METHODS:
            if recipe == "naive" and method in ("arithmetic", "ties", "dare"):
                continue  # modality vectors need the shared seed a naive recipe lacks
            merged_path = out / f"{recipe}-{method}.safetensors"
            result = merge_checkpoint(specific_path, method, options, out=merged_path, seed_checkpoint=seed_path,
                                      grams=grams_path)
            scores = feature_error(specific, load_model(merged_path), held_out)
            table.append(f"{recipe:<8} {method:<14} " + " ".join(f"{scores[r]:>7.3f}" for r in ("image", "text", "pair")))
    specific_params = count_parameters(recipes["seeded"], backbone_only=True)
    merged_params = count_parameters(seed_model, backbone_only=True)
    lines += ["Relative error of the merged model's features against the modality-specific model",
              "(held-out inputs; lower is better):"]
    lines += table
    lines += ["", "Mergeability: distances between the experts (model level; lower means closer):"] + metric_lines
    lines += ["", f"Backbone parameters: modality-specific {specific_params:,} -> merged {merged_params:,} "
              f"({merged_params / specific_params:.1%})",
              f"Checkpoints in {out}/; done in {time.perf_counter() - start:.1f}s"]
    return "\n".join(lines)
