"""GPT-2: parity with Hugging Face transformers (the reference, used only here), hub-cache loading offline,
preset sizes, refusal of mismatched checkpoints."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fabric_tram.models.gpt2 import GPT2, GPT2Config

transformers = pytest.importorskip("transformers")


def hf_tiny(tmp_path, dropout=0.0):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        n_positions=64,
        vocab_size=101,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    folder = tmp_path / "hf-gpt2"
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def test_loads_hf_checkpoint_with_identical_logits(tmp_path):
    ref, folder = hf_tiny(tmp_path)
    ours = GPT2.from_config(GPT2Config(pretrained=str(folder))).eval()
    assert ours.lm_head.weight is ours.transformer.wte.weight  # still tied after loading
    ids = torch.randint(0, 101, (3, 17))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-5, rtol=0)


def test_input_noise_is_added_to_token_embeddings(tmp_path):
    ref, folder = hf_tiny(tmp_path)
    ours = GPT2.from_config(GPT2Config(pretrained=str(folder))).eval()
    ids = torch.randint(0, 101, (2, 9))
    noise = 0.1 * torch.randn(2, 9, 32)
    with torch.no_grad():
        embeds = ref.transformer.wte(ids) + noise  # HF's inputs_embeds: before positions
        noised = ours(ids, input_noise=lambda e: e + noise)
        torch.testing.assert_close(noised, ref(inputs_embeds=embeds).logits, atol=1e-5, rtol=0)


def test_hub_id_loads_offline_from_the_cache_layout(tmp_path):
    _, folder = hf_tiny(tmp_path)
    repo = tmp_path / "hf_home" / "hub" / "models--someone--tiny-gpt2"
    rev = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / rev).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    for f in ("config.json", "model.safetensors"):
        (repo / "snapshots" / rev / f).write_bytes((folder / f).read_bytes())
    code = (
        "from fabric_tram.models.gpt2 import GPT2, GPT2Config;"
        "m = GPT2.from_config(GPT2Config(pretrained='someone/tiny-gpt2'));"
        "print(sum(p.numel() for p in m.parameters()))"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) == sum(
        p.numel() for p in GPT2.from_config(GPT2Config(pretrained=str(folder))).parameters()
    )
    # a repo missing from the cache gets an error naming it and the fix
    code = (
        "from fabric_tram.models.gpt2 import GPT2, GPT2Config; GPT2.from_config(GPT2Config(pretrained='nobody/absent'))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "nobody/absent" in out.stderr and "local folder" in out.stderr


@pytest.mark.parametrize("preset,count", [("gpt2", 124_439_808), ("gpt2-xl", 1_557_611_200)])
def test_preset_parameter_counts(preset, count):
    with torch.device("meta"):
        model = GPT2(GPT2Config(preset=preset))
    assert sum(p.numel() for p in model.parameters()) == count


def test_mismatched_checkpoint_is_refused_naming_keys(tmp_path):
    _, folder = hf_tiny(tmp_path)
    from safetensors.torch import load_file

    model = GPT2(GPT2Config(preset="tiny", vocab_size=101, n_embd=48, n_head=2, n_layer=3))
    with pytest.raises(ValueError, match=r"missing keys: transformer\.h\.2.*shape mismatch"):
        model.load_hf_state_dict(load_file(str(folder / "model.safetensors")))


def test_pickle_only_checkpoint_is_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"n_layer": 1}))
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        GPT2.from_config(GPT2Config(pretrained=str(folder)))
