"""The analysis tools' mathematics (analysis/cka.py, analysis/sharpness.py): CKA's invariances and its streamed
sums against the direct formula; ε-sharpness against a quadratic loss whose box maximum is known in closed form."""

import math
from pathlib import Path

import pytest
import torch

from fabric_tram.analysis.cka import StreamedLinearCKA, linear_cka
from fabric_tram.analysis.sharpness import epsilon_sharpness


def test_cka_is_one_on_itself_and_invariant_to_rotation_and_scaling():
    torch.manual_seed(0)
    x = torch.randn(50, 8, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))  # an orthogonal matrix
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-12)
    y = torch.randn(50, 5, dtype=torch.float64)
    assert linear_cka(x, y) == pytest.approx(linear_cka(3.0 * x @ q, 0.5 * y), abs=1e-12)
    assert linear_cka(x, y) < 0.5  # unrelated representations are far from 1: the comparison has teeth


def test_streamed_cka_equals_the_direct_formula_batch_by_batch():
    torch.manual_seed(1)
    x = torch.randn(70, 6, dtype=torch.float64) + 3.0  # an offset: centring matters
    y = x[:, :4] @ torch.randn(4, 4, dtype=torch.float64) + 0.3 * torch.randn(70, 4, dtype=torch.float64)
    streamed = StreamedLinearCKA(6, 4)
    for start in range(0, 70, 16):  # uneven batches
        streamed.update(x[start : start + 16].float(), y[start : start + 16].float())
    assert streamed.value() == pytest.approx(linear_cka(x.float(), y.float()), rel=1e-9)
    two = [StreamedLinearCKA(6, 4), StreamedLinearCKA(6, 4)]  # two ranks' sums added = one rank's
    two[0].update(x[:30], y[:30])
    two[1].update(x[30:], y[30:])
    for a, b in zip(two[0].sums(), two[1].sums(), strict=True):
        a += b
    assert two[0].value() == pytest.approx(linear_cka(x, y), rel=1e-12)
    with pytest.raises(ValueError, match="the same examples on both sides: 3 vs 2 rows"):
        streamed.update(x[:3], y[:2])


def test_epsilon_sharpness_finds_the_closed_form_maximum_of_a_quadratic():
    """f(w) = Σ ½ a_i w_i² + b_i w_i, convex and separable: over |δ_i| ≤ ε(|w_i| + 1) each coordinate's maximum is
    the end of its interval that its gradient a_i w_i + b_i points to (f(r) − f(−r) = 2r · gradient)."""
    torch.manual_seed(2)
    a, b = torch.rand(20, dtype=torch.float64) + 0.5, torch.randn(20, dtype=torch.float64)
    w0 = torch.randn(20, dtype=torch.float64)
    w = torch.nn.Parameter(w0.clone())
    loss = lambda v: float((0.5 * a * v**2 + b * v).sum())  # noqa: E731

    def loss_and_backward():
        value = (0.5 * a * w**2 + b * w).sum()
        value.backward()
        return float(value.detach())

    eps = 1e-2
    out = epsilon_sharpness([w], loss_and_backward, lambda: loss(w.detach()), epsilon=eps, lr=1.0, steps=5)
    radius = eps * (w0.abs() + 1.0)
    best = loss(w0 + torch.sign(a * w0 + b) * radius)
    assert out["loss"] == pytest.approx(loss(w0), rel=1e-12)
    assert out["max_loss"] == pytest.approx(best, rel=1e-12)
    assert out["sharpness"] == pytest.approx(100.0 * (best - loss(w0)) / (1.0 + loss(w0)), rel=1e-12)
    assert torch.equal(w.detach(), w0) and w.grad is None  # the weights come back exactly
    with pytest.raises(ValueError, match="ε must be > 0, got 0"):
        epsilon_sharpness([w], loss_and_backward, lambda: 0.0, epsilon=0)


# ----------------------------------------------------------------- the commands on a trained run (measure.py)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The bundled demo GPT-2 fine-tuned 3 steps on jargon (float64): a run folder with a checkpoint."""
    from fabric_tram.config import load_config
    from fabric_tram.engine.trainer import train

    folder = tmp_path_factory.mktemp("measure") / "run"
    overrides = ["model.name=gpt2", "model.pretrained=bundled:demo-gpt2", "model.dropout=0.0", "task.name=lm",
                 "task.data_dir=demo", "task.tokenizer=demo", "task.block_size=32", "task.train_domains=[jargon]",
                 "optimizer.name=adam", "optimizer.lr=1e-3", "trainer.max_steps=3", "trainer.micro_batch_size=4",
                 "trainer.precision=64-true", "trainer.eval_batches=1", "trainer.progress_bar=false",
                 f"trainer.run_dir={folder}"]  # fmt: skip
    train(load_config(None, overrides))
    return folder


def test_cka_command_per_domain_against_the_pretrained_model(demo_run, tmp_path):
    import json

    transformers = pytest.importorskip("transformers")

    from fabric_tram.measure import cka

    out = cka("bundled:demo-gpt2", demo_run, "validation", ("jargon", "bible"), batch_size=4, limit=3)
    assert set(out["results"]) == {"jargon", "bible"}
    for metrics in out["results"].values():
        assert 0.0 < metrics["cka"] < 1.0 - 1e-6 and metrics["examples"] == 12.0  # 3 steps moved the weights
    saved = json.loads((demo_run / "analysis" / "cka-validation.json").read_text())
    assert saved["results"] == out["results"] and saved["pretrained"] == "bundled:demo-gpt2"
    with pytest.raises(ValueError, match=r"domain\(s\) \['klingon'\] not in the validation split"):
        cka("bundled:demo-gpt2", demo_run, "validation", ("klingon",))
    other = transformers.GPT2Config(vocab_size=4096, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(other).save_pretrained(tmp_path / "other", safe_serialization=True)
    with pytest.raises(ValueError, match="is not the checkpoint's architecture .differs at"):
        cka(str(tmp_path / "other"), demo_run, "validation", ("jargon",))


def test_sharpness_command_per_domain(demo_run):
    from fabric_tram.measure import sharpness

    out = sharpness(demo_run, "validation", ("jargon",), epsilon=1e-3, lr=1e-1, steps=3, batch_size=4, accumulate=2)
    result = out["results"]["jargon"]
    assert result["max_loss"] > result["loss"] and result["sharpness"] > 0
    assert (demo_run / "analysis" / "sharpness-validation.json").is_file()
    with pytest.raises(ValueError, match="--epsilon must be > 0, got -1"):
        sharpness(demo_run, epsilon=-1)


def test_report_adds_domain_correlations_and_the_sharpness_and_cka_tables(tmp_path):
    """Fake run folders: 2 rules × 3 seeds whose zero-shot perplexities move with (a) or against (b) the training
    domain's, and whose sharpness on b rises with the training domain's exactly: r = +1, -1 and +1."""
    import json

    from fabric_tram.analysis.correlations import pearson
    from fabric_tram.analysis.results import report

    folders = []
    for rule in ("adam", "tram-prev"):
        for seed in range(3):
            folder = tmp_path / f"{rule}-{seed}"
            (folder / "analysis").mkdir(parents=True)
            t = 10.0 + seed + (0.5 if rule == "adam" else 0.0)
            test = {"m": {"ppl": t}, "a": {"ppl": 2 * t + 1}, "b": {"ppl": 40 - t}}
            summary = {"optimizer": rule, "seed": seed, "train_domains": ["m"], "results": {"test": test}}
            (folder / "results.json").write_text(json.dumps(summary))
            sharp = {"m": {"sharpness": 0.1 * seed + 1}, "a": {"sharpness": 5.0 - seed}, "b": {"sharpness": 2 * seed}}
            (folder / "analysis" / "sharpness-validation.json").write_text(json.dumps({"results": sharp}))
            cka = {"m": {"cka": 0.9 - 0.01 * seed}, "a": {"cka": 0.5}, "b": {"cka": 0.4}}
            (folder / "analysis" / "cka-validation.json").write_text(json.dumps({"results": cka}))
            folders.append(folder)
    text = report(folders, tmp_path / "report")
    correlations = json.loads((tmp_path / "report" / "domain_correlations.json").read_text())["r with m"]
    assert correlations["a"] == pytest.approx(1.0) and correlations["b"] == pytest.approx(-1.0)
    assert "appendix C.1" in text and "ε-sharpness" in text and "CKA with the pre-trained model" in text
    sharpness = json.loads((tmp_path / "report" / "sharpness.json").read_text())
    # per rule: r(in-domain, a) = -1 and r(in-domain, b) = +1 across its 3 runs, so the mean over domains is 0
    from fabric_tram.analysis.correlations import PEARSON

    assert sharpness["adam (n=3)"][PEARSON] == "0.00 [-1.00, 1.00]"  # the range over domains, inside [-1, 1]
    assert (tmp_path / "report" / "domain_correlations.png").is_file() and (
        tmp_path / "report" / "sharpness.png"
    ).is_file()
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0) and math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    # the command: by default beside the runs (not the current folder), and its last line names every file written
    from click.testing import CliRunner

    from fabric_tram.cli import main

    (tmp_path / "elsewhere").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path / "elsewhere")
        out = CliRunner().invoke(main, ["report", *map(str, folders)]).output
    assert not list((tmp_path / "elsewhere").iterdir())  # nothing in the current folder
    written = out.strip().splitlines()[-1]
    assert written.startswith(f"written: {tmp_path / 'report'}/(")
    for name in ("report.md", "report.csv", "figure2.png", "domain_correlations.png", "sharpness.json", "cka.md"):
        assert name in written and (tmp_path / "report" / name).is_file(), name


def test_the_demo_analyses_its_runs_and_reports_table_6(tmp_path):
    import runpy

    demo = runpy.run_path(str(Path(__file__).resolve().parents[1] / "recipes" / "demo.py"))
    table = demo["main"](["--smoke", "--rules", "tram-prev", "--analyse", "--out", str(tmp_path / "demo")])
    assert (tmp_path / "demo" / "tram-prev-seed0" / "analysis" / "sharpness-validation.json").is_file()
    assert (tmp_path / "demo" / "tram-prev-seed0" / "analysis" / "cka-validation.json").is_file()
    assert "validation ε-sharpness" in table and "CKA with the pre-trained model" in table
    assert "| tram-prev (n=1) |" in table
