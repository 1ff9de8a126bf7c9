"""Shared by the tests and by the 2-process worker (which imports this file as a module).

- a small corpus of documents of very unequal lengths, and the small equivalence set-up of docs/design.md: a
  model with tied embeddings, parameters in the root FSDP group (wte, wpe, ln_f) and dimensions not divisible
  by 2 (n_embd = 33, vocabulary 4,099: FSDP pads its shards); documents padded, not packed, so micro-batches
  and ranks hold unequal token counts;
- tolerances and fp16 gradient poisoning. Launching 2 processes or 2 nodes: tests/launch.py; page faults
  and saved activations: tests/memory_probes.py.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
if "FABRIC_TRAM_CACHE" not in os.environ:  # token caches of the test corpora stay out of the user's home
    import tempfile

    os.environ["FABRIC_TRAM_CACHE"] = tempfile.mkdtemp(prefix="fabric_tram_cache_")
import torch  # noqa: E402

from fabric_tram.config import load_config  # noqa: E402
from fabric_tram.distributed import full_state_dict  # noqa: E402

torch.set_num_threads(1)

# ------------------------------------------------------------------------------------------- tolerances

# Equivalence tests (k = 1 vs 4, 1 vs 2 processes, DDP/FSDP, resume) check algebra, so they run in float64:
# then the only differences are the summation orders of other batch shapes and reductions. Measured for k = 1
# vs 4 over three steps: losses and norms within 4e-16 relative, parameters within 3e-15, and d (a KL of nearly
# equal distributions, ~1e-5, summed from log-probabilities near -10) within 2e-16 absolute. The tolerances
# leave three orders of margin on any machine and still fail any algebraic mistake, which moves results by 1e-3
# or more (the negative controls show it).
EXACT_REL = 1e-10
EXACT_ABS = 1e-12  # for values that are near zero (parameters, d at step 1)
D_ABS = 1e-15  # the absolute rounding of a float64 KL between nearly equal distributions (sums of ~1e-16 terms)
# after calibration TRAM's radius (and so ‖e‖) is proportional to d; its calibrated scale to 1 / d (LoRA's first
# steps, whose adapters start at B = 0, give d ~ 1e-8: float64's absolute rounding of the KL is then 1e-7 of it)
FOLLOWS_D = ("d", "radius", "e_norm", "radius_scale")


def pytest_collection_modifyitems(config, items):
    """Longest first: with ``-n`` workers the long ones start early, so the workers finish together (the mutation
    check, then the 2-process launches, then the other slow tests)."""

    def rank(item) -> int:
        if "test_mutations.py" in item.nodeid and item.get_closest_marker("slow"):
            return 0
        if item.get_closest_marker("distributed"):
            return 1
        return 2 if item.get_closest_marker("slow") else 3

    items.sort(key=rank)


# ------------------------------------------------------------------------------------------- corpus

WORDS = (
    "the model keeps its weights flat and its representations close to pre-training while it learns a new "
    "domain of text from scientific papers and encyclopedia articles about language and society"
).split()


def write_corpus(root: Path, domains=("alpha", "beta"), docs=(40, 12, 12), seed=0, min_words=3, max_words=60) -> Path:
    """A small corpus of documents of very unequal lengths (so padded batches have unequal target counts)."""
    rng = random.Random(seed)
    for domain in domains:
        folder = root / domain
        folder.mkdir(parents=True, exist_ok=True)
        for split, n in zip(("train", "validation", "test"), docs, strict=True):
            texts = [
                " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) + f" {domain}."
                for _ in range(n)
            ]
            (folder / f"{split}.txt").write_text("\n\n".join(texts) + "\n")
    return root


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "data")


# ------------------------------------------------------------------------------------------- the small set-up

# for the tests about GPT-2's own ids (export to transformers, generate's end of text): its tokenizer and a model
# of its 50,257 rows in place of the small set-up's 4,099 over the demo tokenizer
GPT2_IDS = ["task.tokenizer=gpt2", "model.vocab_size=50257"]

SMALL_MODEL = [
    "model.name=gpt2",
    "model.preset=tiny",
    "model.n_layer=2",
    "model.n_head=3",
    "model.n_embd=33",
    "model.n_positions=48",
    "model.vocab_size=4099",
    "model.dropout=0.0",
]


def small_pretrained(data_dir, folder) -> Path:
    """A Hugging Face GPT-2 folder of the small config's sizes (seeded weights): the "pre-trained" model the CKA of
    the equivalence runs compares with."""
    from fabric_tram.models.gpt2 import GPT2
    from fabric_tram.models.hf_folder import save_hf_folder

    model_config = small_config(data_dir, Path(folder) / "unused").model
    torch.manual_seed(0)
    save_hf_folder(GPT2(model_config), folder)
    return Path(folder)


MEASURE = dict(split="validation", epsilon=1e-3, lr=1e-2, steps=2, batch_size=2, accumulate=4)


def measure_run(run_dir, pretrained) -> dict:
    """ε-sharpness and CKA of an equivalence run, with settings whose batches do not depend on the processes."""
    from fabric_tram.measure import cka, sharpness

    return {
        "sharpness": sharpness(run_dir, **MEASURE)["results"],
        "cka": cka(str(pretrained), run_dir, "validation", batch_size=2, limit=4)["results"],
    }


def recipe_smoke_config(recipe, run_dir, strategy="auto", micro=2, accumulate=1, rule="tram-prev", extra=()):
    """A recipe's smoke setting as an equivalence run: float64, no dropout (ranks would draw other masks than one
    process), the rule's TRAM scale calibrated within the run; ``extra`` overrides last."""
    from fabric_tram.config import load_config

    path = Path(__file__).resolve().parents[1] / "recipes" / f"{recipe}.py"
    overrides = [f"trainer.run_dir={run_dir}", f"trainer.strategy={strategy}", "trainer.precision=64-true",
                 f"trainer.micro_batch_size={micro}", f"trainer.accumulate={accumulate}", "model.dropout=0.0",
                 f"optimizer.name={rule}", "optimizer.calibration_steps=2",
                 # the window at the start, where d is large enough to compare tightly (after the warm-up, a KL of
                 # 2e-8 carries float64 rounding of 1e-9 of itself, however exact the algebra)
                 "optimizer.calibration_start=0", *extra]  # fmt: skip
    return load_config(path, overrides, smoke=True)


def xnli_smoke_config(run_dir, strategy="auto", micro=2, accumulate=1):
    """The XNLI recipe's smoke (tiny encoder, bundled pairs) with tram-prev."""
    return recipe_smoke_config("xlmr_xnli", run_dir, strategy, micro, accumulate)


def vit_smoke_config(run_dir, strategy="auto", micro=2, accumulate=1):
    """The CIFAR-100 recipe's smoke (tiny ViT, bundled images, augmented) for one epoch with tram-x, the paper's
    best vision variant: its noise on the patch embeddings is a function of the example, not of the rank."""
    extra = ("trainer.max_epochs=1", "trainer.eval_batches=0")  # every test image, however many ranks
    return recipe_smoke_config("vit_cifar100", run_dir, strategy, micro, accumulate, "tram-x", extra)


# the Llama family's equivalence run (FSDP2): grouped-query attention, SwiGLU, tied embeddings
LLAMA_MODEL = [
    "model.name=llama",
    "model.n_layer=2",
    "model.n_head=4",
    "model.n_kv_head=2",
    "model.n_embd=32",
    "model.intermediate_size=48",
    "model.vocab_size=4099",
]


def hf_checkpoints(root: Path, corpus: Path, write: bool = True) -> dict:
    """Hugging Face folders of three architectures written by our families' exporters (GPT-2; a Llama with
    grouped-query attention; a BERT classifier with a pooler), and how a run loads each:
    ``{family: (our family's model overrides, model.name=hf overrides, task overrides)}``."""
    from fabric_tram.models import build_model
    from fabric_tram.models.hf_folder import save_hf_folder

    lm = ["task.name=lm", f"task.data_dir={corpus}", "task.packing=false", "task.block_size=32", "task.tokenizer=demo"]
    nli = ["task.name=nli", "task.data_dir=nli-sample", "task.tokenizer=nli-sample", "task.max_length=48"]
    bert = ["model.name=encoder", "model.variant=bert", "model.type_vocab_size=2", "model.layer_norm_eps=1e-12"]
    out = {}
    for family, model, task in (("gpt2", SMALL_MODEL, lm), ("llama", LLAMA_MODEL, lm), ("bert", bert, nli)):
        config = load_config(None, ["optimizer.name=sgd", *model, *task, "model.dropout=0.0"])
        torch.manual_seed(0)
        folder = root / f"hf-{family}"
        if write:  # (a 2-process worker reads the folders its reference fixture wrote)
            save_hf_folder(build_model(config.model), folder)
        native = [f"model.name={config.model.name}", f"model.pretrained={folder}", "model.dropout=0.0"]
        out[family] = (native, ["model.name=hf", f"model.pretrained={folder}"], task)
    return out


LLAMA_LORA = ["model.lora.r=4", "model.lora.target_modules=[q_proj,v_proj,down_proj]"]


# The rules the 1 vs 2 process tests run (docs/design.md), and what they add to the small config: TRAM's scale
# calibrated within the run (tram-prev) and a radius reused between measurements of d (tram-x).
DIST_RULES = ("sam", "asam", "fsam", "tram-prev", "tram-x", "tram-fisher", "trpo", "r3f")
DIST_RULE_EXTRA = {
    "tram-prev": ["optimizer.calibration_steps=2"],
    "tram-x": ["optimizer.calibration_steps=1", "optimizer.radius_every=2"],
}


def rule_extra(rule: str) -> list[str]:
    return ["optimizer.base=sgd", *DIST_RULE_EXTRA.get(rule, [])]


# a rule's schedule variants in the 1 vs 2 process tests: "RULE@VARIANT" -> the rule and what it adds
DIST_VARIANTS = {
    "tram-prev@ascent-every-2": ("tram-prev", ["optimizer.ascent_every=2"]),
    "asam@momentum": ("asam", ["optimizer.ascent_direction=momentum", "optimizer.momentum=0.9"]),
}


def dist_rule(name: str) -> tuple[str, list[str]]:
    """(optimizer.name, its overrides) of an entry of DIST_RULES or DIST_VARIANTS."""
    rule, extra = DIST_VARIANTS.get(name, (name, []))
    return rule, [*rule_extra(rule), *extra]


def small_config(
    data_dir,
    run_dir,
    optimizer="sgd",
    micro=8,
    accumulate=1,
    steps=3,
    strategy="auto",
    precision="64-true",
    extra=(),
    model=tuple(SMALL_MODEL),
):
    """The small LM run of the equivalence tests; float64 unless a test is about another precision."""
    lr = "0.5" if optimizer == "sgd" else "0.003"
    return load_config(
        None,
        list(model)
        + [
            "task.name=lm",
            f"task.data_dir={data_dir}",
            "task.packing=false",
            "task.block_size=32",
            "task.tokenizer=demo",
            f"optimizer.name={optimizer}",
            f"optimizer.lr={lr}",
            "schedule.name=constant",
            f"trainer.run_dir={run_dir}",
            f"trainer.micro_batch_size={micro}",
            f"trainer.accumulate={accumulate}",
            f"trainer.max_steps={steps}",
            f"trainer.strategy={strategy}",
            f"trainer.precision={precision}",
            "trainer.grad_clip=0",
            "trainer.progress_bar=false",
            "trainer.eval_batches=1",
            *extra,
        ],
    )


def initial_params(config) -> dict[str, torch.Tensor]:
    """The weights a run of ``config`` starts from, built as ``engine.setup`` builds them (seeded, initialised in
    the precision's dtype, as Fabric's ``init_module`` does), without training anything."""
    from fabric_tram.models import build_model

    dtype = {"64-true": torch.float64, "bf16-true": torch.bfloat16}.get(config.trainer.precision, torch.float32)
    torch.manual_seed(config.trainer.seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = build_model(config.model)
    finally:
        torch.set_default_dtype(previous)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def trajectory(run) -> dict:
    """What equivalence tests compare: per-step stats and the final (gathered) parameters."""
    keys = ("loss", "grad_norm", "n_targets")
    return {"steps": [{k: s[k] for k in keys} for s in run.history], "params": full_state_dict(run.model)}


def max_param_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def assert_histories_match(a: list[dict], b: list[dict], keys, rel=EXACT_REL, abs_=EXACT_ABS, label="") -> None:
    """Per-step stats of two runs: the same number of steps, each key logged by both or by neither, equal to
    the tolerance (never a silent skip of a missing step or key)."""
    assert len(a) == len(b), f"{label}: {len(a)} vs {len(b)} steps"
    for step, (x, y) in enumerate(zip(a, b, strict=True), start=1):
        for key in keys:
            assert (key in x) == (key in y), f"{label} step {step}: {key!r} logged by one run only"
            if key in x:
                tolerance = rel
                if key in FOLLOWS_D and x.get("d"):  # a KL of nearly equal distributions keeps float64's absolute
                    tolerance = max(rel, D_ABS / x["d"])  # rounding (~1e-16 per term), so d's relative error grows as
                    # it shrinks (1e-9 at d = 2e-8), and so does that of what is proportional to it
                assert x[key] == pytest.approx(y[key], rel=tolerance, abs=abs_), f"{label} step {step}: {key}"


# ------------------------------------------------------------------------------------------- fp16 poisoning


def poisoned_forward_backward(real: Callable, when: Callable, passes: list | None = None) -> Callable:
    """``StepContext.forward_backward`` that, after the pass, writes inf into one gradient element when
    ``when(ctx)`` (an fp16 overflow in that pass); ``passes`` records the step of every pass that ran."""

    def forward_backward(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        if passes is not None:
            passes.append(self.step)
        if when(self):
            next(p for p in self.parameters if p.grad is not None).grad.view(-1)[0] = float("inf")
        return result

    return forward_backward


@pytest.fixture
def poison_gradients(monkeypatch):
    """``poison_gradients(when)``: from now on, passes for which ``when(ctx)`` overflow; returns the pass log."""
    from fabric_tram.optim.step import StepContext

    def install(when: Callable) -> list:
        passes: list = []
        monkeypatch.setattr(
            StepContext, "forward_backward", poisoned_forward_backward(StepContext.forward_backward, when, passes)
        )
        return passes

    return install
