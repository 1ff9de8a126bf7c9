"""The ViT family (models/vit.py): logits identical to Hugging Face's ViTForImageClassification on a tiny config
built here (saved with the names transformers writes), input noise on the patch embeddings, every update rule
stepping on it, a new head for another label count, and clear errors for checkpoints that do not fit."""

import pytest
import torch
import torch.nn.functional as F
from memory_probes import saved_elements_per_token

from fabric_tram.bench.step_cost import RULES
from fabric_tram.loss import LossOutput
from fabric_tram.models.vit import ViT, ViTConfig, config_from_hf
from fabric_tram.optim.api import UpdateRuleLoop

transformers = pytest.importorskip("transformers")
SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32,
             patch_size=8)  # fmt: skip


def hf_vit(num_labels: int = 5):
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(**SIZES, num_labels=num_labels))
    with torch.no_grad():  # non-zero biases and [CLS]/positions, so each is really compared
        for name, p in model.named_parameters():
            if name.endswith("bias") or "embeddings" in name:
                p.normal_(0, 0.1)
    return model.eval()


def test_logits_match_transformers_and_noise_lands_on_the_patch_embeddings(tmp_path):
    theirs = hf_vit()
    theirs.save_pretrained(tmp_path, safe_serialization=True)
    ours = ViT.from_config(ViTConfig(pretrained=str(tmp_path), num_labels=5)).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), theirs(pixel_values=images).logits, atol=1e-5, rtol=0)
        shapes = []

        def noise(e):
            shapes.append(tuple(e.shape))
            return e + 0.5

        noised = ours(images, input_noise=noise)
        # the same shift given to transformers' patch projection (its bias) reproduces ours: noise goes on the
        # patch embeddings, before [CLS] and the positions are added
        theirs.vit.embeddings.patch_embeddings.projection.bias += 0.5
        torch.testing.assert_close(noised, theirs(pixel_values=images).logits, atol=1e-5, rtol=0)
    assert shapes == [(3, 16, 32)]  # (batch, 4×4 patches, width): no [CLS] in what the noise sees


def test_another_label_count_needs_a_new_head_and_other_checkpoints_are_refused(tmp_path):
    hf_vit(num_labels=10).save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(ValueError, match=r"classifier.weight \(10, 32\) vs \(100, 32\).*model.new_head=true"):
        ViT.from_config(ViTConfig(pretrained=str(tmp_path)))
    fresh = ViT.from_config(ViTConfig(pretrained=str(tmp_path), new_head=True))
    assert fresh.classifier.weight.shape == (100, 32)
    hf = {"model_type": "vit", "image_size": 224, "patch_size": 16, "num_hidden_layers": 12, "num_attention_heads": 12,
          "hidden_size": 768, "intermediate_size": 3072}  # fmt: skip
    assert config_from_hf(ViTConfig(preset="vit-b16", pretrained="x"), hf).sizes()["n_layer"] == 12
    with pytest.raises(ValueError, match="model_type='bert', not a ViT"):
        config_from_hf(ViTConfig(pretrained="x"), {**hf, "model_type": "bert"})
    with pytest.raises(ValueError, match="does not match model.preset='vit-b16'.*patch_size=16 .config. vs 32"):
        config_from_hf(ViTConfig(preset="vit-b16", pretrained="x"), {**hf, "patch_size": 32})


def test_vit_b16_has_the_published_parameter_count():
    with torch.device("meta"):
        model = ViT(ViTConfig(preset="vit-b16", num_labels=1000))
    assert sum(p.numel() for p in model.parameters()) == 86_567_656  # google/vit-base-patch16-224


def image_loss(model, batch, **forward_kwargs) -> LossOutput:
    logits = model(batch["pixel_values"], **forward_kwargs)
    labels = batch["labels"]
    return LossOutput(F.cross_entropy(logits, labels, reduction="sum"), torch.tensor(len(labels)), logits,
                      torch.ones_like(labels, dtype=torch.bool))  # fmt: skip


def test_every_update_rule_steps_on_a_vit():
    torch.manual_seed(0)
    batch = {"pixel_values": torch.randn(4, 3, 32, 32), "labels": torch.randint(0, 5, (4,)),
             "example_index": torch.arange(4)}  # fmt: skip
    for name in RULES:
        torch.manual_seed(0)
        model = ViT(ViTConfig(num_labels=5, dropout=0.1))
        before = [p.detach().clone() for p in model.parameters()]
        loop = UpdateRuleLoop(name, model, torch.optim.Adam(model.parameters(), lr=1e-3), image_loss)
        stats = loop.step(batch)
        assert torch.isfinite(torch.tensor(stats["loss"])), name
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)), name


def test_estimate_counts_patches_and_the_tensors_a_block_saves():
    """`fabric-tram estimate` of the CIFAR-100 recipe: 197 tokens per 224-px image (the [CLS] and 14 × 14
    patches), and a ViT block's per-token activation count equal to what autograd keeps (saved-tensor hooks;
    parameters and per-token statistics left out)."""
    from pathlib import Path

    from fabric_tram.config import load_config
    from fabric_tram.engine.estimate import estimate

    model = ViT(ViTConfig(preset="tiny", n_embd=64, n_head=4, intermediate_size=160))
    B, T = 2, 16
    x = torch.randn(B, T, 64, requires_grad=True)
    saved = saved_elements_per_token(lambda: model.vit.layers[0](x), list(model.parameters()), B * T)
    assert saved == model.activation_elements_per_token() == 8 * 64 + 2 * 160

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "vit_cifar100.py"
    e = estimate(load_config(recipe, ["optimizer.name=tram-x"]), devices=1)
    assert e["tokens_per_step_per_device"] == 128 * 197
    full = ViT(ViTConfig(preset="vit-b16", num_labels=100))
    per_block = 128 * 197 * full.activation_elements_per_token() * 2  # bf16 activations
    assert e["activations_without_checkpointing"] > 12 * per_block  # 12 blocks, and the logits on top
