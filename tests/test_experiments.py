"""Experiments: the reusing sweep equals independent captures, the metrics mean what they say,
the cliff and trace rules give known answers on constructed data, bad input is a clear error."""
import json

import numpy as np
import pytest
import torch

import vlmlens as vl
from vlmlens.cli import main
from vlmlens.capture import greedy_generate, image_positions, prepare_inputs
from vlmlens.errors import InputError
from vlmlens.experiments.cliff import cliff_from, cliff_layer, reasoning_perturbation, trace_distance
from vlmlens.experiments.compare import DepthSummary, TruncationResult, compare, sweep
from vlmlens.experiments.engine import edit_distance, first_divergence, kl_divergence, normalized_edit_distance, parse_depths
from vlmlens.metrics import split_answer
from vlmlens.experiments.prefix import prefill, prepare
from vlmlens.experiments.skip import image_cosine_distance, layer_skip_scan
from vlmlens.experiments.study import task_study
from vlmlens.experiments.substitution import check_pair, substitution_matrix
from vlmlens.figures import experiments as F
from vlmlens.figures import matrices
from vlmlens.interventions import Freeze, SkipLayers, Substitute, Truncate
from vlmlens.lens import Lens, Plan

from tests._models import extend_inputs, random_lm

P = "What is in the image?"
N = 4


def cap(lm, image, ivs=(), **kw):
    return vl.capture(lm, image, P, max_new_tokens=N, interventions=list(ivs), **kw)


@pytest.fixture(scope="module")
def llava_sweep(image):
    return sweep(random_lm("llava"), image, P, max_new_tokens=N, hidden_dtype="float32")


# ---- sweep == independent runs ---------------------------------------------------------------------

@pytest.mark.parametrize("family, mode", [("llava", "drop"), ("qwen2_vl", "drop"), ("qwen2_vl", "remove"), ("llava", "freeze")])
def test_sweep_equals_independent_captures(family, mode, image, llava_sweep):
    lm = random_lm(family)
    L = lm.n_layers
    res = llava_sweep if (family, mode) == ("llava", "drop") else sweep(lm, image, P, mode=mode, max_new_tokens=N,
                                                                          hidden_dtype="float32")
    assert res.reuse and [d.depth for d in res.depths] == list(range(L + 1))
    ref = sweep(lm, image, P, mode=mode, max_new_tokens=N, hidden_dtype="float32", reuse=False, store="none",
                record_attention=False)
    assert not ref.reuse
    for k in range(L + 1):
        iv = Freeze(k) if mode == "freeze" else Truncate(k, mode)
        own = cap(lm, image, [iv], hidden_dtype="float32")
        run = res.runs[k]
        assert run.token_ids == own.token_ids, k
        assert np.abs(np.array(run.token_logprobs) - own.token_logprobs).max(initial=0) <= 1e-5
        assert np.abs(run.hidden_states - own.hidden_states).max() <= 1e-5
        a, b = run.attention_to_image, own.attention_to_image
        assert np.array_equal(np.isnan(a), np.isnan(b)) and np.nanmax(np.abs(a - b)) <= 1e-5
        d, r = res.depth(k), ref.depth(k)
        assert d.token_ids == r.token_ids
        assert abs(d.baseline_logprob - r.baseline_logprob) <= 1e-5 and abs(d.first_token_kl - r.first_token_kl) <= 1e-5
        assert abs(d.output_kl - r.output_kl) <= 1e-4 * max(1.0, r.output_kl)          # prefix reuse: same answer KL
    assert res.baseline_token_ids == ref.baseline_token_ids


@pytest.mark.parametrize("family", ["qwen2_5_vl", "internvl", "idefics3"])
def test_other_families_reuse_or_fall_back(family, image):
    lm = random_lm(family)
    a = sweep(lm, image, P, mode="remove", max_new_tokens=2, store="none", record_attention=False)
    b = sweep(lm, image, P, mode="remove", max_new_tokens=2, store="none", record_attention=False, reuse=False)
    assert a.reuse == (family != "idefics3")  # image tiles: independent captures
    for x, y in zip(a.depths, b.depths):
        assert x.token_ids == y.token_ids
        assert abs(x.first_token_kl - y.first_token_kl) <= 1e-5 and abs(x.baseline_logprob - y.baseline_logprob) <= 1e-5


def test_baseline_depth_and_metric_meaning(image, llava_sweep):
    res, lm = llava_sweep, random_lm("llava")
    L = lm.n_layers
    top = res.depth(L)
    assert top.first_token_kl == 0 and top.answer_kept and top.text_kept
    assert top.first_divergence is None and top.edit_distance == 0 and top.token_ids == res.baseline_token_ids
    assert abs(top.baseline_logprob - res.baseline_logprob) <= 1e-5
    assert all(d.first_token_kl >= 0 for d in res.depths)
    assert res.depth(0).first_token_kl > 0  # random weights: cutting the image changes the distribution
    for d in res.depths:  # kept tokens: teacher forcing scores exactly what greedy generation produced
        if d.text_kept:
            assert abs(d.baseline_logprob - d.own_logprob) <= 1e-5
        assert d.edit_distance == edit_distance(res.baseline_token_ids, d.token_ids)
    # KL against logits computed here: plain model forward vs a lens generate with Truncate(0)
    inputs, _, _ = prepare_inputs(lm, image, P)
    with torch.no_grad():
        p = torch.log_softmax(lm.model(**inputs).logits[0, -1].float(), -1)
    plan = Plan.build(image_positions(lm, inputs["input_ids"]), L, inputs["input_ids"].shape[1],
                      interventions=[Truncate(0)])
    with torch.no_grad(), Lens(lm.arch.decoder_layers(lm.model), plan):
        q = torch.log_softmax(greedy_generate(lm, inputs, 1).logits[0][0].float(), -1)
    assert abs(kl_divergence(p, q) - res.depth(0).first_token_kl) <= 1e-5
    # output KL against an independent reference: plain forwards over prompt + baseline tokens, the
    # depth-0 cut as a padding-style 2-D mask over the image positions (no query reads an image key)
    full = extend_inputs(inputs, res.baseline_token_ids)
    T = len(res.baseline_token_ids)
    img = image_positions(lm, inputs["input_ids"])
    cut = dict(full, attention_mask=full["attention_mask"].clone())
    cut["attention_mask"][0, img] = 0
    with torch.no_grad():
        lp = torch.log_softmax(lm.model(**full).logits[0, -(T + 1):-1].double(), -1)
        lq = torch.log_softmax(lm.model(**cut).logits[0, -(T + 1):-1].double(), -1)
    want = float((lp.exp() * (lp - lq)).sum())
    d0 = res.depth(0)
    assert want > 1e-3 and abs(d0.output_kl - want) <= 1e-4 * max(1.0, want)
    assert d0.answer_kl == pytest.approx(d0.output_kl) and d0.answer_start == 0     # no separator: the whole output
    assert res.depth(L).output_kl == 0.0
    json.loads(json.dumps(res.to_json()))
    assert TruncationResult.from_json(res.to_json()).depths == res.depths


def test_compare_depth_parsing_and_marking(image):
    lm = random_lm("llava")
    r = compare(lm, image, P, "all,0", mode="remove", max_new_tokens=N, store="none", record_attention=False)
    assert [d.depth for d in r.depths] == [0, 2] and set(r.runs) == {0, 2}
    d0 = r.depth(0)
    assert d0.first_divergence is not None  # random weights: the blind model says something else
    marked = r.marked_text(0)
    assert "[[" in marked and marked.replace("[[", "").replace("]]", "").split() == d0.text.split()
    assert r.marked_text(2) == r.baseline_text


@pytest.mark.parametrize("depths, msg", [("0,3", r"0\.\.2"), ([-1], r"0\.\.2"), ("zero", r"0\.\.2")])
def test_bad_depths(depths, msg):
    with pytest.raises(InputError, match=msg):
        parse_depths(depths, 2)


def test_bad_mode_and_conflicts_are_input_errors(image):
    lm = random_lm("llava")
    with pytest.raises(InputError, match="unknown truncation mode"):
        compare(lm, image, P, [0], mode="shrink")
    with pytest.raises(InputError, match="conflicting"):
        compare(lm, image, P, [0], mode="remove", interventions=[SkipLayers([1])], max_new_tokens=1)
    with pytest.raises(InputError, match=r"from_layer must be smaller than at_layer \(0 <= from_layer < at_layer <= 1\)"):
        check_pair(at_layer=1, from_layer=1, n_layers=2)
    with pytest.raises(InputError, match=r"0\.\.1"):
        substitution_matrix(lm, image, P, layers=[0, 2])


def test_prefix_must_match_the_capture(image):
    lm = random_lm("llava")
    pre = prefill(lm, prepare(lm, image, P))
    with pytest.raises(ValueError, match="different prompt"):
        vl.capture(lm, image, "Another question?", max_new_tokens=1, prefix=pre)
    with pytest.raises(ValueError, match="interventions"):
        vl.capture(lm, image, P, max_new_tokens=1, interventions=[Truncate(0)], prefix=pre)


# ---- metrics on constructed data --------------------------------------------------------------------

def test_edit_distances_and_divergence():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance([], [1, 2]) == 2 and edit_distance([1, 2, 3], [1, 3]) == 1
    assert normalized_edit_distance("abcd", "abxd") == 0.25 and normalized_edit_distance([], []) == 0
    assert first_divergence([1, 2, 3], [1, 2, 4]) == 2 and first_divergence([1, 2], [1, 2]) is None
    assert first_divergence([1, 2], [1, 2, 3]) == 2
    assert trace_distance("the circle is red.", "The  circle is blue.") == 0.25
    assert kl_divergence(torch.log(torch.tensor([0.5, 0.5])), torch.log(torch.tensor([0.9, 0.1]))) == pytest.approx(
        0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1))


def test_trace_answer_split():
    assert split_answer("the circle is red. answer: red") == ("the circle is red.", "red")
    assert split_answer("Answer: one. answer: two") == ("Answer: one.", "two")
    assert split_answer("red") == ("red", None)
    assert split_answer("x => y", "=>") == ("x", "y")


def _result(texts, kl, L, baseline="a b c. answer: yes"):
    from vlmlens.metrics import answer_of

    ds = [DepthSummary(depth=k, text=t, divergence_char=None, tokens=[], token_ids=[], first_divergence=None,
                       edit_distance=0, baseline_logprob=0.0, own_logprob=0.0, first_token_kl=x,
                       answer=answer_of(t), answer_kept=answer_of(t) == answer_of(baseline), text_kept=t == baseline)
          for k, (t, x) in enumerate(zip(texts, kl))]
    return TruncationResult("m", "llava", "p", "sha", "drop", L, 8, "answer:", True, baseline, [], [], 0.0,
                            answer_of(baseline), ds)


def test_cliff_rule_known_answer():
    kept = [False, False, True, False, True, True, True, True, True]
    kl = [2.0, 1.5, 0.01, 0.3, 0.05, 0.02, 0.2, 0.0, 0.0]
    assert cliff_from(range(9), kept, kl, 8, tau=0.1)[0] == 7   # KL 0.2 at depth 6 breaks the run
    assert cliff_from(range(9), kept, kl, 8, tau=0.25)[0] == 4  # depth 3 lost the answer
    cliff, ok = cliff_from(range(9), kept, kl, 8, tau=5.0)
    assert cliff == 4 and ok == kept
    assert cliff_from([0, 4], [True, True], [0.0, 0.0], 8)[0] == 0   # unmeasured depths are not checked
    with pytest.raises(InputError, match="tau"):
        cliff_from(range(3), [True] * 3, [0] * 3, 2, tau=0)
    res = _result(["x. answer: no", "a b. answer: yes", "a b c. answer: yes"], [1.0, 0.05, 0.0], L=2)
    rep = cliff_layer(res)
    assert rep.cliff == 1 and rep.ok == [False, True, True]
    assert rep.attention_cliff is None and rep.agree is None  # no baseline run to read attention from


def test_reasoning_perturbation_on_constructed_traces():
    res = _result(["x y z. answer: no", "a b d. answer: yes", "a b c", "a b c. answer: yes"], [0, 0, 0, 0], L=3)
    p = reasoning_perturbation(res)
    assert p.baseline_answer == "yes" and p.depths == [0, 1, 2, 3]
    assert p.trace_distance == pytest.approx([1.0, 1 / 3, 0.0, 0.0])
    assert p.answer_changed == [True, False, True, False] and p.has_answer == [True, True, False, True]
    fig = F.fig_reasoning_perturbation(p)
    assert len(fig.data[0].x) == 4


# ---- substitution, skip scan, study -------------------------------------------------------------------

def test_substitution_matrix(image):
    lm = random_lm("llava")
    m = substitution_matrix(lm, image, P, max_new_tokens=N)
    assert m.layers == [0, 1] and m.kl[0][1] is None
    for j in range(2):  # the diagonal is the identity: exactly the baseline
        assert m.kl[j][j] == 0 and m.answer_kept[j][j] and m.text[j][j] == m.baseline_text
    own = cap(lm, image, [Substitute(at_layer=1, from_layer=0)])
    assert m.text[1][0] == own.generated_text and m.kl[1][0] > 0
    assert substitution_matrix(lm, image, P, stride=5, max_new_tokens=1).layers == [0, 1]
    fig = matrices.fig_substitution_matrix(m.to_json())
    assert np.asarray(fig.data[0].z).shape == (2, 2)


def test_layer_skip_scan(image):
    lm = random_lm("qwen2_vl")
    s = layer_skip_scan(lm, image, P, max_new_tokens=N)
    L = lm.n_layers
    assert s.layers == list(range(L)) and all(x >= 0 for t in s.tokens for x in s.kl[t])
    own = cap(lm, image, [SkipLayers([0], tokens="all")])
    assert s.text["all"][0] == own.generated_text
    geo = vl.capture(lm, image, P, max_new_tokens=0, hidden_dtype="float32", record_attention=False)
    assert np.allclose(s.cosine_distance, image_cosine_distance(geo), atol=1e-6)
    H = geo.span_states("image").astype(np.float64)  # the definition, by hand
    cos = (H[:-1] * H[1:]).sum(-1) / (np.linalg.norm(H[:-1], axis=-1) * np.linalg.norm(H[1:], axis=-1))
    assert np.allclose(s.cosine_distance, (1 - cos).mean(-1), atol=1e-5)
    fig = matrices.fig_layer_skip(s)
    assert all(len(t.x) == L for t in fig.data if t.name.endswith("KL"))


def test_task_study_smoke():
    lm = random_lm("llava")
    st = task_study(lm, n=1, families=["single", "reasoning"], depths="0,all")
    assert st.depths == [0, 2] and len(st.rows) == 4 and len(st.examples) == 2
    assert all(0 <= r["accuracy"] <= 1 and r["n"] == 1 for r in st.rows)
    top = [r for r in st.rows if r["depth"] == 2]
    assert all(r["answer_kept"] == 1.0 and r["first_token_kl"] == 0 for r in top)
    fig = F.fig_task_necessity(st)
    assert all(len(t.x) == 2 for t in fig.data) and len(fig.data) == 3  # + reasoning trace exactness
    with pytest.raises(InputError, match="family"):
        task_study(lm, n=1, families=["poetry"])


def test_the_suite_and_a_dataset_study_run_one_loop(tmp_path, monkeypatch):
    """The shapes suite's examples, written out as a dataset and run as a dataset study, give the same
    outputs, kept answers and output KL cell for cell as the suite study; both pass through run_inputs."""
    from vlmlens.data import load_dataset
    from vlmlens.experiments import study_runner
    from vlmlens.experiments.dataset_study import dataset_study
    from vlmlens.experiments.study import suite_examples

    lm = random_lm("llava")
    seen = []
    real = study_runner.run_inputs
    monkeypatch.setattr(study_runner, "run_inputs", lambda *a, **k: seen.append(len(a[1])) or real(*a, **k))
    st = task_study(lm, n=2, families=["single"], depths="0,1", max_new_tokens={"single": 3})
    exs = suite_examples("shapes", "single", 2)
    rows = []
    for e in exs:
        e.scene.image.save(tmp_path / f"{e.seed}.png")
        rows.append(json.dumps({"id": str(e.seed), "image": f"{e.seed}.png", "question": e.prompt,
                                "answer": e.answer, "task": "vqa"}))
    (tmp_path / "manifest.jsonl").write_text("\n".join(rows) + "\n")
    ds = dataset_study(lm, load_dataset(tmp_path / "manifest.jsonl"), tmp_path / "out", depths="0,1",
                       max_new_tokens=3)
    assert seen == [2, 2]                                       # the suite and the dataset: one loop each
    recs = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["baseline"] for r in recs] == [x["baseline"] for x in st.examples]
    for k in ("0", "1"):
        assert [r["depths"][k]["text"] for r in recs] == [x["outputs"][k] for x in st.examples]
    by = {(r["depth"]): r for r in ds.rows}
    for r in st.rows:
        assert by[r["depth"]]["answer_kept"] == r["answer_kept"]
        assert by[r["depth"]]["output_kl"] == pytest.approx(r["output_kl"], abs=1e-9)


# ---- figures and CLI ---------------------------------------------------------------------------------

def test_sweep_figures(llava_sweep):
    L = llava_sweep.n_layers
    fig = F.fig_truncation_sweep(llava_sweep)
    names = [t.name for t in fig.data]
    assert names == ["output KL (nats)", "first-token KL", "answer kept (vs baseline)", "Δ log p(baseline answer)"]
    assert all(len(t.x) == L + 1 for t in fig.data)
    assert np.allclose(fig.data[0].y, [d.output_kl for d in llava_sweep.depths])
    assert np.allclose(fig.data[3].y, [d.answer_logprob_delta for d in llava_sweep.depths])
    assert fig.data[3].y[-1] == 0.0 and fig.data[0].y[-1] == 0.0          # depth L is the baseline
    table = F.fig_side_by_side(llava_sweep)
    assert len(table.data[0].cells.values[0]) == L + 2  # baseline + every depth
    html = F.side_by_side_html(llava_sweep)
    assert html.count("<tr>") == L + 3
    assert ("<mark>" in html) == any(d.first_divergence is not None for d in llava_sweep.depths)


def test_cli_bad_depth_and_mode_exit_2(image, tmp_path, capsys):
    path = tmp_path / "img.png"
    image.save(path)
    base = ["truncate", "--model", "random:llava", "--image", str(path), "--prompt", P, "--max-new-tokens", "2"]
    assert main(base + ["--depths", "0,7"]) == 2
    assert "0..2" in capsys.readouterr().err
    assert main(base + ["--mode", "shrink"]) == 2
    assert "unknown truncation mode" in capsys.readouterr().err
    assert main(base + ["--depths", "0,all"]) == 0
    out = capsys.readouterr().out
    assert "baseline" in out and "(all)" in out


def test_cli_sweep_writes_outputs(image, tmp_path, capsys):
    path = tmp_path / "img.png"
    image.save(path)
    out = tmp_path / "sweep"
    args = ["sweep", "--model", "random:llava", "--image", str(path), "--prompt", P, "--max-new-tokens", "2",
            "--out", str(out), "--store", "none"]
    assert main(args) == 0
    doc = json.loads((out / "sweep.json").read_text())
    assert len(doc["sweep"]["depths"]) == 3 and 0 <= doc["cliff"]["cliff"] <= 2
    assert (out / "sweep.csv").read_text().count("\n") == 4
    assert vl.load_run(out / "runs" / "depth_00").meta["interventions"] == [Truncate(0).to_json()]
    assert "cliff layer" in capsys.readouterr().out
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    assert main(args[:-4] + ["--out", str(tmp_path / "other")]) == 2


def test_cli_study_writes_outputs(tmp_path, capsys):
    out = tmp_path / "study"
    args = ["study", "--model", "random:llava", "--n", "1", "--families", "single", "--depths", "0,all", "--out", str(out)]
    assert main(args) == 0
    doc = json.loads((out / "study.json").read_text())
    assert doc["depths"] == [0, 2] and [r["family"] for r in doc["rows"]] == ["single", "single"]
    assert (out / "study.csv").read_text().splitlines()[0].startswith("family,depth,n,accuracy")
    assert (out / "fig_task_necessity.html").stat().st_size > 1000
    assert "| single |" in capsys.readouterr().out
    assert main(["study", "--model", "random:llava", "--suite", "clevr"]) == 2
    assert "unknown suite" in capsys.readouterr().err
