"""The search's pure parts: its spec, the formats' stored bits, the allocation and the plan validate prints."""

import itertools

import pytest
from pydantic import ValidationError

from qfarm.sweep.methods import GGUF_BITS_PER_WEIGHT
from qfarm.sweep.search import (
    SIZE_MARGIN,
    TARGET_SLACK,
    Format,
    Layer,
    SearchSpec,
    allocate,
    block_rules,
    gguf_file_types,
    gguf_rules,
    layers_by_rules,
    plan_search,
    uniform_bits_per_weight,
    uniform_options,
)

ISSUE_SPACE = [
    {"method": "rtn", "bits": [3, 4, 8], "group_size": [32, 64, 128], "mixed": True},
    {"method": "gptq", "bits": [3, 4, 8], "group_size": [32, 64, 128], "mixed": True},
    {"method": "gguf", "gguf_type": ["Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"], "mixed": True},
]


def smollm_layers() -> list[Layer]:
    """SmolLM2-135M's quantizable layers (30 blocks; hidden 576, 9 heads of 64, 3 KV heads, intermediate 1536)."""
    roles = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (576, 192), "self_attn.v_proj": (576, 192),
             "self_attn.o_proj": (576, 576), "mlp.gate_proj": (576, 1536), "mlp.up_proj": (576, 1536),
             "mlp.down_proj": (1536, 576)}
    return [Layer(f"model.layers.{b}.{r}", n_in, n_out) for b in range(30) for r, (n_in, n_out) in roles.items()]


def test_the_issue_spec_parses_and_plans_within_its_budget():
    search = SearchSpec.model_validate({"target": {"bits_per_weight": 4.25}, "objective": "kl_div",
                                       "space": ISSUE_SPACE, "budget": {"jobs": 16}})
    assert search.measured() == ("kl_div", "min")
    plan, problems = plan_search(search, smollm_layers())
    assert problems == []
    assert plan.jobs <= 16
    assert plan.uniform_total == 23
    assert {i for i, _ in plan.mixed} == {0, 1, 2}  # every mixed entry has at least one allocation
    # g128 does not divide 576: no uniform with it; Q3_K's rows fall back: 3-bit uniforms fit, 8-bit ones do not
    labels = [o for _, o, _ in plan.uniform]
    assert all(o.get("group_size") != 128 for o in labels)
    assert all(b <= 4.25 * 1.002 for _, _, b in plan.uniform)
    assert {"method": "rtn", "bits": 4, "group_size": 64} in labels  # 4.25 exactly (4 + 16/64, shapes aside)
    assert set(plan.probes) == {"3b g32", "3b g64", "3b g128", "4b g32", "4b g64", "4b g128", "8b g32", "8b g64",
                                "8b g128", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"}
    text = "\n".join(plan.summary(search))
    assert "planned: 4 probe job(s)" in text and "uniform candidates that fit" in text


@pytest.mark.parametrize("bad, where", [
    ({"target": {"bits_per_weight": 4.25, "size_mb": 50}}, "size_mb"),
    ({"target": {}}, "bits_per_weight"),
    ({"objective": "speed"}, "objective"),
    ({"space": [{"method": "gguf", "bits": [4]}]}, "gguf_type"),
    ({"space": [{"method": "rtn", "bits": [4], "group_size": [48]}]}, "48"),
    ({"space": [{"method": "rtn", "bits": [5], "group_size": [64]}]}, "bits"),
    ({"space": [{"method": "awq", "bits": [4], "group_size": [64]}]}, "method"),
    ({"space": [{"method": "rtn", "bits": [2, 3, 4, 8], "group_size": [16, 32, 64, 128, 256, 512, 1024], "mixed": True},
                {"method": "gguf", "gguf_type": ["Q4_0", "Q5_0", "Q8_0", "Q6_K", "Q4_K_M"], "mixed": True}]},
     "at most 32"),
])
def test_bad_search_specs_are_refused_saying_what(bad, where):
    base = {"target": {"bits_per_weight": 4.25}, "space": ISSUE_SPACE}
    with pytest.raises(ValidationError) as err:
        SearchSpec.model_validate({**base, **bad})
    assert where in str(err.value)


def test_a_target_under_every_mix_is_refused_at_the_target_and_one_entry_under_it_is_left_out():
    search = SearchSpec.model_validate({"target": {"bits_per_weight": 2.5}, "space": ISSUE_SPACE[:1]})
    plan, problems = plan_search(search, smollm_layers())
    assert plan is None
    assert problems[0][0] == ("target", "bits_per_weight") and "smallest mixes: space[0] (rtn) 3.2" in problems[0][1]
    # at 3.5 the gguf entry's smallest mix (576-wide rows fall back to Q4_0) is over: the others still run
    search = SearchSpec.model_validate({"target": {"bits_per_weight": 3.5}, "space": ISSUE_SPACE})
    plan, problems = plan_search(search, smollm_layers())
    assert problems == [] and {i for i, _ in plan.mixed} == {0, 1}
    assert "mixed gguf: 0 allocation(s) (smallest mix 4.234 bits per weight, over the target" in "\n".join(
        plan.summary(search))
    # a target its smallest mix takes whole (its smallest uniform format): no mix, and not said to be over it
    search = SearchSpec.model_validate({"target": {"bits_per_weight": 4.25},
                                        "space": [{"method": "rtn", "bits": [4, 8], "group_size": [64], "mixed": True}]})
    plan, problems = plan_search(search, smollm_layers())
    assert problems == [] and plan.mixed == () and [(o["bits"], o["group_size"]) for _, o, _ in plan.uniform] == [(4, 64)]
    said = "\n".join(plan.summary(search))
    assert "which takes the whole target" in said and "over the target" not in said


def test_a_budget_too_small_for_every_uniform_runs_gptqs_before_rtns_of_the_same_format():
    search = SearchSpec.model_validate({"target": {"bits_per_weight": 3.5}, "space": ISSUE_SPACE,
                                        "budget": {"jobs": 5}})
    plan, problems = plan_search(search, smollm_layers())
    assert problems == [] and len(plan.mixed) == 4  # rtn's and gptq's mixes (gguf's smallest is over 3.5)
    assert [(o["method"], o["bits"], o["group_size"]) for _, o, _ in plan.uniform] == [("gptq", 3, 32)]
    assert plan.left_out == ("rtn 3b g32", "gptq 3b g64", "rtn 3b g64")
    # with no gptq entry, rtn's is as any other
    search = SearchSpec.model_validate({"target": {"bits_per_weight": 3.5}, "space": [ISSUE_SPACE[0], ISSUE_SPACE[2]],
                                        "budget": {"jobs": 3}})
    plan, _ = plan_search(search, smollm_layers())
    assert [(o["method"], o["bits"], o["group_size"]) for _, o, _ in plan.uniform] == [("rtn", 3, 32)]
    assert plan.left_out == ("rtn 3b g64",)


def test_a_model_with_no_linear_layer_is_a_problem_not_a_zero_target():
    search = SearchSpec.model_validate({"target": {"bits_per_weight": 4.25}, "space": ISSUE_SPACE})
    plan, problems = plan_search(search, [])
    assert plan is None and problems == [((), "the model has no Linear layer to quantize, and a search gives each "
                                              "its format")]


def test_stored_bits_follow_the_formats_layouts():
    # compressed-tensors: 4-bit packs 8 a word, one 16-bit scale a group, the shape's two int64
    assert Format("4b g64").layer_bits(576, 192) == 192 * 576 * 4 + 192 * 9 * 16 + 128
    assert Format("3b g32").layer_bits(640, 10) == 10 * 60 * 32 + 10 * 20 * 16 + 128  # bit after bit
    assert Format("8b g64").layer_bits(64, 2) == 2 * 64 * 8 + 2 * 16 + 128
    # ggml: Q4_K is 4.5 bits where 256 divides the rows, else llama.cpp stores Q5_0 (5.5)
    assert Format("Q4_K").layer_bits(1536, 576) == 1536 * 576 * 4.5
    assert Format("Q4_K").layer_bits(576, 576) == 576 * 576 * 5.5
    assert Format("Q6_K").stored_type(576) == "Q8_0" and Format("Q3_K").stored_type(576) == "Q4_0"
    assert not Format("4b g128").fits(576) and Format("4b g128").fits(1536)
    assert uniform_bits_per_weight({"method": "rtn", "bits": 4, "group_size": 128}, smollm_layers()) is None


def test_a_llama_cpp_mix_is_priced_by_its_own_rules_tensor_by_tensor():
    """Q4_K_M on SmolLM2 (measured: 5.534 bits per weight, bench/search.py's rows): Q6_K on attn_v and ffn_down in
    14 of 30 blocks (the first 3, the last 4, every third between), the 576-wide rows in the fallbacks (Q4_K -> Q5_0,
    Q6_K -> Q8_0); Q3_K_M (measured 4.634) raises the first two attn_v, attn_output and ffn_down."""
    layers = smollm_layers()
    types = gguf_file_types("Q4_K_M", layers)
    more = [b for b in range(30) if types[f"model.layers.{b}.mlp.down_proj"] == "Q6_K"]
    assert more == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert {b for b in range(30) if types[f"model.layers.{b}.self_attn.v_proj"] == "Q8_0"} == set(more)
    assert {types[f"model.layers.{b}.self_attn.q_proj"] for b in range(30)} == {"Q5_0"}
    assert uniform_bits_per_weight({"method": "gguf", "gguf_type": "Q4_K_M"}, layers) == pytest.approx(5.5344, abs=1e-4)
    assert uniform_bits_per_weight({"method": "gguf", "gguf_type": "Q3_K_M"}, layers) == pytest.approx(4.6344, abs=1e-4)
    # a rule of the user's decides its tensors and they leave llama.cpp's counters alone (blk.0's attn_v is not
    # counted: blk.1's is the first, and 13 blocks other than 0 get Q8_0 by the count shifted by one)
    ruled = gguf_file_types("Q4_K_M", layers, tensor_types=["blk\\.0\\.attn_v=Q4_0"])
    assert ruled["model.layers.0.self_attn.v_proj"] == "Q4_0"
    assert [b for b in range(1, 30) if ruled[f"model.layers.{b}.self_attn.v_proj"] == "Q8_0"] == \
        [1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29]
    # a mixture of experts is priced by the registry's figure, not by rules it does not follow here
    experts = [Layer("model.layers.0.block_sparse_moe.experts.0.w1", 256, 512)]
    assert gguf_file_types("Q4_K_M", experts) is None
    assert uniform_bits_per_weight({"method": "gguf", "gguf_type": "Q4_K_M"}, experts) == GGUF_BITS_PER_WEIGHT["Q4_K_M"]


def _brute(layers, sens, formats, target):
    best = None
    for combo in itertools.product(*[[f for f in formats if f.fits(la.n_in)] for la in layers]):
        bits = sum(f.layer_bits(la.n_in, la.n_out) for la, f in zip(layers, combo))
        if bits > target * 1.002 * sum(la.params for la in layers):
            continue
        loss = sum(sens[la.name][f.name] for la, f in zip(layers, combo))
        best = loss if best is None else min(best, loss)
    return best


def _lp_bound(layers, sens, formats, target):
    """The optimum of the relaxation where a layer may be split between formats: a lower bound on any allocation."""
    budget = target * 1.002 * sum(la.params for la in layers)
    steps, loss, used = [], 0.0, 0.0
    for la in layers:
        pts = sorted((f.layer_bits(la.n_in, la.n_out), sens[la.name][f.name]) for f in formats)
        hull = [pts[0]]
        for p in pts[1:]:
            if p[1] >= hull[-1][1]:
                continue
            while len(hull) >= 2 and (hull[-2][1] - hull[-1][1]) * (p[0] - hull[-1][0]) <= \
                    (hull[-1][1] - p[1]) * (hull[-1][0] - hull[-2][0]):
                hull.pop()
            hull.append(p)
        loss, used = loss + hull[0][1], used + hull[0][0]
        steps += [((a[1] - b[1]) / (b[0] - a[0]), b[0] - a[0], a[1] - b[1]) for a, b in zip(hull, hull[1:])]
    for _, extra, saved in sorted(steps, reverse=True):
        take = min(1.0, max(0.0, (budget - used) / extra))
        loss, used = loss - take * saved, used + take * extra
    return loss


def test_allocation_meets_the_target_and_is_near_the_optimum():
    import random

    rng = random.Random(0)
    formats = [Format(n) for n in ("3b g64", "4b g64", "8b g64")]

    def case(n):
        layers = [Layer(f"l{i}", 64 * rng.choice([1, 2, 4]), 64 * rng.choice([1, 2])) for i in range(n)]
        sens = {la.name: {"3b g64": (s := rng.random() * 10 ** rng.uniform(-3, 0)), "4b g64": s / 4,
                          "8b g64": s / 250} for la in layers}
        return layers, sens, rng.uniform(3.6, 7.0)

    for _ in range(30):  # few layers: every allocation that meets the target, tried
        layers, sens, target = case(5)
        got, best = allocate(layers, sens, formats, target), _brute(layers, sens, formats, target)
        if best is None:
            assert got is None
            continue
        assert got.bits_per_weight <= target * 1.002 + 1e-12
        assert got.predicted == pytest.approx(sum(sens[n][f] for n, f in got.formats.items()))
        assert got.predicted <= best * 2 + 1e-12
    for _ in range(10):  # a model's worth of layers: within a few percent of the relaxation's bound
        layers, sens, target = case(200)
        got = allocate(layers, sens, formats, target)
        assert got.bits_per_weight <= target * 1.002 + 1e-12
        assert got.predicted <= _lp_bound(layers, sens, formats, target) * 1.05 + 1e-9


def test_allocation_spends_bits_where_they_buy_most():
    layers = [Layer("sensitive", 64, 64), Layer("robust", 64, 64)]
    sens = {"sensitive": {"4b g64": 1.0, "8b g64": 0.01}, "robust": {"4b g64": 0.001, "8b g64": 0.0}}
    formats = [Format("4b g64"), Format("8b g64")]
    one_up = (Format("8b g64").layer_bits(64, 64) + Format("4b g64").layer_bits(64, 64)) / (2 * 64 * 64)
    got = allocate(layers, sens, formats, one_up + 1e-9)
    assert got.formats == {"sensitive": "8b g64", "robust": "4b g64"}
    assert allocate(layers, sens, formats, 3.9) is None  # under the smallest mix (scales and shapes count)


def test_gguf_rules_name_each_role_and_type_once():
    alloc = {f"l{b}.{r}": ("Q6_K" if b in (0, 11) else "Q4_K") for b in range(12) for r in ("ffn_down", "attn_v")}
    names = {f"l{b}.{r}": f"blk.{b}.{r}.weight" for b in range(12) for r in ("ffn_down", "attn_v")}
    rules = gguf_rules(alloc, names)
    assert len(rules) == 4
    assert "blk\\.(0|11)\\.ffn_down\\.weight=Q6_K" in rules
    import re

    for layer, name in names.items():  # the first rule whose pattern the name holds gives the allocated type
        first = next(r for r in rules if re.search(r.rpartition("=")[0], name))
        assert first.rpartition("=")[2] == alloc[layer]


def test_the_shipped_search_expands_into_jobs_that_need_what_they_read():
    """jobs/search.yaml on the bundled model: every mixed candidate needs every probe (a GPTQ one also its shared
    capture), the probes and the capture are not candidates, the uniform ones are the plain jobs a grid makes."""
    from pathlib import Path

    from qfarm.sweep.expand import load_sweep

    _, sweep = load_sweep(Path(__file__).resolve().parents[2] / "jobs" / "search.yaml", cuda=False)
    probes = {j.id for j in sweep.jobs if j.kind == "probe"}
    captures = {j.id for j in sweep.jobs if j.kind == "calibrate"}
    assert len(probes) == 4 and len(captures) == 1
    for job in sweep.jobs:
        role = (job.search or {}).get("role")
        if job.options.get("mixed"):
            assert role == "candidate" and probes <= set(job.needs)
            assert (job.method == "gptq") == bool(captures & set(job.needs))
        elif job.kind in ("probe", "calibrate"):
            assert role == ("probe" if job.kind == "probe" else None)
        elif job.method != "none":
            assert role == "uniform" and not probes & set(job.needs)
    order = [j.id for j in sweep.jobs]
    assert all(order.index(p) < order.index(j.id) for j in sweep.jobs for p in j.needs if p in order)


def test_a_bad_search_in_a_spec_file_says_every_problem_at_its_line(tmp_path):
    from qfarm.errors import SpecError
    from qfarm.sweep.spec import load_spec

    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nmodel: bundled:smollm2-135m\nsearch:\n  target: {bits_per_weight: 4.25, size_mb: 3}\n"
                    "  objective: speed\n  space:\n    - {method: rtn, bits: [4], group_size: [48], mixed: true}\n"
                    "    - {method: gguf, gguf_type: [Q4_K_X]}\n")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    said = {(p.path, p.line) for p in err.value.problems}
    assert said == {("search.target", 4), ("search.objective", 5), ("search.space[0]", 7),
                    ("search.space[1]", 8)}  # and no complaint of a missing jobs: list


@pytest.mark.parametrize("evaluation, objective, said", [
    ("{perplexity: null}", "kl_div", "eval.perplexity: a search needs eval.perplexity"),
    ("{perplexity: [{dataset: bundled:python-docs, name: code}]}", "kl@wiki", "no evaluation domain of that name"),
    ("{perplexity: {max_windows: 2}}", "task:arc_easy_acc", "has no tasks"),
])
def test_a_search_whose_objective_the_evaluation_cannot_measure_is_refused(tmp_path, evaluation, objective, said):
    from qfarm.errors import SpecError
    from qfarm.sweep.expand import load_valid

    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\nmodel: bundled:smollm2-135m\neval: {evaluation}\nsearch:\n  target: {{bits_per_weight: 4.25}}"
                    f"\n  objective: {objective}\n  space:\n    - {{method: rtn, bits: [4], group_size: [64], mixed: true}}\n")
    with pytest.raises(SpecError) as err:
        load_valid(path)
    assert any(said in f"{p.path}: {p.message}" for p in err.value.problems), err.value.problems


@pytest.mark.parametrize("method, extra, said", [("rtn", {"scheme": "W4A16"}, "leave scheme out")])
def test_a_mixed_option_is_refused_where_it_would_not_be_applied(method, extra, said):
    from qfarm.sweep.methods import METHODS

    mixed = {"target_bits_per_weight": 4.25, "formats": ["4b g64", "8b g64"], "probe": {"formats": ["4b g64"]}}
    with pytest.raises(ValidationError, match=said):
        METHODS[method].options.model_validate({"method": method, "mixed": mixed, **extra})


def test_layer_rules_written_from_an_allocation_give_back_every_layer_its_format():
    layers = smollm_layers()
    formats = ["3b g32", "4b g64", "8b g128"]
    alloc = {la.name: formats[(i * 7) % 3] for i, la in enumerate(layers)}
    rules = block_rules(alloc, anchored=True)
    assert len(rules) <= 7 * 3  # one per role and format
    assert layers_by_rules([la.name for la in layers], rules, "2b g64") == alloc
    # anchored: block 1's rule does not take block 11's layer, nor a longer name
    one = {"model.layers.1.mlp.up_proj": "8b g64", "model.layers.11.mlp.up_proj": "4b g64"}
    names = list(one) + ["model.layers.1.mlp.up_proj_extra"]
    assert layers_by_rules(names, block_rules(one, anchored=True), "3b g32") == {**one, names[2]: "3b g32"}


def test_a_layer_rule_that_decides_no_layer_is_refused_naming_the_layers():
    names = [la.name for la in smollm_layers()]
    with pytest.raises(ValueError, match="decides no layer.*model.layers"):
        layers_by_rules(names, ["mlp\\.gate=8b g64", "transformer\\.h=4b g64"], "4b g64")
    with pytest.raises(ValueError, match="decides no layer"):  # shadowed by the rule before it
        layers_by_rules(names, ["mlp=8b g64", "mlp\\.up=4b g64"], "4b g64")


@pytest.mark.parametrize("rules, said", [
    (["mlp=Q4_K"], "bits and group size"),
    (["mlp=5b g64"], "not a layer format"),
    (["mlp"], "PATTERN=FORMAT"),
    (["(a+)+b=4b g64"], "may not be repeated"),
    (["(mlp=4b g64"], "not a regular expression"),
])
def test_bad_layer_rules_are_refused_saying_what(rules, said):
    from qfarm.sweep.methods import METHODS

    with pytest.raises(ValidationError, match=said):
        METHODS["rtn"].options.model_validate({"method": "rtn", "layer_rules": rules})


@pytest.mark.parametrize("method, extra, said", [("rtn", {"scheme": "W4A16"}, "leave scheme out"),
                                                 ("rtn", {"symmetric": False}, "symmetric"),
                                                 ("gptq", {"mixed": {"target_bits_per_weight": 4.25,
                                                                     "formats": ["4b g64"],
                                                                     "probe": {"formats": ["4b g64"]}}}, "give one")])
def test_layer_rules_are_refused_where_they_would_not_be_applied(method, extra, said):
    from qfarm.sweep.methods import METHODS

    with pytest.raises(ValidationError, match=said):
        METHODS[method].options.model_validate({"method": method, "layer_rules": ["mlp=8b g64"], **extra})


def test_a_mixed_candidates_fragment_is_a_plain_job_with_its_layers_formats():
    import yaml

    from qfarm.results.rows import fragment
    from qfarm.sweep.methods import METHODS, per_layer

    alloc = {la.name: ("8b g64" if "down" in la.name else "4b g32") for la in smollm_layers()}
    options = {"method": "gptq", "calibration": {"share": True},
               "mixed": {"target_bits_per_weight": 4.5, "formats": ["4b g32", "8b g64"],
                         "probe": {"formats": ["4b g32", "8b g64"]}}}
    job = yaml.safe_load(fragment(options, {"layer_formats": alloc}))
    assert "mixed" not in job and job["calibration"] == {"share": True}
    typed = METHODS["gptq"].options.model_validate({k: v for k, v in job.items() if k != "kind"})
    assert per_layer(typed) and METHODS["gptq"].nominal_bits(typed) is None
    assert layers_by_rules(list(alloc), typed.layer_rules, "3b g128") == alloc


def test_an_imatrix_file_reads_back_what_was_written_and_a_broken_one_is_refused(tmp_path):
    import numpy as np

    from workers.quantize.gguf import read_imatrix, write_imatrix

    values = {"blk.0.ffn_down.weight": np.arange(1, 1537, dtype=np.float32) / 7,
              "blk.0.attn_q.weight": np.full(576, 0.25, dtype=np.float32)}
    path = tmp_path / "imatrix.dat"
    write_imatrix(path, values, 16, "probe windows")
    back = read_imatrix(path)
    assert back.keys() == values.keys() and all(np.array_equal(back[k], values[k]) for k in values)
    data = path.read_bytes()
    for broken, said in ((data[:40], "ends early"), (b"\xff\xff\xff\x7f" + data[4:], "holds"),
                         (data[:4] + b"\x00\x00\x10\x00" + data[8:], "name of")):
        path.write_bytes(broken)
        with pytest.raises(ValueError, match=said):
            read_imatrix(path)


@pytest.mark.parametrize("options, said", [
    ({"imatrix": "../secrets/imatrix.dat"}, "without '..'"),
    ({"imatrix": "run/imatrix.gguf"}, "imatrix.dat layout"),
    ({"imatrix": "run/imatrix.dat", "gguf_type": "F16"}, "not quantized"),
])
def test_a_gguf_imatrix_option_is_refused_where_it_cannot_apply(options, said):
    from qfarm.sweep.methods import METHODS

    with pytest.raises(ValidationError, match=said):
        METHODS["gguf"].options.model_validate({"method": "gguf", **options})


def test_a_size_target_is_each_candidates_bits_per_weight_once_what_lies_outside_its_layers_is_paid():
    layers = smollm_layers()
    params = sum(la.params for la in layers)
    outside = {"rtn": 60 * 2**23, "gguf": 30 * 2**23}  # bits besides the quantized layers (embeddings, tokenizer)
    search = SearchSpec.model_validate({"target": {"size_mb": 100}, "space": [
        {"method": "rtn", "bits": [3, 4, 8], "group_size": [32, 64], "mixed": True},
        {"method": "gguf", "gguf_type": ["Q4_K_M", "Q8_0"], "mixed": True}]})
    assert (search.target.column, search.target.value) == ("size_mb", 100)
    plan, problems = plan_search(search, layers, outside=lambda o: outside[o["method"]])
    assert problems == []
    room = {"rtn": 40 * 2**23 / params, "gguf": 70 * 2**23 / params}  # the layers' share of 100 MB
    assert plan.targets == pytest.approx({0: room["rtn"], 1: room["gguf"]}, rel=1e-3)
    for i, options in plan.mixed:  # each mix's bits per weight target is its entry's room, less a margin, no slack
        aim = (room[options["method"]] * params - SIZE_MARGIN * 100 * 2**23) / params / (1 + TARGET_SLACK)
        assert options["mixed"]["target_bits_per_weight"] == pytest.approx(aim, rel=1e-3)
    for _, options, bpw in plan.uniform:  # a uniform fits when its layers and the rest come to the size
        assert bpw <= room[options["method"]] * 1.002
        assert plan.sizes[f"{options['method']} {options['bits']}b g{options['group_size']}"
                          if options["method"] != "gguf" else f"gguf {options['gguf_type']}"] <= 100 * 1.002
    assert {"method": "rtn", "bits": 8, "group_size": 64} not in [o for _, o, _ in plan.uniform]  # 8 bits: ~110 MB
    assert "MB on disk" in "\n".join(plan.summary(search))
    # no shape to price the rest: refused at the target, not guessed
    assert plan_search(search, layers)[1][0][0] == ("target", "size_mb")
    tight = search.model_copy(update={"target": search.target.model_copy(update={"size_mb": 61})})
    none, said = plan_search(tight, layers, outside=lambda o: outside[o["method"]])
    assert none is None and said[0][0] == ("target", "size_mb") and "after the embeddings" in said[0][1]


def test_under_a_size_target_a_gguf_mix_allocates_the_embedding_table_too_from_what_else_lies_outside():
    layers = smollm_layers()
    params = sum(la.params for la in layers)
    table = Layer("token_embd", 576, 49152)  # SmolLM2's tied table: a fifth of its weights
    calls = []

    def outside(options, tables=True):  # the table in llama.cpp's Q8_0 (its Q6_K falls back on 576-wide rows)
        calls.append((options["method"], tables))
        return (table.params * 8.5 if tables else 0) + 2 * 2**23

    space = [{"method": "rtn", "bits": [4, 8], "group_size": [32, 64], "mixed": True},
             {"method": "gguf", "gguf_type": ["Q4_K_M", "Q8_0"], "mixed": True}]
    search = SearchSpec.model_validate({"target": {"size_mb": 100}, "space": space})
    plan, problems = plan_search(search, layers, outside=outside, tables=[table])
    assert problems == [] and plan.tabled == (1,)
    # the gguf entry's room is over its layers and the table, once what lies outside both is paid; rtn's as before
    assert plan.targets[1] == pytest.approx((100 * 2**23 - 2 * 2**23) / (params + table.params), rel=1e-6)
    assert plan.targets[0] == pytest.approx((100 * 2**23 - 2 * 2**23 - table.params * 8.5) / params, rel=1e-6)
    assert ("gguf", False) in calls and ("rtn", False) not in calls
    mixes = {o["method"]: o["mixed"] for _, o in plan.mixed}
    assert mixes["gguf"]["tables"] and not mixes["rtn"]["tables"]
    assert mixes["gguf"]["probe"] == mixes["rtn"]["probe"]  # one set of probes for every entry
    assert "layers and the embeddings" in "\n".join(plan.summary(search))
    # a bits_per_weight target counts the layers alone: no table is allocated, none is probed
    by_bits = search.model_copy(update={"target": search.target.model_copy(update={"size_mb": None,
                                                                                    "bits_per_weight": 4.5})})
    plan, _ = plan_search(by_bits, layers, outside=outside, tables=[table])
    assert plan.tabled == () and not any(o["mixed"]["tables"] for _, o in plan.mixed)


def test_an_allocation_gives_the_table_a_coarser_type_where_it_costs_less_kl_per_byte_than_the_layers():
    layers = [Layer(f"blk{i}", 576, 576) for i in range(4)]
    table = Layer("token_embd.weight", 576, 4096)
    formats = [Format("Q4_0"), Format("Q8_0")]
    sens = {la.name: {"Q4_0": 0.04, "Q8_0": 0.001} for la in layers}
    room = sum(Format("Q4_0").layer_bits(la.n_in, la.n_out) for la in layers) \
        + Format("Q8_0").layer_bits(table.n_in, table.n_out)
    target = room / (sum(la.params for la in layers) + table.params)
    robust = allocate(layers + [table], {**sens, table.name: {"Q4_0": 0.001, "Q8_0": 0.0}}, formats, target)
    fragile = allocate(layers + [table], {**sens, table.name: {"Q4_0": 1.0, "Q8_0": 0.0}}, formats, target)
    assert robust.formats[table.name] == "Q4_0" and all(robust.formats[la.name] == "Q8_0" for la in layers)
    assert fragile.formats[table.name] == "Q8_0" and all(fragile.formats[la.name] == "Q4_0" for la in layers)


def test_the_pick_of_a_size_search_meets_the_size_measured_on_disk():
    from qfarm.results.compare import mark_search_pick

    def row(job, kl, size, bpw):
        return {"job_id": job, "sweep_id": "s", "status": "succeeded", "search_role": "candidate", "kl_div": kl,
                "size_mb": size, "bits_per_weight": bpw, "search_target": {"size_mb": 100},
                "search_objective": "kl_div", "search_direction": "min"}

    rows = mark_search_pick([row("a", 0.1, 100.4, 4.0), row("b", 0.2, 99.9, 6.0), row("c", 0.3, 80.0, 3.0)])
    assert [r["job_id"] for r in rows if r["search_pick"]] == ["b"]  # a is 0.4 MB over; b's bits do not matter


def test_a_speed_target_spans_the_sizes_and_the_pick_is_the_best_measured_at_least_that_fast():
    from qfarm.results.compare import mark_search_pick
    from qfarm.sweep.search import spread

    layers = smollm_layers()
    search = SearchSpec.model_validate({"target": {"decode_tokens_per_s": {"min": 30}}, "space": ISSUE_SPACE,
                                        "budget": {"jobs": 12}})
    assert (search.target.column, search.target.value) == ("decode_tokens_per_s", 30)
    plan, problems = plan_search(search, layers)
    assert problems == [] and plan.jobs <= 12
    bpws = sorted(b for i, _, b in plan.uniform if i == 0)  # rtn's kept uniforms: its smallest and its largest
    assert bpws[0] == pytest.approx(3.25, abs=0.01) and bpws[-1] >= 8.0
    # a budget with room for one uniform an entry keeps each entry's smallest: the likeliest to be fast enough
    tight = SearchSpec.model_validate({"target": {"decode_tokens_per_s": {"min": 30}}, "space": ISSUE_SPACE,
                                       "budget": {"jobs": 9}})
    few, _ = plan_search(tight, layers)
    assert len(few.mixed) == 6 and len(few.uniform) == 3, (few.mixed, few.uniform)
    for i in (0, 1, 2):
        (kept,) = [b for e, _, b in few.uniform if e == i]
        assert kept == min(uniform_bits_per_weight(o, layers) for o in uniform_options(tight.space[i])
                           if uniform_bits_per_weight(o, layers) is not None), i
    for i in (0, 1, 2):  # each mixed entry's points lie evenly inside its range, not at a size target
        mine = [o["mixed"] for e, o in plan.mixed if e == i]
        points = [m["target_bits_per_weight"] - m["point"] * m["step"] for m in mine]
        assert len(points) == 2 and plan.smallest[i] < min(points) < max(points) < 8.6
    assert spread(list(range(9)))[:3] == [0, 8, 4] and sorted(spread(list(range(9)))) == list(range(9))

    def row(job, kl, speed):
        return {"job_id": job, "sweep_id": "s", "status": "succeeded", "search_role": "uniform", "kl_div": kl,
                "decode_tokens_per_s": speed, "bits_per_weight": 4.0, "size_mb": 90.0,
                "search_target": {"decode_tokens_per_s": {"min": 30}}, "search_objective": "kl_div"}

    rows = mark_search_pick([row("a", 0.01, 29.9), row("b", 0.2, 31.0), row("c", 0.3, 45.0), row("d", 0.1, None)])
    assert [r["job_id"] for r in rows if r["search_pick"]] == ["b"]


def test_a_speed_target_without_a_speed_measurement_is_refused_at_its_line(tmp_path):
    from qfarm.errors import SpecError
    from qfarm.sweep.expand import load_valid

    path = tmp_path / "s.yaml"
    path.write_text("name: s\nmodel: bundled:smollm2-135m\neval: {perplexity: {max_windows: 2}, speed: null}\n"
                    "search:\n  target: {decode_tokens_per_s: {min: 20}}\n"
                    "  space:\n    - {method: rtn, bits: [4, 8], group_size: [64], mixed: true}\n")
    with pytest.raises(SpecError) as err:
        load_valid(path)
    assert [(p.path, p.line) for p in err.value.problems] == [("search.target.decode_tokens_per_s", 5)]


def _gpu_search(tmp_path, target: str):
    from qfarm.sweep.expand import load_valid

    path = tmp_path / "s.yaml"
    path.write_text("name: s\nmodel: bundled:smollm2-135m\neval: {perplexity: {seq_len: 512, max_windows: 2}}\n"
                    f"search:\n  target: {target}\n  space:\n"
                    "    - {method: rtn, bits: [3, 4, 8], group_size: [32, 64], mixed: true}\n"
                    "    - {method: gguf, gguf_type: [Q4_K_M, Q8_0], mixed: true}\n")
    return load_valid(path)


def test_a_gpu_memory_target_is_the_size_it_leaves_once_the_kv_cache_and_logits_are_paid(tmp_path):
    """SmolLM2-135M (30 layers, 3 KV heads of 64, vocabulary 49152, bfloat16): at 512 tokens the KV cache takes
    2·30·512·3·64·2 bytes and a forward's logits and log-softmax 512·49152·4·2; what is left is a size target's."""
    from qfarm.sweep.search import meets_target

    overhead = 2 * 30 * 512 * 3 * 64 * 2 + 512 * 49152 * 4 * 2
    valid = _gpu_search(tmp_path, "{gpu_mem_gb: 0.32}")
    left = (0.32e9 - overhead) / 2**20
    sized = _gpu_search(tmp_path, f"{{size_mb: {left}}}")
    assert valid.search.targets == pytest.approx(sized.search.targets)  # the same room for every mixed entry
    assert [o for _, o, _ in valid.search.uniform] == [o for _, o, _ in sized.search.uniform]
    assert [o["mixed"]["target_bits_per_weight"] for _, o in valid.search.mixed] == \
        [o["mixed"]["target_bits_per_weight"] for _, o in sized.search.mixed]
    jobs = [s for s in valid.stages if s.search]
    target = jobs[0].search["target"]
    assert target["context"] == 512 and target["overhead_gb"] == pytest.approx(overhead / 1e9, rel=1e-5)
    assert target["size_mb"] == pytest.approx(left, abs=1e-3)
    assert "GB of GPU memory (the KV cache and logits at 512 tokens take 0.213 GB" in \
        "\n".join(valid.search.summary(valid.loaded.spec.search))
    # the row meets it when its size on disk and that overhead come to at most the GB asked
    assert meets_target(target, {"size_mb": left - 0.01}) and not meets_target(target, {"size_mb": left + 0.01})
    # a longer context leaves the weights less: at 2048 tokens the logits alone take 0.8 GB
    longer = _gpu_search(tmp_path, "{gpu_mem_gb: 1.0, context: 2048}")
    assert [s for s in longer.stages if s.search][0].search["target"]["size_mb"] == pytest.approx(
        (1e9 - 4 * overhead) / 2**20, abs=1e-3)


@pytest.mark.parametrize("target, said", [
    ("{gpu_mem_gb: 0.2}", "the KV cache and logits at 512 tokens take 0.213 GB: more than 0.2 GB"),
    ("{gpu_mem_gb: 0.23}", "0.23 GB of GPU memory (the KV cache and logits at 512 tokens take 0.213 GB, leaving"),
    ("{size_mb: 90, context: 512}", "give it with gpu_mem_gb"),
])
def test_a_gpu_memory_target_that_cannot_be_met_is_refused_at_its_line(tmp_path, target, said):
    from qfarm.errors import SpecError

    with pytest.raises(SpecError) as err:
        _gpu_search(tmp_path, target)
    assert err.value.problems[0].line == 5 and said in err.value.problems[0].message, err.value.problems


def test_the_pick_of_a_gpu_memory_search_is_the_best_whose_predicted_memory_fits():
    from qfarm.results.compare import mark_search_pick

    target = {"gpu_mem_gb": 0.32, "context": 512, "overhead_gb": 0.2132, "size_mb": 101.9}

    def row(job, kl, size):
        return {"job_id": job, "sweep_id": "s", "status": "succeeded", "search_role": "candidate", "kl_div": kl,
                "size_mb": size, "bits_per_weight": 4.0, "search_target": target, "search_objective": "kl_div"}

    rows = mark_search_pick([row("a", 0.1, 102.5), row("b", 0.2, 101.5), row("c", 0.3, 80.0)])
    assert [r["job_id"] for r in rows if r["search_pick"]] == ["b"]  # a needs 0.3207 GB


def test_the_search_path_lists_every_job_in_finishing_order_with_the_best_so_far():
    from qfarm.results.compare import mark_search_pick
    from qfarm.results.report import _path

    def row(job, role, at, kl=None, bpw=None, **more):
        return {"job_id": job, "label": job, "sweep_id": "s", "status": "succeeded", "search_role": role,
                "finished_at": at, "kl_div": kl, "bits_per_weight": bpw, "search_target": {"bits_per_weight": 4.25},
                "search_objective": "kl_div", "search_direction": "min", **more}

    rows = mark_search_pick([row("u-far", "uniform", 5, 0.05, 8.2), row("p1", "probe", 1, probe_layers=105,
                                                                       probe_kl_sum=3.5),
                             row("u4", "uniform", 3, 0.30, 4.25), row("mix", "candidate", 4, 0.10, 4.24,
                                                                      search_predicted_kl=0.08)])
    page = _path(rows)
    order = [page.index(f">{name}<") if name != "mix" else page.index("★ mix") for name in ("p1", "u4", "mix", "u-far")]
    assert order == sorted(order)  # as they finished
    cells = page.split("<tr")[2:]
    assert "105 layers" in cells[0] and "3.5" in cells[0]
    assert "u4 (0.3)" in cells[1] and "0.0800 → 0.1" in cells[2] and "mix (0.1)" in cells[2]
    assert ">no<" in cells[3] and "mix (0.1)" in cells[3]  # 8.2 bits: over the target, not the best so far
    assert _path([{"job_id": "x", "sweep_id": "t"}]) == ""
    tables = _path([row("pt", "probe", 1, probe_layers=0, probe_tables=2, probe_kl_sum=0.25)])
    assert "2 table(s) (embeddings, head); their KL alone, summed: 0.25" in tables


def _halving_spec(tmp_path, halving: str, objective: str = "kl_div", tasks: str = ""):
    path = tmp_path / "h.yaml"
    path.write_text("name: h\nmodel: bundled:smollm2-135m\n"
                    f"eval: {{perplexity: {{seq_len: 256, max_windows: 8}}{tasks}}}\n"
                    f"search:\n  target: {{bits_per_weight: 4.5}}\n  objective: {objective}\n  space:\n"
                    "    - {method: rtn, bits: [3, 4, 8], group_size: [32, 64], mixed: true}\n"
                    "    - {method: gguf, gguf_type: [Q4_0, Q8_0]}\n"
                    f"  budget: {{jobs: 6}}\n  halving: {halving}\n")
    return path


def test_a_halving_search_screens_every_candidate_then_evaluates_the_best_in_full(tmp_path):
    """Every candidate is evaluated on the screen's first windows (no tasks); ``keep`` final jobs wait after all of
    them, each on the full evaluation, needing only the reference (they quantize nothing)."""
    from qfarm.sweep.expand import load_sweep, load_valid

    path = _halving_spec(tmp_path, "{windows: 2, keep: 2}")
    valid = load_valid(path)
    said = "\n".join(valid.search.summary(valid.loaded.spec.search))
    assert "candidate(s) screened on 2 window(s) (budget 6), then the best 2 of them evaluated in full" in said
    _, sweep = load_sweep(path, cuda=False)
    by_role: dict[str, list] = {}
    for job in sweep.jobs:
        by_role.setdefault((job.search or {}).get("role"), []).append(job)
    screened = by_role["uniform"] + by_role["candidate"]
    finals = by_role["final"]
    reference = next(j for j in sweep.jobs if j.method == "none")
    assert len(screened) >= 3 and [j.label for j in finals] == ["final 1/2", "final 2/2"]
    for job in screened:
        assert job.eval["perplexity"]["max_windows"] == 2 and job.eval["tasks"] == []
        assert job.search["halving"] == {"windows": 2, "keep": 2}
    assert reference.eval["perplexity"]["max_windows"] == 8  # the full windows: the finals' reference
    order = [j.id for j in sweep.jobs]
    for rank, final in enumerate(finals, 1):
        assert final.kind == "final" and final.options == {"rank": rank, "of": len(screened), "windows": 2}
        assert set(final.after) == {j.id for j in screened} and final.needs == (reference.id,)
        assert final.eval["perplexity"]["max_windows"] == 8 and final.compares
        assert min(order.index(j.id) for j in finals) > max(order.index(j.id) for j in screened)
        assert final.payload()["after"] == list(final.after)
        assert type(final).from_payload(final.payload()).after == final.after  # as Redis gives it back
    # no halving: no finals, every candidate on the full windows
    plain = tmp_path / "plain.yaml"
    plain.write_text(path.read_text().replace("  halving: {windows: 2, keep: 2}\n", ""))
    _, full = load_sweep(plain, cuda=False)
    assert not any(j.kind == "final" for j in full.jobs)
    assert all(j.eval["perplexity"]["max_windows"] == 8 for j in full.jobs if (j.search or {}).get("role") == "uniform")


def test_halving_over_rungs_chains_each_rung_after_the_one_before(tmp_path):
    """``windows: [1, 3], keep: [3, 2]``: every candidate on 1 window, the best 3 of them again on 3 (rung jobs,
    after every candidate), the best 2 of those in full (finals, after the rung jobs only). The screens are the jobs
    a one-rung halving on the same windows makes: adding a rung reuses them."""
    from qfarm.sweep.expand import load_sweep, load_valid

    path = _halving_spec(tmp_path, "{windows: [1, 3], keep: [3, 2]}")
    valid = load_valid(path)
    said = "\n".join(valid.search.summary(valid.loaded.spec.search))
    assert ("screened on 1 window(s) (budget 6), the best 3 of them again on 3 window(s) (rung 2 jobs), then the best "
            "2 of them evaluated in full (final jobs)") in said, said
    _, sweep = load_sweep(path, cuda=False)
    by_role: dict[str, list] = {}
    for job in sweep.jobs:
        by_role.setdefault((job.search or {}).get("role"), []).append(job)
    screened, rungs, finals = by_role["uniform"] + by_role["candidate"], by_role["rung"], by_role["final"]
    assert [j.label for j in rungs] == ["rung 2 1/3", "rung 2 2/3", "rung 2 3/3"]
    assert [j.label for j in finals] == ["final 1/2", "final 2/2"]
    assert all(j.eval["perplexity"]["max_windows"] == 1 for j in screened)
    order = [j.id for j in sweep.jobs]
    for rank, job in enumerate(rungs, 1):
        assert job.kind == "final" and job.options == {"rank": rank, "of": len(screened), "windows": 1}
        assert set(job.after) == {j.id for j in screened} and job.eval["perplexity"]["max_windows"] == 3
        assert job.eval["tasks"] == [] and job.compares
    for rank, job in enumerate(finals, 1):
        assert job.options == {"rank": rank, "of": 3, "windows": 3} and set(job.after) == {j.id for j in rungs}
        assert job.eval["perplexity"]["max_windows"] == 8
    assert max(order.index(j.id) for j in screened) < min(order.index(j.id) for j in rungs)
    assert max(order.index(j.id) for j in rungs) < min(order.index(j.id) for j in finals)
    # one rung on the same first windows: the same screens (ids), its finals straight after them
    one = tmp_path / "one.yaml"
    one.write_text(path.read_text().replace("{windows: [1, 3], keep: [3, 2]}", "{windows: 1, keep: 2}"))
    _, single = load_sweep(one, cuda=False)
    roles = [(j.search or {}).get("role") for j in single.jobs]
    assert "rung" not in roles and roles.count("final") == 2
    finals_one = [j for j in single.jobs if (j.search or {}).get("role") == "final"]
    assert all(set(f.after) == {j.id for j in screened} for f in finals_one)


@pytest.mark.parametrize("halving, said", [
    ("{windows: [1, 3], keep: 2}", "both numbers (one screen), or lists of the same length"),
    ("{windows: [1, 3], keep: [3]}", "both numbers (one screen), or lists of the same length"),
    ("{windows: [3, 2], keep: [3, 2]}", "each rung reads more windows than the one before"),
    ("{windows: [1, 3], keep: [2, 2]}", "each rung keeps fewer candidates than the one before"),
    ("{windows: [1, 2, 3, 4, 5], keep: [6, 5, 4, 3, 2]}", "1 to 4 rungs"),
    ("{windows: [], keep: []}", "1 to 4 rungs"),
])
def test_bad_rungs_are_refused_saying_what(tmp_path, halving, said):
    from qfarm.errors import SpecError
    from qfarm.sweep.expand import load_valid

    with pytest.raises(SpecError) as err:
        load_valid(_halving_spec(tmp_path, halving))
    found = [(p.path, p.message) for p in err.value.problems]
    assert any(path.startswith("search.halving") and said in message for path, message in found), found


@pytest.mark.parametrize("halving, objective, tasks, where, said", [
    ("{windows: 8, keep: 2}", "kl_div", "", "search.halving.windows", "not fewer than the full evaluation's 8"),
    ("{windows: [2, 8], keep: [4, 2]}", "kl_div", "", "search.halving.windows", "not fewer than the full evaluation's 8"),
    ("{windows: 2, keep: 2}", "task:arc_easy_acc", ", tasks: [{name: arc_easy}]", "search",
     "an eval.tasks objective is not measured there"),
])
def test_a_halving_that_cannot_screen_is_refused_at_its_line(tmp_path, halving, objective, tasks, where, said):
    from qfarm.errors import SpecError
    from qfarm.sweep.expand import load_valid

    with pytest.raises(SpecError) as err:
        load_valid(_halving_spec(tmp_path, halving, objective, tasks))
    found = [(p.path, p.message) for p in err.value.problems]
    assert any(path == where and said in message for path, message in found), found


def test_a_final_ranks_the_screened_candidates_that_met_the_target_and_the_pick_is_the_best_final():
    from qfarm.farm.scheduler import screened
    from qfarm.results.compare import mark_search_pick
    from workers.search.final import ranked

    search = {"objective": "kl_div", "direction": "min", "target": {"bits_per_weight": 4.5}}

    def cand(job, kl, bpw, status="succeeded"):
        return {"id": job, "status": status, "result": {"kl_div": kl, "bits_per_weight": bpw, "artifact": f"/o/{job}"}}

    after = [cand("a", 0.30, 4.4), cand("b", 0.10, 4.6), cand("c", 0.20, 4.5), cand("d", 0.05, 4.0, "failed"),
             cand("e", None, 4.0), cand("f", 0.20, 4.25), {"id": "g", "status": "missing"}]
    assert [c["id"] for c in ranked(after, search)] == ["f", "c", "a"]  # b over the target; a tie goes to the smaller
    assert [c["id"] for c in ranked(after, {**search, "direction": "max"})] == ["a", "f", "c"]

    assert screened("x", None) == {"id": "x", "status": "missing"}

    def row(job, role, kl):
        return {"job_id": job, "sweep_id": "s", "status": "succeeded", "search_role": role, "kl_div": kl,
                "bits_per_weight": 4.25, "search_target": {"bits_per_weight": 4.5}, "search_objective": "kl_div"}

    rows = mark_search_pick([row("screen-best", "candidate", 0.01), row("f1", "final", 0.12), row("f2", "final", 0.11)])
    assert {r["job_id"]: r["search_pick"] for r in rows} == {"screen-best": False, "f1": False, "f2": True}


def test_on_gptqmodel_per_layer_formats_are_its_per_module_overrides_priced_in_the_gptq_layout():
    """backend gptqmodel takes mixed and layer_rules: GPTQModel's ``dynamic`` (exact module names, each layer off the
    job's own format), and the search prices its mixes in the GPTQ layout (int32 zero points, float16 scales, an
    int32 group index per input), which stores more than compressed-tensors for the same format."""
    from qfarm.sweep.methods import METHODS
    from workers.quantize.gptqmodel import dynamic_of

    opts = METHODS["gptq"].options.model_validate({"method": "gptq", "backend": "gptqmodel",
                                                   "layer_rules": ["mlp=8b g64"]})
    assert opts.layer_rules == ["mlp=8b g64"]
    layers = {"model.layers.0.mlp.down_proj": "8b g64", "model.layers.0.self_attn.q_proj": "4b g64",
              "model.layers.10.mlp.up_proj": "3b g-1"}
    assert dynamic_of(layers, 4, 64) == {r"+:^model\.layers\.0\.mlp\.down_proj$": {"bits": 8, "group_size": 64},
                                         r"+:^model\.layers\.10\.mlp\.up_proj$": {"bits": 3, "group_size": -1}}
    assert dynamic_of({"a": "4b g64"}, 4, 64) is None and dynamic_of(None, 4, 64) is None
    # 576 × 1536 at 4b g64: 4 bits, 16/64 for the scales, 4/64 for the zero points, 32/1536 for g_idx
    gptq = Format("4b g64", "gptq").layer_bits(576, 1536)
    assert gptq == 576 * 1536 * 4 + 9 * 1536 * 16 + 9 * 1536 * 4 + 576 * 32
    assert gptq > Format("4b g64").layer_bits(576, 1536)
    search = SearchSpec.model_validate({"target": {"bits_per_weight": 4.5}, "space": [
        {"method": "gptq", "bits": [3, 4, 8], "group_size": [64], "mixed": True, "backend": "gptqmodel"},
        {"method": "gptq", "bits": [3, 4, 8], "group_size": [64], "mixed": True}]})
    plan, problems = plan_search(search, smollm_layers())
    assert problems == []
    by_entry = {i: b for i, o, b in plan.uniform if o["bits"] == 4}
    layers = smollm_layers()
    params = sum(la.params for la in layers)
    for i, layout in ((0, "gptq"), (1, "compressed-tensors")):
        assert by_entry[i] == pytest.approx(sum(Format("4b g64", layout).layer_bits(la.n_in, la.n_out)
                                                for la in layers) / params)
    assert by_entry[0] > by_entry[1] + 0.06  # the zero points and g_idx: GPTQ's 4b g64 is not 4.25
